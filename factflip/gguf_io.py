"""GGUF files (llama.cpp's format), read with ggml's own `gguf` package.

Owns: opening a file with errors that name it, its metadata as plain Python values, and its
tensors in numpy order, dequantised to float32 by `gguf.quants.dequantize` (every type that
package dequantises: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K- and IQ-quants), a block
of rows at a time, so a caller that needs one device's slice dequantises only those rows.
Must not: know model families or tensor names (`models/gguf.py`) or build tokenizers
(`data/tokenizer.py`); both sit on top of this module.

Opened files are kept (a few, keyed by path, size and modification time): the tokenizer and the
model of one GGUF read one parse of its header (~2 s for a 49k-token vocabulary).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_PLAIN = {"F32": np.float32, "F16": np.float16}


class GGUFError(ValueError):
  pass


def is_gguf(path: str) -> bool:
  """A file named *.gguf, or any file that starts with the GGUF magic."""
  if not os.path.isfile(path):
    return False
  if path.endswith(".gguf"):
    return True
  with open(path, "rb") as f:
    return f.read(4) == MAGIC


def open_gguf(path: str) -> GGUFFile:
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  st = os.stat(path)
  return _open(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: str, size: int, mtime_ns: int) -> GGUFFile:
  del size, mtime_ns    # the cache key: a rewritten file is opened again
  return GGUFFile(path)


@functools.cache
def dequantisable() -> tuple[str, ...]:
  """The quantised GGML types this `gguf` package dequantises: those whose one zero block
  `gguf.quants.dequantize` decodes (its public API; unknown types raise NotImplementedError)."""
  from gguf import quants
  from gguf.constants import GGML_QUANT_SIZES

  out = []
  for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
    if qtype.name in _PLAIN:
      continue
    try:
      quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, AssertionError):
      continue
    out.append(qtype.name)
  return tuple(sorted(out))


class GGUFFile:
  """One GGUF file: `get(key)` metadata, `names()`, `shape(name)`, `type_name(name)` and
  `read(name, rows)` tensors (float32, numpy order: [rows, columns] for a matrix)."""

  def __init__(self, path: str):
    from gguf import GGUFReader

    self.path = path
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic != MAGIC:
      raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    try:
      self._reader = GGUFReader(path, "r")
    except Exception as e:   # the reader fails with ValueError/IndexError/KeyError on bad bytes
      raise GGUFError(f"{path}: unreadable GGUF file, truncated or corrupt "
                      f"({type(e).__name__}: {e})") from e
    self._tensors = {t.name: t for t in self._reader.tensors}
    self._values: dict[str, Any] = {}

  # ---- metadata -------------------------------------------------------------------------------
  def __contains__(self, key: str) -> bool:
    return key in self._reader.fields

  def get(self, key: str, default: Any = None) -> Any:
    """The metadata value under `key` (str, int, float, bool or a list of them)."""
    if key not in self._reader.fields:
      return default
    if key not in self._values:
      self._values[key] = self._reader.fields[key].contents()
    return self._values[key]

  def require(self, key: str) -> Any:
    if key not in self._reader.fields:
      raise GGUFError(f"{self.path}: missing metadata key {key!r}")
    return self.get(key)

  # ---- tensors --------------------------------------------------------------------------------
  def names(self) -> list[str]:
    return list(self._tensors)

  def has_tensor(self, name: str) -> bool:
    return name in self._tensors

  def _tensor(self, name: str):
    if name not in self._tensors:
      raise GGUFError(f"{self.path}: no tensor {name!r}")
    return self._tensors[name]

  def shape(self, name: str) -> tuple[int, ...]:
    """numpy order (GGUF lists dimensions fastest-moving first)."""
    return tuple(int(n) for n in reversed(self._tensor(name).shape.tolist()))

  def type_name(self, name: str) -> str:
    return self._tensor(name).tensor_type.name

  def check_readable(self, name: str) -> None:
    """GGUFError unless `read` can turn this tensor into floats."""
    t = self._tensor(name)
    if t.tensor_type.name not in _PLAIN and t.tensor_type.name not in dequantisable():
      raise GGUFError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which "
                      "gguf.quants cannot dequantise; expected F32, F16, BF16 or a quantised "
                      f"type ({', '.join(dequantisable())})")

  def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
    """The tensor as float32 in numpy order, or only `rows` of its first axis (a slice or an
    index array); quantised blocks are decoded for those rows only."""
    from gguf import quants

    self.check_readable(name)
    t = self._tensor(name)
    raw = t.data if rows is None else t.data[rows]
    if t.tensor_type.name in _PLAIN:
      return np.asarray(raw, dtype=np.float32)
    return quants.dequantize(np.asarray(raw), t.tensor_type).astype(np.float32, copy=False)
