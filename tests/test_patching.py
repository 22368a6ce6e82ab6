"""Patching sweeps equal a plain loop of single patched forwards; TransformerLens semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from factflip import Transformer, get_preset
from factflip.models.hooks import Intervention
from factflip.probes import capture, replace
from factflip.probes.packing import pack_cells, position_groups
from factflip.probes.patching import (
  act_patch,
  answer_logit_diff,
  attribution_patch,
  normalised_recovery,
  reversal_rate,
  sweep_cost,
  sweep_table,
)

CFG = get_preset("tiny-0.5m", vocab_size=97, max_seq_len=64)
B, T = 2, 7


def logit_diff(logits_BxPxV):
  return logits_BxPxV[:, -1, 5] - logits_BxPxV[:, -1, 9]


@pytest.fixture(scope="module")
def setup():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  other = Transformer(CFG, rngs=nnx.Rngs(1))
  r = np.random.default_rng(0)
  clean = r.integers(3, 97, (B, T)).astype(np.int32)
  corrupted = clean.copy()
  corrupted[:, 1:3] = r.integers(3, 97, (B, 2))
  return model, other, clean, corrupted


def loop(model, source, corrupted, clean, site, layers, cells, window=1):
  """The baseline: one full patched forward per cell."""
  caps = capture(source, clean, [site])[site]
  out = np.zeros((B, len(layers), len(cells)))
  for i, layer in enumerate(layers):
    for c, pos in enumerate(cells):
      iv = replace(site, caps, layers=list(range(layer, min(layer + window, CFG.n_layers))),
                   positions=np.asarray(pos))
      out[:, i, c] = np.asarray(logit_diff(model(corrupted, interventions=[iv])))
  return out


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "resid_post"])
def test_sweep_equals_a_loop_of_patched_forwards(setup, site):
  model, _, clean, corrupted = setup
  got = act_patch(model, corrupted, clean, logit_diff, site=site, chunk=3)
  assert got.shape == (B, CFG.n_layers, T)
  want = loop(model, model, corrupted, clean, site, range(CFG.n_layers), np.eye(T, dtype=bool))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_resid_pre_semantics_windows_groups_and_cross_model(setup):
  model, other, clean, corrupted = setup
  base = np.asarray(logit_diff(model(corrupted)))
  clean_m = np.asarray(logit_diff(model(clean)))
  sweep = act_patch(model, corrupted, clean, logit_diff)
  # TransformerLens: patching resid_pre[0] at a position where clean == corrupted changes
  # nothing; patching every position at layer 0 gives the clean run.
  np.testing.assert_allclose(sweep[:, :, 0], base[:, None].repeat(CFG.n_layers, 1), atol=1e-5)
  all_pos = act_patch(model, corrupted, clean, logit_diff, positions=np.ones((1, T), bool),
                      layers=[0])
  np.testing.assert_allclose(all_pos[:, 0, 0], clean_m, atol=1e-5)
  # position groups (per-item masks) and layer windows, cross-model (other's activations)
  groups = np.zeros((2, B, T), bool)
  groups[0, :, 1:3] = True                     # the "subject" tokens
  groups[1, :, -1] = True                      # the last token
  got = act_patch(model, corrupted, clean, logit_diff, site="mlp_out", source_model=other,
                  layers=[0, 2], positions=groups, window=2, chunk=None)
  want = np.zeros_like(got)
  caps = capture(other, clean, ["mlp_out"])["mlp_out"]
  for i, layer in enumerate([0, 2]):
    for c in range(2):
      iv = replace("mlp_out", caps, layers=list(range(layer, min(layer + 2, CFG.n_layers))),
                   positions=groups[c])
      want[:, i, c] = np.asarray(logit_diff(model(corrupted, interventions=[iv])))
  np.testing.assert_allclose(got, want, atol=1e-5)
  rec = normalised_recovery(all_pos, base, clean_m)
  np.testing.assert_allclose(rec[:, 0, 0], 1.0, atol=1e-4)


def answer_diff(logits_BxPxV, ids_Bx2):
  """Per-row answer ids (metric_aux): logit(true) − logit(counterfactual), summed over the two
  read positions."""
  lp = jnp.take_along_axis(logits_BxPxV, ids_Bx2[:, None, :], axis=-1)    # [B, P, 2]
  return (lp[..., 0] - lp[..., 1]).sum(-1)


def test_padded_rows_per_row_metric_and_packing_against_the_loop(setup):
  """Left-padded prompts, a metric with per-row data reading two positions, cells patched
  before and after the first read position: equal to full patched forwards."""
  model, other, clean, corrupted = setup
  mask = np.ones((B, T), bool)
  mask[1, :2] = False                         # row 1 is a 5-token prompt padded on the left
  ids = np.asarray([[5, 9], [11, 4]], np.int32)
  cells = np.eye(T, dtype=bool)
  got = act_patch(model, corrupted, clean, answer_diff, site="resid_post", source_model=other,
                  mask=mask, metric_aux=jnp.asarray(ids), logit_positions=(-3, -1), chunk=8)
  caps = capture(other, clean, ["resid_post"], mask)["resid_post"]
  want = np.zeros_like(got)
  for layer in range(CFG.n_layers):
    for c in range(T):
      iv = replace("resid_post", caps, layers=[layer], positions=cells[c])
      lg = model(corrupted, mask, interventions=[iv])[:, [T - 3, T - 1]]
      want[:, layer, c] = np.asarray(answer_diff(lg, ids))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_packing_skips_the_unchanged_prefix_and_chunks_bound_memory(setup):
  model, _, clean, corrupted = setup
  pk = pack_cells(np.eye(8, dtype=bool)[:, None], (-1,))
  # single-position cells of an 8-token prompt: suffixes 8..1 packed in pairs into 4 rows of 9
  assert pk.pos.shape == (4, 9) and pk.tokens == 36 and pk.computed == 36
  np.testing.assert_array_equal(np.sort(pk.flat), np.arange(8))
  small = sweep_cost(model, corrupted, clean, logit_diff, chunk=8)
  whole = sweep_cost(model, corrupted, clean, logit_diff, chunk=None)
  L = CFG.n_layers
  # T = 7: suffixes 7..1 in 4 rows of 8 tokens ((7,1), (6,2), (5,3), (4)); layers ℓ..L−1
  assert small["packed_tokens"] == 32 and small["cell_tokens"] == 28
  assert small["block_share"] == pytest.approx((L + 1) / (2 * L) * 32 / T**2, rel=1e-9)
  assert small["temp_bytes"] < whole["temp_bytes"]


def test_shape_buckets_share_one_program_and_equal_exact_shapes(setup):
  """Prompts of 9 and 10 tokens fall in one bucket (10): the second length compiles nothing;
  the bucketed sweep (right padding, padded packing) equals the exact-shape one."""
  from factflip.probes.packing import bucket_size
  from factflip.probes.patching import _sweep
  assert [bucket_size(n) for n in (3, 4, 5, 8, 9, 10, 11, 13, 17, 33)] == [
      3, 4, 5, 8, 10, 10, 12, 14, 20, 40]
  model, other, _, _ = setup
  r = np.random.default_rng(7)

  def metric(logits_BxPxV):
    return logits_BxPxV[:, -1, 5] - logits_BxPxV[:, -1, 9]
  before = _sweep._cache_size()
  for n in (9, 10):
    clean = r.integers(3, 97, (B, n)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 2:4] = r.integers(3, 97, (B, 2))
    got = act_patch(model, corrupted, clean, metric, site="attn_out", source_model=other,
                    window=2)
    assert got.shape == (B, CFG.n_layers, n)
    exact = act_patch(model, corrupted, clean, metric, site="attn_out", source_model=other,
                      window=2, buckets=False)
    np.testing.assert_allclose(got, exact, atol=1e-5)
  # one bucketed program for both lengths + one exact program per length
  assert _sweep._cache_size() - before == 3


def test_sharded_over_devices_along_the_batch(setup):
  model, _, _, _ = setup
  r = np.random.default_rng(3)
  clean = r.integers(3, 97, (8, T)).astype(np.int32)
  corrupted = np.where(r.random((8, T)) < 0.3, r.integers(3, 97, (8, T)), clean).astype(np.int32)
  assert len(jax.local_devices()) == 8
  one = act_patch(model, corrupted, clean, logit_diff, devices=jax.local_devices()[:1])
  eight = act_patch(model, corrupted, clean, logit_diff)     # all 8 devices divide the batch
  np.testing.assert_allclose(eight, one, atol=1e-5)
  with pytest.raises(ValueError, match="does not split over 3 devices"):
    act_patch(model, corrupted, clean, logit_diff, devices=jax.local_devices()[:3])


def test_reversal_rate_and_tidy_table(setup):
  """The study's patching outputs: ΔLL sweeps (answer_logit_diff with per-item answer ids),
  the reversal rate of flipped items, and the long-form table."""
  model, other, clean, corrupted = setup
  ids = jnp.asarray([[5, 9], [11, 4]], jnp.int32)
  dll = act_patch(model, corrupted, clean, answer_logit_diff, site="resid_post",
                  source_model=other, metric_aux=ids, positions=[1, 2, -1])
  lp = np.asarray(jax.nn.log_softmax(model(corrupted)[:, -1], axis=-1))
  np.testing.assert_allclose(dll[:, -1, 0],   # the last block's output at position 1 is read by nothing
                             lp[[0, 1], [5, 11]] - lp[[0, 1], [9, 4]], atol=1e-5)
  patched = np.asarray([[[0.5, -1.0]], [[0.2, 0.1]], [[-0.3, 2.0]]])      # [items, 1, 2]
  np.testing.assert_allclose(reversal_rate(patched, [True, True, False]), [[1.0, 0.5]])
  assert np.isnan(reversal_rate(patched, [False] * 3)).all()
  with pytest.raises(ValueError, match="one flag per item"):
    reversal_rate(patched, [True, False])
  df = pd.DataFrame(sweep_table(dll, items=["a", "b"], cells=["subj0", "subj1", "last"],
                                value="dll"))
  assert list(df.columns) == ["item", "layer", "position", "dll"] and len(df) == dll.size
  row = df[(df.item == "b") & (df.layer == 2) & (df.position == "last")]
  assert row.dll.item() == pytest.approx(dll[1, 2, 2])
  with pytest.raises(ValueError, match="2 cells labels for a sweep axis of 3"):
    sweep_table(dll, cells=["x", "y"])


def test_bad_inputs(setup):
  model, _, clean, corrupted = setup
  wide = Transformer(get_preset("tiny-0.5m", vocab_size=98, max_seq_len=64), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mismatched vocabularies"):
    act_patch(model, corrupted, clean, logit_diff, source_model=wide)
  with pytest.raises(ValueError, match="differ in shape"):
    act_patch(model, corrupted, clean[:, :5], logit_diff)
  with pytest.raises(ValueError, match="longer than the model's context of 64"):
    act_patch(model, np.zeros((1, 70), np.int32), np.zeros((1, 70), np.int32), logit_diff)
  with pytest.raises(ValueError, match="out of range"):
    position_groups(T, [9])


@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_attribution_patching_is_the_first_order_term_of_exact_patching(setup, site):
  """attribution[ℓ, t] = d/dε metric(patch with corrupted + ε·(clean − corrupted)) at ε = 0:
  checked by a central finite difference of exact patches; and it ranks cells like exact
  patching does on this tiny model."""
  model, _, clean, corrupted = setup
  attr = attribution_patch(model, corrupted, clean, logit_diff, site=site)
  assert attr.shape == (B, CFG.n_layers, T)
  c_clean = capture(model, clean, [site])[site]
  c_corr = capture(model, corrupted, [site])[site]
  eps = 1e-2
  for layer, t in [(0, 1), (1, 2), (3, 6), (2, 0)]:
    def patched(e):
      on = jnp.zeros(CFG.n_layers, bool).at[layer].set(True)
      pos = jnp.zeros(T, bool).at[t].set(True)
      iv = Intervention(on, pos, c_corr + e * (c_clean - c_corr), site=site, mode="replace")
      return np.asarray(logit_diff(model(corrupted, interventions=[iv])), np.float64)
    fd = (patched(eps) - patched(-eps)) / (2 * eps)
    np.testing.assert_allclose(attr[:, layer, t], fd, rtol=2e-2, atol=2e-3)
  exact = act_patch(model, corrupted, clean, logit_diff, site=site)
  base = np.asarray(logit_diff(model(corrupted)))[:, None, None]
  corr = np.corrcoef(attr.ravel(), (exact - base).ravel())[0, 1]
  assert corr > 0.5
