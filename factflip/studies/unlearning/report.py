"""Paper D's figures, captions, headline and terminal summary, drawn from the results tables.

Owns: `paper_checks` (paper D's findings beside the measured values), `headline` (per run at its last epoch against the base: forget / neighbour ROUGE-L,
utility, MIA AUC, hallucination and abstention rates; the conflict ratios of the two corpora;
the four claims the default must show, each checked), `figures` (the trade-off per run along
epochs; conflict ratio along training per corpus; each run's loss terms and gradient norm;
spillover before / after; the trade-off at matched forgetting in the headline) and `summary`.
Must not: compute results (`results.py`) or read stage outputs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd

from factflip.studies.report import Figure, legend, save, short

_KEYS = ("forget_rougeL", "neighbour_rougeL", "utility_acc", "heldout_loss", "mia_auc",
         "hallucination_rate", "abstention_rate", "fluency", "es")


def _f(v) -> float | None:
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _last(df: pd.DataFrame) -> pd.DataFrame:
  """Each run's rows at its last epoch, averaged over sizes and seeds."""
  last = df[df.epoch == df.groupby("run").epoch.transform("max")]
  return last.groupby("run", sort=False)[list(_KEYS)].mean()


def headline(study, t: dict[str, pd.DataFrame]) -> dict[str, Any]:
  """Means over sizes and seeds: the base (epoch 0), each run at its last epoch, the conflict
  ratios, and the checks of what paper D reports (True / False; None when a run is absent)."""
  tr, cf = t["tradeoff"], t["conflict"]
  base = tr[tr.epoch == 0].groupby(["size", "seed"]).first()[list(_KEYS)].mean()
  last = _last(tr)
  c = study.c
  aligned = not c.facts and c.align.epochs > 0
  head: dict[str, Any] = {
      "protocol": ((f"the base aligned first (align.epochs = {c.align.epochs}: answers known "
                    "facts, abstains on unknown ones)" if aligned else "the base as it is")
                   + "; forget corpus: " + ", ".join(c.forget.renders)),
      "base": {k: _f(base[k]) for k in _KEYS}}
  for run, r in last.iterrows():
    head[run] = {k: _f(r[k]) for k in _KEYS}
  for corpus, g in cf.groupby("corpus"):
    head[f"conflict_{corpus}"] = {
        "start": _f(g[g.step == 0].conflict_ratio.mean()),
        "mean_along_training": _f(g.conflict_ratio.mean()),
        "same_fact_start": _f(g[g.step == 0].same_fact_conflict_ratio.mean()),
        "same_fact_along_training": _f(g.same_fact_conflict_ratio.mean()),
        "forget_retain_cos_start": _f(g[g.step == 0].forget_retain_cos.mean())}
  cft = [r for r in last.index if r.startswith("cft_")]
  checks: dict[str, Any] = {
      "every_method_lowers_forget": bool((last.forget_rougeL < base.forget_rougeL).all()),
      "cft_hallucinates_more_than_base": (
          bool(all(last.loc[r].hallucination_rate > base.hallucination_rate for r in cft))
          if cft else None),
      "cft_hallucinates_more_than_refusal": (
          bool(all(last.loc[r].hallucination_rate > last.loc["refusal"].hallucination_rate
                   for r in cft)) if cft and "refusal" in last.index else None)}
  if {"consistent", "inconsistent"} <= set(cf.corpus):
    g = cf.groupby("corpus").conflict_ratio.mean()
    checks["inconsistent_conflicts_more"] = bool(g["inconsistent"] > g["consistent"])
  else:
    checks["inconsistent_conflicts_more"] = None
  spread = last[["neighbour_rougeL", "utility_acc"]].max() - last[
      ["neighbour_rougeL", "utility_acc"]].min()
  checks["neighbour_spread"] = _f(spread["neighbour_rougeL"])
  checks["utility_spread"] = _f(spread["utility_acc"])
  head["checks"] = checks
  m = t["matched"]
  if len(m):
    head["matched_forgetting"] = {         # RWKU+: the trade-off where forgetting is equal
        run: {"reached": f"{int(g.reached.sum())}/{len(g)}", "epoch": _f(g.epoch.mean()),
              **{k: _f(g[k].mean()) for k in ("neighbour_rougeL", "utility_acc",
                                               "hallucination_rate")}}
        for run, g in m.groupby("run", sort=False)}
  return head


