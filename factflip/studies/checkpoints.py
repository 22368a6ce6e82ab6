"""Probing every checkpoint of a training run: resumable per checkpoint, with progress and ETA.

Owns: `probe_checkpoints`, which any study's probe stage calls with its own per-checkpoint
probe functions; each writes one table per checkpoint (`<name>_<step:06d>.csv`, atomically),
so a stopped stage resumes at the first checkpoint whose tables are missing.
Must not: know what a probe measures.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from factflip.fileio import write_csv


@dataclasses.dataclass(frozen=True)
class CheckpointProbe:
  """`fn(model, step) -> DataFrame` written as `<name>_<step:06d>.csv`, at the checkpoints
  where `when(index, step)` holds (index: the checkpoint's position in the run, 0 = first)."""
  name: str
  fn: Callable[[Any, int], pd.DataFrame]
  when: Callable[[int, int], bool] = lambda i, step: True


def table_path(out: str, name: str, step: int) -> str:
  return os.path.join(out, f"{name}_{step:06d}.csv")


def table_steps(out: str, name: str) -> list[int]:
  """The checkpoint steps that have a `name` table in `out`, ascending."""
  pre = name + "_"
  return sorted(int(f[len(pre):-4]) for f in os.listdir(out)
                if f.startswith(pre) and f.endswith(".csv") and f[len(pre):-4].isdigit())


def probe_checkpoints(ckpt_dir: str, out: str, probes: list[CheckpointProbe],
                      load: Callable[[str], Any], log=print, label: str = "probe"
                      ) -> dict[str, Any]:
  """Every valid checkpoint of `ckpt_dir` (`<ckpt_dir>/<step>` loads through `load`) through
  the probes whose table for it is missing; the model is loaded only when one is. Logs one
  line per checkpoint probed (`label`: checkpoint i/n, checkpoints/s, ETA over what is left).
  Returns {"checkpoints": n, "probed": probed now, "seconds": wall seconds}."""
  from factflip.models.store import valid_steps
  steps = valid_steps(ckpt_dir)
  t0, done = time.time(), 0
  for i, step in enumerate(steps):
    todo = [p for p in probes if p.when(i, step) and not os.path.exists(table_path(out, p.name,
                                                                                   step))]
    if not todo:
      continue                                 # probed before a stop
    model = load(os.path.join(ckpt_dir, str(step)))
    for p in todo:
      write_csv(p.fn(model, step), table_path(out, p.name, step))
    done += 1
    rate = done / max(time.time() - t0, 1e-9)
    left = sum(1 for j, s in enumerate(steps[i + 1:], i + 1)
               if any(p.when(j, s) for p in probes))
    log(f"    {label}: checkpoint {i + 1}/{len(steps)} (step {step}), {rate:.2f} ckpt/s, "
        f"ETA {left / rate:.0f} s")
  return {"checkpoints": len(steps), "probed": done, "seconds": round(time.time() - t0, 1)}
