"""Evaluating every checkpoint of a training run: resumable per checkpoint, with progress and ETA.

Owns: `probe_models` (models in series through per-model probe functions: `CheckpointProbe`),
`probe_checkpoints` (the same over a run's checkpoints/ directory), which every study's probe
and eval stages and `factflip eval` (`evals.run`) call; `model_steps` (a model directory, or a
training workdir's checkpoints), `table_path` / `table_steps` (the per-model tables). Each
probe writes one table per model (`<name>_<step:06d>.csv`, atomically), so a stopped stage
resumes at the first model whose tables are missing.
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
from factflip.models.store import valid_steps


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
                if f.startswith(pre) and f.endswith(".csv")
                and f[len(pre):-4].removeprefix("-").isdigit())


def model_steps(model: str, step: int | None = None) -> list[tuple[int, str]]:
  """[(step, path to load)]: a model directory once (step −1); a training workdir (its
  model.json) at every valid checkpoint, or at `step` (−1 = the latest)."""
  if not os.path.exists(os.path.join(model, "model.json")):
    return [(-1, model)]
  steps = valid_steps(os.path.join(model, "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"{model}: a training workdir without a complete checkpoint")
  if step is not None:
    if step != -1 and step not in steps:
      raise ValueError(f"{model}: no checkpoint at step {step}; steps {steps}")
    steps = [steps[-1] if step == -1 else step]
  return [(s, os.path.join(model, "checkpoints", str(s))) for s in steps]


def probe_checkpoints(ckpt_dir: str, out: str, probes: list[CheckpointProbe],
                      load: Callable[[str], Any], log=print, label: str = "probe"
                      ) -> dict[str, Any]:
  """`probe_models` over every valid checkpoint of `ckpt_dir` (`<ckpt_dir>/<step>`)."""
  return probe_models([(s, os.path.join(ckpt_dir, str(s))) for s in valid_steps(ckpt_dir)],
                      out, probes, load, log, label)


def probe_models(models: list[tuple[int, str]], out: str, probes: list[CheckpointProbe],
                 load: Callable[[str], Any], log=print, label: str = "probe") -> dict[str, Any]:
  """Every model of `models` ((step, path) in order; `load(path)` loads one) through the
  probes whose table for it is missing; a model is loaded only when one is. Logs one line per
  model probed (`label`: model i/n, models/s, ETA over what is left). Returns
  {"checkpoints": n, "probed": probed now, "seconds": wall seconds}."""
  t0, done = time.time(), 0
  for i, (step, path) in enumerate(models):
    todo = [p for p in probes if p.when(i, step) and not os.path.exists(table_path(out, p.name,
                                                                                   step))]
    if not todo:
      continue                                 # probed before a stop
    model = load(path)
    for p in todo:
      write_csv(p.fn(model, step), table_path(out, p.name, step))
    done += 1
    rate = done / max(time.time() - t0, 1e-9)
    left = sum(1 for j, (s, _) in enumerate(models[i + 1:], i + 1)
               if any(p.when(j, s) for p in probes))
    log(f"    {label}: checkpoint {i + 1}/{len(models)} (step {step}), {rate:.2f} ckpt/s, "
        f"ETA {left / rate:.0f} s")
  return {"checkpoints": len(models), "probed": done, "seconds": round(time.time() - t0, 1)}
