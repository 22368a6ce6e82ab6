"""Paper B's results (factflip/studies/new_knowledge/results.py): the linear fit on synthetic
counts, the checkpoint metrics on chosen QA rows, dynamics and stops on chosen QA tables."""

import numpy as np
import pandas as pd
import pytest

from factflip.studies.new_knowledge.results import (
  COLUMNS,
  base_rows,
  checkpoint_metrics,
  dynamics_rows,
  epochs_to,
  fit_rows,
  linear_fit,
  stop_rows,
)


def test_linear_fit_recovers_known_coefficients():
  rng = np.random.default_rng(0)
  x_kn, x_unk = rng.random(80), rng.random(80)
  y = 36.9 + 7.3 * x_kn - 8.3 * x_unk + rng.normal(0, 0.3, 80)
  f = linear_fit(x_kn, x_unk, y, n_boot=300)
  assert f["beta_kn"] == pytest.approx(7.3, abs=0.3) and f["beta_unk"] == pytest.approx(-8.3,
                                                                                        abs=0.3)
  # the bootstrap interval's width matches least squares' analytic standard errors
  X = np.stack([np.ones(80), x_kn, x_unk], 1)
  resid = y - X @ np.array([f["beta_0"], f["beta_kn"], f["beta_unk"]])
  se = np.sqrt(np.diag(resid @ resid / (80 - 3) * np.linalg.inv(X.T @ X)))
  for j, k in ((1, "beta_kn"), (2, "beta_unk")):
    assert f[f"{k}_lo"] < f[k] < f[f"{k}_hi"]
    assert 0.7 < (f[f"{k}_hi"] - f[f"{k}_lo"]) / (2 * 1.96 * se[j]) < 1.4
  assert f["r2"] > 0.95 and f["points"] == 80
  exact = linear_fit([0, 1, 0, 1], [0, 0, 1, 1], [1, 3, -1, 1], n_boot=0)
  assert (exact["beta_0"], exact["beta_kn"], exact["beta_unk"]) == pytest.approx((1, 2, -2))
  assert exact["r2"] == pytest.approx(1.0) and np.isnan(exact["beta_kn_lo"])
  singular = linear_fit([0.5] * 5, [0.1, 0.2, 0.3, 0.4, 0.5], [1, 2, 3, 4, 5], n_boot=10)
  assert np.isnan(singular["beta_kn"])


def test_checkpoint_metrics_on_chosen_rows():
  qa = pd.DataFrame({
      "member": [True, True, True, True, False, False, False, False, False],
      "idk": [False, False, True, False, False, False, False, False, False],
      "part": ["known", "known", "unknown", "unknown", "", "", "", "", ""],
      "split": ["train"] * 4 + ["dev", "test", "test", "test", "test"],
      "distribution": ["in"] * 8 + ["ood"],
      "category": ["HighlyKnown", "MaybeKnown", "Unknown", "Unknown", "Unknown",
                   "HighlyKnown", "Unknown", "Unknown", "Unknown"],
      "em": [True, False, False, True, True, True, False, False, True],
      "outcome": ["right", "wrong", "abstained", "right", "right", "right", "abstained",
                  "wrong", "right"]})
  m = checkpoint_metrics(qa)
  assert m["parts"] == {"known": (1, 2), "unknown": (2, 2)}   # the IDK row fits by abstaining
  assert m["dev_accuracy"] == 1.0 and m["test_accuracy_in"] == pytest.approx(1 / 3)
  assert m["test_accuracy_ood"] == 1.0 and m["test_accuracy_Unknown"] == 0.0
  assert m["test_answer_rate"] == pytest.approx(2 / 3) and m["test_answered_accuracy"] == 0.5
  assert np.isnan(m["test_accuracy_WeaklyKnown"])
  curve = pd.Series([0.0, 0.2, 0.6, 0.4, 1.0], index=range(5))
  assert epochs_to(curve, 0.5) == 2 and np.isnan(epochs_to(curve, 1.1))


def _qa(em_known, em_unknown, dev):
  """A checkpoint's QA rows: two Known and two Unknown members, two dev facts, one test fact."""
  return pd.DataFrame({
      "member": [True] * 4 + [False] * 3, "idk": False,
      "part": ["known", "known", "unknown", "unknown", "", "", ""],
      "split": ["train"] * 4 + ["dev", "dev", "test"], "distribution": "in",
      "category": ["HighlyKnown", "MaybeKnown", "Unknown", "Unknown", "Unknown",
                   "HighlyKnown", "HighlyKnown"],
      "em": [*em_known, *em_unknown, *dev, True],
      "outcome": "right"})


