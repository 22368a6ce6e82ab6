"""Hugging Face checkpoints <-> factflip models, with no torch at run time.

Owns: `config.json` <-> `ModelConfig` for the supported families, the tensor-name map, streamed
loading into a target sharding, and `save_hf`.
Must not: define the model math (`transformer.py`) or the byte format (`safetensors_io.py`).

Loading streams tensor by tensor: each parameter is built with `jax.make_array_from_callback`,
and each device's callback reads only its own slice of the memory-mapped file(s), so a model
larger than one device loads onto a mesh without a full host copy per device.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from factflip import sharding as sharding_lib
from factflip.fileio import read_json, write_json
from factflip.models.config import ModelConfig, RopeScaling, family_switches
from factflip.models.safetensors_io import CheckpointTensors, write_checkpoint
from factflip.models.transformer import Params, Transformer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM"}
GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# buffers older checkpoints saved: RoPE's frequencies, GPT-NeoX's causal mask
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")

log = logging.getLogger(__name__)


# ---- config.json ------------------------------------------------------------------------------
def read_hf_config(path: str) -> ModelConfig:
  """Parse `path/config.json` (transformers 4.x or 5.x layout) into a ModelConfig."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json; expected an HF model directory")
  return config_from_hf(read_json(cfg_path), cfg_path)


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
  family = d.get("model_type")
  if family not in ARCHITECTURES:
    raise ValueError(f"{source}: field 'model_type' is {family!r}; expected one of "
                     f"{sorted(ARCHITECTURES)}")

  def req(key):
    if d.get(key) is None:
      raise ValueError(f"{source}: missing field {key!r} (required for model_type {family!r})")
    return d[key]

  def unsupported(key, value, expected):
    raise ValueError(f"{source}: field {key!r} is {value!r}; factflip supports {expected}")

  L, D, H = int(req("num_hidden_layers")), int(req("hidden_size")), int(req("num_attention_heads"))
  gemma, neox = family in GEMMA, family == "gpt_neox"
  act_name = d.get("hidden_activation") or d.get("hidden_act") or "silu"
  if act_name not in _ACTIVATIONS:
    unsupported("hidden_act", act_name, f"one of {sorted(_ACTIVATIONS)}")
  if d.get("mlp_bias") and not neox:
    unsupported("mlp_bias", True, "false")
  if d.get("attention_bias") and family not in ("qwen2", "gpt_neox"):
    unsupported("attention_bias", True, "false for this family (o_proj has no bias)")
  if neox and not d.get("attention_bias", True):
    unsupported("attention_bias", False, "true for gpt_neox (its projections have biases)")
  # RoPE: transformers 5 keeps it in rope_parameters (Gemma 3: one per layer type), 4.x in
  # rope_theta + rope_scaling (+ rope_local_base_freq, rotary_pct / partial_rotary_factor).
  rp = d.get("rope_parameters") or {}
  local_theta = d.get("rope_local_base_freq") if family == "gemma3_text" else None
  if rp and "rope_type" not in rp and "rope_theta" not in rp:
    if family == "gemma3_text" and set(rp) <= {"full_attention", "sliding_attention"}:
      local = rp.get("sliding_attention") or {}
      if local.get("rope_type", "default") != "default":
        unsupported("rope_parameters.sliding_attention", local, "default RoPE on sliding layers")
      local_theta = local.get("rope_theta", local_theta)
      rp = rp.get("full_attention") or {}
    else:
      kinds = {json.dumps(v, sort_keys=True) for v in rp.values()}
      if len(kinds) != 1:
        unsupported("rope_parameters", rp, "one RoPE setting shared by all layer types")
      rp = next(iter(rp.values()))
  scaling = d.get("rope_scaling") or rp
  rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  theta = float(rp.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0))))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    rope_scaling = RopeScaling("llama3", float(scaling["factor"]),
                               float(scaling.get("low_freq_factor", 1.0)),
                               float(scaling.get("high_freq_factor", 4.0)),
                               int(scaling.get("original_max_position_embeddings", 8192)))
  elif rope_type == "linear":
    rope_scaling = RopeScaling("linear", float(scaling["factor"]))
  else:
    unsupported("rope_scaling.rope_type", rope_type, "'default', 'llama3' or 'linear'")
  head_dim = int(d.get("head_dim") or D // H)
  partial = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor",
                                                       d.get("rotary_pct", 1.0))))
  rotary_dim = int(head_dim * partial) if partial != 1.0 else 0

  window = d.get("sliding_window")
  if d.get("layer_types"):
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = [t for t in d["layer_types"] if t not in names]
    if bad:
      unsupported("layer_types", bad[0], "'full_attention' or 'sliding_attention'")
    types = [names[t] for t in d["layer_types"]]
  elif family == "gemma2":
    types = ["sliding" if i % 2 == 0 else "full" for i in range(L)]
  elif family == "gemma3_text":
    every = int(d.get("sliding_window_pattern", 6))
    types = ["sliding" if (i + 1) % every else "full" for i in range(L)]
  elif family in ("mistral", "phi3"):
    types = ["sliding" if window else "full"] * L
  elif family in ("qwen2", "qwen3") and d.get("use_sliding_window") and window:
    first = int(d.get("max_window_layers", L))
    types = ["sliding" if i >= first else "full" for i in range(L)]
  else:
    types = ["full"] * L
  if "sliding" not in types:
    types, window = None, None
  if family == "gemma3_text" and (local_theta is None or not types):
    local_theta = None

  eos = d.get("eos_token_id")
  return ModelConfig(
      family=family, vocab_size=int(req("vocab_size")), d_model=D, n_layers=L, n_heads=H,
      n_kv_heads=int(d.get("num_key_value_heads") or H), head_dim=head_dim,
      d_ff=int(req("intermediate_size")), max_seq_len=int(d.get("max_position_embeddings", 2048)),
      norm_eps=float(d.get("layer_norm_eps" if neox else "rms_norm_eps", 1e-6)),
      **family_switches(family), activation=_ACTIVATIONS[act_name], rope_theta=theta,
      rope_scaling=rope_scaling,
      parallel_residual=neox and bool(d.get("use_parallel_residual", True)), rotary_dim=rotary_dim,
      rope_local_theta=float(local_theta) if local_theta else None,
      tie_embeddings=bool(d.get("tie_word_embeddings", gemma)),
      layer_types=tuple(types) if types else None, sliding_window=window,
      attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
      final_softcap=d.get("final_logit_softcapping") if gemma else None,
      query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
      bos_token_id=d.get("bos_token_id"),
      eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
      pad_token_id=d.get("pad_token_id"))


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
  """The `config.json` that transformers (4.x and 5.x) loads as the same model."""
  _check_expressible(cfg)
  types = cfg.layer_types or ("full",) * cfg.n_layers
  rs = cfg.rope_scaling
  rope_scaling = None
  if rs is not None and rs.kind == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings}
  elif rs is not None:
    rope_scaling = {"rope_type": "linear", "factor": rs.factor}
  eos = list(cfg.eos_token_ids)
  d = {
      "architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "hidden_act": _HF_ACTIVATION[cfg.activation],
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                          **(rope_scaling or {})},
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": cfg.pad_token_id,
      "torch_dtype": dtype or cfg.param_dtype, "dtype": dtype or cfg.param_dtype,
  }
  hf_types = ["sliding_attention" if t == "sliding" else "full_attention" for t in types]
  if cfg.family == "mistral":
    d["sliding_window"] = cfg.sliding_window
  elif cfg.family in ("qwen2", "qwen3"):
    sliding = [i for i, t in enumerate(types) if t == "sliding"]
    d.update(use_sliding_window=bool(sliding), sliding_window=cfg.sliding_window,
             max_window_layers=sliding[0] if sliding else cfg.n_layers, layer_types=hf_types)
  elif cfg.family in GEMMA:
    d.update(hidden_activation=_HF_ACTIVATION[cfg.activation],
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             final_logit_softcapping=cfg.final_softcap,
             attn_logit_softcapping=cfg.attn_softcap, sliding_window=cfg.sliding_window,
             layer_types=hf_types)
    if cfg.family == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
      d.update(rope_local_base_freq=local["rope_theta"],
               rope_parameters={"full_attention": d["rope_parameters"],
                                "sliding_attention": local})
  elif cfg.family == "phi3":
    d.update(sliding_window=cfg.sliding_window, partial_rotary_factor=cfg.rope_dim / cfg.head_dim)
    d["rope_parameters"]["partial_rotary_factor"] = cfg.rope_dim / cfg.head_dim
  elif cfg.family == "gpt_neox":
    factor = cfg.rope_dim / cfg.head_dim
    d.update(layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
             rotary_pct=factor, rotary_emb_base=cfg.rope_theta, attention_bias=True)
    d["rope_parameters"]["partial_rotary_factor"] = factor
  return d


