"""Safetensors files without torch: a memory-mapped, validating reader and a streaming writer.

Owns: the byte format (8-byte little-endian header length, JSON header, raw little-endian data),
sharded checkpoints (`model.safetensors.index.json`), and atomic writes.
Must not: know parameter names or model families (that is `hf.py`).

Reading maps the file and slices it, so a caller that needs one device's shard of one tensor
touches only those bytes. Every structural problem (truncated file, bad header, offsets out of
range, unknown dtype) raises `SafetensorsError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from factflip.fileio import atomic_path, read_json, write_json

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """One .safetensors file: `keys()`, `shape(name)`, `dtype(name)`, `read(name, index)`."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes; expected an "
                                 "8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
          raise SafetensorsError(f"{path}: corrupt safetensors header length {n} (file has "
                                 f"{size} bytes)")
        header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise SafetensorsError(f"{path}: corrupt safetensors header, not valid JSON ({e})") from e
    except OSError as e:
      raise SafetensorsError(f"{path}: cannot read safetensors file ({e})") from e
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = {}
    data_len = size - self._start
    for name, e in header.items():
      if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise SafetensorsError(f"{path}: tensor {name!r}: header entry lacks dtype/shape/"
                               f"data_offsets: {e!r}")
      if e["dtype"] not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {e['dtype']!r}; "
                               f"expected one of {sorted(_DTYPES)}")
      dtype, shape = _DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
      begin, end = (int(o) for o in e["data_offsets"])
      want = math.prod(shape) * dtype.itemsize
      if end - begin != want or begin < 0 or end > data_len:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) do not hold a {e['dtype']} "
            f"{list(shape)} tensor ({want} bytes) inside the {data_len}-byte data section "
            "(file truncated or corrupt)")
      self._entries[name] = (dtype, shape, begin)
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    """The tensor (or `tensor[index]`: slices, the first may be an index array, a fused
    tensor's rows) as a new numpy array; reads only the bytes needed."""
    if name not in self._entries:
      raise SafetensorsError(f"{self.path}: no tensor {name!r}")
    dtype, shape, begin = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    count = math.prod(shape)
    raw = self._mmap[self._start + begin:self._start + begin + count * dtype.itemsize]
    arr = raw.view(dtype).reshape(shape)
    return np.array(arr if index is None else arr[index])


class CheckpointTensors:
  """All tensors of an HF checkpoint directory: one file or a sharded index."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.exists(index_path):
      try:
        weight_map = read_json(index_path)["weight_map"]
      except (KeyError, TypeError) as e:
        raise SafetensorsError(f"{index_path}: expected JSON with a 'weight_map' object "
                               f"({type(e).__name__}: {e})") from e
      for name, fname in weight_map.items():
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
          raise SafetensorsError(f"{index_path}: tensor {name!r} maps to missing file {path}")
        self._where[name] = path
    elif os.path.exists(single):
      for name in self._open(single).keys():
        self._where[name] = single
    else:
      raise FileNotFoundError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}; expected an HF "
                              "checkpoint directory with safetensors weights")

  def _open(self, path: str) -> SafetensorsFile:
    if path not in self._files:
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def keys(self) -> list[str]:
    return list(self._where)

  def file_of(self, name: str) -> SafetensorsFile:
    f = self._open(self._where[name])
    if name not in f.keys():
      raise SafetensorsError(f"{f.path}: index lists tensor {name!r} but the file lacks it")
    return f

  def path_of(self, name: str | None) -> str:
    """The file holding tensor `name` (None: the checkpoint directory), for messages."""
    return self.directory if name is None else self.file_of(name).path

  def shape(self, name: str) -> tuple[int, ...]:
    return self.file_of(name).shape(name)

  def read(self, name: str, index=None) -> np.ndarray:
    return self.file_of(name).read(name, index)


# ---- writing ----------------------------------------------------------------------------------
TensorSpec = tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def _header(specs: Mapping[str, TensorSpec], metadata: dict | None) -> tuple[bytes, int]:
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, (shape, dtype, _) in specs.items():
    n = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return raw, offset


def write_file(path: str, specs: Mapping[str, TensorSpec], metadata: dict | None = None) -> None:
  """Write tensors one at a time (each `produce()` is called once, in order) to `path`, atomically."""
  header, _ = _header(specs, metadata)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for name, (shape, dtype, produce) in specs.items():
      arr = np.ascontiguousarray(produce(), dtype=dtype)
      if arr.shape != tuple(shape):
        raise SafetensorsError(f"{path}: tensor {name!r} produced shape {arr.shape}, "
                               f"declared {tuple(shape)}")
      f.write(arr.tobytes())


def write_checkpoint(directory: str, specs: Mapping[str, TensorSpec],
                     max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[str]:
  """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when the tensors
  exceed `max_shard_bytes`. Returns the files written."""
  shards: list[dict[str, TensorSpec]] = [{}]
  size = 0
  total = 0
  for name, spec in specs.items():
    n = math.prod(spec[0]) * np.dtype(spec[1]).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = spec
    size += n
    total += n
  meta = {"format": "pt", **(metadata or {})}
  if len(shards) == 1:
    path = os.path.join(directory, SINGLE_NAME)
    write_file(path, shards[0], meta)
    stale = os.path.join(directory, INDEX_NAME)
    if os.path.exists(stale):
      os.remove(stale)
    return [path]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fname, shard in zip(names, shards):
    write_file(os.path.join(directory, fname), shard, meta)
    weight_map.update({k: fname for k in shard})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  write_json(os.path.join(directory, INDEX_NAME), index)
  return [os.path.join(directory, n) for n in names] + [os.path.join(directory, INDEX_NAME)]
