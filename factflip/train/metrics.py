"""Where training metrics go: `metrics.jsonl`, TensorBoard event files and a progress line.

Owns: `MetricsWriter` (one JSON object per logged step, appended and flushed; the same scalars
as TensorBoard events under WORKDIR/tensorboard; only process 0 writes), `Progress` (step, loss,
tokens/s, ETA) and `format_duration`.
Must not: touch devices (it is handed host floats).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from factflip import distributed


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsWriter:
  """metrics.jsonl rows and TensorBoard scalars. A resumed run truncates rows past the step it
  resumes from, so the file holds one row per logged step, as if the run had never stopped."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    self.active = distributed.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      self._truncate(resume_step)
    self.file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def _truncate(self, step: int) -> None:
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by a crash
          continue
        if row.get("step", 0) <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: (float(v) if not isinstance(v, str) else v)
                                 for k, v in scalars.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if not self.active:
      return
    self.file.close()
    if self.tb is not None:
      self.tb.close()


class Progress:
  """`step 120/600 | loss 3.214 | 41.2k tok/s | 8.4 steps/s | ETA 0:57`, from step times
  measured since the start (the first step's compile excluded once a second step is seen)."""

  def __init__(self, first_step: int, last_step: int):
    self.first, self.last = first_step, last_step
    self.t0 = None
    self.s0 = first_step

  def line(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> str:
    now = time.perf_counter()
    if self.t0 is None:  # the first measured step starts the clock (compile excluded)
      self.t0, self.s0 = now, step
    rate = (step - self.s0) / (now - self.t0) if now > self.t0 and step > self.s0 else 0.0
    eta = (self.last - step) / rate if rate else float("nan")
    tok = f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s < 1e6 else f"{tokens_per_s / 1e6:.2f}M"
    return (f"step {step}/{self.last} | loss {loss:.4f} | {tok} tok/s | {rate:.2f} steps/s | "
            f"ETA {format_duration(eta)}" + (f" | {extra}" if extra else ""))
