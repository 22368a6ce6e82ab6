"""Causal tracing equals a loop of noised, restored forwards; ROME's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from factflip import Transformer, get_preset
from factflip.models.hooks import Intervention
from factflip.models.transformer import embed, forward, unembed
from factflip.probes import capture
from factflip.probes.causal_trace import answer_prob, causal_trace, subject_noise_scale

CFG = get_preset("tiny-0.5m", vocab_size=97, max_seq_len=64)
B, T, S = 2, 6, 3


@pytest.fixture(scope="module")
def setup():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  r = np.random.default_rng(0)
  tokens = r.integers(3, 97, (B, T)).astype(np.int32)
  subject = np.zeros((B, T), bool)
  subject[0, 1:3] = True
  subject[1, 2:4] = True
  target = np.asarray([7, 11], np.int32)
  return model, tokens, subject, target


def loop_trace(model, tokens, subject, target, key, sigma, site, layers, window):
  """The baseline: for every noise draw and cell, one full forward with the noise on the
  subject embeddings and the clean `site` restored at (layer window, position)."""
  params = model.params()
  z = jax.random.normal(key, (B * S, T, CFG.d_model), jnp.float32)
  tok = np.repeat(tokens, S, axis=0)
  noise = sigma * z * np.repeat(subject, S, axis=0)[..., None]
  clean = capture(model, tok, [site])[site]
  out = np.zeros((B * S, len(layers), T))
  run = jax.jit(lambda iv: answer_prob(unembed(params, CFG, forward(
      params, CFG, tok, resid_BxTxD=embed(params, CFG, tok) + noise, interventions=(iv,),
      return_logits=False).residual[:, -1:]), jnp.asarray(np.repeat(target, S))))
  for i, layer in enumerate(layers):
    lo, hi = max(layer - window // 2, 0), min(layer - window // 2 + window, CFG.n_layers)
    for t in range(T):
      on = jnp.zeros(CFG.n_layers, bool).at[lo:hi].set(True)
      iv = Intervention(on, jnp.zeros(T, bool).at[t].set(True), clean, site=site)
      out[:, i, t] = np.asarray(run(iv))
  return out.reshape(B, S, len(layers), T).mean(1)


@pytest.mark.parametrize("site,window", [("resid_post", 1), ("mlp_out", 3)])
def test_trace_equals_a_loop_of_restored_forwards(setup, site, window):
  model, tokens, subject, target = setup
  key = jax.random.key(4)
  res = causal_trace(model, tokens, subject, target, key, samples=S, site=site, window=window)
  layers = list(range(CFG.n_layers))
  want = loop_trace(model, tokens, subject, target, key, res["noise_scale"], site, layers,
                    window)
  np.testing.assert_allclose(res["p_restored"], want, atol=1e-6)
  np.testing.assert_allclose(res["indirect_effect"],
                             want - res["p_corrupted"][:, None, None], atol=1e-6)


def test_rome_semantics(setup):
  model, tokens, subject, target = setup
  key = jax.random.key(0)
  res = causal_trace(model, tokens, subject, target, key, samples=S)
  logits = np.asarray(model(tokens))[:, -1]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  np.testing.assert_allclose(res["p_clean"], p[np.arange(B), target], rtol=1e-5)
  np.testing.assert_allclose(res["total_effect"], res["p_clean"] - res["p_corrupted"],
                             atol=1e-7)
  # restoring the last layer's output at the last token gives back the clean probability
  np.testing.assert_allclose(res["p_restored"][:, -1, -1], res["p_clean"], rtol=1e-5)
  # tokens before the subject carry no noise: restoring them changes nothing
  np.testing.assert_allclose(res["indirect_effect"][0, :, 0], 0.0, atol=1e-7)
  np.testing.assert_allclose(res["indirect_effect"][1, :, :2], 0.0, atol=1e-7)
  assert np.abs(res["total_effect"]).max() > 1e-4     # the noise did corrupt the answer
  # ROME's noise level: 3 x the std of the subject embeddings; the key fixes the draw
  e = np.asarray(embed(model.params(), CFG, jnp.asarray(tokens)))[subject]
  assert res["noise_scale"] == pytest.approx(3 * e.std(), rel=1e-5)
  assert subject_noise_scale(model, tokens, subject) == pytest.approx(res["noise_scale"])
  again = causal_trace(model, tokens, subject, target, key, samples=S)
  np.testing.assert_array_equal(again["p_restored"], res["p_restored"])
  other = causal_trace(model, tokens, subject, target, jax.random.key(1), samples=S)
  assert not np.array_equal(other["p_corrupted"], res["p_corrupted"])


def test_bad_inputs(setup):
  model, tokens, subject, target = setup
  key = jax.random.key(0)
  empty = subject.copy()
  empty[1] = False
  with pytest.raises(ValueError, match=r"rows \[1\] have no subject tokens"):
    causal_trace(model, tokens, empty, target, key)
  with pytest.raises(ValueError, match="outside the vocabulary of 97"):
    causal_trace(model, tokens, subject, [7, 97], key)
  with pytest.raises(ValueError, match="expected"):
    causal_trace(model, tokens, subject[:, :4], target, key)
