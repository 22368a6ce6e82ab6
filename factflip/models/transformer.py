"""The decoder: pure functions over a parameter pytree, plus a thin Flax NNX module around them.

Owns: parameter initialisation, the forward pass (embedding, scanned blocks, unembedding), the
targets' log-probabilities from the final residual stream (`target_logprobs`, optionally by
chunks of positions), the KV-cache layout, and the hook sites inside the scan.
Must not: read files (see `hf.py`, `store.py`), build sweeps (see `factflip.probes`) or sample
tokens (see `generate.py`).

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

from factflip.models.config import ModelConfig
from factflip.models.hooks import Intervention, check_site

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
    if "norm" in name:
      leaves.append(jnp.full(shape, 1.0 - cfg.norm_offset, pdt))
    elif name in ("bq", "bk", "bv"):
      leaves.append(jnp.zeros(shape, pdt))
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


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [K/2] in float32, with Llama-3 / linear scaling."""
  K = cfg.head_dim
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


def rope_tables(cfg: ModelConfig, positions_BxT: jax.Array, dt) -> tuple[jax.Array, jax.Array]:
  freqs_BxTxK2 = positions_BxT.astype(F32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  emb_BxTxK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)
  return jnp.cos(emb_BxTxK).astype(dt), jnp.sin(emb_BxTxK).astype(dt)


def apply_rope(x_BxTxNxK: jax.Array, cos_BxTxK: jax.Array, sin_BxTxK: jax.Array) -> jax.Array:
  half = x_BxTxNxK.shape[-1] // 2
  rot = jnp.concatenate([-x_BxTxNxK[..., half:], x_BxTxNxK[..., :half]], axis=-1)
  return x_BxTxNxK * cos_BxTxK[:, :, None] + rot * sin_BxTxK[:, :, None]


def _activation(cfg: ModelConfig):
  return {"silu": jax.nn.silu,
          "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
          "gelu": functools.partial(jax.nn.gelu, approximate=False)}[cfg.activation]


def _dense(x_NxI: jax.Array, w_IxO: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
  y = x_NxI @ w_IxO
  return y if b_O is None else y + b_O


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, cfg: ModelConfig) -> jax.Array:
  """Grouped-query attention with optional logit soft-cap; softmax in float32. -> [B, T, H*K].

  The R = H/G query heads of a group are folded into the query axis ([B, G, R*T, K]) so each
  group is one large matmul (1.3x faster on XLA:CPU than a batched [B, G, R] product). Without
  a soft-cap the core has a hand-written backward (`_attend`), 1.4x faster than autodiff's.
  """
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  R = H // G
  q_BxGxRTxK = q_BxTxHxK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * T, K)
  if cfg.attn_softcap:
    o_BxGxRTxK = _attend_fwd(q_BxGxRTxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, cfg.attn_scale,
                             cfg.attn_softcap)[0]
  else:
    o_BxGxRTxK = _attend(q_BxGxRTxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, cfg.attn_scale)
  return o_BxGxRTxK.reshape(B, G, R, T, K).transpose(0, 3, 1, 2, 4).reshape(B, T, H * K)