def _runs_over(axes, df: pd.DataFrame, x: str, panels, xlabel: str, **style) -> None:
  """In each panel (key, title), a line per run: the mean of `key` over sizes and seeds
  against `x`."""
  mean = df.groupby(["run", x], sort=False)[[k for k, _ in panels]].mean().reset_index()
  for ax, (key, title) in zip(axes, panels):
    for run, g in mean.groupby("run", sort=False):
      ax.plot(g[x], g[key], label=run, **style)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)


def figures(study, t: dict[str, pd.DataFrame], out_dir: str) -> list[Figure]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  tr, cf, sp = t["tradeoff"], t["conflict"], t["spillover"]
  figs = []
  panels = (("forget_rougeL", "forget ROUGE-L recall"),
            ("neighbour_rougeL", "neighbour ROUGE-L recall"),
            ("utility_acc", "utility MC accuracy"), ("mia_auc", "MIA AUC (LOSS)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  _runs_over(axes, tr, "epoch", panels, "epoch (0 = base)", marker="o", ms=3)
  legend(axes[0], fontsize=7)
  figs.append(Figure(
      "Forgetting against what must stay, per method",
      save(fig, os.path.join(out_dir, "tradeoff.png")),
      "Per unlearning run (cft_<corpus> = counterfactual tuning on a self-consistent or a "
      "self-contradicting corpus; refusal = tuning to \"I don't know.\"; gradient ascent; NPO; "
      "DPO), along epochs (0 = the base): ROUGE-L recall of greedy answers on the forget set "
      "(mean of the cloze, question and adversarial levels; lower = forgotten), on the "
      "neighbour set (facts of other subjects; should stay), multiple-choice accuracy on "
      "non-target facts, and the LOSS membership-inference AUC of forget vs retain texts "
      "(0.5 = indistinguishable). Means over sizes and seeds."))
  plt.close(fig)
  if len(cf):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for k, (corpus, g) in enumerate(cf.groupby("corpus")):
      g = g.groupby("step").mean(numeric_only=True).reset_index()
      color = f"C{k}"
      axes[0].plot(g.step, g.conflict_ratio, marker="o", ms=3, color=color,
                   label=f"{corpus}: all pairs")
      axes[0].plot(g.step, g.same_fact_conflict_ratio, ls="--", marker="s", ms=3, color=color,
                   label=f"{corpus}: same-fact pairs")
      axes[1].plot(g.step, g.forget_retain_cos, marker="o", ms=3, color=color, label=corpus)
    axes[0].set_title("conflict ratio (share of pairs with cos < 0)", fontsize=10)
    axes[1].set_title("cosine of mean forget and retain gradients", fontsize=10)
    for ax in axes:
      ax.set_xlabel("training step of the CFT run")
      legend(ax, fontsize=7)
    figs.append(Figure(
        "Knowledge conflict: consistent vs self-contradicting counterfactuals",
        save(fig, os.path.join(out_dir, "conflict.png")),
        "Per-example gradients of the counterfactual-tuning examples, at every checkpoint of "
        "the CFT run on that corpus (step 0 = the base). Left: the share of example pairs "
        "whose gradients point against each other (cosine < 0), over all pairs (solid) and "
        "over the pairs that render the same fact (dashed: in the inconsistent corpus these "
        "state different counterfactuals). Right: the cosine between the mean forget gradient "
        "and the mean retain gradient."))
    plt.close(fig)
  cu = t["curves"]
  if len(cu):
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.4))
    _runs_over(axes, cu, "step", (("loss_forget", "forget term of the objective"),
                                  ("loss_retain", "retain NLL"),
                                  ("grad_norm", "global gradient norm")), "training step", lw=1)
    legend(axes[2], fontsize=7)
    figs.append(Figure(
        "Optimisation along each run",
        save(fig, os.path.join(out_dir, "curves.png")),
        "From each run's training metrics: the forget term of its objective (the NLL of the "
        "trained answers for counterfactual and refusal tuning and for gradient ascent, which "
        "descends its negation; NPO's and DPO's losses), the retain term's NLL, and the norm "
        "of the whole gradient, logged every `unlearn.log_every` steps. Means over sizes and "
        "seeds."))
    plt.close(fig)
  if len(sp):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    s = sp.groupby(["run", "when"], sort=False)[["hallucination_rate", "abstention_rate"]
                                                ].mean().unstack("when")
    runs = list(s.index)
    for ax, key in zip(axes, ("hallucination_rate", "abstention_rate")):
      x = range(len(runs))
      ax.bar([i - 0.2 for i in x], s[key]["before"], 0.4, label="base")
      ax.bar([i + 0.2 for i in x], s[key]["after"], 0.4, label="after unlearning")
      ax.set_xticks(list(x), runs, rotation=30, ha="right", fontsize=8)
      ax.set_title(key.replace("_", " ") + " on unseen questions", fontsize=10)
      legend(ax, fontsize=7)
    figs.append(Figure(
        "Hallucination spillover",
        save(fig, os.path.join(out_dir, "spillover.png")),
        "Closed-book questions about facts the model never saw (the world's unmentioned facts "
        "and people who do not exist; with hf= the eval.unseen file): the share of answers "
        "that are wrong and not an abstention (hallucination rate) and the share of "
        "abstentions, for the base and after each run's last epoch."))
    plt.close(fig)
  return figs


