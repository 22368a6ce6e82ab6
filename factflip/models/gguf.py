"""GGUF model files -> factflip models: metadata to `ModelConfig`, tensors under their HF names.

Owns: the map from llama.cpp's architectures and metadata keys to factflip's families
(`llama`, `qwen2`, `qwen3`, `gemma2`), the map from GGUF tensor names to HF ones, and undoing what
llama.cpp's converter (convert_hf_to_gguf.py) does to tensors on the way: the Q/K row permutation
of `llama` files and the +1 folded into Gemma's norm weights.
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
from factflip.models.config import ModelConfig, RopeScaling
from factflip.models.hf import load_tensors
from factflip.models.transformer import Transformer, rope_inv_freq

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Gemma 2's sandwich norms: HF's post_attention_layernorm is llama.cpp's post_attention_norm.
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


# ---- metadata -> ModelConfig ------------------------------------------------------------------
def read_gguf_config(path: str) -> ModelConfig:
  return config_from_gguf(open_gguf(path))


def config_from_gguf(f: GGUFFile) -> ModelConfig:
  """The ModelConfig a GGUF file describes; GGUFError naming the file and key otherwise."""
  arch = f.require("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{f.path}: general.architecture is {arch!r}; factflip reads "
                    f"{sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]

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
  if int(key("rope.dimension_count", K)) != K:
    unsupported(f"{arch}.rope.dimension_count", key("rope.dimension_count"),
                f"rotary embeddings over the whole head ({K})")
  if not f.has_tensor("token_embd.weight"):
    raise GGUFError(f"{f.path}: no tensor 'token_embd.weight'")
  V = f.shape("token_embd.weight")[0]
  if key("vocab_size") is not None and int(key("vocab_size")) != V:
    raise GGUFError(f"{f.path}: {arch}.vocab_size is {key('vocab_size')}, but token_embd.weight "
                    f"has {V} rows")
  gemma = family == "gemma2"
  theta = float(key("rope.freq_base", 10000.0))
  rope_scaling = _rope_scaling(f, arch, key("rope.scaling.type"), theta, K)
  types, window = None, None
  if gemma:
    window = int(key("attention.sliding_window", 4096))
    types = tuple("sliding" if i % 2 == 0 else "full" for i in range(L))
  eos = f.get("tokenizer.ggml.eos_token_id")
  return ModelConfig(
      family=family, vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=G, head_dim=K,
      d_ff=int(key("feed_forward_length", required=True)),
      max_seq_len=int(key("context_length", 2048)),
      norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
      norm_offset=1.0 if gemma else 0.0, activation="gelu_tanh" if gemma else "silu",
      rope_theta=theta, rope_scaling=rope_scaling,
      qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      tie_embeddings=not f.has_tensor("output.weight"),
      layer_types=types, sliding_window=window,
      attn_softcap=key("attn_logit_softcapping") if gemma else None,
      final_softcap=key("final_logit_softcapping") if gemma else None,
      post_norms=gemma, embed_scale=gemma,
      query_pre_attn_scalar=_gemma2_query_scalar(L, D, H, K) if gemma else None,
      bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=f.get("tokenizer.ggml.padding_token_id"))


def _gemma2_query_scalar(L: int, D: int, H: int, K: int) -> float:
  """GGUF has no key for Gemma 2's query_pre_attn_scalar; like llama.cpp, by model size: the
  27B (46 layers) scales scores by (d_model / heads)**-0.5, the 2B and 9B by head_dim**-0.5."""
  return float(D // H) if L == 46 else float(K)


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
  `safetensors_io.CheckpointTensors`): llama's Q/K rows put back in HF order, Gemma's norm
  weights without llama.cpp's +1. `read(name, index)` dequantises only the rows `index` needs."""

  def __init__(self, f: GGUFFile, cfg: ModelConfig):
    self.file = f
    arch = f.get("general.architecture")
    layer = _GEMMA_LAYER if cfg.family == "gemma2" else _LAYER
    self._src: dict[str, tuple[str, np.ndarray | None, float]] = {}
    for hf_name, name in _TOP.items():
      self._add(hf_name, name, None, cfg)
    for i in range(cfg.n_layers):
      for suffix, name in layer.items():
        heads = None
        if arch == "llama" and suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
          heads = cfg.n_heads if "q_proj" in suffix else cfg.n_kv_heads
        self._add(f"model.layers.{i}.{suffix}", f"blk.{i}.{name}", heads, cfg)
    self._hf_of = {src: hf for hf, (src, _, _) in self._src.items()}

  def _add(self, hf_name: str, name: str, heads: int | None, cfg: ModelConfig) -> None:
    if not self.file.has_tensor(name):
      return
    self.file.check_readable(name)
    rows = None
    if heads is not None:
      rows = _unpermute_rows(self.file.shape(name)[0], heads)
    shift = -1.0 if cfg.family == "gemma2" and name.endswith("norm.weight") else 0.0
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

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
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


def load_gguf(path: str, dtype: str = "float32", compute_dtype: str | None = None,
              mesh: jax.sharding.Mesh | None = None) -> Transformer:
  """A GGUF file as a Transformer with parameters in `dtype` (dequantised), streamed into
  `mesh`'s shardings like an HF checkpoint."""
  f = open_gguf(path)
  cfg = config_from_gguf(f)
  return load_tensors(cfg, GGUFTensors(f, cfg), f"{f.path} (metadata)", dtype, compute_dtype,
                      mesh)

