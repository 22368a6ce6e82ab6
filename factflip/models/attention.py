"""How the T new tokens of a forward pass see keys: the attention context.

Owns: `Context`, the pytree of what decides which keys each query attends to (the padding
mask, RoPE positions, packed segment ids, a KV cache and the slot the new tokens are written
at, read-only prefix keys/values under an explicit mask, a prompt cache shared by fan-out rows);
its named constructors, which refuse what the forward pass cannot run; and what a context
implies inside the layer scan: the masks (`Context.key_mask`), each layer's keys and values
(`Context.layer_keys`) and the cache after the write (`Context.written`).
Also the attention computation those masks feed: `attention` (grouped-query softmax attention
with an optional soft-cap and a hand-written backward), `hooked_attention` (the same with its
scores and pattern as hook sites) and `shared_attention` (one softmax over a prompt cache shared
by groups of rows and each row's own keys).
Must not: hold parameters or run the layers (that is `transformer.py`). A new way for tokens
to attend is a new constructor here, not a new keyword of `transformer.forward`.

  causal(mask_BxT, positions_BxT)          each token sees the real tokens at or before it
                                           (`forward`'s default: ctx=None)
  packed(segment_ids_BxT, positions_BxT)   ... of its own segment only (pipeline rows)
  with_prefix(prefix_kv, attn_mask_BxTxS, positions_BxT)
                                           read-only keys/values before the new tokens, under
                                           an explicit mask (patching sweeps, shared contexts)
  decode(cache, cache_index, mask_BxT, positions_BxT)
                                           write into a KV cache and read it (prefill, decoding)
  fan_out(cache, shared_cache, cache_index, mask_BxT, positions_BxT)
                                           decode, each group of rows also reading one shared
                                           prompt cache (several continuations of a prompt)

Every field is an array (or a dict / pair of arrays) or None where absent, so a context passes
through `jit`, `vmap` and `lax.map` like any argument; which fields are present is the pytree's
structure, so each kind of context compiles to its own program.

Shape suffixes as in `transformer.py`: B batch, T new tokens, S key slots, S0 prefix slots,
Sp shared slots, L layers, H query heads, G kv heads, R = H/G, K head_dim, Q = R·T folded
queries, P shared prompt rows.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from factflip.models.config import ModelConfig

Cache = dict[str, jax.Array]   # k, v [L, B, S, G, K]; valid [B, S] (`transformer.init_cache`)


class KeyMask(NamedTuple):
  """The masks a context implies for T queries, built once outside the layer scan."""

  causal_BxTxS: jax.Array                 # which key slots each query sees (before windows)
  diff_xTxS: jax.Array                    # query position − key position, for sliding windows
  kv_valid_BxS: jax.Array | None = None   # the cache's valid slots after the write
  shared_valid_BxSp: jax.Array | None = None   # fan-out: each row's shared slots
  shared_diff_xTxSp: jax.Array | None = None

  def at(self, window: jax.Array, windowed: bool) -> jax.Array:
    """bool [B, T, S] at a layer with this `window` (0 = full attention); `windowed` is False
    when no layer slides (the mask is then the same for every layer)."""
    if not windowed:
      return self.causal_BxTxS
    return self.causal_BxTxS & jnp.where(window > 0, self.diff_xTxS < window, True)

  def shared_at(self, window: jax.Array, windowed: bool) -> jax.Array:
    """bool [B, T, Sp]: the shared slots each query sees at a layer with this `window`."""
    mask_BxTxSp = self.shared_valid_BxSp[:, None, :] & (
        jnp.where(window > 0, self.shared_diff_xTxSp < window, True) if windowed else True)
    B, T, Sp = (*self.causal_BxTxS.shape[:2], self.shared_valid_BxSp.shape[1])
    return jnp.broadcast_to(mask_BxTxSp, (B, T, Sp))   # [B, 1, Sp] without windows


@struct.dataclass
class Context:
  """How the T new tokens see keys. Build one with a constructor below (`causal`, `packed`,
  `with_prefix`, `decode`, `fan_out`); fields left None are absent. `check` refuses
  combinations the forward pass cannot run (the constructors call it, and so does `forward`)."""

  mask_BxT: jax.Array | None = None           # 1/True real tokens, 0 padding
  positions_BxT: jax.Array | None = None      # RoPE positions (default cache_index + arange(T))
  segment_ids_BxT: jax.Array | None = None    # packed rows; 0 marks padding
  cache: Cache | None = None
  cache_index: jax.Array | int | None = None  # the first cache slot the new tokens go to
  prefix_kv: tuple[jax.Array, jax.Array] | None = None   # k, v [L, B, S0, G, K], read-only
  attn_mask_BxTxS: jax.Array | None = None    # with prefix_kv: [B, T, S0 + T]
  shared_cache: Cache | None = None           # k, v [L, Bp, Sp, G, K], valid [Bp, Sp]

  def check(self) -> Context:
    """This context, or a ValueError naming what forward cannot run."""
    if self.segment_ids_BxT is not None and self.cache is not None:
      raise ValueError("attention context: segment_ids (packed rows) cannot be combined with a "
                       "KV cache")
    if self.prefix_kv is not None:
      if self.cache is not None or self.attn_mask_BxTxS is None:
        raise ValueError("attention context: prefix_kv needs attn_mask_BxTxS and no cache")
      if self.mask_BxT is not None or self.segment_ids_BxT is not None:
        raise ValueError("attention context: with prefix_kv, padding and segments are part of "
                         "attn_mask_BxTxS (mask_BxT and segment_ids_BxT are not read)")
    elif self.attn_mask_BxTxS is not None:
      raise ValueError("attention context: attn_mask_BxTxS is read only beside prefix_kv "
                       "(with_prefix)")
    if self.shared_cache is not None and self.cache is None:
      raise ValueError("attention context: shared_cache reads beside a cache (fan_out(cache, "
                       "shared_cache, ...))")
    if self.cache is not None and self.cache_index is None:
      raise ValueError("attention context: a cache needs cache_index (the slot the new tokens "
                       "are written at)")
    return self

  # ---- what forward reads -----------------------------------------------------------------
  def valid(self, B: int, T: int) -> jax.Array:
    """bool [B, T]: the real new tokens (all, or those of a nonzero segment, by default)."""
    mask_BxT = self.mask_BxT
    if mask_BxT is None:
      mask_BxT = (jnp.ones((B, T), bool) if self.segment_ids_BxT is None
                  else self.segment_ids_BxT > 0)
    return mask_BxT.astype(bool)

  def positions(self, B: int, T: int) -> jax.Array:
    """[B, T] RoPE positions: as given, else cache_index + arange(T) (HF forward semantics)."""
    if self.positions_BxT is not None:
      return self.positions_BxT
    start = 0 if self.cache_index is None else self.cache_index
    return jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))

  def key_mask(self, positions_BxT: jax.Array) -> KeyMask:
    """The masks for the new tokens at `positions_BxT` (from `positions`; its shape sets B, T)."""
    B, T = positions_BxT.shape
    if self.prefix_kv is not None:
      S0 = self.prefix_kv[0].shape[2]
      key_pos_BxS = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(S0, dtype=positions_BxT.dtype), (B, S0)), positions_BxT],
          1)
      diff_xTxS = positions_BxT[:, :, None] - key_pos_BxS[:, None, :]
      return KeyMask(self.attn_mask_BxTxS.astype(bool), diff_xTxS)
    mask_BxT = self.valid(B, T)
    if self.cache is None:
      kv_valid_BxS = mask_BxT
      q_slot_T = jnp.arange(T)
      kv_slot_S = jnp.arange(T)
    else:
      kv_valid_BxS = jax.lax.dynamic_update_slice(self.cache["valid"], mask_BxT,
                                                  (0, self.cache_index))
      q_slot_T = self.cache_index + jnp.arange(T)
      kv_slot_S = jnp.arange(self.cache["valid"].shape[1])
    diff_xTxS = (q_slot_T[:, None] - kv_slot_S[None, :])[None]
    causal_BxTxS = (diff_xTxS >= 0) & kv_valid_BxS[:, None, :]
    shared_valid_BxSp = shared_diff_xTxSp = None
    if self.shared_cache is not None:
      Bp, Sp = self.shared_cache["valid"].shape
      if B % Bp:
        raise ValueError(f"fan_out: {B} rows do not split into groups over the shared cache's "
                         f"{Bp} rows")
      shared_diff_xTxSp = (Sp + q_slot_T[:, None] - jnp.arange(Sp)[None, :])[None]
      shared_valid_BxSp = jnp.repeat(self.shared_cache["valid"], B // Bp, axis=0)
    if self.segment_ids_BxT is not None:
      seg_BxT = self.segment_ids_BxT
      causal_BxTxS = causal_BxTxS & (seg_BxT[:, :, None] == seg_BxT[:, None, :])
    return KeyMask(causal_BxTxS, diff_xTxS, kv_valid_BxS, shared_valid_BxSp, shared_diff_xTxSp)

  def scanned(self) -> tuple[Any, Any]:
    """(keys/values, shared keys/values) with a leading layer axis, for the layer scan."""
    kv_L = self.prefix_kv if self.cache is None else (self.cache["k"], self.cache["v"])
    shared_L = (None if self.shared_cache is None
                else (self.shared_cache["k"], self.shared_cache["v"]))
    return kv_L, shared_L

  def layer_keys(self, kv, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, dt
                 ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One layer's keys and values [B, S, G, K] for the new tokens' queries, and what goes back
    into the cache (None without one). `kv`: this layer's slice of `scanned()[0]`."""
    if kv is None:
      return k_BxTxGxK, v_BxTxGxK, None
    if self.prefix_kv is not None:
      k_BxSxGxK = jnp.concatenate([kv[0].astype(dt), k_BxTxGxK], axis=1)
      v_BxSxGxK = jnp.concatenate([kv[1].astype(dt), v_BxTxGxK], axis=1)
      return k_BxSxGxK, v_BxSxGxK, None
    k_BxSxGxK = jax.lax.dynamic_update_slice(kv[0], k_BxTxGxK.astype(kv[0].dtype),
                                             (0, self.cache_index, 0, 0))
    v_BxSxGxK = jax.lax.dynamic_update_slice(kv[1], v_BxTxGxK.astype(kv[1].dtype),
                                             (0, self.cache_index, 0, 0))
    return k_BxSxGxK, v_BxSxGxK, (k_BxSxGxK, v_BxSxGxK)

  def written(self, new_kv, keys: KeyMask) -> Cache | None:
    """The cache after the scan wrote the new tokens (None without a cache)."""
    if self.cache is None:
      return None
    return {"k": new_kv[0], "v": new_kv[1], "valid": keys.kv_valid_BxS}


