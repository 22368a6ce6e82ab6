"""Study stages that know the config they were computed with.

Owns: `Stage` (a named unit of a study's work with its own output directory, the resolved
config keys it reads and the fingerprints of the stages it consumes), `fingerprint`,
`config_keys` (a config's resolved values under some key prefixes, flattened),
`Stage.status` (reuse / new / resume / redo, with the keys that changed), `Stage.build` (the
directory to write into; DONE last; a redo replaces the old outputs atomically) and
`describe_plan`; `StageSpec` (a kind of stage: the cell axes it runs over, how its Stage is
made and built, who computes it on many hosts: MAIN, SHARED, MIRROR), `memo` (a study's
Stage-making methods, once per arguments), `train_stage` (a training stage's run) and the
driver's errors (`StudyError`, `Stopped`).
Must not: know any study's stages (studies list their own) or run models.

The fingerprint rule: fingerprint = sha256 of (the stage's own keys and values, the upstream
stages' fingerprints), 16 hex digits. A stage's DONE record holds its fingerprint and keys; a
stage whose wanted fingerprint differs from its DONE record's is redone, and since every
downstream stage includes it among its upstream fingerprints, so is everything downstream.

Atomic redo: a stage being redone writes into `<dir>.redo` (its STAGE.json says for which
fingerprint, so a stopped redo resumes there); only when it is complete is `<dir>` replaced
by it (`<dir>` -> `<dir>.old`, `<dir>.redo` -> `<dir>`, `<dir>.old` removed). A stop at any
point leaves the old outputs or the new ones, never a mix. A first run (no `<dir>` yet)
writes in place and resumes in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from factflip.fileio import read_json, write_json

DONE, STARTED = "DONE", "STAGE.json"


def _plain(v):
  if hasattr(v, "to_dict"):
    v = v.to_dict()
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, list | tuple):
    return [_plain(x) for x in v]
  return v


def config_keys(config, prefixes: Sequence[str]) -> dict[str, Any]:
  """The resolved values of `config` (a ConfigDict or dict) under each dotted prefix,
  flattened to {"cpt.optim.lr": 0.001, ...}. A prefix naming a leaf gives that leaf."""
  out: dict[str, Any] = {}

  def walk(v, key):
    if isinstance(v, dict):
      for k in sorted(v):
        walk(v[k], f"{key}.{k}")
    else:
      out[key] = v
  root = _plain(config)
  for prefix in prefixes:
    node = root
    for part in prefix.split("."):
      node = node[part]
    walk(node, prefix)
  return out


def _remove(path: str) -> None:
  """A replaced stage directory, or the link that stood for it (a suite links a stage equal to
  another study's: a redo replaces the link, never the other study's outputs)."""
  if os.path.islink(path):
    os.unlink(path)
  else:
    shutil.rmtree(path)


def fingerprint(keys: dict[str, Any], upstream: Sequence[str] = ()) -> str:
  blob = json.dumps({"keys": _plain(keys), "upstream": list(upstream)}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Stage:
  """One unit of work: `name` (for people: "cpt tiny-0.5m seed0 p1.00"), `path` (its output
  directory), `keys` (the resolved config values it reads), `upstream` (the fingerprints of
  the stages whose outputs it reads)."""
  name: str
  path: str
  keys: dict[str, Any]
  upstream: tuple[str, ...] = ()
  info: dict[str, Any] = dataclasses.field(default_factory=dict)   # added to DONE by the caller

  @property
  def fp(self) -> str:
    return fingerprint(self.keys, self.upstream)

  @property
  def redo_path(self) -> str:
    return self.path + ".redo"

  def _record(self, path: str, name: str) -> dict[str, Any] | None:
    f = os.path.join(path, name)
    if not os.path.exists(f):
      return None
    try:
      return read_json(f)
    except (OSError, ValueError):  # a record cut off mid-write counts as none
      return None

  def _recover(self) -> None:
    """Finish a swap a stop interrupted: `<dir>` gone but a complete `<dir>.redo` there."""
    if self._live() == self.redo_path:
      os.rename(self.redo_path, self.path)
    if os.path.lexists(self.path + ".old"):
      _remove(self.path + ".old")

  def _live(self) -> str:
    """Where the stage's current outputs are: `<dir>`, or `<dir>.redo` when a stop came
    between the two renames of a swap (`build` finishes it)."""
    if not os.path.exists(self.path) and os.path.isdir(self.redo_path) and self._record(
        self.redo_path, DONE) is not None:
      return self.redo_path
    return self.path

  def status(self) -> tuple[str, list[str]]:
    """("reuse" | "new" | "resume" | "redo", what changed: "KEY: old -> new" lines, or
    "inputs" when only upstream stages changed). Reads only: nothing on disk changes."""
    live = self._live()
    done = self._record(live, DONE)
    if done is not None and done.get("fingerprint") == self.fp:
      return "reuse", []
    if done is None and not os.path.exists(live):
      return "new", []
    if done is None:
      started = self._record(live, STARTED)
      if started is not None and started.get("fingerprint") == self.fp:
        return "resume", []
    old = (done or self._record(live, STARTED) or {})
    before = old.get("keys")
    if before is None:
      return "redo", ["(no fingerprint recorded: computed before stages had one)"]
    changed = [f"{k}: {before.get(k, '(absent)')!r} -> {self.keys.get(k, '(absent)')!r}"
               for k in sorted(set(before) | set(self.keys))
               if before.get(k, "(absent)") != _plain(self.keys.get(k, "(absent)"))]
    return "redo", changed or ["inputs (an upstream stage changed)"]

  @contextlib.contextmanager
  def build(self) -> Iterator[str]:
    """The directory to write this stage's outputs into; on a clean exit its DONE record
    (fingerprint, keys, upstream, `info`) is written last and a redo replaces `path`.
    Yields None when the stage is reused (its outputs are current)."""
    self._recover()
    state, _ = self.status()
    if state == "reuse":
      yield None
      return
    if state in ("new", "resume"):
      target = self.path
    else:
      target = self.redo_path
      started = self._record(target, STARTED)
      if started is None or started.get("fingerprint") != self.fp:
        shutil.rmtree(target, ignore_errors=True)
    if state != "resume" and os.path.exists(target) and self._record(target, STARTED) is None:
      shutil.rmtree(target)                      # partial outputs of an unknown config
    os.makedirs(target, exist_ok=True)
    record = {"stage": self.name, "fingerprint": self.fp, "keys": _plain(self.keys),
              "upstream": list(self.upstream)}
    write_json(os.path.join(target, STARTED), record)
    self.info = {}
    yield target
    write_json(os.path.join(target, DONE), dict(record, **self.info))
    if target != self.path:
      os.rename(self.path, self.path + ".old")
      os.rename(target, self.path)
      _remove(self.path + ".old")


def describe_plan(stages: Sequence[Stage]) -> tuple[list[str], dict[str, int]]:
  """Lines saying which stages will be computed and why, and counts per status."""
  lines, counts = [], {"reuse": 0, "new": 0, "resume": 0, "redo": 0}
  for s in stages:
    state, changed = s.status()
    counts[state] += 1
    if state == "reuse":
      continue
    lines.append(f"  {state:<6} {s.name}")
    lines += [f"           {c}" for c in changed[:12]]
    if len(changed) > 12:
      lines.append(f"           ... and {len(changed) - 12} more keys")
  return lines, counts


# ---- kinds of stage, and how a study's driver fails -------------------------------------
class StudyError(RuntimeError):
  """A study cannot go on as configured (e.g. the base model does not know the targets)."""


class Stopped(RuntimeError):
  """A training stage stopped by SIGTERM with its checkpoint saved (a preemption, or SLURM's
  signal before the time limit): the study stops there, the stage not DONE; the same command
  resumes it from that checkpoint."""


def train_stage(config, out: str, source: str):
  """A study's training stage: `train.loop.train` into `out` (every process of a multi-host run
  calls it: a SHARED stage); Stopped when SIGTERM stopped it, so no DONE is written for it."""
  from factflip.train.loop import train
  res = train(config, out, quiet=False, source=source)
  if res.preempted:
    raise Stopped(f"{source}: stopped by SIGTERM at step {res.step} (checkpoint saved); run the "
                  "same command again to resume")
  return res


def memo(method):
  """Cache a Stage-making method per object and arguments (positional or keyword: the same
  call either way): a stage's fingerprint is computed once per study object, not again for
  every downstream stage that includes it. Sound because the study's config is frozen."""
  sig = inspect.signature(method)

  @functools.wraps(method)
  def wrapper(self, *args, **kw):
    cache = self.__dict__.setdefault("_memo", {})
    bound = sig.bind(self, *args, **kw)
    bound.apply_defaults()
    key = (method.__name__, tuple(bound.arguments.items())[1:])
    if key not in cache:
      cache[key] = method(self, *args, **kw)
    return cache[key]
  return wrapper


# who computes a stage in a multi-process run (StageSpec.hosts)
MAIN = "main"        # process 0; the others wait for it
SHARED = "shared"    # every process, into the stage's directory (a multi-host training job)
MIRROR = "mirror"    # every process (probes over every process's devices); process 0's files kept


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A kind of stage. `over`: the cell axes it runs over (() = once per study); `stage(**cell)`
  -> its Stage; `build(out, **cell)` -> the info for DONE (computes into `out`);
  `then(**cell)`: after the stage, built or reused (process 0 only); `hosts`: who computes it
  in a multi-process run (MAIN, SHARED or MIRROR)."""
  name: str
  over: tuple[str, ...]
  stage: Callable[..., Stage]
  build: Callable[..., dict[str, Any] | None]
  then: Callable[..., Any] | None = None
  hosts: str = MAIN
