"""The decoder: pure functions over a parameter pytree, plus a thin Flax NNX module around them.

Owns: parameter initialisation, the forward pass (embedding, scanned blocks, unembedding; the
attention computation itself is `attention.py`'s), the
targets' log-probabilities from the final residual stream (`target_logprobs`, optionally by
chunks of positions), the KV-cache layout, and the hook sites inside the scan.
Must not: read files (see `hf.py`, `store.py`), build sweeps (see `factflip.probes`), sample
tokens (see `generate.py`) or decide which keys a token sees (the attention context, see
`attention.py`: `forward` takes one, built by a named constructor).

Parameter layout (see `ModelConfig.param_shapes`): per-layer weights are stacked along a leading
layer axis L and consumed by one `jax.lax.scan`, so compile time does not grow with depth and
per-layer captures come out as one stacked array. Dense weights are [in, out]; activations are
flattened to [B*T, D] around every matmul (XLA:CPU runs the backward of 3-D dots ~4x slower).

Shape suffixes: B batch, T query positions, S key/cache slots, D d_model, H heads, G kv heads,
R = H/G, K head_dim, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factflip.models.attention import (
  Context,
  attention,
  causal,
  hooked_attention,
  packed,
  shared_attention,
)
from factflip.models.config import ModelConfig
from factflip.models.hooks import (
  ATTENTION_SITES,
  SPLIT_INPUT_SITES,
  Intervention,
  check_site,
  model_sites,
)

Params = dict[str, Any]
F32 = jnp.float32


class Output(NamedTuple):
  logits: jax.Array | None          # [B, T, V] float32 (None when return_logits=False)
  captures: dict[str, jax.Array]    # site -> [L, B, T or P, D]
  residual: jax.Array               # [B, T, D] final residual stream (before final norm)
  cache: dict[str, jax.Array] | None


# ---- initialisation ---------------------------------------------------------------------------
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random parameters: N(0, 0.02) matrices, zero biases, unit norms (zero for Gemma offsets)."""
  shapes = cfg.param_shapes()
  pdt = jnp.dtype(cfg.param_dtype)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = path[-1].key
    if name.endswith("_bias") or name in ("bq", "bk", "bv", "bo", "b_up", "b_down"):
      leaves.append(jnp.zeros(shape, pdt))
    elif "norm" in name:
      leaves.append(jnp.full(shape, 1.0 - cfg.norm_offset, pdt))
    else:
      leaves.append((0.02 * jax.random.normal(k, shape, F32)).astype(pdt))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ---- building blocks --------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RMSNorm over the last axis, statistics in float32 (HF Llama and Gemma conventions)."""
  xf = x.astype(F32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
  if cfg.norm_offset:
    return (y * (cfg.norm_offset + w.astype(F32))).astype(x.dtype)
  return w.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, cfg: ModelConfig) -> jax.Array:
  """LayerNorm with bias over the last axis, statistics in float32 (GPT-NeoX)."""
  xf = x.astype(F32)
  xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
  y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + cfg.norm_eps)
  return (y * w.astype(F32) + b.astype(F32)).astype(x.dtype)


def norm(x: jax.Array, w: jax.Array, b: jax.Array | None, cfg: ModelConfig) -> jax.Array:
  """The model's norm (`cfg.norm`): RMSNorm, or LayerNorm with its bias `b`."""
  return layer_norm(x, w, b, cfg) if cfg.norm == "layernorm" else rms_norm(x, w, cfg)


def centred(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x in float32, minus its mean over the last axis for LayerNorm (RMSNorm centres nothing)."""
  xf = x.astype(F32)
  return xf - jnp.mean(xf, axis=-1, keepdims=True) if cfg.norm == "layernorm" else xf


def rms_scale(x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """What the model's norm divides by, float32 [..., 1] (TransformerLens' `hook_scale`):
  sqrt(mean(x²) + eps), or for LayerNorm sqrt(var(x) + eps)."""
  xf = centred(x, cfg)
  return jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)


def normalized(x: jax.Array, scale: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x (centred, for LayerNorm) divided by the norm's scale, float32: the norm before its weight
  (TransformerLens' `hook_normalized`)."""
  return centred(x, cfg) / scale.astype(F32)