# ---- constructors -----------------------------------------------------------------------------
def _needs(where: str, name: str, value, expected: str):
  if value is None:
    raise ValueError(f"{where}: {name} is None; expected {expected}")


def causal(mask_BxT: jax.Array | None = None,
           positions_BxT: jax.Array | None = None) -> Context:
  """Each new token attends to the real tokens at or before it in its row.

  mask_BxT: 1/True for real tokens, 0 for padding (keys at padding are never attended to);
    default all real. positions_BxT: RoPE positions; default arange(T) (left-padded prompts
    pass cumsum(mask) − 1, as HF `generate` does)."""
  return Context(mask_BxT=mask_BxT, positions_BxT=positions_BxT).check()


def packed(segment_ids_BxT: jax.Array, positions_BxT: jax.Array | None = None,
           mask_BxT: jax.Array | None = None) -> Context:
  """Packed rows (the data pipeline's layout): a token attends only to earlier tokens of its
  own segment; segment 0 marks padding (the default mask is segment_ids > 0). Pass the
  pipeline's `positions` too, so RoPE restarts per segment. Not with a cache."""
  _needs("packed", "segment_ids_BxT", segment_ids_BxT, "int [B, T] segment ids")
  return Context(mask_BxT=mask_BxT, positions_BxT=positions_BxT,
                 segment_ids_BxT=segment_ids_BxT).check()


