"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Owns: `initialize` (the one place a factflip process joins a multi-process job),
`should_initialize` (when "auto" does), `alone` (run by this process only: `process_index`,
`process_count` and `devices` then describe a one-process job) and `Hosts` (how the processes of a study agree: process
0 decides and publishes, the others wait for it with a timeout that names what they waited for;
a failure on any process is published so the waiting ones stop with its message).
Must not: touch devices before initialising (JAX must not have started its backends), or know
what a study computes.

On Cloud TPU pods and under SLURM (`srun`), JAX reads the coordinator, process count and index
from the environment, so `jax.distributed.initialize()` needs no arguments; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (the same on every process but
the id). CPU-only jobs use gloo collectives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time

import jax

ERROR_KEY = "factflip/error"
_SEQ = itertools.count(1)   # share/barrier keys in call order (the same on every process)
_ALONE = [False]


@contextlib.contextmanager
def alone():
  """Inside: this process runs work the others do not (a study's stage computed by process 0
  only), so factflip's code that would wait for the other processes or span their devices acts
  as a one-process job: `process_index()` 0, `process_count()` 1, `devices()` this process's.
  Orbax refuses to save one process's arrays in a multi-process job, so work that trains runs
  on every process, never alone (reading a checkpoint onto this process's devices is fine:
  `models.store.restore_params`)."""
  before = _ALONE[0]
  _ALONE[0] = jax.process_count() > 1
  try:
    yield
  finally:
    _ALONE[0] = before


def process_index() -> int:
  return 0 if _ALONE[0] else jax.process_index()


def process_count() -> int:
  return 1 if _ALONE[0] else jax.process_count()


def devices() -> list:
  """The devices a job spans: every process's, or this process's inside `alone`."""
  return jax.local_devices() if _ALONE[0] else jax.devices()


class HostError(RuntimeError):
  """Another process failed, or did not arrive within the timeout (the message names where)."""


def should_initialize(mode: str, coordinator_address: str | None, environ=os.environ) -> bool:
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}; expected auto, on or off")
  if mode != "auto":
    return mode == "on"
  if coordinator_address:
    return True
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
    return True
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Join the multi-process job if there is one; returns whether it did."""
  if not should_initialize(mode, coordinator_address):
    return False
  if coordinator_address and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by CPU devices only
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


class Hosts:
  """The processes of one job, as a study driver sees them: `index`, `count`, `main` (process
  0: it decides and writes), `share` (process 0's value on every process), `on_main` (run on
  process 0, the others wait), `barrier` (every process has arrived) and `fail` (publish this
  process's failure to the waiting ones).

  Every process must call `share` and `barrier` at the same points in the same order (they
  are numbered in call order across every Hosts object of the process, as collectives are).
  A wait longer than `timeout_s` raises HostError naming what was awaited ("stage 'cpt
  tiny-0.5m seed0 p1.00'"); a failure another process published raises HostError with its
  message. With one process every call returns at once."""

  POLL_MS = 2000

  def __init__(self, timeout_s: float = 7200.0):
    self.index, self.count = jax.process_index(), jax.process_count()
    self.timeout_s = float(timeout_s)

  @property
  def main(self) -> bool:
    return self.index == 0

  @property
  def many(self) -> bool:
    return self.count > 1

  @staticmethod
  def _client():
    from jax._src import distributed
    return distributed.global_state.client

  @staticmethod
  def _next() -> str:
    return f"factflip/{next(_SEQ)}"

  def _peer_error(self) -> str | None:
    try:
      return self._client().key_value_try_get(ERROR_KEY)
    except jax.errors.JaxRuntimeError:  # NOT_FOUND: nobody failed
      return None

  def share(self, what: str, value: str = "") -> str:
    """Process 0's `value` (a string), returned on every process; the others wait for it."""
    key = self._next()
    if not self.many:
      return value
    client = self._client()
    if self.main:
      client.key_value_set(key, value)
      return value
    deadline = time.time() + self.timeout_s
    while True:
      try:
        return client.blocking_key_value_get(key, self.POLL_MS)
      except jax.errors.JaxRuntimeError as e:  # DEADLINE_EXCEEDED: not yet
        err = self._peer_error()
        if err is not None:
          raise HostError(err) from None
        if time.time() > deadline:
          raise HostError(self._late(what)) from e

  def on_main(self, what: str, fn):
    """`fn()` on process 0 (None on the others); every process returns once it is done, or
    stops with its error (HostError on the others)."""
    value = None
    if self.main:
      try:
        value = fn()
      except BaseException as e:
        self.fail(what, e)
        raise
    self.share(what, "done")
    return value

  def barrier(self, what: str) -> None:
    """Wait until every process reaches this point (at most timeout_s)."""
    key = self._next()
    if not self.many:
      return
    try:
      self._client().wait_at_barrier(key, int(self.timeout_s * 1000))
    except jax.errors.JaxRuntimeError as e:
      err = self._peer_error()
      raise HostError(err or self._late(what) + f" ({type(e).__name__}: {e})") from None

  def _late(self, what: str) -> str:
    return (f"process {self.index} of {self.count} waited {self.timeout_s:.0f} s at {what} "
            "and the other processes did not arrive (one is stuck or died: see its log; a "
            "stage longer than that needs a larger --config.barrier_timeout_s)")

  def fail(self, what: str, error: BaseException) -> None:
    """Publish this process's failure at `what` (the first one published is kept)."""
    if not self.many:
      return
    with contextlib.suppress(Exception):     # another process published first
      self._client().key_value_set(
          ERROR_KEY, f"process {self.index} of {self.count} failed at {what}: "
          f"{type(error).__name__}: {error}")
