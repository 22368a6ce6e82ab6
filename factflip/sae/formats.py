"""SAE files: SAELens directories, Gemma Scope `params.npz`, Llama Scope directories.

Owns: `load_sae(path)` (which format a path holds, and reading it into an `SAE`) and
`save_sae(sae, path)` (the SAELens 6.x layout, which `sae_lens.SAE.load_from_disk` opens).
Must not: define the SAE math (`sae.core`).

Formats:
- SAELens (`cfg.json` + `sae_weights.safetensors`): cfg fields as SAELens 6.x writes them
  (architecture, d_in, d_sae, dtype, apply_b_dec_to_input, normalize_activations,
  reshape_activations, metadata with hook_name, and the architecture's own: `cfg_fields` in
  `sae.architectures`' table, e.g. k and rescale_acts_by_decoder_norm for topk); a pre-6.0
  flat cfg (hook_point, activation_fn_str "topk" with activation_fn_kwargs.k, boolean
  normalize_activations) is read as SAELens's loader reads it.
- Gemma Scope (`params.npz`: W_enc, W_dec, b_enc, b_dec, threshold): JumpReLU on raw activations,
  no b_dec subtraction (`apply_b_dec_to_input = False`).
- Llama Scope (`hyperparams.json` + `checkpoints/final.safetensors` with encoder.weight
  [d_sae, d_in], encoder.bias, decoder.weight [d_in, d_sae], decoder.bias): a JumpReLU SAE trained
  on inputs rescaled to norm √d_model by the dataset-wise average norm; the scale
  s = √d_model / dataset_average_activation_norm.in is folded into the weights as SAELens folds it
  (W_enc · s, W_dec / s, b_dec / s, threshold = jump_relu_threshold · s), so the SAE reads raw
  activations.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from factflip.fileio import DataError, atomic_directory, read_json, write_json
from factflip.models.safetensors_io import SafetensorsFile, write_file
from factflip.sae.architectures import ARCHITECTURES
from factflip.sae.core import SAE, SAEConfig, make_sae, param_shapes

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"   # SAELens: log10 feature density, "sparsity" [d_sae]
GEMMA_SCOPE = "params.npz"
LLAMA_SCOPE, LLAMA_SCOPE_WEIGHTS = "hyperparams.json", os.path.join("checkpoints",
                                                                    "final.safetensors")
# what save_sae writes as metadata.sae_lens_version: SAELens reads a cfg without a version >= 6
# as a pre-6.0 file and drops its metadata (hook_name and the rest)
SAELENS_FORMAT_VERSION = "6.0.0"


def detect_format(path: str) -> str:
  """"saelens" | "gemma_scope" | "llama_scope" for a directory (or a Gemma Scope .npz file)."""
  if os.path.isfile(path):
    if path.endswith(".npz"):
      return "gemma_scope"
    raise DataError(path, "not an SAE: expected a directory (SAELens cfg.json + "
                    f"{WEIGHTS}, Gemma Scope {GEMMA_SCOPE}, Llama Scope {LLAMA_SCOPE}) or a "
                    "Gemma Scope .npz file")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such SAE file or directory")
  for name, kind in ((CFG, "saelens"), (GEMMA_SCOPE, "gemma_scope"),
                     (LLAMA_SCOPE, "llama_scope")):
    if os.path.exists(os.path.join(path, name)):
      return kind
  raise DataError(path, f"no SAE here: expected {CFG} + {WEIGHTS} (SAELens), {GEMMA_SCOPE} "
                  f"(Gemma Scope) or {LLAMA_SCOPE} + {LLAMA_SCOPE_WEIGHTS} (Llama Scope)")


def load_sae(path: str, *, dtype: str | None = None, hook_name: str | None = None) -> SAE:
  """The SAE at `path` (any of the module's formats). `dtype` overrides the file's; `hook_name`
  names the site for formats that do not record it (Gemma Scope) or overrides it."""
  kind = detect_format(path)
  sae = {"saelens": _load_saelens, "gemma_scope": _load_gemma_scope,
         "llama_scope": _load_llama_scope}[kind](path, dtype)
  if hook_name is not None:
    sae = sae.replace(cfg=dataclasses.replace(sae.cfg, hook_name=hook_name))
  return sae


def save_sae(sae: SAE, path: str, sparsity: np.ndarray | None = None) -> None:
  """`sae` as an SAELens 6.x directory (cfg.json + sae_weights.safetensors, and with
  `sparsity` — log10 feature density [d_sae] — sparsity.safetensors), written to a temporary
  directory and renamed onto `path`."""
  cfg = sae.cfg
  arrays = {k: np.asarray(v) for k, v in sae.params().items()}
  metadata = {**cfg.metadata, "sae_lens_version": cfg.metadata.get(
      "sae_lens_version") or SAELENS_FORMAT_VERSION}
  if cfg.hook_name:
    metadata["hook_name"] = cfg.hook_name
  record = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": cfg.normalize_activations,
            "reshape_activations": cfg.reshape_activations, "metadata": metadata,
            "architecture": cfg.architecture}
  for name in ARCHITECTURES[cfg.architecture].cfg_fields:
    record[name] = getattr(cfg, name)
  if cfg.d_head:
    record["d_head"] = cfg.d_head          # ours: SAELens ignores unknown keys
  if sparsity is not None:
    sparsity = np.asarray(sparsity, np.float32)
    if sparsity.shape != (cfg.d_sae,):
      raise ValueError(f"save_sae: sparsity has shape {sparsity.shape}; expected ({cfg.d_sae},)")
  with atomic_directory(path) as tmp:
    write_file(os.path.join(tmp, WEIGHTS),
               {k: (a.shape, a.dtype, lambda a=a: a) for k, a in arrays.items()})
    write_json(os.path.join(tmp, CFG), record)
    if sparsity is not None:
      write_file(os.path.join(tmp, SPARSITY),
                 {"sparsity": (sparsity.shape, np.float32, lambda: sparsity)})


# ---- SAELens ----------------------------------------------------------------------------------
def _field(record: dict, name: str, path: str, kind, expected: str, default=None,
           required: bool = True):
  if name not in record:
    if required:
      raise DataError(path, f"missing; expected {expected}", field=name)
    return default
  value = record[name]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise DataError(path, f"{value!r}; expected {expected}", field=name)
  return value


def _dtype_name(value: str, path: str, field: str) -> str:
  name = str(value).removeprefix("torch.")
  if name not in ("float32", "float64", "float16", "bfloat16"):
    raise DataError(path, f"{value!r}; expected float32, float64, float16 or bfloat16",
                    field=field)
  return name


def _major(version) -> int:
  """The major version of a SAELens version string (0 when absent or unreadable: pre-6.0)."""
  try:
    return int(str(version).split(".")[0])
  except ValueError:
    return 0


def _names(conjunction: str) -> str:
  """The table's architectures in words: "standard, topk or jumprelu"."""
  *most, last = ARCHITECTURES
  return f"{', '.join(most)} {conjunction} {last}" if most else last


def _known(arch: str, path: str) -> None:
  if arch not in ARCHITECTURES:
    raise DataError(path, f"{arch!r}; factflip reads {_names('and')} SAEs",
                    field="architecture")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SAEConfig)}