def with_prefix(prefix_kv: tuple[jax.Array, jax.Array], attn_mask_BxTxS: jax.Array,
                positions_BxT: jax.Array) -> Context:
  """Read-only keys/values k, v [L, B, S0, G, K] (e.g. another run's cache, or S0 = 0 for an
  explicit mask only) that the T new tokens attend to besides themselves, under an explicit
  mask [B, T, S0 + T] over (prefix slots, new tokens) that carries any padding and segment
  structure. `positions_BxT` places the new tokens (prefix slot j is position j; windows
  measure distance by position). Patching sweeps pack several suffixes into one row this way."""
  _needs("with_prefix", "prefix_kv", prefix_kv, "keys and values k, v [L, B, S0, G, K]")
  _needs("with_prefix", "positions_BxT", positions_BxT, "int [B, T] positions of the new tokens")
  return Context(positions_BxT=positions_BxT, prefix_kv=prefix_kv,
                 attn_mask_BxTxS=attn_mask_BxTxS).check()


def decode(cache: Cache, cache_index: jax.Array | int, mask_BxT: jax.Array | None = None,
           positions_BxT: jax.Array | None = None) -> Context:
  """Write the T new tokens into a KV cache (`transformer.init_cache`) at slots
  [cache_index, cache_index + T) and attend to every valid slot up to their own: a prefill
  (cache_index 0) or a decode step. `forward` returns the written cache in `Output.cache`.
  mask_BxT / positions_BxT as in `causal` (default positions cache_index + arange(T))."""
  _needs("decode", "cache", cache, "a cache from transformer.init_cache")
  _needs("decode", "cache_index", cache_index, "the first slot the new tokens are written at")
  return Context(mask_BxT=mask_BxT, positions_BxT=positions_BxT, cache=cache,
                 cache_index=cache_index).check()