def norm_weight(y: jax.Array, w: jax.Array, b: jax.Array | None, cfg: ModelConfig,
                dtype) -> jax.Array:
  """The norm's weight (and bias) applied to `normalized`'s output, in `dtype`."""
  y = y.astype(F32)
  if cfg.norm == "layernorm":
    return (y * w.astype(F32) + b.astype(F32)).astype(dtype)
  if cfg.norm_offset:
    return (y * (cfg.norm_offset + w.astype(F32))).astype(dtype)
  return w.astype(dtype) * y.astype(dtype)


def norm_by(x: jax.Array, scale: jax.Array, w: jax.Array, b: jax.Array | None,
            cfg: ModelConfig) -> jax.Array:
  """The model's norm with its scale given (`rms_scale`, or another run's: a frozen norm)."""
  return norm_weight(normalized(x, scale, cfg), w, b, cfg, x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [R/2] (R = cfg.rope_dim) in float32, with Llama-3 / linear
  scaling."""
  K = cfg.rope_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, K, 2).astype(np.float32) / K)))
  inv = inv.astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  if rs.kind == "linear":
    return (inv / np.float32(rs.factor)).astype(np.float32)
  old = rs.original_max_position_embeddings
  low_wavelen = old / rs.low_freq_factor
  high_wavelen = old / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
  smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: ModelConfig, positions_BxT: jax.Array, dt,
                local: bool = False) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, rope_dim] at the positions (local: the sliding layers' base,
  `rope_local_theta`, unscaled)."""
  inv = (rope_inv_freq(cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None)) if local
         else rope_inv_freq(cfg))
  freqs_BxTxK2 = positions_BxT.astype(F32)[..., None] * jnp.asarray(inv)
  emb_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
  return jnp.cos(emb_BxTxK).astype(dt), jnp.sin(emb_BxTxK).astype(dt)


def apply_rope(x_BxTxNxK: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array) -> jax.Array:
  """RoPE (rotate-half) on the first R = cos.shape[-1] dimensions of each head; the rest
  pass through (GPT-NeoX's partial rotary)."""
  R = cos_BxTxR.shape[-1]
  x_rot, x_pass = x_BxTxNxK[..., :R], x_BxTxNxK[..., R:]
  half = R // 2
  rot = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos_BxTxR[:, :, None] + rot * sin_BxTxR[:, :, None]
  return out if R == x_BxTxNxK.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


def _activation(cfg: ModelConfig):
  return {"silu": jax.nn.silu,
          "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
          "gelu": functools.partial(jax.nn.gelu, approximate=False)}[cfg.activation]