def summary(head: dict[str, Any]) -> list[str]:
  runs = [k for k, v in head.items() if isinstance(v, dict) and "forget_rougeL" in v]
  lines = ["run              forget  neighbour  utility  MIA AUC  halluc.  abstain"]
  for r in runs:
    v = head[r]
    lines.append(f"{r:16s} {short(v['forget_rougeL']):>6s}  {short(v['neighbour_rougeL']):>9s}"
                 f"  {short(v['utility_acc']):>7s}  {short(v['mia_auc']):>7s}"
                 f"  {short(v['hallucination_rate']):>7s}  {short(v['abstention_rate']):>7s}")
  for corpus in ("consistent", "inconsistent"):
    c = head.get(f"conflict_{corpus}")
    if c:
      lines.append(f"conflict ratio {corpus}: start {short(c['start'])}, along training "
                   f"{short(c['mean_along_training'])}; same-fact pairs: start "
                   f"{short(c['same_fact_start'])}, along training "
                   f"{short(c.get('same_fact_along_training'))}")
  if "matched_forgetting" in head:
    lines.append("at half the base's forget ROUGE-L (RWKU+): " + "; ".join(
        f"{r} epoch {short(v['epoch'])}, neighbour {short(v['neighbour_rougeL'])}, utility "
        f"{short(v['utility_acc'])}" if v["epoch"] is not None else f"{r} never"
        for r, v in head["matched_forgetting"].items()))
  lines.append("checks: " + ", ".join(f"{k} {v if not isinstance(v, float) else short(v)}"
                                      for k, v in head["checks"].items()))
  return lines


_CLAIMS = {
    "every_method_lowers_forget": "every method lowers forget-set ROUGE-L below the base",
    "inconsistent_conflicts_more": "self-contradicting counterfactuals conflict more (all "
                                   "pairs, along training)",
    "cft_hallucinates_more_than_base": "CFT raises hallucination on unseen questions above "
                                       "the base",
    "cft_hallucinates_more_than_refusal": "CFT hallucinates more than refusal tuning"}


def paper_checks(head: dict[str, Any]) -> list[dict[str, Any]]:
  """Paper D's findings beside this run's measured values (the suite's report)."""
  runs = [k for k, v in head.items() if isinstance(v, dict) and "forget_rougeL" in v]
  halluc = ", ".join(f"{r} {short(head[r]['hallucination_rate'])}" for r in runs)
  corpora = [c for c in ("consistent", "inconsistent") if f"conflict_{c}" in head]
  conflict = ", ".join(f"{c} {short(head[f'conflict_{c}']['mean_along_training'])}"
                       for c in corpora)
  same = " vs ".join(short(head[f"conflict_{c}"].get("same_fact_along_training"))
                     for c in corpora)
  measured = {
      "every_method_lowers_forget": "forget ROUGE-L " + ", ".join(
          f"{r} {short(head[r]['forget_rougeL'])}" for r in runs),
      "inconsistent_conflicts_more": f"conflict ratio {conflict} (same-fact pairs {same})",
      "cft_hallucinates_more_than_base": (f"base abstains "
                                          f"{short(head['base']['abstention_rate'])}; "
                                          "hallucination rate " + halluc),
      "cft_hallucinates_more_than_refusal": "hallucination rate " + halluc}
  return [{"finding": text, "measured": measured[k], "reproduced": head["checks"].get(k)}
          for k, text in _CLAIMS.items()]