def _own_fields(record: dict, arch: str, path: str) -> dict[str, Any]:
  """The architecture's own cfg fields (its `cfg_fields`) from a 6.x cfg.json: checked by the
  type of SAEConfig's default (a flag as SAELens reads it: any truthy value), absent ones at
  that default unless the architecture requires them."""
  spec, out = ARCHITECTURES[arch], {}
  for name in spec.cfg_fields:
    default = _DEFAULTS[name]
    if isinstance(default, bool):
      out[name] = bool(record.get(name, default))
    else:
      kind, expected = {int: (int, "an integer"), float: ((int, float), "a number"),
                        str: (str, "a string")}[type(default)]
      out[name] = _field(record, name, path, kind, expected, default,
                         required=name in spec.required)
  return out


def _load_saelens(path: str, dtype: str | None) -> SAE:
  cfg_path = os.path.join(path, CFG)
  record = read_json(cfg_path)
  if not isinstance(record, dict):
    raise DataError(cfg_path, f"a JSON {type(record).__name__}; expected an object")
  meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
  if _major(meta.get("sae_lens_version") or record.get("sae_lens_version")) < 6:                                   # SAELens 5.x and earlier: a flat cfg
    meta = {k: record[k] for k in ("model_name", "hook_head_index", "prepend_bos",
                                   "context_size", "dataset_path", "neuronpedia_id")
            if k in record}
    meta["hook_name"] = record.get("hook_name", record.get("hook_point", ""))
    arch = record.get("architecture", "standard")
    kwargs = record.get("activation_fn_kwargs") or {}
    fn = record.get("activation_fn_str", record.get("activation_fn", "relu"))
    own = {}
    if fn == "topk":                             # the file format's spelling of a TopK SAE
      arch, own = "topk", {"k": kwargs.get("k", 0) or 0}
    _known(arch, cfg_path)
    norm = record.get("normalize_activations")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    reshape = "hook_z" if "hook_z" in meta["hook_name"] else "none"
  else:
    arch = _field(record, "architecture", cfg_path, str, _names("or"))
    _known(arch, cfg_path)
    own = _own_fields(record, arch, cfg_path)
    norm = record.get("normalize_activations", "none")
    reshape = record.get("reshape_activations", "none")
  file_dtype = _dtype_name(record.get("dtype", "float32"), cfg_path, "dtype")
  cfg = SAEConfig(
      architecture=arch, d_in=_field(record, "d_in", cfg_path, int, "a positive integer"),
      d_sae=_field(record, "d_sae", cfg_path, int, "a positive integer"), **own,
      apply_b_dec_to_input=bool(record.get("apply_b_dec_to_input", True)),
      normalize_activations=norm, reshape_activations=reshape,
      d_head=int(record.get("d_head", 0)), hook_name=meta.get("hook_name") or "",
      dtype=dtype or file_dtype,
      metadata={k_: v for k_, v in meta.items() if k_ != "hook_name"})
  try:
    cfg.validate(cfg_path)
  except ValueError as e:
    raise DataError(cfg_path, str(e).removeprefix(cfg_path + ": ")) from None
  weights = os.path.join(path, WEIGHTS)
  if not os.path.exists(weights):
    raise DataError(path, f"{WEIGHTS} missing (cfg.json describes a {arch} SAE)")
  f = SafetensorsFile(weights)
  names = f.keys()                             # a SafetensorsFile: not a dict
  params = {name: f.read(name) for name in names}
  return _checked(cfg, params, weights)


