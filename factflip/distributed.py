"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Owns: `initialize` (the one place a factflip process joins a multi-process job) and
`should_initialize` (when "auto" does).
Must not: touch devices before initialising (JAX must not have started its backends).

On Cloud TPU pods and under SLURM (`srun`), JAX reads the coordinator, process count and index
from the environment, so `jax.distributed.initialize()` needs no arguments; elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (the same on every process but
the id). CPU-only jobs use gloo collectives.
"""

from __future__ import annotations

import os

import jax


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
