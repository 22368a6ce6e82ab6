"""Paper C's results (factflip/studies/morfi/results.py) on small synthetic tables."""

import numpy as np
import pandas as pd
import pytest

from factflip.studies.morfi.results import (
  COLUMNS,
  cell_tables,
  clamp_values,
  cloze_check,
  label_permutation_null,
  monotonic_counts,
  null_summary,
  ranked_monotonic,
)


def _latents():
  return pd.DataFrame({"latent": [0, 1, 2, 3], "rho": [0.9, -0.95, 0.2, 0.9],
                       "rho_low": 0.0, "rho_high": 1.0, "mk_p": [0.01, 0.02, 0.5, 0.001],
                       "mk_tau": 0.5, "monotonic": [True, True, False, True],
                       "direction": ["rises", "falls", "rises", "rises"], "alive": True,
                       "delta_m0_m100": [-0.1, 0.2, 0.0, -0.3],
                       "rho_epochs": 0.0, "rho_epochs_low": 0.0, "rho_epochs_high": 0.0,
                       "mk_p_epochs": 1.0, "monotonic_epochs": [True, True, True, False],
                       "direction_epochs": ["rises", "rises", "falls", "rises"]})


def _cloze():
  # ΔLL > τ = 0.5: M_0 knows a, b, c; M_100 knows a, c, d; e has no counterfactual (no ΔLL).
  # QA: M_0 right on a, b, c, e; M_100 on a
  return pd.DataFrame({"item": list("abcde"), "dll_m0": [2.0, 1.0, 0.6, -1.0, np.nan],
                       "dll_m100": [1.0, 0.2, 3.0, 0.9, np.nan],
                       "logp_true_m0": [-1.0, -2.0, -3.0, -6.0, -2.0],
                       "logp_true_m100": [-2.0, -2.0, -2.0, -2.0, -2.0],
                       "qa_m0": [True, True, True, False, True],
                       "qa_m100": [True, False, False, False, False]})


def test_monotonic_latents_rank_by_strength_then_p_then_index():
  assert ranked_monotonic(_latents()).latent.tolist() == [1, 3, 0]


def test_monotonic_counts_across_mixtures_epochs_and_both_in_one_direction():
  # monotonic 0 (rises), 1 (falls), 3 (rises); across epochs 0, 1, 2; both with one sign: 0
  assert monotonic_counts(_latents()) == {"alive": 4, "monotonic": 3, "rising": 2, "falling": 1,
                                          "monotonic_epochs": 3, "both": 1}


def test_null_summary_mean_95th_percentile_and_p():
  got = null_summary(np.arange(21), 0.25)                 # 0..20: mean 10, p95 19
  assert got == {"null_mean": 10.0, "null_p95": 19.0, "null_p": 0.25, "permutations": 21}
  assert np.isnan(null_summary([], np.nan)["null_mean"])


def test_label_permutation_null_counts_only_the_trend_and_its_reversal():
  # five models, one latent rising with %Unknown (prompt noise keeps the bootstrap alive), one
  # constant, one dead: of the 5! = 120 orderings of the labels only the identity and the
  # reversal give Mann-Kendall p < 0.05 (|S| = 10; |S| = 8 gives p 0.086), so the null holds
  # two 1s: mean 2/120, and p = P(null >= 1) = 2/120 (every permutation: exact)
  rng = np.random.default_rng(0)
  x = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  acts = np.zeros((30, 5, 3))
  acts[:, :, 0] = np.arange(5) + rng.normal(0, 0.05, size=(30, 5))
  acts[:, :, 1] = 1.0
  res = label_permutation_null(x, acts, 1000, seed=0, n_boot=200, mk_alpha=0.05)
  assert res.statistic == 1 and len(res.null_distribution) == 120
  assert res.null_distribution.mean() == pytest.approx(2 / 120)
  assert res.pvalue == pytest.approx(2 / 120)


def test_label_permutation_null_equals_the_test_on_the_permuted_labels():
  from factflip.probes import morfi as M
  rng = np.random.default_rng(1)
  acts = rng.gamma(1.0, size=(20, 6, 40))
  acts[:, :, :8] += np.arange(6)[None, :, None] * rng.uniform(0.1, 0.6, size=8)
  x = np.linspace(0, 1, 6)
  kw = {"n_boot": 100, "mk_alpha": 0.05}
  for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 0, 2, 4, 3, 5]):
    want = M.monotonic_latents(x[perm], acts, seed=3, **kw).monotonic.sum()
    assert label_permutation_null(x[perm], acts, 1, seed=3, **kw).statistic == want


def test_clamp_values_are_multiples_of_the_own_difference_never_below_zero():
  np.testing.assert_allclose(clamp_values([0.1, 0.5], [0.2, -0.3], 1.0), [0.3, 0.2])
  np.testing.assert_allclose(clamp_values([0.1, 0.5], [0.2, -0.3], 2.0), [0.5, 0.0])


def test_cloze_check_known_retained_and_lost_but_stored():
  got = cloze_check(_cloze(), tau=0.5)
  assert (got["facts"], got["with_dll"]) == (5, 4)
  assert got["known_m0"] == 0.75 and got["known_m100"] == 0.75   # of the four with a ΔLL
  assert got["retained"] == pytest.approx(2 / 3)             # a and c of a, b, c
  assert got["lost_qa"] == 3 and got["lost_qa_stored"] == 1  # b, c, e lost; c still stored
  assert got["dll_m0"] == pytest.approx(0.65) and got["logp_true_m0"] == pytest.approx(-2.8)
  assert cloze_check(_cloze().iloc[:0], tau=0.5)["facts"] == 0
  no_cf = cloze_check(_cloze().iloc[4:], tau=0.5)            # log p(true) only
  assert no_cf["with_dll"] == 0 and np.isnan(no_cf["lost_qa_stored"])
  assert no_cf["logp_true_m100"] == -2.0 and no_cf["lost_qa"] == 1


def test_cell_tables_trend_of_the_steered_latents():
  steering = pd.DataFrame({"kind": ["none"], "latent": [-1], "alpha": [0.0], "rel_norm": [0.0],
                           "accuracy": [0.5], "delta_accuracy": [0.0], "recovered": [0.0],
                           "r_k": [np.nan]})
  final = {0.0: np.array([[1.0, 2.0, 0.0, 4.0], [3.0, 2.0, 0.0, 0.0]]),   # [P, d_sae]
           1.0: np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])}
  t = cell_tables({"size": "tiny", "seed": 1, "layer": 3}, _latents(), steering, final, top=2,
                  cloze=_cloze(), null_counts=[0, 1, 1, 2], null_p=0.5, tau=0.5)
  trend = t["trend"]
  assert list(trend.columns) == COLUMNS["trend"]
  assert trend.set_index(["unknown_share", "latent"]).mean_activation.to_dict() == {
      (0.0, 1): 2.0, (0.0, 3): 2.0, (1.0, 1): 0.5, (1.0, 3): 1.0}
  assert (t["latents"]["seed"] == 1).all() and list(t["steering"].columns) == COLUMNS["steering"]
  mono = t["monotonic"].iloc[0]
  assert (mono.layer, mono.monotonic, mono.both, mono.null_mean, mono.permutations) == (
      3, 3, 1, 1.0, 4)
  assert (trend.layer == 3).all() and "layer" not in t["cloze"]      # the cloze check: per model
  assert t["cloze"].iloc[0].lost_qa_stored == 1 and list(t["cloze"].columns) == COLUMNS["cloze"]
