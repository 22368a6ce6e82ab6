"""What runs beside the training loop: the factual-integrity monitor (`train.monitor`) and a
study's probes, through one interface.

Owns: `Callback` (start, due, observe, stop, close) and `AtEvals` (a function run at every
evaluation step).
Must not: know what a callback measures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Callback:
  """What runs beside the loop (the factual-integrity monitor, a study's probe): `start(step,
  params)` once, at the starting step, may return scalars to log for it; after each step the
  loop calls `observe(step, params)` where `due(step, last)` holds and logs what it returns;
  `stop` set (a reason) ends the run at that step with a checkpoint; `close()` at the end."""
  stop: str | None = None

  def start(self, step: int, params) -> dict[str, float] | None:
    return None

  def due(self, step: int, last: int) -> bool:
    return False

  def observe(self, step: int, params) -> dict[str, float] | None:
    return None

  def close(self) -> None:
    pass


class AtEvals(Callback):
  """A function (step, params) -> scalars (or None) run at every evaluation step
  (`eval_every` and the run's last step)."""

  def __init__(self, fn: Callable[[int, Any], dict[str, float] | None], every: int):
    self.fn, self.every = fn, every

  def due(self, step: int, last: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == last)

  def observe(self, step: int, params) -> dict[str, float] | None:
    return self.fn(step, params)