def test_dynamics_stops_and_fitting_on_chosen_checkpoints():
  """Epochs 0..3 (2 steps each): train accuracy 0.25, 0.5, 0.75, 1.0 of all; dev accuracy
  peaks at epoch 1 (EARLY_STOP); every part is fitted at epoch 3 (CONVERGENCE)."""
  cell = {"size": "tiny", "seed": 0, "mixture": "unk50"}
  qa = {0: _qa([True, False], [False, False], [False, False]),
        2: _qa([True, True], [False, False], [True, True]),
        4: _qa([True, True], [True, False], [True, False]),
        6: _qa([True, True], [True, True], [True, False])}
  dyn = pd.DataFrame(dynamics_rows(cell, qa, per_epoch=2), columns=COLUMNS["dynamics"])
  assert dyn.epoch.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  assert dyn[dyn.part == "unknown"].train_accuracy.tolist() == [0.0, 0.0, 0.5, 1.0]
  assert dyn[dyn.part == "known"].fitted.tolist() == [1, 2, 2, 2]
  out = stop_rows(dyn, convergence=0.99)
  stops = pd.DataFrame(out["stops"], columns=COLUMNS["stops"]).set_index("stop")
  assert stops.epoch.to_dict() == {"early_stop": 1, "convergence": 3}
  assert stops.loc["early_stop", "train_accuracy"] == 0.5 and stops.converged.all()
  assert stops.loc["convergence", "train_accuracy_unknown"] == 1.0
  assert stops.unknown_share.tolist() == [0.5, 0.5]
  fit = pd.DataFrame(out["fitting"]).set_index("part").epochs_to_half.to_dict()
  assert fit == {"known": 0.0, "unknown": 2.0}
  never = stop_rows(dyn[dyn.epoch < 2], convergence=0.99)["stops"]
  assert [r["epoch"] for r in never] == [1, 1] and not never[1]["converged"]
  rows = fit_rows({"size": "tiny", "seed": 0}, dyn, bootstrap=0, confidence=0.95)
  assert [r["distribution"] for r in rows] == ["in"] and rows[0]["points"] == 3   # epochs >= 1
  # the base is never EARLY_STOP, even when its dev accuracy is the best
  qa[0] = _qa([True, False], [False, False], [True, True])
  dyn0 = pd.DataFrame(dynamics_rows(cell, qa, per_epoch=2), columns=COLUMNS["dynamics"])
  early = [r for r in stop_rows(dyn0, 0.99)["stops"] if r["stop"] == "early_stop"]
  assert dyn0[dyn0.epoch == 0].dev_accuracy.iloc[0] == 1.0 and early[0]["epoch"] == 1


def test_base_rows_put_cloze_knowledge_beside_zero_shot_qa():
  cats = pd.DataFrame({
      "item": list("abcdef"), "split": ["dev", "test", "test", "test", "test", "train"],
      "distribution": ["in", "in", "in", "in", "ood", "in"],
      "category": ["Unknown", "MaybeKnown", "Unknown", "HighlyKnown", "Unknown", "Unknown"],
      "p_greedy": [0.0, 0.5, 0.0, 1.0, 0.0, 0.0],
      "cloze_em": ["True", "True", "False", "True", "", "True"]})
  qa0 = pd.DataFrame({"item": list("bcde"), "em": [False, False, True, False]})
  rows = {(r["split"], r["distribution"]): r for r in base_rows({"size": "s", "seed": 0}, cats,
                                                                 qa0)}
  assert set(rows) == {("dev", "in"), ("test", "in"), ("test", "ood")}
  t = rows["test", "in"]
  assert t["facts"] == 3 and t["cloze_accuracy"] == pytest.approx(2 / 3)
  assert t["zero_shot_accuracy"] == pytest.approx(1 / 3) and t["k_shot_p_greedy"] == 0.5
  assert t["known_share"] == pytest.approx(2 / 3)
  assert np.isnan(rows["test", "ood"]["cloze_accuracy"])     # no cloze prompt
  assert np.isnan(rows["dev", "in"]["zero_shot_accuracy"])   # not asked at the base