def _check_expressible(cfg: ModelConfig) -> None:
  """Refuse configs that the family's HF class cannot represent (they would load differently)."""
  f, types = cfg.family, cfg.layer_types or ("full",) * cfg.n_layers
  gemma, neox = f in GEMMA, f == "gpt_neox"
  wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in family_switches(f).items()
           if getattr(cfg, k) != v]
  if cfg.parallel_residual and not neox:
    wrong.append("parallel_residual=True")
  if cfg.rotary_dim and f not in ("gpt_neox", "phi3"):
    wrong.append(f"rotary_dim={cfg.rotary_dim}")
  if cfg.rope_local_theta and f != "gemma3_text":
    wrong.append(f"rope_local_theta={cfg.rope_local_theta}")
  if not gemma and (cfg.attn_softcap or cfg.final_softcap or cfg.query_pre_attn_scalar):
    wrong.append("soft-caps / query_pre_attn_scalar")
  if f in ("llama", "olmo2", "gpt_neox") and "sliding" in types:
    wrong.append("sliding layers")
  if f in ("mistral", "phi3") and len(set(types)) > 1:
    wrong.append("mixed full/sliding layers")
  if f in ("qwen2", "qwen3") and "sliding" in types:
    first = types.index("sliding")
    if any(t != "sliding" for t in types[first:]):
      wrong.append("sliding layers that are not a suffix of the stack")
  if neox and cfg.head_dim * cfg.n_heads != cfg.d_model:
    wrong.append(f"head_dim={cfg.head_dim} (GPT-NeoX's is d_model / heads)")
  if neox and cfg.n_kv_heads != cfg.n_heads:
    wrong.append(f"n_kv_heads={cfg.n_kv_heads} (GPT-NeoX has no grouped-query attention)")
  if wrong:
    raise ValueError(f"ModelConfig(family={f!r}) with {', '.join(wrong)} has no HF "
                     f"{ARCHITECTURES[f]} equivalent; change the family or the switches")