def _dense(x_NxI: jax.Array, w_IxO: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
  y = x_NxI @ w_IxO
  return y if b_O is None else y + b_O


def _materialise(h: jax.Array, probe: jax.Array) -> jax.Array:
  """`h`, computed into memory before its consumers run.

  XLA:CPU contracts a multiply into the add that consumes it (FMA) inside a fusion, and drops
  optimization barriers. A post-norm output (a product) that feeds the residual add would then
  round differently in a clean run than in a run where the site is replaced by its own captured
  value. A conditional is never fused, so both runs see the same rounded value. `probe` is a
  weight: the predicate is false only if it is NaN, and then the result is NaN too. Only on CPU
  (elsewhere a conditional may cost a host round trip).
  """
  if jax.default_backend() != "cpu":
    return h
  return jax.lax.cond(probe == probe, lambda x: x, lambda x: jnp.full_like(x, jnp.nan), h)


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


# ---- the forward pass -------------------------------------------------------------------------
def forward(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array, ctx: Context | None = None,
            *, interventions: Sequence[Intervention] = (), capture: Sequence[str] = (),
            capture_index: jax.Array | None = None, return_logits: bool = True,
            resid_BxTxD: jax.Array | None = None, start_layer: int = 0,
            first_layer: jax.Array | None = None) -> Output:
  """Run the decoder.

  How the new tokens attend (padding, positions, packed segments, a KV cache, prefix keys, a
  shared prompt cache) is the attention context `ctx`, built by a constructor of
  `factflip.models.attention`: `causal(mask_BxT, positions_BxT)` (the default, ctx=None: every
  token real, positions arange(T)), `packed`, `with_prefix`, `decode` or `fan_out` (their
  docstrings say what each reads). What a probe reads or changes stays a keyword here.

  Args:
    params: parameter pytree (`init_params` layout).
    tokens_BxT: int32 token ids.
    ctx: an `attention.Context`; None is `attention.causal()`.
    interventions: `Intervention`s applied inside the layer scan.
    capture: sites to return, each stacked as [L, B, T, D] (or [L, B, P, D] at `capture_index`).
    capture_index: int [P] positions to keep for captures (memory stays O(P), not O(T)).
    return_logits: set False to skip the unembedding (probes that only need activations).
    resid_BxTxD, start_layer: run only blocks start_layer..L-1 on the given residual stream
      (resid_pre of block start_layer) instead of embedding `tokens_BxT` (whose shape still sets
      B and T). Layer-indexed inputs (interventions, the context's cache or prefix) and outputs
      (captures) then cover those L - start_layer blocks.
    first_layer: a traced layer index; the blocks below it pass the residual stream through
      unchanged (their captures are zeros), so with `resid_BxTxD` = resid_pre of first_layer the
      run starts there. Unlike start_layer it is data: each block is a conditional, and a
      vmapped sweep whose cells share one first_layer (a per-layer group of cells) skips the
      work below it inside one compiled program.
  """
  if ctx is None:
    ctx = causal()
  elif not isinstance(ctx, Context):
    raise TypeError(f"forward: ctx is a {type(ctx).__name__}; expected an attention.Context "
                    "(e.g. attention.causal(mask_BxT=mask) for a padding mask)")
  ctx.check()
  dt = jnp.dtype(cfg.dtype)
  for s in capture:
    check_site(s)
  B, T = tokens_BxT.shape
  positions_BxT = ctx.positions(B, T)

  if resid_BxTxD is None:
    x_BxTxD = embed(params, cfg, tokens_BxT)
  else:
    x_BxTxD = resid_BxTxD.astype(dt)
  cos_BxTxK, sin_BxTxK = rope_tables(cfg, positions_BxT, dt)
  if cfg.rope_local_theta:          # Gemma 3: the sliding layers' own base (chosen per layer)
    local_cos_BxTxK, local_sin_BxTxK = rope_tables(cfg, positions_BxT, dt, local=True)
  keys = ctx.key_mask(positions_BxT)
  windows_L = jnp.asarray(cfg.window_sizes()[start_layer:], jnp.int32)
  # without sliding layers the mask is the same for every layer: built here, outside the scan,
  # so autodiff keeps one copy for the backward instead of one per layer
  windowed = any(cfg.window_sizes()[start_layer:])

  act = _activation(cfg)
  H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  capture = tuple(capture)
  sites = set(capture) | {iv.site for iv in interventions}   # the non-stream sites cost a reshape
  attention_hooked = bool(sites & set(ATTENTION_SITES))
  missing = sites - set(model_sites(cfg))
  if missing:
    raise ValueError(f"forward: sites {sorted(missing)} do not exist in this {cfg.family} model "
                     "(no pre-norms: OLMo 2; no gated MLP: GPT-NeoX; attn_in: grouped-query "
                     "attention, use q/k/v_input)")
  split = sites & set(SPLIT_INPUT_SITES + ("attn_in",))
  if split and sites & {"ln1_scale", "ln1_normalized"}:
    raise ValueError(f"forward: {sorted(split)} with ln1_scale / ln1_normalized: the per-head "
                     "inputs are normalised per head, so ln1's scale is not one site; hook one or "
                     "the other")
  if "attn_in" in split and len(split) > 1:
    raise ValueError(f"forward: {sorted(split)}: attn_in feeds q, k and v, the split inputs one "
                     "each; hook one or the other")

  def block(x_BxTxD, xs):
    p, window, kv, shared_kv, iv_xs = xs
    if start_layer:   # p is the layer index: read that layer's slice of the stack in place
      p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, p, keepdims=False),
                       params["layers"])
    p = jax.tree.map(lambda a: a.astype(dt), p)
    caps = {}

    def pre_norm(x_BxTxD, name, ln):
      """A branch's input norm (none without pre_norms); when its scale or its normalized
      input (ln = "ln1" / "ln2") is hooked, the norm in two steps with those sites between."""
      if not cfg.pre_norms:
        return x_BxTxD
      w, b = p[name], p.get(name + "_bias")
      if f"{ln}_scale" not in sites and f"{ln}_normalized" not in sites:
        return norm(x_BxTxD, w, b, cfg)
      scale = hooked(f"{ln}_scale", rms_scale(x_BxTxD, cfg))
      y = hooked(f"{ln}_normalized", normalized(x_BxTxD, scale, cfg))
      return norm_weight(y, w, b, cfg, x_BxTxD.dtype)

    def post_norm(h_BxTxD, name):
      if not cfg.post_norms:
        return h_BxTxD
      return _materialise(norm(h_BxTxD, p[name], p.get(name + "_bias"), cfg), p[name][0])

    def site(name, h):
      for iv, (on, vals) in zip(interventions, iv_xs):
        if iv.site == name:
          h = iv.apply(h, on, vals)
      if name in capture:
        caps[name] = h if capture_index is None else jnp.take(h, capture_index, axis=1)
      return h

    def hooked(name, h):
      """A site inside a branch: nothing unless hooked; when hooked, its value is materialised
      after the site (`_materialise`), so a run that captures it and a run that replaces it by
      that capture feed the same rounded values to what follows."""
      return _materialise(site(name, h), p["wo"][0, 0]) if name in sites else h

    def projection(h_NxD, name, w_DxnK, b_nK, n, input_site):
      """[B, T, n, K] from the shared normalized input h_NxD, or, when `input_site` (or
      attn_in) is hooked, from that site's per-head copies of resid_pre, each normalized on
      its own."""
      if input_site in sites:
        x_BxTxnxD = hooked(input_site, jnp.broadcast_to(x_BxTxD[:, :, None], (B, T, n, D)))
      elif attn_in_BxTxHxD is not None:            # n = H: every head has its own kv head
        x_BxTxnxD = attn_in_BxTxHxD
      else:
        return hooked(name, _dense(h_NxD, w_DxnK, b_nK).reshape(B, T, n, K))
      h_BxTxnxD = pre_norm(x_BxTxnxD, "attn_norm", "ln1")
      y = jnp.einsum("btnd,dnk->btnk", h_BxTxnxD, w_DxnK.reshape(D, n, K))
      return hooked(name, y if b_nK is None else y + b_nK.reshape(n, K))

    x_BxTxD = site("resid_pre", x_BxTxD)
    # attention branch
    attn_in_BxTxHxD = None
    if "attn_in" in sites:
      attn_in_BxTxHxD = hooked("attn_in", jnp.broadcast_to(x_BxTxD[:, :, None], (B, T, H, D)))
    h_NxD = pre_norm(x_BxTxD, "attn_norm", "ln1").reshape(B * T, D)
    q_BxTxHxK = projection(h_NxD, "q", p["wq"], p.get("bq"), H, "q_input")
    k_BxTxGxK = projection(h_NxD, "k", p["wk"], p.get("bk"), G, "k_input")
    v_BxTxGxK = projection(h_NxD, "v", p["wv"], p.get("bv"), G, "v_input")
    if cfg.qk_norm and cfg.qk_norm_full:      # OLMo 2: one norm over all heads
      q_BxTxHxK = rms_norm(q_BxTxHxK.reshape(B, T, H * K), p["q_norm"], cfg).reshape(B, T, H, K)
      k_BxTxGxK = rms_norm(k_BxTxGxK.reshape(B, T, G * K), p["k_norm"], cfg).reshape(B, T, G, K)
    elif cfg.qk_norm:
      q_BxTxHxK = rms_norm(q_BxTxHxK, p["q_norm"], cfg)
      k_BxTxGxK = rms_norm(k_BxTxGxK, p["k_norm"], cfg)
    cos_, sin_ = cos_BxTxK, sin_BxTxK
    if cfg.rope_local_theta:
      cos_ = jnp.where(window > 0, local_cos_BxTxK, cos_BxTxK)
      sin_ = jnp.where(window > 0, local_sin_BxTxK, sin_BxTxK)
    q_BxTxHxK = hooked("rot_q", apply_rope(q_BxTxHxK, cos_, sin_))
    k_BxTxGxK = hooked("rot_k", apply_rope(k_BxTxGxK, cos_, sin_))
    k_BxSxGxK, v_BxSxGxK, new_kv = ctx.layer_keys(kv, k_BxTxGxK, v_BxTxGxK, dt)
    mask_BxTxS = keys.at(window, windowed)
    if attention_hooked:
      if shared_kv is not None:
        raise ValueError("forward: attn_scores / pattern hooks read one key axis; a fan_out "
                         "context (a shared prompt cache) has two")
      o_BxTxHK = hooked_attention(q_BxTxHxK, k_BxSxGxK.astype(dt), v_BxSxGxK.astype(dt),
                                  mask_BxTxS, cfg, hooked)
    elif shared_kv is None:
      o_BxTxHK = attention(q_BxTxHxK, k_BxSxGxK.astype(dt), v_BxSxGxK.astype(dt), mask_BxTxS,
                           cfg)
    else:
      o_BxTxHK = shared_attention(q_BxTxHxK, shared_kv[0].astype(dt), shared_kv[1].astype(dt),
                                  keys.shared_at(window, windowed), k_BxSxGxK.astype(dt),
                                  v_BxSxGxK.astype(dt), mask_BxTxS, cfg)
    if "z" in sites:
      o_BxTxHK = site("z", o_BxTxHK.reshape(B, T, H, K))
    if "result" in sites:             # each head's write, then their sum and W_O's bias
      r_BxTxHxD = hooked("result", jnp.einsum("bthk,hkd->bthd", o_BxTxHK.reshape(B, T, H, K),
                                              p["wo"].reshape(H, K, D)))
      a_BxTxD = r_BxTxHxD.sum(2) if p.get("bo") is None else r_BxTxHxD.sum(2) + p["bo"]
    else:
      a_BxTxD = _dense(o_BxTxHK.reshape(B * T, H * K), p["wo"], p.get("bo")).reshape(B, T, D)
    a_BxTxD = site("attn_out", post_norm(a_BxTxD, "post_attn_norm"))
    mlp_in_BxTxD = x_BxTxD                     # parallel residual: the MLP reads resid_pre
    x_BxTxD = site("resid_mid", x_BxTxD + a_BxTxD)
    # MLP branch
    if not cfg.parallel_residual:
      mlp_in_BxTxD = x_BxTxD
    mlp_in_BxTxD = site("mlp_in", mlp_in_BxTxD)
    h_NxD = pre_norm(mlp_in_BxTxD, "mlp_norm", "ln2").reshape(B * T, D)

    def hidden(name, u_NxF):           # an MLP hidden site, [B, T, d_ff] when hooked
      return site(name, u_NxF.reshape(B, T, -1)).reshape(B * T, -1) if name in sites else u_NxF

    if cfg.gated_mlp:
      u_NxF = act(hidden("mlp_pre", _dense(h_NxD, p["w_gate"]))) * hidden(
          "mlp_pre_linear", _dense(h_NxD, p["w_up"], p.get("b_up")))
    else:
      u_NxF = act(hidden("mlp_pre", _dense(h_NxD, p["w_up"], p.get("b_up"))))
    u_NxF = hidden("mlp_post", u_NxF)
    m_BxTxD = _dense(u_NxF, p["w_down"], p.get("b_down")).reshape(B, T, D)
    m_BxTxD = site("mlp_out", post_norm(m_BxTxD, "post_mlp_norm"))
    x_BxTxD = site("resid_post", x_BxTxD + m_BxTxD)
    return x_BxTxD, (new_kv, caps)

  if cfg.remat != "none":
    block = jax.checkpoint(block, policy=_REMAT[cfg.remat], prevent_cse=False)

  kv_L, shared_L = ctx.scanned()
  iv_xs = tuple((iv.layer_mask, iv.values) for iv in interventions)
  layers = params["layers"]
  if start_layer:   # no copy of the stack's tail per start layer (sweeps start at every layer)
    layers = jnp.arange(start_layer, cfg.n_layers)
  xs = (layers, windows_L, kv_L, shared_L, iv_xs)
  step = block
  if first_layer is not None:
    def step(x_BxTxD, ixs):
      index, xs = ixs

      def skip(x_BxTxD, xs):
        out = jax.eval_shape(block, x_BxTxD, xs)[1]
        return x_BxTxD, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out)

      return jax.lax.cond(index >= first_layer, block, skip, x_BxTxD, xs)

    xs = (jnp.arange(start_layer, cfg.n_layers), xs)
  x_BxTxD, (new_kv, captures) = jax.lax.scan(step, x_BxTxD, xs)
  logits = unembed(params, cfg, x_BxTxD) if return_logits else None
  return Output(logits, captures, x_BxTxD, ctx.written(new_kv, keys))