def shared_attention(q_BxTxHxK, kp_PxSpxGxK, vp_PxSpxGxK, maskp_BxTxSp, k_BxSxGxK, v_BxSxGxK,
                     mask_BxTxS, cfg: ModelConfig) -> jax.Array:
  """Attention over a prefix shared by groups of F = B / P consecutive rows (keys kp, vp of
  P prefix rows) and each row's own keys k, v: one softmax over both, float32. The F rows'
  queries of a group meet its prefix keys in one matmul ([P, G, F·R·T, K] x [P, Sp, G, K]), so
  the prefix is read once per group, not copied per row. -> [B, T, H*K]."""
  B, T, H, K = q_BxTxHxK.shape
  P, Sp, G, _ = kp_PxSpxGxK.shape
  F, R = B // P, H // G
  q_PxGxQxK = (q_BxTxHxK.reshape(P, F, T, G, R, K).transpose(0, 3, 1, 4, 2, 5)
               .reshape(P, G, F * R * T, K))
  sp_PxGxQxSp = jnp.einsum("bgqk,bsgk->bgqs", q_PxGxQxK, kp_PxSpxGxK,
                           preferred_element_type=F32) * cfg.attn_scale
  sp_BxGxRTxSp = (sp_PxGxQxSp.reshape(P, G, F, R * T, Sp).transpose(0, 2, 1, 3, 4)
                  .reshape(B, G, R * T, Sp))
  q_BxGxRTxK = q_BxTxHxK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * T, K)
  so_BxGxRTxS = jnp.einsum("bgqk,bsgk->bgqs", q_BxGxRTxK, k_BxSxGxK,
                           preferred_element_type=F32) * cfg.attn_scale
  s_BxGxRTxA = jnp.concatenate([sp_BxGxRTxSp, so_BxGxRTxS], axis=-1)
  if cfg.attn_softcap:
    s_BxGxRTxA = jnp.tanh(s_BxGxRTxA / cfg.attn_softcap) * cfg.attn_softcap
  A = s_BxGxRTxA.shape[-1]
  mask_BxTxA = jnp.concatenate([maskp_BxTxSp, mask_BxTxS], axis=-1)
  s_BxGxRxTxA = jnp.where(mask_BxTxA[:, None, None], s_BxGxRTxA.reshape(B, G, R, T, A),
                          jnp.finfo(F32).min)
  p_BxGxRTxA = jax.nn.softmax(s_BxGxRxTxA, axis=-1).reshape(B, G, R * T, A)
  pp_PxGxQxSp = (p_BxGxRTxA[..., :Sp].reshape(P, F, G, R * T, Sp).transpose(0, 2, 1, 3, 4)
                 .reshape(P, G, F * R * T, Sp))
  op_PxGxQxK = jnp.einsum("bgqs,bsgk->bgqk", pp_PxGxQxSp.astype(vp_PxSpxGxK.dtype), vp_PxSpxGxK)
  o_BxGxRTxK = (op_PxGxQxK.reshape(P, G, F, R * T, K).transpose(0, 2, 1, 3, 4)
                .reshape(B, G, R * T, K))
  o_BxGxRTxK = o_BxGxRTxK + jnp.einsum("bgqs,bsgk->bgqk",
                                       p_BxGxRTxA[..., Sp:].astype(v_BxSxGxK.dtype), v_BxSxGxK)
  return o_BxGxRTxK.reshape(B, G, R, T, K).transpose(0, 3, 1, 2, 4).reshape(B, T, H * K)


def _attend_fwd(q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale, softcap=0.0):
  """softmax(q·k·scale, masked) · v over folded queries (Q = R*T); also returns p."""
  B, G, Q, _ = q_BxGxQxK.shape
  T, S = mask_BxTxS.shape[1], mask_BxTxS.shape[2]
  s_BxGxQxS = jnp.einsum("bgqk,bsgk->bgqs", q_BxGxQxK, k_BxSxGxK,
                         preferred_element_type=F32) * scale
  if softcap:
    s_BxGxQxS = jnp.tanh(s_BxGxQxS / softcap) * softcap
  s_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxGxQxS.reshape(B, G, Q // T, T, S),
                          jnp.finfo(F32).min)
  p_BxGxQxS = jax.nn.softmax(s_BxGxRxTxS, axis=-1).reshape(B, G, Q, S)
  o_BxGxQxK = jnp.einsum("bgqs,bsgk->bgqk", p_BxGxQxS.astype(v_BxSxGxK.dtype), v_BxSxGxK)
  return o_BxGxQxK, p_BxGxQxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale):
  return _attend_fwd(q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale)[0]


def _attend_vjp_fwd(q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale):
  o, p = _attend_fwd(q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale)
  return o, (q_BxGxQxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, p)


