"""Training checkpoints: Orbax composite (train state + data iterator state), async, kept by
policy, restored exactly and onto any mesh.

Owns: `Checkpointer` (save at an interval or on demand, restore the latest valid step into an
abstract target's shardings), and the layout below (`valid_steps`, `restore_params` and `load_trained`, which read a
checkpoint's parameters for exports, probes and base models, live with model loading in
`factflip.models.store`).
Must not: build models or data (it is handed an abstract state and an iterator).

Layout, readable with plain Orbax (`ocp.StandardCheckpointer().restore(".../state")`):
  WORKDIR/checkpoints/<step>/
    state/                       StandardCheckpointer pytree {step, params: {embed, final_norm,
                                 [lm_head], layers: {wq, ... [L, ...]}}, opt_state: optax state}
    data/process_<i>-of-<n>.json each process's input iterator state (grain's checkpoint handler)
    _CHECKPOINT_METADATA, commit_success.txt   written by Orbax when the step is complete
A step directory without commit_success.txt (a save cut off by a crash) is never restored: it is
renamed to <step>.incomplete with a warning, as is one whose restore fails (<step>.unreadable),
and the newest good step is used; nothing is deleted, and the step can be saved again.
"""

from __future__ import annotations

import os
import re
from typing import Any

import grain
import orbax.checkpoint as ocp

from factflip import distributed
from factflip.models.store import COMMIT_FILE, _warn, load_trained, restore_params, valid_steps  # noqa: F401  (re-exported)
from factflip.train.step import TrainState


def _set_aside(path: str, suffix: str) -> None:
  """Rename a step directory out of Orbax's way (process 0; nothing is deleted)."""
  if distributed.process_index() == 0 and os.path.isdir(path):
    target, n = f"{path}.{suffix}", 1
    while os.path.exists(target):
      target, n = f"{path}.{suffix}{n}", n + 1
    os.rename(path, target)
    _warn(f"{path}: moved to {target}")
  if distributed.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"factflip_set_aside_{os.path.basename(path)}")


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep` (0 = all) plus every
  `keep_period`-th step, writing in the background when `async_save`."""

  def __init__(self, directory: str, every: int, keep: int = 0, keep_period: int = 0,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    good = set(valid_steps(self.directory, warn=False))
    if os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if re.fullmatch(r"\d+", name) and int(name) not in good:
          _warn(f"{self.directory}/{name}: incomplete checkpoint (no {COMMIT_FILE}; the save "
                "was cut off); ignored")
          _set_aside(os.path.join(self.directory, name), "incomplete")
    opts = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def save(self, step: int, state: TrainState, data: Any, force: bool = False) -> bool:
    """Save if `step` is on the interval (or `force`); returns whether a save started."""
    if not (force or self.manager.should_save(step)) or step in self.manager.all_steps():
      return False  # (the directory is listed only when a save is due)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state: TrainState, data: Any = None, step: int | None = None
              ) -> tuple[int, TrainState] | None:
    """Restore `step` (default: the newest valid one; an unreadable one is skipped with a
    warning) into the shardings of `abstract_state`, and `data`'s iterator state in place
    (unless data is None). None when there is nothing to restore."""
    candidates = valid_steps(self.directory)
    if step is not None:
      if step not in candidates:
        raise FileNotFoundError(f"{self.directory}: no complete checkpoint at step {step} "
                                f"(complete: {candidates})")
      candidates = [step]
    for s in reversed(candidates):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data)
      args = ocp.args.Composite(**items)
      try:
        out = self.manager.restore(s, args=args)
      except Exception as e:
        if step is not None:
          raise
        _warn(f"{self.directory}/{s}: cannot be restored ({str(e)[:200]}); trying an older step")
        _set_aside(os.path.join(self.directory, str(s)), "unreadable")
        self.manager.reload()
        continue
      return s, out["state"]
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
