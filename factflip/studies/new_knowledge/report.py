"""Paper B's report: figures, captions, headline, terminal summary and paper checks.

Owns: `headline` (the numbers the report and summary.json lead with), `figures` (fitting
dynamics, accuracy vs %Unknown at EARLY_STOP and CONVERGENCE, accuracy by SliCK category, the
linear fit beside paper B's, the IDK variant), `summary` (terminal lines) and `paper_checks`
(paper B's findings beside the measured values); `PAPER_FIT`, paper B's own fit.
Must not: compute results (`results.py`) or read stage outputs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from factflip.data.sft_mixtures import CATEGORIES
from factflip.studies.new_knowledge.config import unknown_share
from factflip.studies.report import Figure, legend, save, short

# Paper B's in-distribution fit (Table 1 of Gekhman et al. 2024; accuracy in percent)
PAPER_FIT = {"beta_0": 36.9, "beta_kn": 7.3, "beta_unk": -8.3, "r2": 0.86}


def _mean(s) -> float | None:
  v = pd.to_numeric(pd.Series(s), errors="coerce").dropna()
  return float(v.mean()) if len(v) else None


def headline(study, t: dict[str, pd.DataFrame]) -> dict[str, Any]:
  """Means over sizes and seeds: SliCK shares of the train facts, the base's knowledge of the
  test facts (cloze vs zero-shot QA vs k-shot), epochs to 50% train accuracy per part, test accuracy vs %Unknown at both stops, the fit, the IDK variant."""
  cats = t["categories"]
  train = cats[(cats.relation == "all") & (cats.split == "train")]
  cfg = study.c
  slick = f"; SliCK {cfg.slick.form} k = {cfg.slick.k_shot}"
  head: dict[str, Any] = {
      "protocol": ("the model directories as they are" + slick if cfg.facts else
                   "the QA format " + ("in the pretraining corpus"
                                       if cfg.pretrain.data.world_questions
                                       else "new to the base (no question in its corpus)")
                   + slick)
      + "; EARLY_STOP and the fit over fine-tuned epochs (>= 1)",
      "train_category_shares": {c: _mean(train[c]) for c in CATEGORIES}}
  b = t["base"][t["base"].split == "test"]
  head["base_knowledge"] = {          # what the base knows, and in which form (test facts)
      dist: {k: _mean(g[k]) for k in ("cloze_accuracy", "zero_shot_accuracy",
                                       "k_shot_p_greedy", "known_share")}
      for dist, g in b.groupby("distribution")}
  fit = t["fitting"]
  shared = fit[fit.mixture.map(lambda m: (unknown_share(m) or 0) not in (0, 1)
                               and m.startswith("unk"))]
  head["epochs_to_half_train_accuracy"] = {p: _mean(shared[shared.part == p].epochs_to_half)
                                           for p in ("known", "unknown")}
  stops = t["stops"]
  unk = stops[stops.mixture.str.startswith("unk")]
  for stop in ("early_stop", "convergence"):
    g = unk[unk.stop == stop].groupby("unknown_share")
    head[f"test_accuracy_in_at_{stop}"] = {f"{x:.2f}": _mean(v) for x, v in
                                           g.test_accuracy_in}
    head[f"test_accuracy_ood_at_{stop}"] = {f"{x:.2f}": _mean(v) for x, v in
                                            g.test_accuracy_ood}
  conv = unk[unk.stop == "convergence"]
  head["converged_mixtures"] = f"{int(conv.converged.sum())}/{len(conv)}"
  f = t["fit"]
  for dist in ("in", "ood"):
    g = f[f.distribution == dist]
    head[f"fit_{dist}"] = {k: _mean(g[k]) for k in ("beta_0", "beta_kn", "beta_unk", "r2",
                                                     "beta_unk_lo", "beta_unk_hi")}
  head["paper_fit_in"] = PAPER_FIT
  idk = stops[(stops.mixture.str.startswith("idk")) & (stops.stop == "convergence")]
  if len(idk):
    x = float(idk.unknown_share.iloc[0])
    base = unk[(unk.stop == "convergence") & np.isclose(unk.unknown_share, x)]
    head["idk_at_convergence"] = {
        "mixture": idk.mixture.iloc[0],
        "answer_rate": _mean(idk.test_answer_rate),
        "answered_accuracy": _mean(idk.test_answered_accuracy),
        "plain_answered_accuracy": _mean(base.test_answered_accuracy)}
  return head


def figures(study, t: dict[str, pd.DataFrame], out_dir: str) -> list[Figure]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  figs = []
  dyn, stops = t["dynamics"], t["stops"]
  first = dyn[(dyn["size"] == dyn["size"].iloc[0]) & (dyn.seed == dyn.seed.iloc[0])] \
      if len(dyn) else dyn
  label = f"{first['size'].iloc[0]} seed {first.seed.iloc[0]}" if len(first) else ""

  # 1. fitting dynamics: train accuracy per part vs epoch, one panel per mixture
  mixtures = [m for m in dict.fromkeys(first.mixture) if m.startswith(("unk", "idk"))]
  if mixtures:
    fig, axes = plt.subplots(1, len(mixtures), figsize=(3.2 * len(mixtures), 3), sharey=True,
                             squeeze=False, constrained_layout=True)
    for ax, m in zip(axes[0], mixtures):
      g = first[first.mixture == m]
      for part, color in (("known", "tab:blue"), ("unknown", "tab:red")):
        p = g[(g.part == part) & (g.examples > 0)]
        if len(p):
          ax.plot(p.epoch, p.train_accuracy, color=color, label=part)
      ax.set_title(m)
      ax.set_xlabel("epoch")
      ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("train accuracy (greedy EM)")
    legend(max(axes[0], key=lambda a: len(a.get_lines())))   # a panel with both parts
    figs.append(Figure("Fitting dynamics", save(fig, os.path.join(out_dir, "dynamics.png")),
                       f"Train accuracy on the Known (blue) and Unknown (red) examples of each "
                       f"mixture vs SFT epoch ({label}); paper B: Unknown examples are fitted "
                       "much later than Known ones."))
    plt.close(fig)

  # 2. test accuracy vs %Unknown at EARLY_STOP and CONVERGENCE
  unk = stops[stops.mixture.str.startswith("unk")]
  if len(unk):
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True, constrained_layout=True)
    for ax, col, title in ((axes[0], "test_accuracy_in", "in-distribution"),
                           (axes[1], "test_accuracy_ood", "out-of-distribution")):
      for stop, style in (("early_stop", "o-"), ("convergence", "s--")):
        g = unk[unk.stop == stop].groupby("unknown_share")[col].mean()
        ax.plot(100 * g.index, g.values, style, label=stop.upper())
      ax.set_title(title)
      ax.set_xlabel("% Unknown in the fine-tuning set")
    axes[0].set_ylabel("test accuracy (greedy EM)")
    legend(axes[0])
    figs.append(Figure("Test accuracy vs %Unknown", save(fig, os.path.join(
        out_dir, "accuracy_vs_unknown.png")), "Closed-book test accuracy after SFT on mixtures "
        "with X% Unknown examples, at the best-dev epoch (EARLY_STOP) and at CONVERGENCE "
        "(mean over sizes and seeds); paper B: accuracy falls as X rises, less at "
        "EARLY_STOP."))
    plt.close(fig)

  # 3. test accuracy by SliCK category, at CONVERGENCE, per mixture
  conv = stops[stops.stop == "convergence"]
  if len(conv):
    names = list(dict.fromkeys(conv.mixture))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2), 3.2),
                           constrained_layout=True)
    w = 0.8 / len(CATEGORIES)
    for j, c in enumerate(CATEGORIES):
      v = conv.groupby("mixture", sort=False)[f"test_accuracy_{c}"].mean().reindex(names)
      ax.bar(np.arange(len(names)) + (j - 1.5) * w, v.values, w, label=c)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylabel("test accuracy at CONVERGENCE")
    legend(ax, fontsize=8)
    figs.append(Figure("Test accuracy by SliCK category", save(fig, os.path.join(
        out_dir, "by_category.png")), "In-distribution test accuracy at CONVERGENCE per "
        "fine-tuning mixture, split by the test facts' SliCK category at the base model."))
    plt.close(fig)

  # 4. the linear fit beside paper B's
  fit = t["fit"]
  if len(fit):
    fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
    keys = ("beta_kn", "beta_unk")
    for j, dist in enumerate(("in", "ood")):
      g = fit[fit.distribution == dist]
      if not len(g):
        continue
      mid = np.array([g[k].mean() for k in keys])
      lo = np.array([g[f"{k}_lo"].mean() for k in keys])
      hi = np.array([g[f"{k}_hi"].mean() for k in keys])
      err = np.nan_to_num(np.stack([mid - lo, hi - mid]))
      ax.bar(np.arange(2) + (j - 1) * 0.27, mid, 0.27, yerr=err, capsize=3,
             label=f"factflip ({dist}, R² {g.r2.mean():.2f})")
    ax.bar(np.arange(2) + 0.27, [PAPER_FIT[k] for k in keys], 0.27, color="grey",
           label=f"paper B (in, R² {PAPER_FIT['r2']})")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(2), ["β_kn", "β_unk"])
    ax.set_ylabel("coefficient (accuracy points)")
    legend(ax, fontsize=8)
    figs.append(Figure("Linear model of test accuracy", save(fig, os.path.join(
        out_dir, "fit.png")), "Acc = β0 + β_kn·N_kn/|D| + β_unk·N_unk/|D| fitted over every "
        "checkpoint of the X%-Unknown runs (accuracy in percent; bars: 95% bootstrap "
        "intervals over checkpoints) beside paper B's in-distribution fit (β_kn = 7.3, "
        "β_unk = −8.3)."))
    plt.close(fig)
  return figs


def summary(head: dict[str, Any]) -> list[str]:
  e = head["epochs_to_half_train_accuracy"]
  f = head["fit_in"]
  lines = ["SliCK shares of the train facts: " + ", ".join(
               f"{c}: {short(v)}" for c, v in head["train_category_shares"].items()),
           *[f"the base on the {d} test facts: cloze {short(v['cloze_accuracy'])}, zero-shot "
             f"QA {short(v['zero_shot_accuracy'])}, k-shot P(T=0) {short(v['k_shot_p_greedy'])},"
             f" not Unknown {short(v['known_share'])}"
             for d, v in head.get("base_knowledge", {}).items()],
           f"epochs to 50% train accuracy: known {short(e['known'])}, unknown "
           f"{short(e['unknown'])}",
           "test accuracy (in) by %Unknown at CONVERGENCE: " + ", ".join(
               f"{x}: {short(v)}" for x, v in head["test_accuracy_in_at_convergence"].items()),
           "                            at EARLY_STOP:  " + ", ".join(
               f"{x}: {short(v)}" for x, v in head["test_accuracy_in_at_early_stop"].items()),
           f"linear fit (in): β_kn {short(f['beta_kn'])}, β_unk {short(f['beta_unk'])} "
           f"[{short(f['beta_unk_lo'])}, {short(f['beta_unk_hi'])}], R² {short(f['r2'])} "
           f"(paper B: 7.3, -8.3, 0.86)"]
  if "idk_at_convergence" in head:
    i = head["idk_at_convergence"]
    lines.append(f"{i['mixture']} at CONVERGENCE: answer rate {short(i['answer_rate'])}, "
                 f"accuracy when answering {short(i['answered_accuracy'])} (plain: "
                 f"{short(i['plain_answered_accuracy'])})")
  return lines


def paper_checks(head: dict[str, Any]) -> list[dict[str, Any]]:
  """Paper B's findings beside this run's measured values (the suite's report)."""
  fit = head["fit_in"]
  unk, kn = fit["beta_unk"], fit["beta_kn"]
  e = head["epochs_to_half_train_accuracy"]
  acc = head["test_accuracy_in_at_convergence"]
  ends = [acc[k] for k in (min(acc), max(acc))] if acc else [None, None]
  return [{"finding": "Unknown examples are fitted later than Known ones",
           "measured": f"epochs to 50% train accuracy: Known {short(e['known'])}, Unknown "
                       f"{short(e['unknown'])}",
           "reproduced": None if None in (e["known"], e["unknown"])
           else e["unknown"] > e["known"]},
          {"finding": "test accuracy falls as the Unknown share rises",
           "measured": "at CONVERGENCE " + ", ".join(f"{x}: {short(v)}"
                                                   for x, v in acc.items()),
           "reproduced": None if None in ends else ends[1] < ends[0]},
          {"finding": "β_unk < 0: fitted Unknown examples lower test accuracy (paper: −8.3)",
           "measured": f"β_unk {short(unk)} [{short(fit['beta_unk_lo'])}, "
                       f"{short(fit['beta_unk_hi'])}], R² {short(fit['r2'])}",
           "reproduced": unk is not None and unk < 0},
          {"finding": "β_kn > 0: fitted Known examples raise it (paper: +7.3)",
           "measured": f"β_kn {short(kn)}", "reproduced": kn is not None and kn > 0}]
