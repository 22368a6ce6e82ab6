"""Attention contexts (`models.attention`): each constructor computes what one causal row of the
same tokens computes, and every combination forward cannot run is refused with its reason."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factflip import get_preset
from factflip.models import Transformer, attention
from factflip.models.attention import Context
from factflip.models.transformer import forward, init_cache, init_params

fwd = jax.jit(forward, static_argnames=("cfg",))   # one program per shape and kind of context
CFG = get_preset("tiny-0.5m", vocab_size=64, max_seq_len=32)
# sliding layers (window 3) and an attention soft-cap: windows measure distance across a prefix,
# a cache and a shared cache alike
WINDOWED = CFG.replace(sliding_window=3, layer_types=("sliding", "full", "sliding", "full"),
                       attn_softcap=50.0)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(1))   # WINDOWED has the same parameter shapes


def test_packed_rows_equal_separate_examples(params):
  a, b = np.arange(5, 12, dtype=np.int32), np.arange(20, 29, dtype=np.int32)
  row = np.concatenate([a, b, np.zeros(4, np.int32)])[None]
  seg = np.array([[1] * 7 + [2] * 9 + [0] * 4], np.int32)
  pos = np.array([list(range(7)) + list(range(9)) + [0] * 4], np.int32)
  packed = fwd(params, CFG, row, attention.packed(seg, pos)).logits[0]
  alone_a = fwd(params, CFG, a[None]).logits[0]
  alone_b = fwd(params, CFG, b[None], attention.causal()).logits[0]
  np.testing.assert_allclose(packed[:7], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[7:16], alone_b, atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, WINDOWED], ids=["full", "windowed"])
def test_prefix_cache_and_fan_out_equal_one_causal_row(params, cfg):
  """A prompt of S0 tokens, then T more: a decode step after a prefill, with_prefix over the
  prefill's keys, and F = 2 fan-out rows sharing the prefill's cache all give the logits of
  the whole row run causally."""
  B, S0, T = 2, 6, 3
  tokens = np.random.default_rng(0).integers(3, 64, (B, S0 + T)).astype(np.int32)
  whole = fwd(params, cfg, tokens).logits[:, S0:]
  cache = fwd(params, cfg, tokens[:, :S0], attention.decode(init_cache(cfg, B, S0 + T), 0)).cache
  step = fwd(params, cfg, tokens[:, S0:], attention.decode(cache, S0))
  np.testing.assert_allclose(step.logits, whole, atol=1e-5)
  assert step.cache["valid"].all() and not cache["valid"][:, S0:].any()

  prompt = {k: a[..., :S0, :, :] if k != "valid" else a[:, :S0] for k, a in cache.items()}
  pos = jnp.broadcast_to(S0 + jnp.arange(T, dtype=jnp.int32), (B, T))
  see = np.concatenate([np.ones((T, S0), bool), np.tri(T, dtype=bool)], axis=1)
  ctx = attention.with_prefix((prompt["k"], prompt["v"]), jnp.broadcast_to(see, (B, T, S0 + T)),
                              pos)
  np.testing.assert_allclose(fwd(params, cfg, tokens[:, S0:], ctx).logits, whole, atol=1e-5)

  F = 2   # row b of the fan-out reads prompt b // F; positions continue after the prompt
  ctx = attention.fan_out(init_cache(cfg, B * F, T), prompt, 0,
                          positions_BxT=jnp.repeat(pos, F, axis=0))
  fan = fwd(params, cfg, np.repeat(tokens[:, S0:], F, axis=0), ctx).logits
  np.testing.assert_allclose(fan, np.repeat(whole, F, axis=0), atol=1e-5)


def test_the_module_call_builds_a_causal_context(params):
  model = Transformer(CFG, params=params)
  tokens = np.arange(3, 11, dtype=np.int32)[None].repeat(2, 0)
  mask = np.ones((2, 8), bool)
  mask[0, :3] = False
  want = fwd(params, CFG, tokens, attention.causal(mask)).logits
  np.testing.assert_allclose(model(tokens, mask), want, atol=1e-6)
  np.testing.assert_allclose(model.forward(tokens, ctx=attention.causal(mask)).logits, want,
                             atol=1e-6)
  with pytest.raises(ValueError, match="mask_BxT / positions_BxT or ctx=, not both"):
    model.forward(tokens, mask, ctx=attention.causal(mask))


def test_every_constructor_refuses_what_forward_cannot_run(params):
  B, T, S0 = 1, 4, 2
  tokens = np.arange(3, 3 + T, dtype=np.int32)[None]
  seg = np.ones((B, T), np.int32)
  pos = np.arange(T, dtype=np.int32)[None]
  cache = init_cache(CFG, B, 8)
  kv = (jnp.zeros((CFG.n_layers, B, S0, CFG.n_kv_heads, CFG.head_dim)),) * 2
  see = np.ones((B, T, S0 + T), bool)
  cases = [
      (lambda: attention.packed(seg).replace(cache=cache, cache_index=0),
       "segment_ids \\(packed rows\\) cannot be combined with a KV cache"),
      (lambda: attention.packed(None, pos), "packed: segment_ids_BxT is None"),
      (lambda: attention.with_prefix(kv, None, pos),
       "prefix_kv needs attn_mask_BxTxS and no cache"),
      (lambda: attention.with_prefix(kv, see, pos).replace(cache=cache, cache_index=0),
       "prefix_kv needs attn_mask_BxTxS and no cache"),
      (lambda: attention.with_prefix(None, see, pos), "with_prefix: prefix_kv is None"),
      (lambda: attention.with_prefix(kv, see, None), "with_prefix: positions_BxT is None"),
      (lambda: attention.with_prefix(kv, see, pos).replace(mask_BxT=seg > 0),
       "padding and segments are part of attn_mask_BxTxS"),
      (lambda: attention.causal().replace(attn_mask_BxTxS=see),
       "attn_mask_BxTxS is read only beside prefix_kv"),
      (lambda: attention.decode(None, 0), "decode: cache is None"),
      (lambda: attention.decode(cache, None), "decode: cache_index is None"),
      (lambda: attention.fan_out(cache, None, 0), "fan_out: shared_cache is None"),
      (lambda: attention.causal().replace(shared_cache=cache), "shared_cache reads beside a cache"),
      (lambda: Context(cache=cache).check(), "a cache needs cache_index"),
  ]
  for build, message in cases:
    with pytest.raises(ValueError, match=message):
      build().check()
  # forward checks a context however it was built, and refuses a bare mask in its place
  with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
    forward(params, CFG, tokens, Context(segment_ids_BxT=seg, cache=cache, cache_index=0))
  with pytest.raises(TypeError, match="expected an attention.Context"):
    forward(params, CFG, tokens, seg > 0)
  with pytest.raises(ValueError, match="3 rows do not split into groups over the shared cache's "
                                       "2 rows"):
    forward(params, CFG, np.zeros((3, 1), np.int32),
            attention.fan_out(init_cache(CFG, 3, 2), init_cache(CFG, 2, 4), 0))


def test_a_context_is_a_pytree_that_jit_and_vmap_pass_through(params):
  """Absent fields are None (structure, not leaves): vmap over a stack of padding masks."""
  tokens = np.arange(3, 9, dtype=np.int32)[None]
  masks = np.tril(np.ones((6, 6), bool))[::-1][:, None]          # [6 variants, 1, 6]
  ctx = jax.vmap(attention.causal)(masks)
  assert ctx.cache is None and ctx.mask_BxT.shape == (6, 1, 6)
  run = jax.jit(jax.vmap(lambda c: forward(params, CFG, tokens, c).logits))
  want = fwd(params, CFG, tokens.repeat(6, 0), attention.causal(masks[:, 0])).logits
  np.testing.assert_allclose(run(ctx)[:, 0], want, atol=1e-6)