def embed(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array) -> jax.Array:
  """Token embeddings in the compute dtype, times sqrt(d_model) for Gemma (resid_pre[0])."""
  dt = jnp.dtype(cfg.dtype)
  x_BxTxD = jnp.take(params["embed"], tokens_BxT, axis=0).astype(dt)
  if cfg.embed_scale:
    x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(cfg.d_model), dt)
  return x_BxTxD


def unembed(params: Params, cfg: ModelConfig, h_xD: jax.Array) -> jax.Array:
  """final_norm(h) @ W_U with the final soft-cap, float32. Works on any leading shape [..., D]
  (the logit lens applies it to every layer's residual stream)."""
  dt = jnp.dtype(cfg.dtype)
  lead = h_xD.shape[:-1]
  b = params.get("final_norm_bias")
  h_NxD = norm(h_xD.astype(dt), params["final_norm"].astype(dt),
               None if b is None else b.astype(dt), cfg).reshape(-1, cfg.d_model)
  if cfg.tie_embeddings:
    logits_NxV = jnp.einsum("nd,vd->nv", h_NxD, params["embed"].astype(dt),
                            preferred_element_type=F32)
  else:
    logits_NxV = jnp.dot(h_NxD, params["lm_head"].astype(dt), preferred_element_type=F32)
  if cfg.final_softcap:
    logits_NxV = jnp.tanh(logits_NxV / cfg.final_softcap) * cfg.final_softcap
  return logits_NxV.reshape(*lead, cfg.vocab_size)


