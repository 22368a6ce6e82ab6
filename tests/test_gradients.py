"""Per-example gradients (vmapped, chunked) against a loop of single-example gradients, the
parameter subsets, and the conflict statistics on known vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factflip import get_preset
from factflip.models.transformer import init_params, token_logprobs
from factflip.probes import gradients as GR

CFG = get_preset("tiny-0.5m", vocab_size=64, max_seq_len=32)


def padded_batch(N=6, T=12, seed=0):
  rng = np.random.default_rng(seed)
  inp = rng.integers(3, 64, (N, T)).astype(np.int32)
  mask = np.zeros((N, T), np.int32)
  seg = np.ones((N, T), np.int32)
  for i in range(N):                     # answers of different lengths, rows of padding
    n = 6 + i % 4
    mask[i, n - 3:n] = 1
    seg[i, n:] = 0
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": mask, "segment_ids": seg,
          "positions": np.tile(np.arange(T, dtype=np.int32), (N, 1))}


def test_per_example_grads_equal_a_loop_of_single_example_gradients():
  params = init_params(CFG, jax.random.key(0))
  batch = padded_batch()
  G = GR.per_example_grads(params, CFG, batch, chunk=4)
  assert G.shape == (6, sum(x.size for x in jax.tree.leaves(params)))

  def loss(p, one):
    nll = -token_logprobs(p, CFG, one)[0]
    m = one["loss_mask"][0].astype(jnp.float32)
    return (nll * m).sum() / m.sum()
  for i in range(6):
    one = {k: v[i:i + 1] for k, v in batch.items()}
    g = jax.grad(loss)(params, one)
    want = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(g)])
    np.testing.assert_allclose(G[i], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(GR.per_example_grads(params, CFG, batch, chunk=1), G, atol=1e-6)


def test_parameter_subsets_and_bad_patterns():
  params = init_params(CFG, jax.random.key(0))
  paths = GR.param_subset(params, r"layers\.w_down")
  assert paths == ["layers.w_down"]
  G = GR.per_example_grads(params, CFG, padded_batch(N=3), pattern=r"layers\.w_down")
  assert G.shape == (3, params["layers"]["w_down"].size)
  full = GR.per_example_grads(params, CFG, padded_batch(N=3))
  start = sum(x.size for p, x in zip(GR.param_subset(params), jax.tree.leaves(params))
              if p < "layers.w_down")          # tree order is sorted by path
  np.testing.assert_allclose(G, full[:, start:start + G.shape[1]], atol=1e-7)
  with pytest.raises(ValueError, match="matches none of"):
    GR.param_subset(params, "no_such_param")


def test_conflict_statistics_on_known_vectors():
  G = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
  cos = GR.cosine_matrix(G)
  np.testing.assert_allclose(cos[:3, :3], [[1, -1, 0], [-1, 1, 0], [0, 0, 1]], atol=1e-12)
  assert not cos[3].any()                      # a zero gradient: cosine 0
  st = GR.conflict_stats(cos[:3, :3])
  assert st == {"conflict_ratio": pytest.approx(1 / 3), "mean_cos": pytest.approx(-1 / 3),
                "pairs": 3}
  assert GR.gradient_cosine([1, 1], [-1, -1]) == pytest.approx(-1.0)
  assert np.isnan(GR.gradient_cosine([0, 0], [1, 0]))
