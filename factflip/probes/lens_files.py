"""Tuned lenses in AlignmentResearch's `tuned-lens` layout, read and written without torch.

Owns: `save_lens_dir` (a `TunedLens` as a tuned-lens directory: `config.json` with
TunedLensConfig's fields and `params.safetensors`, the translators' state dict), `load_lens_dir`
(a tuned-lens directory, its `params.pt` or `params.safetensors`, as a `TunedLens`) and
`read_torch_state_dict` (a `torch.save`d dict of tensors as numpy arrays, unpickling only
what such a file holds).
Must not: train lenses or apply them (`probes.tuned_lens`), import torch.

The layout (tuned_lens.nn.lenses.TunedLens.save): `config.json` = {base_model_name_or_path,
d_model, num_hidden_layers, bias, base_model_revision, unembed_hash, lens_type:
"linear_tuned_lens"}, and the `torch.nn.ModuleList` of `num_hidden_layers` Linear(d_model,
d_model) translators' state dict: "<i>.weight" [D, D] (torch's [out, in]) and "<i>.bias" [D].
Translator i maps hidden_states[i] (i = 0: the embedding output) to h + W_i h + b_i, then the
model's final norm and unembedding: ours with weight[i] = W_i.T (`probes.tuned_lens`). A
tuned-lens install reads `params.pt`; `params.safetensors` holds the same state dict
(`torch.save(safetensors.torch.load_file("params.safetensors"), "params.pt")` converts it).
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from factflip.fileio import read_json, write_json
from factflip.models import safetensors_io as st
from factflip.probes.tuned_lens import TunedLens

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "params.safetensors"
TORCH_NAME = "params.pt"
LENS_TYPE = "linear_tuned_lens"

# torch storage classes -> numpy dtypes (what a state dict of float / int tensors uses)
_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
             "LongStorage": np.int64, "IntStorage": np.int32, "BoolStorage": np.bool_,
             "BFloat16Storage": None}


def _rebuild_tensor(storage, offset, size, stride, *unused):
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save file's data.pkl into numpy, refusing every class a state dict of
  tensors does not need (no arbitrary code from the file)."""

  def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(fh)
    self.archive, self.prefix, self.path = archive, prefix, path

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch", "Size"):
      return tuple
    if module == "torch" and name in _STORAGES:
      if _STORAGES[name] is None:
        raise pickle.UnpicklingError(f"{self.path}: {name} tensors are not read (no numpy "
                                     "bfloat16 here); save the lens in float32")
      return _STORAGES[name]
    raise pickle.UnpicklingError(f"{self.path}: holds {module}.{name}; expected a state dict of "
                                 "tensors (torch.save of module.state_dict())")

  def persistent_load(self, pid):
    kind, dtype, key, _location, numel = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"{self.path}: persistent id {kind!r}; expected 'storage'")
    raw = self.archive.read(f"{self.prefix}/data/{key}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=int(numel))


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `torch.save`d dict of tensors (the zip format of torch >= 1.6) as {name: numpy array},
  without torch."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a torch.save zip archive (the legacy format is not read)")
  with zipfile.ZipFile(path) as archive:
    pkls = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][:-len("/data.pkl")]
    order = f"{prefix}/byteorder"
    if order in archive.namelist() and archive.read(order).decode().strip() != "little":
      raise ValueError(f"{path}: big-endian tensors are not read")
    with archive.open(pkls[0]) as fh:
      state = _StateDictUnpickler(fh, archive, prefix, path).load()
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError(f"{path}: expected a dict of tensors")
  return dict(state)


def save_lens_dir(lens: TunedLens, directory: str, base_model_name_or_path: str = "",
                  base_model_revision: str | None = None) -> str:
  """Write `lens` as a tuned-lens directory (`config.json`, `params.safetensors`; each written
  to a temporary path and renamed). Returns the directory."""
  os.makedirs(directory, exist_ok=True)
  L, D = lens.n_layers, lens.d_model
  weight, bias = np.asarray(lens.weight, np.float32), np.asarray(lens.bias, np.float32)
  specs = {}
  for i in range(L):
    w, b = np.ascontiguousarray(weight[i].T), bias[i]
    specs[f"{i}.weight"] = ((D, D), np.float32, lambda w=w: w)
    specs[f"{i}.bias"] = ((D,), np.float32, lambda b=b: b)
  st.write_file(os.path.join(directory, SAFETENSORS_NAME), specs, {"format": "pt"})
  write_json(os.path.join(directory, CONFIG_NAME), {
      "base_model_name_or_path": base_model_name_or_path, "d_model": int(D),
      "num_hidden_layers": int(L), "bias": True, "base_model_revision": base_model_revision,
      "unembed_hash": None, "lens_type": LENS_TYPE})
  return directory


def _config(path: str) -> dict[str, Any]:
  cfg = read_json(path)
  for key, kind in (("d_model", int), ("num_hidden_layers", int)):
    if not isinstance(cfg.get(key), kind):
      raise ValueError(f"{path}: field {key!r} is {cfg.get(key)!r}; expected an integer")
  if cfg.get("lens_type", LENS_TYPE) != LENS_TYPE:
    raise ValueError(f"{path}: field 'lens_type' is {cfg['lens_type']!r}; expected "
                     f"{LENS_TYPE!r}")
  return cfg


def load_lens_dir(directory: str, model=None) -> TunedLens:
  """A tuned-lens directory as a `TunedLens` (`params.safetensors`, else `params.pt`). The
  vocabulary comes from `model` (a Transformer or ModelConfig: the lens is then checked to fit
  it); without one it is 0."""
  cfg = _config(os.path.join(directory, CONFIG_NAME))
  L, D = cfg["num_hidden_layers"], cfg["d_model"]
  path = os.path.join(directory, SAFETENSORS_NAME)
  if os.path.exists(path):
    f = st.SafetensorsFile(path)
    state = {k: f.read(k) for k in f.keys()}
  elif os.path.exists(os.path.join(directory, TORCH_NAME)):
    path = os.path.join(directory, TORCH_NAME)
    state = read_torch_state_dict(path)
  else:
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} or {TORCH_NAME}")
  weight = np.zeros((L, D, D), np.float32)
  bias = np.zeros((L, D), np.float32)
  for i in range(L):
    for name, shape in ((f"{i}.weight", (D, D)), (f"{i}.bias", (D,))):
      if name not in state:
        raise ValueError(f"{path}: no tensor {name!r} (config.json has num_hidden_layers {L})")
      if tuple(state[name].shape) != shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {list(state[name].shape)}; "
                         f"expected {list(shape)} (d_model {D})")
    weight[i] = np.asarray(state[f"{i}.weight"], np.float32).T
    bias[i] = np.asarray(state[f"{i}.bias"], np.float32)
  vocab = 0 if model is None else (model.cfg if hasattr(model, "cfg") else model).vocab_size
  lens = TunedLens(jnp.asarray(weight), jnp.asarray(bias), int(vocab))
  if model is not None:
    lens.check_fits(model, directory)
  return lens
