"""factflip model directories and the one loader for every model path.

Owns: the factflip model format (`factflip_model.json` with the ModelConfig + `params/`, an Orbax
checkpoint of the parameter pytree) and `load_model`, which dispatches between it, HF
directories and GGUF files.
Also the parameters of training runs: `load_trained` (a training workdir or one of its
checkpoint steps; `valid_steps`, `restore_params`), so one dispatch loads every model path.
Must not: know HF tensor names (`hf.py`) or write training state (training checkpoints hold a
model directory's `params` tree inside their train state; `factflip.train.checkpoint` writes
them).

Layout, readable with plain Orbax:
  DIR/factflip_model.json   ModelConfig.to_dict()
  DIR/params/               ocp.StandardCheckpointer tree: {embed, final_norm, [lm_head],
                            layers: {wq, wk, ... each [L, ...]}}
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from factflip import sharding as sharding_lib
from factflip.fileio import read_json, write_json
from factflip.gguf_io import is_gguf
from factflip.models.config import ModelConfig
from factflip.models.hf import load_hf
from factflip.models.transformer import Transformer

CONFIG_NAME = "factflip_model.json"
COMMIT_FILE = "commit_success.txt"   # Orbax writes it when a training checkpoint is complete
log = logging.getLogger("factflip")


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


def model_config(path: str) -> ModelConfig:
  """The ModelConfig of anything `load_model` opens, without reading parameters."""
  if is_gguf(path):
    from factflip.models.gguf import read_gguf_config
    return read_gguf_config(path)
  if os.path.exists(os.path.join(path, CONFIG_NAME)):
    return read_model_config(path)
  run = path
  if os.path.basename(os.path.dirname(os.path.abspath(path))) == "checkpoints":
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.exists(os.path.join(run, "model.json")):
    return ModelConfig.from_dict(read_json(os.path.join(run, "model.json")),
                                 os.path.join(run, "model.json"))
  if os.path.exists(os.path.join(path, "config.json")):
    from factflip.models.hf import read_hf_config
    return read_hf_config(path)
  raise FileNotFoundError(f"{path}: neither a GGUF file, config.json (HF), {CONFIG_NAME} "
                          "(factflip) nor model.json (a training workdir) found")


def load_model(path: str, dtype: str = "float32", compute_dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Load an HF directory (config.json + safetensors), a GGUF file (any type the `gguf`
  package dequantises), a factflip model directory, or a training workdir / checkpoint step
  (its latest / that step's parameters).

  Parameters are stored in `dtype` and computed in `compute_dtype` (default: `dtype`). With a
  `mesh`, every parameter is placed in its logical-axis sharding as it is read (no full host
  copy per device); without one, on the first local device.
  """
  if is_gguf(path):
    from factflip.models.gguf import load_gguf
    return load_gguf(path, dtype, compute_dtype, mesh)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: neither a directory nor a .gguf file; expected an HF "
                            f"model directory, a factflip model directory ({CONFIG_NAME}) or a "
                            "GGUF file")
  if os.path.exists(os.path.join(path, CONFIG_NAME)):
    return _load_native(path, dtype, compute_dtype, mesh)
  if os.path.exists(os.path.join(path, "model.json")) or os.path.basename(
      os.path.dirname(os.path.abspath(path))) == "checkpoints":
    model, _ = load_trained(path, mesh=mesh, dtype=dtype)   # a training run or one of its steps
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


# ---- training runs: WORKDIR/checkpoints/<step>/state (see factflip.train.checkpoint) --------
def _warn(msg: str) -> None:
  log.warning(msg)
  if jax.process_index() == 0:
    print(f"warning: {msg}", flush=True)


def valid_steps(directory: str, warn: bool = True) -> list[int]:
  """Complete checkpoint steps in `directory`, oldest first (incomplete ones are reported)."""
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if not re.fullmatch(r"\d+", name) or not os.path.isdir(path):
      continue
    if os.path.exists(os.path.join(path, COMMIT_FILE)) and os.path.isdir(
        os.path.join(path, "state")):
      steps.append(int(name))
    elif warn:
      _warn(f"{path}: incomplete checkpoint (no {COMMIT_FILE}; the save was cut off); ignored")
  return sorted(steps)


def restore_params(directory: str, step: int | None, abstract_params: Any) -> tuple[int, Any]:
  """Only the parameters of a training checkpoint (the optimizer state is not read), placed in
  `abstract_params`' shardings. directory: WORKDIR/checkpoints. In a multi-process job every
  process must call this unless the shardings are all this process's devices (then it reads
  alone: a probe on process 0)."""
  steps = valid_steps(directory)
  if not steps:
    raise FileNotFoundError(f"{directory}: no complete training checkpoint")
  step = steps[-1] if step is None or step < 0 else step
  if step not in steps:
    raise FileNotFoundError(f"{directory}: no complete checkpoint at step {step} "
                            f"(complete: {steps})")
  path = os.path.join(directory, str(step), "state")
  ckpt = ocp.PyTreeCheckpointer()
  local = all(s.sharding.is_fully_addressable for s in jax.tree.leaves(abstract_params))
  if local and jax.process_count() > 1:    # one process reads alone: no barrier with the others
    mp = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
    ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                            multiprocessing_options=mp)
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract_params)
  out = ckpt.restore(path, args=ocp.args.PyTreeRestore(
      item={"params": abstract_params},
      restore_args={"params": restore_args}, partial_restore=True))
  return step, out["params"]


def load_trained(path: str, step: int | None = None, mesh=None, dtype: str = "float32"):
  """(Transformer, step) from a training workdir (`step`: None/-1 = the latest) or one of its
  checkpoint directories (WORKDIR/checkpoints/<step>)."""
  path = os.path.abspath(path)
  if re.fullmatch(r"\d+", os.path.basename(path)) and os.path.basename(
      os.path.dirname(path)) == "checkpoints":
    step, path = int(os.path.basename(path)), os.path.dirname(os.path.dirname(path))
  model_json = os.path.join(path, "model.json")
  if not os.path.exists(model_json):
    raise FileNotFoundError(f"{path}: no model.json; expected a factflip training workdir")
  cfg = ModelConfig.from_dict(read_json(model_json), model_json).replace(param_dtype=dtype,
                                                                         dtype=dtype)
  shardings = sharding_lib.param_shardings(cfg, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh),
                        cfg.param_shapes(), shardings, is_leaf=lambda x: isinstance(x, tuple))
  step, params = restore_params(os.path.join(path, "checkpoints"), step, target)
  return Transformer(cfg, params=params), step
