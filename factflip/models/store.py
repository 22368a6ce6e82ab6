"""factflip model directories and the one loader for every model path.

Owns: the factflip model format (`factflip_model.json` with the ModelConfig + `params/`, an Orbax
checkpoint of the parameter pytree) and `load_model`, which dispatches between it and HF
directories.
Must not: know HF tensor names (`hf.py`) or training state (training checkpoints hold a model
directory's `params` tree inside their train state; see `factflip.train`).

Layout, readable with plain Orbax:
  DIR/factflip_model.json   ModelConfig.to_dict()
  DIR/params/               ocp.StandardCheckpointer tree: {embed, final_norm, [lm_head],
                            layers: {wq, wk, ... each [L, ...]}}
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from factflip import sharding as sharding_lib
from factflip.fileio import read_json, write_json
from factflip.models.config import ModelConfig
from factflip.models.hf import load_hf
from factflip.models.transformer import Transformer

CONFIG_NAME = "factflip_model.json"


def save_model(model: Transformer, directory: str) -> None:
  """Save as a factflip model directory (Orbax params + config); the params write is atomic."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, "params"), model.params(), force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    write_json(os.path.join(directory, CONFIG_NAME), model.cfg.to_dict())


def read_model_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_NAME)
  return ModelConfig.from_dict(read_json(path), path)


def load_model(path: str, dtype: str = "float32", compute_dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Load an HF directory (config.json + safetensors), a factflip model directory, or a
  training workdir / checkpoint step (its latest / that step's parameters).

  Parameters are stored in `dtype` and computed in `compute_dtype` (default: `dtype`). With a
  `mesh`, every parameter is placed in its logical-axis sharding as it is read (no full host
  copy per device); without one, on the first local device.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory; expected an HF model directory or a "
                            f"factflip model directory ({CONFIG_NAME})")
  if os.path.exists(os.path.join(path, CONFIG_NAME)):
    return _load_native(path, dtype, compute_dtype, mesh)
  if os.path.exists(os.path.join(path, "model.json")) or os.path.basename(
      os.path.dirname(os.path.abspath(path))) == "checkpoints":
    from factflip.train.checkpoint import load_trained  # a training run (or one of its steps)
    model, _ = load_trained(path, mesh=mesh, dtype=dtype)
    return model if compute_dtype in (None, dtype) else Transformer(
        model.cfg.replace(dtype=compute_dtype), params=model.params())
  if os.path.exists(os.path.join(path, "config.json")):
    return load_hf(path, dtype, compute_dtype, mesh)
  raise FileNotFoundError(f"{path}: neither config.json (HF) nor {CONFIG_NAME} (factflip) found")


def _load_native(path, dtype, compute_dtype, mesh) -> Transformer:
  cfg = read_model_config(path).replace(param_dtype=dtype, dtype=compute_dtype or dtype)
  shapes = cfg.param_shapes()
  shardings = sharding_lib.param_shardings(cfg, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh), shapes,
                        shardings, is_leaf=lambda x: isinstance(x, tuple))
  params_dir = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{path}: has {CONFIG_NAME} but no params/ checkpoint")
  try:
    params = ocp.StandardCheckpointer().restore(params_dir, target)
  except ValueError as e:
    raise ValueError(f"{params_dir}: parameters do not match {path}/{CONFIG_NAME}: {e}") from e
  return Transformer(cfg, params=params)