def fan_out(cache: Cache, shared_cache: Cache, cache_index: jax.Array | int,
            mask_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None
            ) -> Context:
  """`decode` with a read-only cache k, v [L, Bp, Sp, G, K], valid [Bp, Sp] shared by groups of
  F = B / Bp consecutive rows (row b reads shared row b // F): every query attends to its
  group's valid shared slots (all in its past) and then to its own cache, whose slots follow
  them (slot j of `cache` is slot Sp + j for sliding windows). Decoding F continuations of one
  prompt reads the prompt's keys once instead of F copies."""
  _needs("fan_out", "cache", cache, "the rows' own cache from transformer.init_cache")
  _needs("fan_out", "shared_cache", shared_cache, "the prompts' cache (a prefill's Output.cache)")
  _needs("fan_out", "cache_index", cache_index, "the first slot the new tokens are written at")
  return Context(mask_BxT=mask_BxT, positions_BxT=positions_BxT, cache=cache,
                 cache_index=cache_index, shared_cache=shared_cache).check()


# ---- the attention computation ---------------------------------------------------------------
F32 = jnp.float32


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


def hooked_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, cfg: ModelConfig,
                     site) -> jax.Array:
  """`attention` with its scores and pattern passed through `site(name, h)` (which captures or
  intervenes and returns h): "attn_scores" after the scale, soft-cap and mask, "pattern" after
  the softmax, each [B, T, H, S] (position-major, as every site). Autodiff's backward; the
  unhooked path keeps the hand-written one. -> [B, T, H*K]."""
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  R = H // G
  q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, R, K)
  s_BxTxGxRxS = jnp.einsum("btgrk,bsgk->btgrs", q_BxTxGxRxK, k_BxSxGxK,
                           preferred_element_type=F32) * cfg.attn_scale
  if cfg.attn_softcap:
    s_BxTxGxRxS = jnp.tanh(s_BxTxGxRxS / cfg.attn_softcap) * cfg.attn_softcap
  S = s_BxTxGxRxS.shape[-1]
  s_BxTxHxS = jnp.where(mask_BxTxS[:, :, None], s_BxTxGxRxS.reshape(B, T, H, S),
                        jnp.finfo(F32).min)
  s_BxTxHxS = site("attn_scores", s_BxTxHxS)
  p_BxTxHxS = site("pattern", jax.nn.softmax(s_BxTxHxS, axis=-1))
  o_BxTxGxRxK = jnp.einsum("btgrs,bsgk->btgrk",
                           p_BxTxHxS.reshape(B, T, G, R, S).astype(v_BxSxGxK.dtype), v_BxSxGxK)
  return o_BxTxGxRxK.reshape(B, T, H * K)


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