def _checked(cfg: SAEConfig, params: dict[str, Any], source: str) -> SAE:
  shapes = param_shapes(cfg)
  for name in sorted(set(shapes) | set(params)):
    if name not in params:
      raise DataError(source, f"tensor '{name}' missing; a {cfg.architecture} SAE has "
                      f"{sorted(shapes)}")
    if name not in shapes:
      raise DataError(source, f"unexpected tensor '{name}'; a {cfg.architecture} SAE has "
                      f"{sorted(shapes)}")
    if tuple(np.shape(params[name])) != shapes[name]:
      raise DataError(source, f"tensor '{name}' has shape {tuple(np.shape(params[name]))}; "
                      f"expected {shapes[name]} (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
  return make_sae(cfg, params, source)


# ---- Gemma Scope ------------------------------------------------------------------------------
def _load_gemma_scope(path: str, dtype: str | None) -> SAE:
  file = path if os.path.isfile(path) else os.path.join(path, GEMMA_SCOPE)
  try:
    with np.load(file) as z:
      params = {("W_" + k[2:] if k.startswith("w_") else k): z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise DataError(file, f"not a readable .npz archive ({e})") from e
  if "scaling_factor" in params and np.all(params["scaling_factor"] == 1):
    del params["scaling_factor"]                 # SAELens drops an all-ones scaling factor
  if "W_enc" not in params or np.ndim(params["W_enc"]) != 2:
    raise DataError(file, f"tensor 'W_enc' missing or not 2-D (tensors: {sorted(params)}); "
                    "expected W_enc [d_in, d_sae], W_dec, b_enc, b_dec, threshold")
  d_in, d_sae = params["W_enc"].shape
  cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae),
                  apply_b_dec_to_input=False, dtype=dtype or "float32",
                  metadata={"format": "gemma_scope"})
  return _checked(cfg, params, file)


# ---- Llama Scope ------------------------------------------------------------------------------
def _load_llama_scope(path: str, dtype: str | None) -> SAE:
  hp_path = os.path.join(path, LLAMA_SCOPE)
  hp = read_json(hp_path)
  if not isinstance(hp, dict):
    raise DataError(hp_path, f"a JSON {type(hp).__name__}; expected an object")
  d_model = _field(hp, "d_model", hp_path, int, "the model width (an integer)")
  d_sae = _field(hp, "d_sae", hp_path, int, "the SAE width (an integer)")
  thr = _field(hp, "jump_relu_threshold", hp_path, (int, float), "a number")
  norms = _field(hp, "dataset_average_activation_norm", hp_path, dict,
                 'an object {"in": <average input norm>, "out": ...}')
  avg = norms.get("in")
  if not isinstance(avg, int | float) or avg <= 0:
    raise DataError(hp_path, f"{avg!r}; expected a positive number",
                    field="dataset_average_activation_norm.in")
  act = hp.get("act_fn", "jumprelu")
  if act != "jumprelu":
    raise DataError(hp_path, f"{act!r}; factflip reads Llama Scope's jumprelu SAEs",
                    field="act_fn")
  weights = os.path.join(path, LLAMA_SCOPE_WEIGHTS)
  if not os.path.exists(weights):
    raise DataError(path, f"{LLAMA_SCOPE_WEIGHTS} missing")
  f = SafetensorsFile(weights)
  want = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,),
          "decoder.weight": (d_model, d_sae), "decoder.bias": (d_model,)}
  names = f.keys()
  for name, shape in want.items():
    if name not in names:
      raise DataError(weights, f"tensor '{name}' missing; expected {sorted(want)}")
    if f.shape(name) != shape:
      raise DataError(weights, f"tensor '{name}' has shape {f.shape(name)}; expected {shape} "
                      f"(d_model={d_model}, d_sae={d_sae} in {LLAMA_SCOPE})")
  raw = {k: np.asarray(f.read(k), np.float64) for k in want}
  s = float(np.sqrt(d_model) / avg)
  params = {"W_enc": raw["encoder.weight"].T * s, "b_enc": raw["encoder.bias"],
            "W_dec": raw["decoder.weight"].T / s, "b_dec": raw["decoder.bias"] / s,
            "threshold": np.full((d_sae,), thr * s)}
  cfg = SAEConfig(architecture="jumprelu", d_in=d_model, d_sae=d_sae,
                  apply_b_dec_to_input=False, hook_name=str(hp.get("hook_point_in", "")),
                  dtype=dtype or "float32",
                  metadata={"format": "llama_scope", "activation_norm_scale": s,
                            "jump_relu_threshold": thr})
  return _checked(cfg, params, weights)