# ---- tensor names -----------------------------------------------------------------------------
class HFTensor(NamedTuple):
  """Where one of our parameters lives in an HF checkpoint."""
  names: list[str]                 # one HF tensor per stacked layer, or a single one
  transpose: bool                  # HF [out, in] against our [in, out]
  rows: np.ndarray | None = None   # a fused HF tensor (q|k|v, gate|up): ours = HF[rows]
  fused_rows: int = 0              # ... the fused tensor's first axis


def _fused_rows(cfg: ModelConfig) -> dict[str, tuple[np.ndarray, int]]:
  """Our params cut from a fused HF tensor: param -> (rows of the HF tensor, its rows)."""
  H, G, K, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  if cfg.family == "gpt_neox":      # query_key_value: per head [q_h | k_h | v_h]
    per_head = (np.arange(H)[:, None] * 3 * K + np.arange(K)[None]).ravel()
    qkv = {n: (per_head + i * K, 3 * H * K) for i, n in enumerate(("q", "k", "v"))}
    return {f"{w}{n}": qkv[n] for n in qkv for w in ("w", "b")}    # weights and biases
  if cfg.family == "phi3":          # qkv_proj: [q | k | v], gate_up_proj: [gate | up]
    qkv = {"q": (np.arange(H * K), (H + 2 * G) * K),
           "k": (H * K + np.arange(G * K), (H + 2 * G) * K),
           "v": ((H + G) * K + np.arange(G * K), (H + 2 * G) * K)}
    return {"wq": qkv["q"], "wk": qkv["k"], "wv": qkv["v"],
            "w_gate": (np.arange(F), 2 * F), "w_up": (F + np.arange(F), 2 * F)}
  return {}


