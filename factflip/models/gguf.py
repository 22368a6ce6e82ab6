"""GGUF model files -> factflip models: metadata to `ModelConfig`, tensors under their HF names.

Owns: the map from llama.cpp's architectures and metadata keys to factflip's families
(`llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3` -> gemma3_text, `olmo2`, `phi3`, `gptneox` ->
gpt_neox), the map from GGUF tensor names to HF ones, and undoing what llama.cpp's converter
(convert_hf_to_gguf.py) does to tensors on the way: the Q/K row permutation of `llama` files,
GPT-NeoX's query_key_value reordered to [q | k | v], and the +1 folded into Gemma's norm
weights.
Must not: decode bytes (`factflip.gguf_io`, i.e. ggml's `gguf` package) or place parameters
(`hf.load_tensors` streams the HF-named view built here, as it streams safetensors).

So a GGUF file loads like an HF checkpoint, into the same shape checks: each device dequantises
only the rows (HF's output features) of its own slice, so a 7B file never needs a full float32
host copy; a slice along the other axis (fsdp over d_model) dequantises its rows whole and
keeps its columns.
"""

from __future__ import annotations

import jax
import numpy as np

from factflip.gguf_io import GGUFError, GGUFFile, open_gguf
from factflip.models.config import ModelConfig, RopeScaling, family_switches
from factflip.models.hf import load_tensors
from factflip.models.transformer import Transformer, rope_inv_freq

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                 "gemma3": "gemma3_text", "olmo2": "olmo2", "phi3": "phi3", "gptneox": "gpt_neox"}
GEMMA = ("gemma2", "gemma3_text")

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Post-norms (Gemma's sandwich, OLMo 2's): HF's post_attention_layernorm is llama.cpp's
# post_attention_norm, and post_feedforward_layernorm its post_ffw_norm.
_POST_NORMS = {**_LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
# Phi-3's fused projections keep HF's layout: qkv_proj is [q | k | v], gate_up_proj [gate | up]
# (llama.cpp's ffn_up, split in two by its SwiGLU).
_PHI3_LAYER = {**_LAYER, "self_attn.qkv_proj.weight": "attn_qkv.weight",
               "mlp.gate_up_proj.weight": "ffn_up.weight"}
_NEOX_TOP = {"gpt_neox.embed_in.weight": "token_embd.weight",
             "gpt_neox.final_layer_norm.weight": "output_norm.weight",
             "gpt_neox.final_layer_norm.bias": "output_norm.bias",
             "embed_out.weight": "output.weight"}
_NEOX_LAYER = {f"{hf}.{kind}": f"{ours}.{kind}" for hf, ours in (
    ("input_layernorm", "attn_norm"), ("attention.query_key_value", "attn_qkv"),
    ("attention.dense", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down"))
    for kind in ("weight", "bias")}


def _names(family: str) -> tuple[dict[str, str], str, dict[str, str]]:
  """(top-level HF name -> GGUF name, HF layer prefix, HF layer suffix -> GGUF suffix)."""
  if family == "gpt_neox":
    return _NEOX_TOP, "gpt_neox.layers", _NEOX_LAYER
  layer = (_POST_NORMS if family_switches(family)["post_norms"]
           else _PHI3_LAYER if family == "phi3" else _LAYER)
  return _TOP, "model.layers", layer


# ---- metadata -> ModelConfig ------------------------------------------------------------------
def read_gguf_config(path: str) -> ModelConfig:
  return config_from_gguf(open_gguf(path))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
  """The ModelConfig a GGUF file describes; GGUFError naming the file and key otherwise.

  What GGUF has no key for is what llama.cpp assumes: Gemma 3's sliding layers every 6th
  layer full (unless `{arch}.attention.sliding_window_pattern` lists them) with RoPE base
  10,000; the Gemma 27Bs' attention scale; GPT-NeoX's parallel residual unless stated. GPT-NeoX's
  MLP is HF's exact GELU, as Pythia's config.json has it (llama.cpp computes the tanh one)."""
  arch = f.require("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{f.path}: general.architecture is {arch!r}; factflip reads "
                    f"{sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]
  gemma, neox = family in GEMMA, family == "gpt_neox"

  def key(name, default=None, required=False):
    full = f"{arch}.{name}"
    return f.require(full) if required else f.get(full, default)

  def unsupported(name, value, expected):
    raise GGUFError(f"{f.path}: {name} is {value!r}; factflip supports {expected}")

  for name in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
    if isinstance(key(name), list):    # per-layer values (e.g. OpenELM, Gemma 3n)
      unsupported(f"{arch}.{name}", key(name), "one value for every layer")
  L, D = int(key("block_count", required=True)), int(key("embedding_length", required=True))
  H = int(key("attention.head_count", required=True))
  G = int(key("attention.head_count_kv", H))
  K = int(key("attention.key_length", D // H))
  if int(key("attention.value_length", K)) != K:
    unsupported(f"{arch}.attention.value_length", key("attention.value_length"),
                f"the key length {K}")
  rotary = int(key("rope.dimension_count", K))
  if rotary != K and family not in ("gpt_neox", "phi3"):
    unsupported(f"{arch}.rope.dimension_count", rotary,
                f"rotary embeddings over the whole head ({K}) in {arch}")
  if f.has_tensor("rope_factors_long.weight"):
    unsupported("tensor 'rope_factors_long.weight'", "present", "Phi-3's short-context RoPE "
                "(the 4k models); LongRoPE's per-frequency factors are not expressible")
  if not f.has_tensor("token_embd.weight"):
    raise GGUFError(f"{f.path}: no tensor 'token_embd.weight'")
  V = f.shape("token_embd.weight")[0]
  if key("vocab_size") is not None and int(key("vocab_size")) != V:
    raise GGUFError(f"{f.path}: {arch}.vocab_size is {key('vocab_size')}, but token_embd.weight "
                    f"has {V} rows")
  theta = float(key("rope.freq_base", 10000.0))
  rope_scaling = _rope_scaling(f, arch, key("rope.scaling.type"), theta, K)
  window = int(key("attention.sliding_window", 4096 if family == "gemma2" else 0)) or None
  types = _layer_types(f, arch, family, L, window)
  eos = f.get("tokenizer.ggml.eos_token_id")
  eps = key("attention.layer_norm_epsilon", 1e-5) if neox else key(
      "attention.layer_norm_rms_epsilon", 1e-6)
  return ModelConfig(
      family=family, vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G, head_dim=K,
      d_ff=int(key("feed_forward_length", required=True)),
      max_seq_len=int(key("context_length", 2048)), norm_eps=float(eps), **family_switches(family),
      activation="gelu_tanh" if gemma else "gelu" if neox else "silu",
      rope_theta=theta, rope_scaling=rope_scaling,
      parallel_residual=neox and bool(key("use_parallel_residual", True)),
      rotary_dim=0 if rotary == K else rotary,
      rope_local_theta=10000.0 if family == "gemma3_text" and types else None,
      tie_embeddings=not f.has_tensor("output.weight"),
      layer_types=types, sliding_window=window if types else None,
      attn_softcap=key("attn_logit_softcapping") if gemma else None,
      final_softcap=key("final_logit_softcapping") if gemma else None,
      query_pre_attn_scalar=_gemma_query_scalar(family, L, D, H, K) if gemma else None,
      bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=f.get("tokenizer.ggml.padding_token_id"))


def _layer_types(f: GGUFFile, arch: str, family: str, L: int,
                 window: int | None) -> tuple[str, ...] | None:
  """Which layers attend within the sliding window: `{arch}.attention.sliding_window_pattern`
  (one bool per layer) where the file has it, else llama.cpp's rule for the architecture."""
  pattern = f.get(f"{arch}.attention.sliding_window_pattern")
  if isinstance(pattern, list):
    if len(pattern) != L:
      raise GGUFError(f"{f.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                      f"entries; expected one per layer ({L})")
    sliding = [bool(p) for p in pattern]
  elif isinstance(pattern, int):                     # a period: every n-th layer full
    sliding = [bool(pattern) and (i + 1) % pattern != 0 for i in range(L)]
  elif family == "gemma2":
    sliding = [i % 2 == 0 for i in range(L)]
  elif family == "gemma3_text":
    sliding = [(i + 1) % 6 != 0 for i in range(L)]
  elif family == "phi3":
    sliding = [True] * L
  else:
    sliding = [False] * L
  if not window or not any(sliding):
    return None
  if family not in ("gemma2", "gemma3_text", "phi3"):
    raise GGUFError(f"{f.path}: {arch}.attention.sliding_window_pattern has sliding layers; "
                    f"factflip reads sliding windows in gemma2, gemma3 and phi3 files")
  return tuple("sliding" if s else "full" for s in sliding)


def _gemma_query_scalar(family: str, L: int, D: int, H: int, K: int) -> float:
  """GGUF has no key for Gemma's query_pre_attn_scalar; like llama.cpp, by model size: the
  27Bs (Gemma 2: 46 layers, Gemma 3: 62) scale scores by (d_model / heads)**-0.5, the others
  by head_dim**-0.5."""
  return float(D // H) if L == {"gemma2": 46, "gemma3_text": 62}[family] else float(K)


def _rope_scaling(f: GGUFFile, arch: str, kind, theta: float,
                  head_dim: int) -> RopeScaling | None:
  """RoPE scaling from `{arch}.rope.scaling.*`, or Llama 3's, which llama.cpp stores as the
  tensor `rope_freqs.weight` (the per-frequency divisors): recognised when it equals Llama 3's
  schedule (low/high frequency factors 1 and 4 over 8,192 positions) at its largest divisor."""
  if kind in (None, "none") and not f.has_tensor("rope_freqs.weight"):
    return None
  if kind == "linear":
    return RopeScaling("linear", float(f.require(f"{arch}.rope.scaling.factor")))
  if kind not in (None, "none"):
    raise GGUFError(f"{f.path}: {arch}.rope.scaling.type is {kind!r}; factflip supports "
                    "'none', 'linear' and Llama 3's rope_freqs")
  divisors = f.read("rope_freqs.weight")
  guess = RopeScaling("llama3", float(divisors.max()), 1.0, 4.0, 8192)
  base = ModelConfig(head_dim=head_dim, rope_theta=theta)
  want = rope_inv_freq(base) / rope_inv_freq(base.replace(rope_scaling=guess))
  if divisors.shape != want.shape or not np.allclose(divisors, want, rtol=1e-4):
    raise GGUFError(f"{f.path}: tensor 'rope_freqs.weight' is not Llama 3's RoPE schedule "
                    f"(factor {guess.factor}, low/high 1/4, 8192 positions); factflip cannot "
                    "express these RoPE frequencies")
  return guess


# ---- tensors under HF names -------------------------------------------------------------------
class GGUFTensors:
  """A GGUF file's tensors under their HF names and in HF layout (the interface of
  `safetensors_io.CheckpointTensors`): llama's Q/K rows put back in HF order, GPT-NeoX's
  [q | k | v] rows back in its per-head order, Gemma's norm weights without llama.cpp's +1.
  `read(name, index)` dequantises only the rows `index` needs."""

  def __init__(self, f: GGUFFile, cfg: ModelConfig):
    self.file = f
    arch = f.get("general.architecture")
    top, prefix, layer = _names(cfg.family)
    self._src: dict[str, tuple[str, np.ndarray | None, float]] = {}
    for hf_name, name in top.items():
      self._add(hf_name, name, None, cfg)
    for i in range(cfg.n_layers):
      for suffix, name in layer.items():
        rows = None
        if arch == "llama" and suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
          heads = cfg.n_heads if "q_proj" in suffix else cfg.n_kv_heads
          rows = _unpermute_rows(cfg.n_heads * cfg.head_dim if "q_proj" in suffix
                                 else cfg.n_kv_heads * cfg.head_dim, heads)
        elif cfg.family == "gpt_neox" and suffix.startswith("attention.query_key_value"):
          rows = _neox_qkv_rows(cfg.n_heads, cfg.head_dim)
        self._add(f"{prefix}.{i}.{suffix}", f"blk.{i}.{name}", rows, cfg)
    self._hf_of = {src: hf for hf, (src, _, _) in self._src.items()}

  def _add(self, hf_name: str, name: str, rows: np.ndarray | None, cfg: ModelConfig) -> None:
    if not self.file.has_tensor(name):
      return
    self.file.check_readable(name)
    shift = -1.0 if cfg.family in GEMMA and name.endswith("norm.weight") else 0.0
    self._src[hf_name] = (name, rows, shift)

  def __contains__(self, name: str) -> bool:
    return name in self._src

  def keys(self) -> list[str]:
    """The HF names, then the GGUF tensors no HF name maps to (rope_freqs.weight is read into
    the config, not a parameter)."""
    return list(self._src) + [n for n in self.file.names()
                              if n not in self._hf_of and n != "rope_freqs.weight"]

  def path_of(self, name: str | None) -> str:
    return self.file.path if name is None else f"{self.file.path} ({self._src[name][0]})"

  def shape(self, name: str) -> tuple[int, ...]:
    return self.file.shape(self._src[name][0])

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    src, rows, shift = self._src[name]
    first = slice(None) if not index else index[0]
    out = self.file.read(src, first if rows is None else rows[first])
    if index and len(index) > 1:
      out = out[(slice(None),) + tuple(index[1:])]
    return out + np.float32(shift) if shift else out


def _unpermute_rows(n_rows: int, heads: int) -> np.ndarray:
  """Source row of each HF row, undoing llama.cpp's `permute` (within each head, the rotary
  halves [h, 2, K/2] were interleaved as [h, K/2, 2])."""
  per_head = n_rows // heads
  half = per_head // 2
  h, rest = np.divmod(np.arange(n_rows), per_head)
  part, i = np.divmod(rest, half)
  return h * per_head + i * 2 + part


def _neox_qkv_rows(heads: int, head_dim: int) -> np.ndarray:
  """Source row of each HF query_key_value row (per head [q_h | k_h | v_h]) in llama.cpp's
  attn_qkv, which its converter reorders to [q | k | v] over all heads."""
  h, rest = np.divmod(np.arange(3 * heads * head_dim), 3 * head_dim)
  part, i = np.divmod(rest, head_dim)
  return part * heads * head_dim + h * head_dim + i


def load_gguf(path: str, dtype: str = "float32", compute_dtype: str | None = None,
              mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A GGUF file as a Transformer with parameters in `dtype` (dequantised), streamed into
  `mesh`'s shardings like an HF checkpoint."""
  f = open_gguf(path)
  cfg = config_from_gguf(f)
  return load_tensors(cfg, GGUFTensors(f, cfg), f"{f.path} (metadata)", dtype, compute_dtype,
                      mesh)

