"""Paper D's results (factflip/studies/unlearning/results.py): conflict statistics on hand-built
gradients, one checkpoint's trade-off row and a run's rows on chosen tables."""

import numpy as np
import pandas as pd
import pytest

from factflip.studies.unlearning.results import (
  MATCHED,
  checkpoint_row,
  conflict_rows,
  curve_rows,
  matched_rows,
  run_rows,
)


def test_conflict_statistics_on_hand_built_gradients():
  G = np.array([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [0.0, 2.0]])
  # pairs: (0,1) cos<0, (0,2) 0, (0,3) 0, (1,2) >0, (1,3) >0, (2,3) 1
  facts = ["a", "a", "b", "b"]
  s = conflict_rows(G, facts, retain_G_MxP=np.array([[0.0, 1.0], [0.0, 3.0]]))
  assert s["pairs"] == 6 and s["conflict_ratio"] == pytest.approx(1 / 6)
  cos01 = -1 / np.hypot(1, 0.1)
  cos12 = 0.1 / np.hypot(1, 0.1)
  assert s["mean_cos"] == pytest.approx((cos01 + 2 * cos12 + 1.0) / 6)
  assert s["same_fact_pairs"] == 2 and s["same_fact_conflict_ratio"] == pytest.approx(0.5)
  assert s["same_fact_mean_cos"] == pytest.approx((cos01 + 1.0) / 2)
  mean = G.mean(0)                                    # [0, 0.775] vs [0, 2]: cosine 1
  assert s["forget_retain_cos"] == pytest.approx(mean[1] / np.linalg.norm(mean))
  assert np.isnan(conflict_rows(G, facts)["forget_retain_cos"])
  # gradient norms: rows 1, hypot(1, .1), 1, 2; retain rows 1, 3
  assert s["forget_grad_norm"] == pytest.approx((4 + np.hypot(1, 0.1)) / 4)
  assert s["retain_grad_norm"] == pytest.approx(2.0)


def test_matched_forgetting_interpolates_between_checkpoints():
  """forget ROUGE-L 0.8 -> 0.6 -> 0.2: half the base's (0.4) lies halfway between epochs 1 and
  2, so every metric is read halfway; a run that never gets there is not reached."""
  base = {m: 0.0 for m in MATCHED}
  rows = []
  for run, forget in (("npo", [0.8, 0.6, 0.2]), ("refusal", [0.8, 0.7, 0.5])):
    for epoch, f in enumerate(forget):
      rows.append({"size": "s", "seed": 0, "method": run, "corpus": "none", "run": run,
                   "epoch": epoch, **base, "forget_rougeL": f,
                   "neighbour_rougeL": 1.0 - 0.2 * epoch, "utility_acc": 0.9 - 0.1 * epoch})
  got = {r["run"]: r for r in matched_rows(pd.DataFrame(rows))}
  npo = got["npo"]
  assert npo["reached"] and npo["forget_target"] == pytest.approx(0.4)
  assert npo["epoch"] == pytest.approx(1.5) and npo["forget_rougeL"] == pytest.approx(0.4)
  assert npo["neighbour_rougeL"] == pytest.approx(0.7) and npo["utility_acc"] == pytest.approx(
      0.75)
  assert not got["refusal"]["reached"] and np.isnan(got["refusal"]["utility_acc"])


def test_curves_read_each_objectives_forget_term():
  key = {"size": "s", "seed": 0, "method": "npo", "corpus": "none", "run": "npo"}
  recs = [{"step": 3, "loss": 1.5, "grad_norm": 2.0, "loss_npo": 1.0, "loss_retain_nll": 0.5},
          {"step": 6, "loss": 9.0, "grad_norm": 1.0, "loss_npo": 0.8},
          {"step": 6, "loss": 1.2, "grad_norm": 1.0, "loss_npo": 0.7, "loss_retain_nll": 0.5}]
  rows = curve_rows(key, recs, per_epoch=3)
  assert [(r["step"], r["epoch"], r["loss"], r["loss_forget"]) for r in rows] == [
      (3, 1.0, 1.5, 1.0), (6, 2.0, 1.2, 0.7)]                # a resumed run's last row
  ga = curve_rows(key, [{"step": 1, "loss": -2.0, "grad_norm": 3.0, "loss_forget_nll": 2.0}], 2)
  assert ga[0]["loss_forget"] == 2.0 and np.isnan(ga[0]["loss_retain"])


