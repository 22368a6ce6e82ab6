"""Model configuration: one frozen dataclass for every decoder family, and the preset ladder.

Owns: `ModelConfig` (the switches that distinguish Llama 3.x, Qwen2/2.5, Qwen3, Mistral and
Gemma 2), `RopeScaling`, the named size presets and parameter counting.
Must not: touch arrays, files or devices. Conversion from/to HF `config.json` lives in `hf.py`.

The config is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3",
            "gpt_neox")
NORMS = ("rms", "layernorm")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
LAYER_TYPES = ("full", "sliding")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def family_switches(family: str) -> dict[str, Any]:
  """The structural switches every model of a family has, as its HF class fixes them (the HF
  and GGUF readers set them, `save_hf` checks them)."""
  gemma, neox, olmo2 = family in ("gemma2", "gemma3_text"), family == "gpt_neox", family == "olmo2"
  return {"qkv_bias": family in ("qwen2", "gpt_neox"),
          "qk_norm": family in ("qwen3", "gemma3_text", "olmo2"), "qk_norm_full": olmo2,
          "post_norms": gemma or olmo2, "embed_scale": gemma, "norm_offset": 1.0 if gemma else 0.0,
          "norm": "layernorm" if neox else "rms", "pre_norms": not olmo2,
          "gated_mlp": not neox, "mlp_bias": neox, "out_bias": neox}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is "llama3" (Llama 3.1+) or "linear"."""

  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("llama3", "linear"):
      raise ValueError(f"rope_scaling.kind={self.kind!r}: expected 'llama3' or 'linear'")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer. Families differ only by these switches.

  Shapes: `d_model` (D), `n_layers` (L), `n_heads` (H), `n_kv_heads` (G, GQA groups),
  `head_dim` (K), `d_ff` (F), `vocab_size` (V).
  """

  family: str = "llama"
  vocab_size: int = 4096
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 512
  max_seq_len: int = 2048
  norm_eps: float = 1e-5
  # RMSNorm scale is (norm_offset + weight): 0 for Llama-style, 1 for Gemma-style weights.
  norm_offset: float = 0.0
  activation: str = "silu"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  qk_norm: bool = False
  # QK-norm over all heads at once ([H*K] weights, OLMo 2) instead of per head ([K], Qwen 3).
  qk_norm_full: bool = False
  # "rms" (RMSNorm) or "layernorm" (LayerNorm with bias, GPT-NeoX): every norm of the model.
  norm: str = "rms"
  # Norms before attention and MLP (False: OLMo 2, whose only block norms are post_norms).
  pre_norms: bool = True
  # Attention and MLP read the same block input and both add to it (GPT-NeoX / Pythia).
  parallel_residual: bool = False
  # act(x W_gate) * (x W_up) (True) or act(x W_up + b_up) (GPT-NeoX's MLP).
  gated_mlp: bool = True
  # Biases on the MLP's matrices (b_up, b_down) and on attention's output projection (bo).
  mlp_bias: bool = False
  out_bias: bool = False
  # RoPE on the first rotary_dim dimensions of each head only (0: all of head_dim).
  rotary_dim: int = 0
  # RoPE base of the sliding layers (Gemma 3: 10k locally, rope_theta with scaling globally).
  rope_local_theta: float | None = None
  tie_embeddings: bool = False
  # Per-layer attention kind ("full" | "sliding"); None means all "full".
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  # Gemma 2 "sandwich" norms: post-attention and post-MLP norms before the residual add.
  post_norms: bool = False
  # Multiply the embedding output by sqrt(d_model) (Gemma).
  embed_scale: bool = False
  # Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma 2); None: head_dim**-0.5.
  query_pre_attn_scalar: float | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Numerics and memory: parameters are stored in param_dtype, computed in dtype.
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  # Positions per chunk of the training loss's unembedding (`target_logprobs`); 0 = all at once.
  logits_chunk: int = 0

  def __post_init__(self):
    def bad(field, got, expected):
      raise ValueError(f"ModelConfig.{field}={got!r}: expected {expected}")

    if self.family not in FAMILIES:
      bad("family", self.family, f"one of {FAMILIES}")
    if self.activation not in ACTIVATIONS:
      bad("activation", self.activation, f"one of {ACTIVATIONS}")
    if self.norm not in NORMS:
      bad("norm", self.norm, f"one of {NORMS}")
    if not self.pre_norms and not self.post_norms:
      bad("pre_norms", self.pre_norms, "True unless post_norms (a block needs some norm)")
    if self.parallel_residual and self.post_norms:
      bad("parallel_residual", True, "False with post_norms")
    if not 0 <= int(self.rotary_dim) <= self.head_dim or int(self.rotary_dim) % 2:
      bad("rotary_dim", self.rotary_dim, f"0 (all) or an even number <= head_dim={self.head_dim}")
    if self.qk_norm_full and not self.qk_norm:
      bad("qk_norm_full", True, "False unless qk_norm")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      if int(getattr(self, name)) <= 0:
        bad(name, getattr(self, name), "a positive integer")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.n_layers:
        bad("layer_types", self.layer_types, f"{self.n_layers} entries")
      for t in self.layer_types:
        if t not in LAYER_TYPES:
          bad("layer_types", t, f"entries in {LAYER_TYPES}")
      if "sliding" in self.layer_types and not self.sliding_window:
        bad("sliding_window", self.sliding_window, "a positive int when layer_types has 'sliding'")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        bad(name, getattr(self, name), f"one of {DTYPES}")
    if self.remat not in REMAT_POLICIES:
      bad("remat", self.remat, f"one of {REMAT_POLICIES}")
    if int(self.logits_chunk) < 0:
      bad("logits_chunk", self.logits_chunk, "0 (all positions at once) or a positive int")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if isinstance(self.layer_types, list):
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if isinstance(self.eos_token_ids, (list, int)):
      ids = (self.eos_token_ids,) if isinstance(self.eos_token_ids, int) else self.eos_token_ids
      object.__setattr__(self, "eos_token_ids", tuple(ids))

  # ---- derived quantities -------------------------------------------------------------------
  @property
  def attn_scale(self) -> float:
    base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return float(base) ** -0.5

  @property
  def rope_dim(self) -> int:
    """The dimensions of each head RoPE rotates."""
    return int(self.rotary_dim) or self.head_dim

  def window_sizes(self) -> tuple[int, ...]:
    """Per-layer attention window in tokens; 0 means full causal attention."""
    types = self.layer_types or ("full",) * self.n_layers
    return tuple(int(self.sliding_window) if t == "sliding" else 0 for t in types)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layer_types"] = list(self.layer_types) if self.layer_types else None
    d["eos_token_ids"] = list(self.eos_token_ids)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}; expected a subset of "
                       f"{sorted(known)}")
    return cls(**d)

  def param_shapes(self) -> dict[str, Any]:
    """Nested dict of parameter shapes (the layout of `transformer.init_params`)."""
    D, L, H, G, K, F, V = (self.d_model, self.n_layers, self.n_heads, self.n_kv_heads,
                           self.head_dim, self.d_ff, self.vocab_size)
    def norm(name):                # a norm's weight (and LayerNorm's bias), where it has one
      on = self.post_norms if name.startswith("post") else self.pre_norms
      return ({name: (L, D)} | ({name + "_bias": (L, D)} if self.norm == "layernorm" else {})
              if on else {})

    # in the order of the forward pass (errors name the first missing tensor of a layer)
    layers = {**norm("attn_norm"),
              "wq": (L, D, H * K), "wk": (L, D, G * K), "wv": (L, D, G * K),
              "wo": (L, H * K, D), **norm("post_attn_norm"), **norm("mlp_norm"),
              **({"w_gate": (L, D, F)} if self.gated_mlp else {}),
              "w_up": (L, D, F), "w_down": (L, F, D), **norm("post_mlp_norm")}
    if self.mlp_bias:
      layers.update(b_up=(L, F), b_down=(L, D))
    if self.out_bias:
      layers["bo"] = (L, D)
    if self.qkv_bias:
      layers.update(bq=(L, H * K), bk=(L, G * K), bv=(L, G * K))
    if self.qk_norm:               # over all heads at once (OLMo 2) or per head
      q, k = (H * K, G * K) if self.qk_norm_full else (K, K)
      layers.update(q_norm=(L, q), k_norm=(L, k))
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if self.norm == "layernorm":
      shapes["final_norm_bias"] = (D,)
    if not self.tie_embeddings:
      shapes["lm_head"] = (D, V)
    return shapes

  def num_params(self) -> int:
    def count(tree):
      if isinstance(tree, dict):
        return sum(count(v) for v in tree.values())
      return math.prod(tree)

    return count(self.param_shapes())


# ---- presets ----------------------------------------------------------------------------------
def _llama3_rope(factor: float) -> RopeScaling:
  return RopeScaling("llama3", factor, 1.0, 4.0, 8192)


def _tiny(d, layers, heads, kv, ff, vocab=4096, tie=True) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                     n_kv_heads=kv, head_dim=d // heads, d_ff=ff, max_seq_len=512,
                     rope_theta=10000.0, tie_embeddings=tie, norm_eps=1e-5)


def _qwen25(d, layers, heads, kv, ff, vocab=151936, tie=True) -> ModelConfig:
  return ModelConfig(family="qwen2", vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                     n_kv_heads=kv, head_dim=d // heads, d_ff=ff, max_seq_len=32768,
                     norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=tie,
                     bos_token_id=151643, eos_token_ids=(151643,))


def _llama3(d, layers, heads, kv, ff, rope_factor, tie) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=128256, d_model=d, n_layers=layers,
                     n_heads=heads, n_kv_heads=kv, head_dim=d // heads, d_ff=ff,
                     max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling=_llama3_rope(rope_factor), tie_embeddings=tie,
                     bos_token_id=128000, eos_token_ids=(128001,))


def _gemma2(d, layers, heads, kv, ff) -> ModelConfig:
  return ModelConfig(family="gemma2", vocab_size=256000, d_model=d, n_layers=layers,
                     n_heads=heads, n_kv_heads=kv, head_dim=256, d_ff=ff, max_seq_len=8192,
                     norm_eps=1e-6, norm_offset=1.0, activation="gelu_tanh", rope_theta=10000.0,
                     tie_embeddings=True, sliding_window=4096,
                     layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(layers)),
                     attn_softcap=50.0, final_softcap=30.0, post_norms=True, embed_scale=True,
                     query_pre_attn_scalar=256, bos_token_id=2, eos_token_ids=(1,),
                     pad_token_id=0)


_PRESETS: dict[str, ModelConfig] = {
    # Tiny Llama-shaped models for CPU studies on the fact world (vocab set by the tokenizer).
    "tiny-0.5m": _tiny(64, 4, 4, 2, 256),
    "tiny-2m": _tiny(128, 6, 4, 2, 512),
    "tiny-8m": _tiny(256, 6, 8, 4, 1024, tie=False),
    "tiny-4m-deep": _tiny(128, 16, 4, 2, 512),   # tiny-2m's width, 16 layers: late layers
    #                                             (paper A's flips), read with a tuned lens
    "tiny-30m": _tiny(512, 8, 8, 4, 1536, tie=False),
    # Real shapes (random init unless loaded from a checkpoint).
    "llama-3.2-1b": _llama3(2048, 16, 32, 8, 8192, 32.0, True),
    "llama-3.2-3b": _llama3(3072, 28, 24, 8, 8192, 32.0, True),
    "llama-3.1-8b": _llama3(4096, 32, 32, 8, 14336, 8.0, False),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, vocab=152064, tie=False),
    "qwen3-0.6b": ModelConfig(family="qwen3", vocab_size=151936, d_model=1024, n_layers=28,
                              n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
                              max_seq_len=40960, norm_eps=1e-6, rope_theta=1e6, qk_norm=True,
                              tie_embeddings=True, bos_token_id=151643, eos_token_ids=(151645,)),
    "mistral-7b-v0.3": ModelConfig(family="mistral", vocab_size=32768, d_model=4096, n_layers=32,
                                   n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
                                   max_seq_len=32768, norm_eps=1e-5, rope_theta=1e6,
                                   bos_token_id=1, eos_token_ids=(2,)),
    "gemma-2-2b": _gemma2(2304, 26, 8, 4, 9216),
    "gemma-2-9b": _gemma2(3584, 42, 16, 8, 14336),
}


def presets() -> dict[str, int]:
  """Preset name -> parameter count, smallest first."""
  return dict(sorted(((k, v.num_params()) for k, v in _PRESETS.items()), key=lambda kv: kv[1]))


def get_preset(name: str, **overrides) -> ModelConfig:
  """The named preset, with any field overridden (e.g. `vocab_size=` from a tokenizer)."""
  if name not in _PRESETS:
    raise KeyError(f"unknown model preset {name!r}; expected one of {sorted(_PRESETS)}")
  return _PRESETS[name].replace(**overrides) if overrides else _PRESETS[name]