def _attend_vjp_bwd(scale, res, do_BxGxQxK):
  """dS = P ∘ (dP − rowsum(dP ∘ P)), the softmax backward written once instead of autodiff's
  chain through the mask, the max subtraction and the normaliser."""
  q, k, v, mask, p_BxGxQxS = res
  do = do_BxGxQxK.astype(F32)
  dv_BxSxGxK = jnp.einsum("bgqs,bgqk->bsgk", p_BxGxQxS, do)
  dp_BxGxQxS = jnp.einsum("bgqk,bsgk->bgqs", do, v.astype(F32))
  ds_BxGxQxS = p_BxGxQxS * (dp_BxGxQxS - (dp_BxGxQxS * p_BxGxQxS).sum(-1, keepdims=True)) * scale
  B, G, Q, S = ds_BxGxQxS.shape
  T = mask.shape[1]  # a fully masked row has a uniform p but no gradient (as through the where)
  ds_BxGxQxS = jnp.where(mask[:, None, None], ds_BxGxQxS.reshape(B, G, Q // T, T, S),
                         0.0).reshape(B, G, Q, S)
  dq_BxGxQxK = jnp.einsum("bgqs,bsgk->bgqk", ds_BxGxQxS, k.astype(F32))
  dk_BxSxGxK = jnp.einsum("bgqs,bgqk->bsgk", ds_BxGxQxS, q.astype(F32))
  return (dq_BxGxQxK.astype(q.dtype), dk_BxSxGxK.astype(k.dtype), dv_BxSxGxK.astype(v.dtype),
          None)


_attend.defvjp(_attend_vjp_fwd, _attend_vjp_bwd)


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
def forward(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array,
            mask_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None, *,
            interventions: Sequence[Intervention] = (), capture: Sequence[str] = (),
            capture_index: jax.Array | None = None, cache: dict[str, jax.Array] | None = None,
            cache_index: jax.Array | int = 0, return_logits: bool = True,
            resid_BxTxD: jax.Array | None = None, start_layer: int = 0,
            segment_ids_BxT: jax.Array | None = None,
            prefix_kv: tuple[jax.Array, jax.Array] | None = None,
            attn_mask_BxTxS: jax.Array | None = None,
            shared_cache: dict[str, jax.Array] | None = None) -> Output:
  """Run the decoder.

  Args:
    params: parameter pytree (`init_params` layout).
    tokens_BxT: int32 token ids.
    mask_BxT: 1/True for real tokens, 0 for padding (keys at padding are never attended to).
    positions_BxT: RoPE positions; default `cache_index + arange(T)` (HF forward semantics).
    interventions: `Intervention`s applied inside the layer scan.
    capture: sites to return, each stacked as [L, B, T, D] (or [L, B, P, D] at `capture_index`).
    capture_index: int [P] positions to keep for captures (memory stays O(P), not O(T)).
    cache: KV cache from `init_cache`; the T new tokens are written at slots
      [cache_index, cache_index + T) and attend to every valid slot up to their own.
    return_logits: set False to skip the unembedding (probes that only need activations).
    resid_BxTxD, start_layer: run only blocks start_layer..L-1 on the given residual stream
      (resid_pre of block start_layer) instead of embedding `tokens_BxT` (whose shape still sets
      B and T). Layer-indexed inputs (interventions, cache) and outputs (captures) then cover
      those L - start_layer blocks.
    segment_ids_BxT: packed rows (the data pipeline's layout): a token attends only to earlier
      tokens of its own segment; 0 marks padding. Pass the pipeline's `positions` too, so RoPE
      restarts per segment. Not with a cache.
    prefix_kv, attn_mask_BxTxS: read-only keys/values k, v [L, B, S0, G, K] (e.g. another run's
      cache) that the T new tokens attend to besides themselves, under an explicit mask
      [B, T, S0 + T] over (prefix slots, new tokens); `positions_BxT` places the new tokens
      (prefix slot j is position j). Patching sweeps pack several suffixes into one row this way.
    shared_cache: with `cache`, a read-only cache k, v [L, Bp, Sp, G, K], valid [Bp, Sp] shared
      by groups of F = B / Bp consecutive rows (row b reads prefix row b // F): every query
      attends to its group's valid shared slots (all in its past) and then to its own cache,
      whose slots follow them (slot j of `cache` is slot Sp + j for sliding windows). Decoding
      F continuations of one prompt reads the prompt's keys once instead of F copies.
  """
  dt = jnp.dtype(cfg.dtype)
  for s in capture:
    check_site(s)
  B, T = tokens_BxT.shape
  if segment_ids_BxT is not None and cache is not None:
    raise ValueError("forward: segment_ids (packed rows) cannot be combined with a KV cache")
  if mask_BxT is None:
    mask_BxT = jnp.ones((B, T), bool) if segment_ids_BxT is None else segment_ids_BxT > 0
  mask_BxT = mask_BxT.astype(bool)
  if positions_BxT is None:
    positions_BxT = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32), (B, T))

  if resid_BxTxD is None:
    x_BxTxD = embed(params, cfg, tokens_BxT)
  else:
    x_BxTxD = resid_BxTxD.astype(dt)
  cos_BxTxK, sin_BxTxK = rope_tables(cfg, positions_BxT, dt)

  if prefix_kv is not None:
    if cache is not None or attn_mask_BxTxS is None:
      raise ValueError("forward: prefix_kv needs attn_mask_BxTxS and no cache")
    S0 = prefix_kv[0].shape[2]
    key_pos_BxS = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(S0, dtype=positions_BxT.dtype), (B, S0)), positions_BxT], 1)
    diff_xTxS = positions_BxT[:, :, None] - key_pos_BxS[:, None, :]
    causal_BxTxS = attn_mask_BxTxS.astype(bool)
  else:
    if cache is None:
      kv_valid_BxS = mask_BxT
      q_slot_T = jnp.arange(T)
      kv_slot_S = jnp.arange(T)
    else:
      kv_valid_BxS = jax.lax.dynamic_update_slice(cache["valid"], mask_BxT, (0, cache_index))
      q_slot_T = cache_index + jnp.arange(T)
      kv_slot_S = jnp.arange(cache["valid"].shape[1])
    diff_xTxS = (q_slot_T[:, None] - kv_slot_S[None, :])[None]
    causal_BxTxS = (diff_xTxS >= 0) & kv_valid_BxS[:, None, :]
    if shared_cache is not None:
      if cache is None:
        raise ValueError("forward: shared_cache reads beside a cache (pass cache=)")
      Sp = shared_cache["valid"].shape[1]
      shared_diff_xTxSp = (Sp + q_slot_T[:, None] - jnp.arange(Sp)[None, :])[None]
      shared_valid_BxSp = jnp.repeat(shared_cache["valid"],
                                     B // shared_cache["valid"].shape[0], axis=0)
    if segment_ids_BxT is not None:
      causal_BxTxS = causal_BxTxS & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  windows_L = jnp.asarray(cfg.window_sizes()[start_layer:], jnp.int32)
  # without sliding layers the mask is the same for every layer: built here, outside the scan,
  # so autodiff keeps one copy for the backward instead of one per layer
  windowed = any(cfg.window_sizes()[start_layer:])

  act = _activation(cfg)
  H, G, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  capture = tuple(capture)
  sites = set(capture) | {iv.site for iv in interventions}   # the non-stream sites cost a reshape

  def block(x_BxTxD, xs):
    p, window, kv, shared_kv, iv_xs = xs
    if start_layer:   # p is the layer index: read that layer's slice of the stack in place
      p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, p, keepdims=False),
                       params["layers"])
    p = jax.tree.map(lambda a: a.astype(dt), p)
    caps = {}

    def site(name, h):
      for iv, (on, vals) in zip(interventions, iv_xs):
        if iv.site == name:
          h = iv.apply(h, on, vals)
      if name in capture:
        caps[name] = h if capture_index is None else jnp.take(h, capture_index, axis=1)
      return h

    x_BxTxD = site("resid_pre", x_BxTxD)
    # attention branch
    h_NxD = rms_norm(x_BxTxD, p["attn_norm"], cfg).reshape(B * T, D)
    q_BxTxHxK = _dense(h_NxD, p["wq"], p.get("bq")).reshape(B, T, H, K)
    k_BxTxGxK = _dense(h_NxD, p["wk"], p.get("bk")).reshape(B, T, G, K)
    v_BxTxGxK = _dense(h_NxD, p["wv"], p.get("bv")).reshape(B, T, G, K)
    if cfg.qk_norm:
      q_BxTxHxK = rms_norm(q_BxTxHxK, p["q_norm"], cfg)
      k_BxTxGxK = rms_norm(k_BxTxGxK, p["k_norm"], cfg)
    q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
    k_BxTxGxK = apply_rope(k_BxTxGxK, cos_BxTxK, sin_BxTxK)
    if kv is None:
      k_BxSxGxK, v_BxSxGxK, new_kv = k_BxTxGxK, v_BxTxGxK, None
    elif prefix_kv is not None:
      k_BxSxGxK = jnp.concatenate([kv[0].astype(dt), k_BxTxGxK], axis=1)
      v_BxSxGxK = jnp.concatenate([kv[1].astype(dt), v_BxTxGxK], axis=1)
      new_kv = None
    else:
      k_BxSxGxK = jax.lax.dynamic_update_slice(kv[0], k_BxTxGxK.astype(kv[0].dtype),
                                               (0, cache_index, 0, 0))
      v_BxSxGxK = jax.lax.dynamic_update_slice(kv[1], v_BxTxGxK.astype(kv[1].dtype),
                                               (0, cache_index, 0, 0))
      new_kv = (k_BxSxGxK, v_BxSxGxK)
    mask_BxTxS = (causal_BxTxS & jnp.where(window > 0, diff_xTxS < window, True)
                  if windowed else causal_BxTxS)
    if shared_kv is None:
      o_BxTxHK = attention(q_BxTxHxK, k_BxSxGxK.astype(dt), v_BxSxGxK.astype(dt), mask_BxTxS,
                           cfg)
    else:
      shared_mask_BxTxSp = shared_valid_BxSp[:, None, :] & (
          jnp.where(window > 0, shared_diff_xTxSp < window, True) if windowed else True)
      o_BxTxHK = shared_attention(q_BxTxHxK, shared_kv[0].astype(dt), shared_kv[1].astype(dt),
                                  shared_mask_BxTxSp, k_BxSxGxK.astype(dt),
                                  v_BxSxGxK.astype(dt), mask_BxTxS, cfg)
    if "z" in sites:
      o_BxTxHK = site("z", o_BxTxHK.reshape(B, T, H, K))
    a_BxTxD = _dense(o_BxTxHK.reshape(B * T, H * K), p["wo"]).reshape(B, T, D)
    if cfg.post_norms:
      a_BxTxD = _materialise(rms_norm(a_BxTxD, p["post_attn_norm"], cfg), p["post_attn_norm"][0])
    a_BxTxD = site("attn_out", a_BxTxD)
    x_BxTxD = site("resid_mid", x_BxTxD + a_BxTxD)
    # MLP branch
    h_NxD = rms_norm(x_BxTxD, p["mlp_norm"], cfg).reshape(B * T, D)
    u_NxF = act(_dense(h_NxD, p["w_gate"])) * _dense(h_NxD, p["w_up"])
    if "mlp_post" in sites:
      u_NxF = site("mlp_post", u_NxF.reshape(B, T, -1)).reshape(B * T, -1)
    m_BxTxD = _dense(u_NxF, p["w_down"]).reshape(B, T, D)
    if cfg.post_norms:
      m_BxTxD = _materialise(rms_norm(m_BxTxD, p["post_mlp_norm"], cfg), p["post_mlp_norm"][0])
    m_BxTxD = site("mlp_out", m_BxTxD)
    x_BxTxD = site("resid_post", x_BxTxD + m_BxTxD)
    return x_BxTxD, (new_kv, caps)

  if cfg.remat != "none":
    block = jax.checkpoint(block, policy=_REMAT[cfg.remat], prevent_cse=False)

  kv_L = prefix_kv if cache is None else (cache["k"], cache["v"])
  iv_xs = tuple((iv.layer_mask, iv.values) for iv in interventions)
  layers = params["layers"]
  if start_layer:   # no copy of the stack's tail per start layer (sweeps start at every layer)
    layers = jnp.arange(start_layer, cfg.n_layers)
  shared_L = None if shared_cache is None else (shared_cache["k"], shared_cache["v"])
  x_BxTxD, (new_kv, captures) = jax.lax.scan(block, x_BxTxD,
                                             (layers, windows_L, kv_L, shared_L, iv_xs))
  new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1], "valid": kv_valid_BxS}
  logits = unembed(params, cfg, x_BxTxD) if return_logits else None
  return Output(logits, captures, x_BxTxD, new_cache)


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
  h_NxD = rms_norm(h_xD.astype(dt), params["final_norm"].astype(dt), cfg).reshape(-1, cfg.d_model)
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
  h_BxTxD = forward(params, cfg, batch["inputs"], positions_BxT=batch["positions"],
                    segment_ids_BxT=batch["segment_ids"], return_logits=False).residual
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
  them as a plain pytree for the pure functions (`forward`, probes, training)."""

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
    if "lm_head" in params:
      self.lm_head = nnx.Param(params["lm_head"])

  def params(self) -> Params:
    return nnx.state(self, nnx.Param).to_pure_dict()

  def __call__(self, tokens_BxT, mask_BxT=None, positions_BxT=None, **kw) -> jax.Array:
    return self.forward(tokens_BxT, mask_BxT, positions_BxT, **kw).logits

  def forward(self, tokens_BxT, mask_BxT=None, positions_BxT=None, **kw) -> Output:
    """Jitted `forward` with this model's parameters (see `forward` for the keywords)."""
    if "capture" in kw:
      kw["capture"] = tuple(kw["capture"])
    if "interventions" in kw:
      kw["interventions"] = tuple(kw["interventions"])
    return _forward_jit(self.params(), self.cfg, jnp.asarray(tokens_BxT, jnp.int32),
                        mask_BxT, positions_BxT, **kw)
