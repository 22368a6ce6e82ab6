"""The persistent compilation cache: XLA programs compiled once are kept on disk and loaded by
the next process that needs the same program (a study resumed, a notebook restarted, the next
`factflip` command, the tests' subprocesses).

Owns: `enable` (the one place factflip turns JAX's persistent cache on, and where), `directory`
(where it is or would be) and `DEFAULT_DIR`.
Must not: compile anything, or change what a program computes (a cached executable is the one
JAX would compile: the cache is keyed by the program, its shapes, the backend and the flags).

Where: `--compilation_cache=DIR` on the command line, else `$FACTFLIP_COMPILATION_CACHE`, else
JAX's own `$JAX_COMPILATION_CACHE_DIR` (set but empty: off), else `$XDG_CACHE_HOME/factflip/xla`
(`~/.cache/factflip/xla`). `off` (flag or variable) turns it off.
Programs that compile in under `MIN_COMPILE_S` (JAX's default second) are not written: the
large probe and training programs are where the first call's time goes.
"""

from __future__ import annotations

import os

import jax

OFF = ("off", "0", "none", "false")
MIN_COMPILE_S = 1.0             # JAX's default
DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(
    os.path.expanduser("~"), ".cache"), "factflip", "xla")


def directory(path: str | None = None, environ=os.environ) -> str | None:
  """The cache directory `enable(path)` would use, or None when the cache is off."""
  value = path or environ.get("FACTFLIP_COMPILATION_CACHE", "")
  if not value and "JAX_COMPILATION_CACHE_DIR" in environ:    # JAX's own: empty = off
    value = environ["JAX_COMPILATION_CACHE_DIR"] or "off"
  if value.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(value)) if value else DEFAULT_DIR


def enable(path: str | None = None) -> str | None:
  """Turn JAX's persistent compilation cache on in `directory(path)` (created if missing), or
  leave it off; returns the directory or None. Call before the first compile; calling again
  with another directory moves later writes there."""
  where = directory(path)
  if where is None:
    return None
  os.makedirs(where, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", where)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return where