def _tables(*, mia_nan=False):
  probes = pd.DataFrame({
      "set": ["forget"] * 4 + ["neighbour"] * 2, "level": [1, 1, 2, 3, 1, 2],
      "type": ["cloze", "cloze", "question", "paraphrase", "cloze", "question"],
      "prompt": "q", "prediction": ["Paris", None, "x", "y", "Rome", "z"], "answer": "a",
      "rouge_l_recall": [1.0, 0.0, 0.5, 0.25, 1.0, 0.0]})
  unseen = pd.DataFrame({"outcome": ["right", "wrong", "abstained", "wrong"]})
  mia = pd.DataFrame({"set": ["forget", "forget", "retain", "retain", "heldout"],
                      "loss": [-1.0, -2.0, -3.0, -4.0, -2.5],
                      "zlib": [0.1, 0.2, 0.3, 0.4, 0.0],
                      "min_k_0.2": [np.nan if mia_nan else -1.0, -1.0, -2.0, -2.0, -1.0]})
  utility = pd.DataFrame({"acc": [1.0, 0.0, 1.0], "acc_norm": [1.0, 1.0, 0.0]})
  dll = pd.DataFrame({"dll": [2.0, -2.0, 0.1, 1.0]})
  return {"probes": probes, "unseen": unseen, "mia": mia, "utility": utility, "cf": None,
          "dll": dll}


def test_checkpoint_row_on_chosen_tables():
  row, probes, spill = checkpoint_row(_tables(), tau=0.5)
  assert row["forget_L1"] == 0.5 and row["forget_L2"] == 0.5 and row["forget_L3"] == 0.25
  assert row["forget_rougeL"] == pytest.approx(1.25 / 3)          # mean of the level means
  assert row["neighbour_rougeL"] == 0.5
  assert row["utility_acc"] == pytest.approx(2 / 3) and row["heldout_loss"] == 2.5
  assert row["mia_auc"] == 1.0 and row["mia_auc_zlib"] == 0.0    # forget louder / quieter
  assert row["mia_auc_min_k"] == 1.0 and np.isnan(row["mia_auc_min_kpp"])   # not scored
  assert row["hallucination_rate"] == 0.5 and row["abstention_rate"] == 0.25   # of all four
  assert row["forget_correct"] == 0.5 and row["forget_counterfactual"] == 0.25
  assert np.isnan(row["es"])                                      # no CounterFact table
  assert probes.set_index(["set", "level"]).probes.to_dict()[("forget", 1)] == 2
  assert spill == {"hallucination_rate": 0.5, "abstention_rate": 0.25,
                   "accuracy": 0.25, "questions": 4}
  # a score missing on one text has no AUC (evals.mia.mia_summary's rule)
  assert np.isnan(checkpoint_row(_tables(mia_nan=True), tau=0.5)[0]["mia_auc_min_k"])


def test_run_rows_put_the_base_first_and_the_spillover_before_and_after():
  ev = checkpoint_row(_tables(), tau=0.5)
  rows = run_rows({"run": "npo"}, [(0, ev), (3, ev), (6, ev)], per_epoch=3)
  assert [r["epoch"] for r in rows["tradeoff"]] == [0, 1, 2]
  assert [(r["when"], r["epoch"]) for r in rows["spillover"]] == [("before", 0), ("after", 2)]
  assert len(rows["probes"]) == 3 * 5 and rows["probes"][0]["run"] == "npo"