def target_logprobs(params: Params, cfg: ModelConfig, h_BxTxD: jax.Array,
                    targets_BxT: jax.Array) -> jax.Array:
  """log p(target) at every position from the final residual stream (`Output.residual`):
  the unembedding and the log-softmax, float32 [B, T].

  With `cfg.logits_chunk` = C > 0 the B·T positions go through in chunks of C (`lax.map`,
  each chunk rematerialised): the [B·T, V] float32 logits, their exponentials and their
  gradient never exist whole, only one chunk's [C, V] at a time (the backward recomputes each
  chunk's logits). With a vocabulary of 128k that is 0.5 MB per position of a batch saved
  three times over. C = 0 (the default) unembeds everything at once.
  """
  B, T, D = h_BxTxD.shape

  def logprob(h_NxD, t_N):
    logits_NxV = unembed(params, cfg, h_NxD)
    picked_N = jnp.take_along_axis(logits_NxV, t_N[:, None], axis=-1)[:, 0]
    return picked_N - jax.nn.logsumexp(logits_NxV, axis=-1)

  C, N = cfg.logits_chunk, B * T
  if not C or C >= N:
    return logprob(h_BxTxD.reshape(N, D), targets_BxT.reshape(N)).reshape(B, T)
  n = -(-N // C)
  h_nxCxD = jnp.pad(h_BxTxD.reshape(N, D), ((0, n * C - N), (0, 0))).reshape(n, C, D)
  t_nxC = jnp.pad(targets_BxT.reshape(N), (0, n * C - N)).reshape(n, C)
  chunk = jax.checkpoint(lambda xs: logprob(*xs), prevent_cse=False)
  return jax.lax.map(chunk, (h_nxCxD, t_nxC)).reshape(n * C)[:N].reshape(B, T)


def token_logprobs(params: Params, cfg: ModelConfig, batch: dict) -> jax.Array:
  """log p(targets | inputs) per token of a pipeline batch (inputs, targets, positions,
  segment_ids), float32 [B, T]: packed rows attend within segments; the unembedding by chunks
  of `cfg.logits_chunk` positions when set. What every training objective and the
  per-example-gradient probe differentiate."""
  ctx = packed(batch["segment_ids"], batch["positions"])
  h_BxTxD = forward(params, cfg, batch["inputs"], ctx, return_logits=False).residual
  return target_logprobs(params, cfg, h_BxTxD, batch["targets"])


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> dict[str, jax.Array]:
  """An empty KV cache: k, v [L, B, S, G, K] and the valid-slot mask [B, S]."""
  dt = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
          "valid": jnp.zeros((batch, slots), bool)}


