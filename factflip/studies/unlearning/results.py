"""Paper D's results: table → table functions from the evaluation tables (SCIENCE.md D).

Owns: `COLUMNS` (every results table and its columns), `checkpoint_row` (one evaluated
model's trade-off metrics, per-level probe means and spillover summary from its tables),
`conflict_rows` (the gradient-conflict statistics of one checkpoint), `run_rows` (a run's
trade-off, probes and spillover rows across its checkpoints), `matched_rows` (RWKU+'s
trade-off at matched forgetting) and `curve_rows` (a run's loss terms and gradient norm along
its steps).
Must not: read or write files (the study's results stage does), run models or plot.

Definitions: forget_rougeL / forget_L<n> / neighbour_rougeL are RWKU's scores
(`evals.rwku.rwku_summary`). hallucination_rate / abstention_rate on unseen questions
(`evals.qa.qa_summary`; a made-up person's question has no right answer). utility_acc =
multiple-choice accuracy (choices = the truth and `eval.mc_choices` − 1 other objects of the
relation, context = the cloze prompt). heldout_loss = mean token NLL of held-out texts
(paraphrase + true answer of utility facts). mia_auc* = AUC of a MIA score, forget texts vs
retain texts (`evals.mia.mia_summary`): 0.5 = indistinguishable; below 0.5 the forget texts
look less like members. fluency = mean n-gram entropy of the forget probes' generations.
es / ps / ns / s: CounterFact's scores of the forget facts; forget_correct /
forget_counterfactual: shares of the forget prompts in each ΔLL state (τ). conflict:
per-example gradients (`conflict.pattern`) of the run's forget examples; conflict_ratio and
mean_cos over all pairs, same_fact_* over the pairs of renderings of one fact;
forget_retain_cos = cosine of the mean forget gradient and the mean retain gradient;
forget_grad_norm / retain_grad_norm = mean L2 norm of the per-example gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factflip.evals.counterfact import fluency, summarize
from factflip.evals.mia import mia_summary
from factflip.evals.qa import qa_summary
from factflip.evals.rwku import rwku_summary
from factflip.probes.fact_preference import CORRECT, COUNTERFACTUAL, state_share
from factflip.probes.gradients import conflict_stats, cosine_matrix, gradient_cosine

# the trade-off columns read at matched forgetting (`matched_rows`)
MATCHED = ("forget_rougeL", "neighbour_rougeL", "utility_acc", "hallucination_rate",
           "abstention_rate", "mia_auc")
COLUMNS = {
    "tradeoff": ["size", "seed", "method", "corpus", "run", "epoch", "step", "forget_rougeL",
                 "forget_L1", "forget_L2", "forget_L3", "neighbour_rougeL", "utility_acc",
                 "utility_acc_norm", "heldout_loss", "mia_auc", "mia_auc_zlib",
                 "mia_auc_min_k", "mia_auc_min_kpp", "hallucination_rate", "abstention_rate",
                 "unseen_accuracy", "fluency", "es", "ps", "ns", "s", "forget_correct",
                 "forget_counterfactual"],
    "probes": ["size", "seed", "method", "corpus", "run", "epoch", "set", "level", "type",
               "rougeL", "probes"],
    "conflict": ["size", "seed", "corpus", "step", "epoch", "conflict_ratio", "mean_cos",
                 "same_fact_conflict_ratio", "same_fact_mean_cos", "forget_retain_cos",
                 "forget_grad_norm", "retain_grad_norm", "pairs", "same_fact_pairs",
                 "examples"],
    "matched": ["size", "seed", "method", "corpus", "run", "forget_target", "reached", "epoch",
                *MATCHED],
    "curves": ["size", "seed", "method", "corpus", "run", "step", "epoch", "loss",
               "loss_forget", "loss_retain", "grad_norm"],
    "spillover": ["size", "seed", "method", "corpus", "run", "when", "epoch",
                  "hallucination_rate", "abstention_rate", "accuracy", "questions"],
}
# MIA score column -> its trade-off column
_MIA = {"loss": "mia_auc", "zlib": "mia_auc_zlib", "min_k_0.2": "mia_auc_min_k",
        "min_k++_0.2": "mia_auc_min_kpp"}


def _mean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(x.mean()) if len(x) else float("nan")


def checkpoint_row(t: Mapping[str, pd.DataFrame | None], tau: float
                   ) -> tuple[dict[str, float], pd.DataFrame, dict[str, float]]:
  """One evaluated model's (trade-off metrics, per-level probe means, spillover summary) from
  its tables (`t`: probes, unseen, mia, and utility, cf, dll or None where not evaluated)."""
  p = t["probes"]
  p = p.assign(prediction=p.prediction.fillna("").astype(str))
  rwku = rwku_summary(p.set, p.level, p.rouge_l_recall)
  by = p.groupby(["set", "level", "type"], sort=False).rouge_l_recall.agg(["mean", "size"])
  probes = by.reset_index().rename(columns={"mean": "rougeL", "size": "probes"})
  q = qa_summary(list(t["unseen"].outcome))
  mc = t.get("utility")
  if mc is None:
    mc = pd.DataFrame({"acc": [], "acc_norm": []})
  mia = t["mia"]
  row = {"forget_rougeL": rwku["forget"],
         **{f"forget_L{lv}": rwku[f"forget_L{lv}"] for lv in (1, 2, 3)},
         "neighbour_rougeL": rwku["neighbour"], "utility_acc": _mean(mc.acc),
         "utility_acc_norm": _mean(mc.acc_norm),
         "heldout_loss": -_mean(mia[mia.set == "heldout"].loss),
         "hallucination_rate": q["hallucination_rate"],
         "abstention_rate": q["abstention_rate"], "unseen_accuracy": q["accuracy"],
         "fluency": fluency(list(p[p.set == "forget"].prediction))}
  summ = mia_summary(mia.set, {col: mia[col] for col in _MIA if col in mia})
  for col, key in _MIA.items():
    row[key] = summ[col]["auc"] if col in summ else float("nan")
  cf = t.get("cf")
  cfs = summarize(cf.to_dict("records")) if cf is not None else {}
  row.update({k.lower(): cfs.get(k, float("nan")) for k in ("ES", "PS", "NS", "S")})
  dl = t.get("dll")
  for key, state in (("forget_correct", CORRECT), ("forget_counterfactual", COUNTERFACTUAL)):
    row[key] = float(state_share(dl.dll.values, state, tau)) if dl is not None else float("nan")
  return row, probes, {**{k: q[k] for k in ("hallucination_rate", "abstention_rate",
                                            "accuracy")}, "questions": q["n"]}


def run_rows(key: Mapping[str, Any], evaluated: Sequence[tuple[int, tuple]], per_epoch: int
             ) -> dict[str, list[dict]]:
  """One run's trade-off and probes rows at every evaluated step, and its spillover before
  (the first step: the base) and after (the last); `evaluated`: (step, `checkpoint_row`)."""
  out: dict[str, list[dict]] = {"tradeoff": [], "probes": [], "spillover": []}
  last = evaluated[-1][0]
  for step, (row, probes, spill) in evaluated:
    epoch = step // per_epoch
    out["tradeoff"].append({**key, "epoch": epoch, "step": step, **row})
    for r in probes.to_dict("records"):
      out["probes"].append({**key, "epoch": epoch, **r})
    if step in (evaluated[0][0], last):
      out["spillover"].append({**key, "when": "before" if step == evaluated[0][0] else "after",
                               "epoch": epoch, **spill})
  return out


def conflict_rows(G_NxP, facts, retain_G_MxP=None) -> dict[str, float]:
  """Conflict statistics of per-example gradients (module docstring): over all pairs, over the
  pairs of examples of one fact (`facts`: each row's fact id), and the forget-retain cosine."""
  cos = cosine_matrix(G_NxP)
  out = conflict_stats(cos)
  facts = np.asarray(facts)
  i, j = np.triu_indices(len(cos), 1)
  same = facts[i] == facts[j]
  c = cos[i[same], j[same]]
  out.update(same_fact_conflict_ratio=float((c < 0).mean()) if len(c) else float("nan"),
             same_fact_mean_cos=float(c.mean()) if len(c) else float("nan"),
             same_fact_pairs=len(c), examples=len(cos))
  out["forget_retain_cos"] = (
      gradient_cosine(np.asarray(G_NxP).mean(0), np.asarray(retain_G_MxP).mean(0))
      if retain_G_MxP is not None else float("nan"))
  out["forget_grad_norm"] = float(np.linalg.norm(np.asarray(G_NxP, np.float64), axis=1).mean())
  out["retain_grad_norm"] = (
      float(np.linalg.norm(np.asarray(retain_G_MxP, np.float64), axis=1).mean())
      if retain_G_MxP is not None else float("nan"))
  return out


def matched_rows(tradeoff: pd.DataFrame, share: float = 0.5) -> list[dict]:
  """RWKU+'s comparison at matched forgetting: per run, the point along its checkpoints where
  forget ROUGE-L first falls to `share` × the base's (epoch 0), the `MATCHED` metrics there by
  linear interpolation between the two checkpoints around it (in forget ROUGE-L), and the
  fractional epoch; reached False (and NaN metrics) when the run never gets there."""
  rows = []
  keys = ["size", "seed", "method", "corpus", "run"]
  for key, g in tradeoff.groupby(keys, sort=False):
    g = g.sort_values("epoch")
    f = g.forget_rougeL.to_numpy(np.float64)
    target = share * f[0]
    hit = np.flatnonzero(f <= target)
    row = {**dict(zip(keys, key)), "forget_target": float(target), "reached": bool(len(hit))}
    if not len(hit) or not np.isfinite(target):
      rows.append({**row, "reached": False, "epoch": float("nan"),
                   **{m: float("nan") for m in MATCHED}})
      continue
    k = int(hit[0])
    w = 0.0 if k == 0 or f[k - 1] == f[k] else (f[k - 1] - target) / (f[k - 1] - f[k])
    lo, hi = g.iloc[max(k - 1, 0)], g.iloc[k]
    rows.append({**row, "epoch": float(lo.epoch + w * (hi.epoch - lo.epoch)),
                 **{m: float(lo[m] + w * (hi[m] - lo[m])) for m in MATCHED}})
  return rows


# the forget term of each objective in a run's metrics (train.objectives' term names)
_FORGET_TERMS = ("loss_forget_nll", "loss_npo", "loss_dpo")


def curve_rows(key: Mapping[str, Any], records: Sequence[Mapping[str, Any]], per_epoch: int
               ) -> list[dict]:
  """A run's optimisation along its steps from its training metrics (metrics.jsonl records):
  the loss, its forget term (the forget NLL for SFT and gradient ascent, which descends its
  negation; NPO's or DPO's loss) and retain NLL, and the global gradient norm."""
  out = []
  for r in {int(r["step"]): r for r in records}.values():   # a resumed run: its last row
    forget = next((r[k] for k in _FORGET_TERMS if k in r), float("nan"))
    out.append({**key, "step": int(r["step"]), "epoch": int(r["step"]) / per_epoch,
                "loss": float(r["loss"]), "loss_forget": float(forget),
                "loss_retain": float(r.get("loss_retain_nll", float("nan"))),
                "grad_norm": float(r["grad_norm"])})
  return out