def _layer_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
  """Our stacked layer param -> (HF name suffix under the layer prefix, transpose?)."""
  if cfg.family == "gpt_neox":
    qkv, dense = "attention.query_key_value", "attention.dense"
    names = {
        "attn_norm": ("input_layernorm.weight", False),
        "attn_norm_bias": ("input_layernorm.bias", False),
        "mlp_norm": ("post_attention_layernorm.weight", False),
        "mlp_norm_bias": ("post_attention_layernorm.bias", False),
        "wq": (f"{qkv}.weight", True), "wk": (f"{qkv}.weight", True),
        "wv": (f"{qkv}.weight", True), "bq": (f"{qkv}.bias", False),
        "bk": (f"{qkv}.bias", False), "bv": (f"{qkv}.bias", False),
        "wo": (f"{dense}.weight", True), "bo": (f"{dense}.bias", False),
        "w_up": ("mlp.dense_h_to_4h.weight", True), "b_up": ("mlp.dense_h_to_4h.bias", False),
        "w_down": ("mlp.dense_4h_to_h.weight", True), "b_down": ("mlp.dense_4h_to_h.bias", False),
    }
    return {k: names[k] for k in cfg.param_shapes()["layers"]}
  names = {
      "attn_norm": ("input_layernorm.weight", False),
      "wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
      "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
      "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
      "bv": ("self_attn.v_proj.bias", False),
      "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
      "mlp_norm": ("post_attention_layernorm.weight", False),
      "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
      "w_down": ("mlp.down_proj.weight", True),
  }
  if cfg.family == "phi3":
    names.update(wq=("self_attn.qkv_proj.weight", True), wk=("self_attn.qkv_proj.weight", True),
                 wv=("self_attn.qkv_proj.weight", True), w_gate=("mlp.gate_up_proj.weight", True),
                 w_up=("mlp.gate_up_proj.weight", True))
  if cfg.post_norms:
    names.update(post_attn_norm=("post_attention_layernorm.weight", False),
                 mlp_norm=("pre_feedforward_layernorm.weight", False),
                 post_mlp_norm=("post_feedforward_layernorm.weight", False))
  return {k: names[k] for k in cfg.param_shapes()["layers"]}


def tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], HFTensor]:
  """Our param path -> its HFTensor (HF tensor names, one per stacked layer or a single one;
  transpose; the rows of a fused tensor)."""
  if cfg.family == "gpt_neox":
    top, layer, lm_head = "gpt_neox.", "gpt_neox.layers", "embed_out.weight"
    out = {("embed",): HFTensor(["gpt_neox.embed_in.weight"], False),
           ("final_norm",): HFTensor(["gpt_neox.final_layer_norm.weight"], False),
           ("final_norm_bias",): HFTensor(["gpt_neox.final_layer_norm.bias"], False)}
  else:
    top, layer, lm_head = "model.", "model.layers", "lm_head.weight"
    out = {("embed",): HFTensor([f"{top}embed_tokens.weight"], False),
           ("final_norm",): HFTensor([f"{top}norm.weight"], False)}
  if not cfg.tie_embeddings:
    out[("lm_head",)] = HFTensor([lm_head], True)
  fused = _fused_rows(cfg)
  for ours, (suffix, t) in _layer_names(cfg).items():
    rows, n = fused.get(ours, (None, 0))
    out[("layers", ours)] = HFTensor([f"{layer}.{i}.{suffix}" for i in range(cfg.n_layers)],
                                       t, rows, n)
  return out


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---- loading ----------------------------------------------------------------------------------
def load_hf(path: str, dtype: str = "float32", compute_dtype: str | None = None,
            mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """Load an HF directory (config.json + model.safetensors or a sharded index) as a Transformer
  with parameters in `dtype`, streamed into `mesh`'s shardings (one device when mesh is None)."""
  cfg = read_hf_config(path)
  return load_tensors(cfg, CheckpointTensors(path), f"{path}/config.json", dtype, compute_dtype,
                      mesh)


def load_tensors(cfg: ModelConfig, tensors, source: str, dtype: str = "float32",
                 compute_dtype: str | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A Transformer of `cfg` from `tensors`, any source of HF-named, HF-shaped tensors
  (`keys()`, `in`, `shape(name)`, `path_of(name)`, `read(name, index)`: a safetensors
  checkpoint, or a GGUF file seen through `models.gguf`). Every name and shape is checked
  against `cfg` (which `source` describes) before anything is allocated; then each device's
  callback reads only its own slice."""
  cfg = cfg.replace(param_dtype=dtype, dtype=compute_dtype or dtype)
  shapes = cfg.param_shapes()
  tmap = tensor_map(cfg)
  missing = list(dict.fromkeys(n for spec in tmap.values() for n in spec.names
                               if n not in tensors))
  if missing:
    raise ValueError(f"{tensors.path_of(None)}: lacks {len(missing)} tensor(s) that {source} "
                     f"({cfg.family}, {cfg.n_layers} layers) requires, e.g. {missing[:4]}")
  for p, spec in tmap.items():
    shape = _get(shapes, p)
    want = tuple(shape[1:]) if p[0] == "layers" else tuple(shape)
    want = want[::-1] if spec.transpose else want
    if spec.rows is not None:
      want = (spec.fused_rows,) + want[1:]
    for n in spec.names:
      got = tensors.shape(n)
      if got != want:
        raise ValueError(f"{tensors.path_of(n)}: tensor {n!r} has shape {list(got)}, "
                         f"expected {list(want)} from {source}")
  known = {n for spec in tmap.values() for n in spec.names}
  extra = [k for k in tensors.keys() if k not in known and not k.endswith(_IGNORED_SUFFIXES)
           and not (k == "lm_head.weight" and cfg.tie_embeddings)]
  if extra:
    log.warning("%s: ignoring %d tensor(s) the model does not use, e.g. %s",
                tensors.path_of(None), len(extra), extra[:4])

  shardings = sharding_lib.param_shardings(cfg, mesh)
  np_dtype = _np_dtype(dtype)
  params: Params = {}
  for p, spec in tmap.items():
    shape = _get(shapes, p)
    stacked = p[0] == "layers"
    cb = _reader(tensors, spec, stacked, np_dtype)
    _set(params, p, jax.make_array_from_callback(shape, _get(shardings, p), cb))
  return Transformer(cfg, params=params)


def _reader(tensors, spec: HFTensor, stacked: bool, np_dtype) -> Callable:
  names, transpose = spec.names, spec.transpose

  def read_one(name, idx):
    if spec.rows is not None:       # a fused tensor: only the rows of our slice of this part
      idx = tuple(idx)
      if transpose:                 # ours [in, out] = HF[rows, in].T
        return tensors.read(name, (spec.rows[idx[1]], idx[0])).T
      return tensors.read(name, (spec.rows[idx[0]],) + idx[1:])
    if transpose:
      return tensors.read(name, tuple(idx[::-1])).T
    return tensors.read(name, tuple(idx))

  def cb(index):
    if not stacked:
      return read_one(names[0], index).astype(np_dtype)
    layers = range(len(names))[index[0]]
    return np.stack([read_one(names[i], index[1:]) for i in layers]).astype(np_dtype)

  return cb


# ---- saving -----------------------------------------------------------------------------------
def save_hf(model: Transformer, out_dir: str, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> list[str]:
  """Write `model` as an HF directory (config.json, generation_config.json, safetensors) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads with identical logits.

  Tensors are gathered and written one at a time (peak host memory: one layer's tensor). Each
  file is written to a temporary path and renamed. Run in one process (export a multi-host run
  from its Orbax checkpoint with `load_model` on one host).
  """
  if jax.process_count() > 1:
    raise RuntimeError("save_hf runs in a single process; restore the checkpoint on one host")
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  np_dtype = _np_dtype(dtype)
  hf_cfg = config_to_hf(cfg, dtype)
  params = model.params()
  os.makedirs(out_dir, exist_ok=True)
  specs, fused = {}, {}
  for p, spec in tensor_map(cfg).items():
    arr = _get(params, p)
    for i, name in enumerate(spec.names):
      shape = tuple(arr.shape[1:] if p[0] == "layers" else arr.shape)
      shape = shape[::-1] if spec.transpose else shape

      def produce(arr=arr, i=i, stacked=p[0] == "layers", transpose=spec.transpose):
        a = np.asarray(jax.device_get(arr[i] if stacked else arr))
        return a.T if transpose else a

      if spec.rows is None:
        specs[name] = (shape, np_dtype, produce)
      else:                          # a fused HF tensor: filled from each of its parts
        fused.setdefault(name, ((spec.fused_rows,) + shape[1:], []))[1].append(
            (spec.rows, produce))
  for name, (shape, parts) in fused.items():
    def produce_fused(shape=shape, parts=parts):
      out = np.zeros(shape, np_dtype)
      for rows, produce in parts:
        out[rows] = produce()
      return out

    specs[name] = (shape, np_dtype, produce_fused)
  files = write_checkpoint(out_dir, specs, max_shard_bytes)
  write_json(os.path.join(out_dir, "config.json"), hf_cfg)
  gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_cfg["eos_token_id"],
         "pad_token_id": cfg.pad_token_id}
  write_json(os.path.join(out_dir, "generation_config.json"),
             {k: v for k, v in gen.items() if v is not None})
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return files
