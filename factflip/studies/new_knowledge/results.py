"""Paper B's results: table → table functions from the stages' outputs (SCIENCE.md B).

Owns: `COLUMNS` (every results table and its columns), `checkpoint_metrics` (one checkpoint's
QA rows -> train accuracy per part, dev / test accuracies), `category_rows`, `mixture_rows`,
`dynamics_rows`, `stop_rows` (EARLY_STOP, CONVERGENCE and epochs to 50% train accuracy),
`fit_rows` and `linear_fit` (paper B's regression with bootstrap intervals).
Must not: read or write files (the study's results stage does), run models or plot.

Definitions. Train accuracy: greedy exact match on the mixture's own questions, per part
(known: the Known examples, unknown: the Unknown ones; an IDK-relabelled example counts as
fitted when the model abstains). Test accuracy: in-distribution (test facts of `relations`),
per SliCK category, and out-of-distribution (test facts of `ood_relations`). EARLY_STOP = the
fine-tuned epoch (>= 1) of best dev accuracy (first of ties; the base, epoch 0, is not a
candidate: it was never fine-tuned); CONVERGENCE = the first fine-tuned epoch whose train
accuracy (both parts) reaches `convergence` (else the last epoch; `converged` says which). The
linear fit (per size, seed, distribution): test accuracy in percent = β0 + β_kn·N_kn/|D| +
β_unk·N_unk/|D| by least squares over every fine-tuned checkpoint (epoch >= 1) of the unk<X>
mixtures, N = the fitted Known / Unknown training examples; R², and percentile bootstrap
intervals over checkpoints (scipy.stats). The base (per size, seed, split and distribution of
the dev / test facts): its cloze accuracy (greedy completion of the statement, the form the
corpus states facts in), its zero-shot accuracy in the SFT format (epoch 0's QA), SliCK's mean
P(T=0) (k-shot) and the share of facts not Unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from factflip.data.sft_mixtures import CATEGORIES
from factflip.probes.slick import category_shares
from factflip.studies.new_knowledge.config import unknown_share

PARTS = ("known", "unknown")
_RUN = ["size", "seed", "mixture", "epoch", "step"]
EVAL = (["dev_accuracy", "test_accuracy_in", "test_accuracy_ood"]
        + [f"test_accuracy_{c}" for c in CATEGORIES] + ["test_answer_rate",
                                                         "test_answered_accuracy"])
COLUMNS = {
    "dynamics": _RUN + ["part", "train_accuracy", "fitted", "examples"] + EVAL,
    "stops": ["size", "seed", "mixture", "unknown_share", "stop", "epoch", "converged",
              "train_accuracy", "train_accuracy_known", "train_accuracy_unknown"] + EVAL,
    "fit": ["size", "seed", "distribution", "points", "beta_0", "beta_0_lo", "beta_0_hi",
            "beta_kn", "beta_kn_lo", "beta_kn_hi", "beta_unk", "beta_unk_lo", "beta_unk_hi",
            "r2"],
    "categories": ["size", "seed", "relation", "split", *CATEGORIES, "facts"],
    "tiers": ["size", "seed", "tier", *CATEGORIES, "facts"],
    "mixtures": ["size", "seed", "mixture", "examples", "unknown_share_configured",
                 "unknown_share_realised", *CATEGORIES, "idk_relabelled", "steps_per_epoch"],
    "fitting": ["size", "seed", "mixture", "part", "epochs_to_half", "final_train_accuracy"],
    "base": ["size", "seed", "split", "distribution", "facts", "cloze_accuracy",
             "zero_shot_accuracy", "k_shot_p_greedy", "known_share"],
}


def linear_fit(x_kn, x_unk, acc, n_boot: int = 1000, confidence: float = 0.95,
               seed: int = 0) -> dict[str, float]:
  """Least squares acc = β0 + β_kn·x_kn + β_unk·x_unk; R²; percentile bootstrap intervals over
  the points (scipy.stats.bootstrap, paired resampling). NaN where the design is singular."""
  x_kn, x_unk, acc = (np.asarray(a, np.float64) for a in (x_kn, x_unk, acc))

  def coef(k, u, y):
    X = np.stack([np.ones_like(k), k, u], 1)
    b, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    return b if rank == 3 else np.full(3, np.nan)

  names = ("beta_0", "beta_kn", "beta_unk")
  b = coef(x_kn, x_unk, acc)
  pred = b[0] + b[1] * x_kn + b[2] * x_unk
  ss = float(((acc - acc.mean()) ** 2).sum())
  r2 = 1 - float(((acc - pred) ** 2).sum()) / ss if ss > 0 else float("nan")
  out = {"points": len(acc), **dict(zip(names, map(float, b))), "r2": r2}
  lo = hi = np.full(3, np.nan)
  if n_boot and len(acc) > 3 and np.isfinite(b).all():
    res = scipy.stats.bootstrap((x_kn, x_unk, acc), coef, paired=True, vectorized=False,
                                n_resamples=n_boot, confidence_level=confidence,
                                method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
  for n, l, h in zip(names, lo, hi):
    out[f"{n}_lo"], out[f"{n}_hi"] = float(l), float(h)
  return out


def _acc(s: pd.Series) -> float:
  return float(s.mean()) if len(s) else float("nan")


def checkpoint_metrics(qa: pd.DataFrame) -> dict[str, Any]:
  """One checkpoint's QA rows -> train accuracy per part, dev / test accuracies (see the
  module docstring)."""
  train = qa[qa.member]
  fitted = np.where(train.idk, train.outcome == "abstained", train.em)
  test_in = qa[(qa.split == "test") & (qa.distribution == "in")]
  answered = test_in[test_in.outcome != "abstained"]
  out = {"parts": {p: (int(fitted[train.part == p].sum()), int((train.part == p).sum()))
                   for p in PARTS},
         "dev_accuracy": _acc(qa[(qa.split == "dev") & (qa.distribution == "in")].em),
         "test_accuracy_in": _acc(test_in.em),
         "test_accuracy_ood": _acc(qa[(qa.split == "test") & (qa.distribution == "ood")].em),
         "test_answer_rate": len(answered) / len(test_in) if len(test_in) else float("nan"),
         "test_answered_accuracy": _acc(answered.em)}
  for c in CATEGORIES:
    out[f"test_accuracy_{c}"] = _acc(test_in[test_in.category == c].em)
  return out


def epochs_to(curve: pd.Series, level: float) -> float:
  """The first epoch at which a train-accuracy curve (indexed by epoch) reaches `level`
  (NaN: never)."""
  hit = curve[curve >= level]
  return float(hit.index[0]) if len(hit) else float("nan")


def category_rows(cell: Mapping[str, Any], cats: pd.DataFrame) -> dict[str, list[dict]]:
  """SliCK shares per relation and split (categories) and, for a world, per exposure tier of
  the train facts (tiers), from the SliCK table of one (size, seed)."""
  out: dict[str, list[dict]] = {"categories": [], "tiers": []}
  for r in category_shares(cats.to_dict("records")).to_dict("records"):
    out["categories"].append({**cell, **r})
  if "tier" in cats:
    for tier, g in cats[cats.split == "train"].groupby("tier"):
      n = g.category.value_counts()
      out["tiers"].append({**cell, "tier": tier, "facts": len(g),
                           **{c: int(n.get(c, 0)) for c in CATEGORIES}})
  return out


def mixture_rows(cell: Mapping[str, Any], stats: Mapping[str, Any], names: Sequence[str]
                 ) -> list[dict]:
  """Each mixture's realised size and shares (the mixtures stage's stats.json)."""
  rows = []
  for m in names:
    st = stats[m]
    rows.append({
        **cell, "mixture": m, "examples": st["size"],
        "unknown_share_configured": st["unknown_share_configured"],
        "unknown_share_realised": st["unknown_share_realised"],
        **{c: st["per_category"].get(c, 0) for c in CATEGORIES},
        "idk_relabelled": st["idk_relabelled"], "steps_per_epoch": st["steps_per_epoch"]})
  return rows


def dynamics_rows(cell: Mapping[str, Any], qa: Mapping[int, pd.DataFrame], per_epoch: int
                  ) -> list[dict]:
  """Per checkpoint step and part: train accuracy, fitted and examples, and the checkpoint's
  dev / test accuracies (`checkpoint_metrics` of its QA rows; `qa`: step -> rows)."""
  rows = []
  for step, table in qa.items():
    met = checkpoint_metrics(table)
    ev = {k: met[k] for k in EVAL}
    for part, (fitted, n) in met["parts"].items():
      rows.append({**cell, "epoch": step // per_epoch, "step": step, "part": part,
                   "train_accuracy": fitted / n if n else float("nan"),
                   "fitted": fitted, "examples": n, **ev})
  return rows


def stop_rows(dyn: pd.DataFrame, convergence: float) -> dict[str, list[dict]]:
  """Per run (size, seed, mixture) of the dynamics table: its EARLY_STOP and CONVERGENCE rows
  (stops) and per part the epochs to 50% train accuracy (fitting)."""
  out: dict[str, list[dict]] = {"stops": [], "fitting": []}
  for (size, seed, m), g in dyn.groupby(["size", "seed", "mixture"], sort=False):
    per = g.pivot_table(index="epoch", columns="part", values=["fitted", "examples"],
                        aggfunc="sum")
    allacc = per["fitted"].sum(1) / per["examples"].sum(1)
    part_acc = g.pivot_table(index="epoch", columns="part", values="train_accuracy")
    ev = g.drop_duplicates("epoch").set_index("epoch")
    tuned = ev.index[ev.index >= 1] if (ev.index >= 1).any() else ev.index
    allacc = allacc.loc[allacc.index.isin(tuned)]
    conv = allacc[allacc >= convergence - 1e-12]
    stops = {"early_stop": int(ev.dev_accuracy.loc[tuned].fillna(-1).idxmax()),
             "convergence": int(conv.index[0]) if len(conv) else int(allacc.index[-1])}
    for stop, e in stops.items():
      out["stops"].append({
          "size": size, "seed": seed, "mixture": m, "unknown_share": unknown_share(m),
          "stop": stop, "epoch": e, "converged": bool(len(conv)),
          "train_accuracy": float(allacc[e]),
          **{f"train_accuracy_{p}": float(part_acc[p][e]) if p in part_acc else float("nan")
             for p in PARTS},
          **{k: float(ev.loc[e, k]) for k in EVAL}})
    for p in PARTS:
      if p in part_acc and g[g.part == p].examples.iloc[0] > 0:
        curve = part_acc[p]
        out["fitting"].append({"size": size, "seed": seed, "mixture": m, "part": p,
                               "epochs_to_half": epochs_to(curve, 0.5),
                               "final_train_accuracy": float(curve.iloc[-1])})
  return out


def fit_rows(cell: Mapping[str, Any], dyn: pd.DataFrame, bootstrap: int, confidence: float
             ) -> list[dict]:
  """Paper B's linear fit of one (size, seed) over every fine-tuned checkpoint (epoch >= 1) of
  its unk<X> mixtures, in and out of distribution (`linear_fit`; the bootstrap seeded by the
  seed)."""
  size, seed = cell["size"], cell["seed"]
  g = dyn[(dyn["size"] == size) & (dyn.seed == seed) & dyn.mixture.str.startswith("unk")
          & (dyn.epoch >= 1)]
  wide = g.pivot_table(index=["mixture", "epoch"], columns="part",
                       values=["fitted", "examples"], aggfunc="sum")
  if wide.empty:
    return []
  n = wide["examples"].sum(1)
  x_kn = (wide["fitted"].get("known", 0) / n).to_numpy()
  x_unk = (wide["fitted"].get("unknown", 0) / n).to_numpy()
  ev = g.drop_duplicates(["mixture", "epoch"]).set_index(["mixture", "epoch"]).loc[wide.index]
  rows = []
  for dist, col in (("in", "test_accuracy_in"), ("ood", "test_accuracy_ood")):
    y = 100 * ev[col].to_numpy(np.float64)
    if np.isfinite(y).all():
      rows.append({**cell, "distribution": dist,
                   **linear_fit(x_kn, x_unk, y, bootstrap, confidence, seed)})
  return rows


def base_rows(cell: Mapping[str, Any], cats: pd.DataFrame, qa0: pd.DataFrame) -> list[dict]:
  """What the base knows and in which form, per split (dev, test) and distribution: cloze
  accuracy (SliCK table's `cloze_em`; NaN where the facts have no cloze prompt), zero-shot
  accuracy in the SFT format (`qa0`: the QA rows of the base checkpoint, epoch 0), SliCK's mean
  P(T=0) and the share of facts not Unknown."""
  rows = []
  qa = qa0.drop_duplicates("item").set_index("item").em
  for (split, dist), g in cats[cats.split.isin(("dev", "test"))].groupby(
      ["split", "distribution"]):
    cloze = g.cloze_em.astype(str) if "cloze_em" in g else pd.Series([], dtype=str)
    cloze = cloze[cloze.isin(("True", "False"))].eq("True")
    asked = g.item[g.item.isin(qa.index)]
    rows.append({**cell, "split": split, "distribution": dist, "facts": len(g),
                 "cloze_accuracy": _acc(cloze),
                 "zero_shot_accuracy": _acc(qa.loc[asked].astype(bool)),
                 "k_shot_p_greedy": _acc(g.p_greedy.astype(float)),
                 "known_share": float((g.category != "Unknown").mean())})
  return rows