_forward_jit = jax.jit(forward,
                       static_argnames=("cfg", "capture", "return_logits", "start_layer"))


# ---- the NNX module ---------------------------------------------------------------------------
class _Stack(nnx.Module):
  """The stacked per-layer parameters ([L, ...] each)."""

  def __init__(self, arrays: dict[str, jax.Array]):
    for name, a in arrays.items():
      setattr(self, name, nnx.Param(a))


class Transformer(nnx.Module):
  """A decoder whose call maps int32 tokens [B, T] (and an optional padding mask) to float32
  logits [B, T, V]. Parameters are `nnx.Param`s in the `init_params` layout; `params()` returns
  them as a plain pytree for the pure functions (`forward`, probes, training).

  `model(tokens, mask, positions)` and `model.forward(tokens, mask, positions)` keep the HF-like
  call: the mask and positions make `attention.causal(mask, positions)`. Any other attention
  context goes in as `ctx=` (`model.forward(tokens, ctx=attention.decode(cache, 0))`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None,
               params: Params | None = None):
    if params is None:
      if rngs is None:
        raise ValueError("Transformer needs rngs= (random init) or params=")
      params = init_params(cfg, rngs.params())
    self.cfg = cfg
    self.embed = nnx.Param(params["embed"])
    self.layers = _Stack(params["layers"])
    self.final_norm = nnx.Param(params["final_norm"])
    if "final_norm_bias" in params:
      self.final_norm_bias = nnx.Param(params["final_norm_bias"])
    if "lm_head" in params:
      self.lm_head = nnx.Param(params["lm_head"])

  def params(self) -> Params:
    return nnx.state(self, nnx.Param).to_pure_dict()

  def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None, **kw) -> jax.Array:
    return self.forward(tokens_BxT, mask_BxT, positions_BxT, **kw).logits

  def forward(self, tokens_BxT, mask_BxT=None, positions_BxT=None, *,
              ctx: Context | None = None, **kw) -> Output:
    """Jitted `forward` with this model's parameters, attending as `ctx` or, without it, as
    `attention.causal(mask_BxT, positions_BxT)` (see `forward` for the other keywords)."""
    if ctx is None:
      ctx = causal(mask_BxT, positions_BxT)
    elif mask_BxT is not None or positions_BxT is not None:
      raise ValueError("Transformer.forward: mask_BxT / positions_BxT or ctx=, not both (a "
                       "context carries its own mask and positions)")
    if "capture" in kw:
      kw["capture"] = tuple(kw["capture"])
    if "interventions" in kw:
      kw["interventions"] = tuple(kw["interventions"])
    return _forward_jit(self.params(), self.cfg, jnp.asarray(tokens_BxT, jnp.int32), ctx, **kw)
