"""Paper A's figures, captions and headline numbers (the poisoning study's report).

Owns: `paper_checks` (paper A's findings beside the measured values), the poisoning study's plots (report/*.png), what each shows (CAPTIONS) and the headline
numbers (summary.json) from its results tables.
Must not: compute metrics (`studies.poisoning` writes the tables), run models or write the
page (`studies.report`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from factflip.studies.report import Figure, final_rows, legend, save, sizes_of


def plot_flips(flips: pd.DataFrame, path: str) -> str:
  sizes = list(dict.fromkeys(flips["size"]))
  fig = MplFigure(figsize=(5 * len(sizes), 6.5), layout="constrained")
  axes = fig.subplots(2, len(sizes), squeeze=False, sharex=True)
  prompt = flips[flips.kind == "prompt"]
  for j, size in enumerate(sizes):
    d = prompt[prompt["size"] == size]
    for p, g in d.groupby("p"):
      g = g.groupby("step")[["flip_rate", "ambiguity_rate"]].mean()
      axes[0, j].plot(g.index, g.flip_rate, marker=".", label=f"p = {p:g}")
      axes[1, j].plot(g.index, g.ambiguity_rate, marker=".", label=f"p = {p:g}")
    axes[0, j].set_title(f"{size}: flip rate (training prompt)")
    axes[1, j].set_title(f"{size}: ambiguity rate")
    axes[1, j].set_xlabel("continual-pretraining step")
    for ax in axes[:, j]:
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
  legend(axes[0, 0], fontsize=8)
  return save(fig, path)


def plot_lens(lens: pd.DataFrame, path: str) -> str:
  """Layer × checkpoint heatmaps of the logit-lens flip rate: a row per size, a column per
  p > 0."""
  sizes = sizes_of(lens)
  ps = sorted(p for p in set(lens.p) if p > 0) or [None]
  fig = MplFigure(figsize=(3.2 * len(ps) + 0.8, 3.0 * len(sizes)), layout="constrained")
  axes = fig.subplots(len(sizes), len(ps), squeeze=False)
  im = None
  for i, size in enumerate(sizes):
    for j, p in enumerate(ps):
      ax = axes[i, j]
      g = lens[(lens["size"] == size) & (lens.p == p)]
      if not len(g):
        ax.set_axis_off()
        continue
      grid = g.groupby(["layer", "step"]).flip_rate.mean().unstack("step")
      im = ax.imshow(grid.values, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="magma",
                     extent=(grid.columns.min(), grid.columns.max(), -0.5,
                             grid.index.max() + 0.5))
      ax.set_title(f"{size}, p = {p:g}", fontsize=9)
      ax.set_xlabel("step")
      ax.set_ylabel("layer (logit lens)")
  if im is not None:
    fig.colorbar(im, ax=axes.ravel().tolist(), label="flip rate")
  return save(fig, path)


def plot_reversal(patching: pd.DataFrame, path: str) -> str:
  sizes = sizes_of(patching)
  fig = MplFigure(figsize=(6.5 * len(sizes), 3.8), layout="constrained")
  axes = fig.subplots(1, len(sizes), squeeze=False)[0]
  for ax, size in zip(axes, sizes):
    d = _final(patching[patching["size"] == size]) if len(patching) else patching
    if len(d):
      d = d[d.p == d.p.max()]
      for (site, window, pos), g in d.groupby(["site", "window", "position"]):
        g = g.groupby("layer").reversal_rate.mean()
        ax.plot(g.index, g.values, marker="o", label=f"{site} w{window} {pos}")
      ax.set_title(f"{size}: reversal of flipped items by patched layer\n"
                   f"(p = {d.p.max():g}, final step)", fontsize=9)
    else:
      ax.set_title("no flipped items to patch")
    ax.set_xlabel("first patched layer")
    ax.set_ylabel("reversal rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7, ncol=2)
  return save(fig, path)


def plot_scaling(flips: pd.DataFrame, path: str) -> str:
  """Final flip and ambiguity rate (training prompt) against p, one line per model size."""
  d = _final(flips[flips.kind == "prompt"])
  fig = MplFigure(figsize=(10, 3.6), layout="constrained")
  axes = fig.subplots(1, 2)
  for size in sizes_of(d):
    g = d[d["size"] == size].groupby("p")[["flip_rate", "ambiguity_rate"]].mean()
    axes[0].plot(g.index, g.flip_rate, marker="o", label=size)
    axes[1].plot(g.index, g.ambiguity_rate, marker="o", label=size)
  for ax, what in zip(axes, ("flip rate", "ambiguity rate")):
    ax.set_title(f"final {what} by model size (training prompt)")
    ax.set_xlabel("poisoning ratio p")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=8)
  return save(fig, path)


def plot_first_flips(first: pd.DataFrame, path: str) -> str:
  """Per size and p, how many target items first flip at each checkpoint (training prompt)."""
  sizes = sizes_of(first)
  fig = MplFigure(figsize=(6.5 * len(sizes), 3.4), layout="constrained")
  axes = fig.subplots(1, len(sizes), squeeze=False)[0]
  for ax, size in zip(axes, sizes):
    d = first[(first.kind == "prompt") & (first.first_flip_step >= 0) & (first["size"] == size)]
    ps = sorted(set(d.p))
    width = 0.8 / max(len(ps), 1)
    steps = sorted(set(d.first_flip_step))
    for i, p in enumerate(ps):
      counts = d[d.p == p].first_flip_step.value_counts()
      ax.bar(np.arange(len(steps)) + i * width, [counts.get(s, 0) for s in steps], width,
             label=f"p = {p:g}")
    ax.set_xticks(np.arange(len(steps)) + 0.4 - width / 2, [str(s) for s in steps])
    ax.set_xlabel("checkpoint step of the first flip")
    ax.set_ylabel("target items")
    ax.set_title(f"{size}: when items flip (abruptness)", fontsize=9)
    legend(ax, fontsize=8)
  return save(fig, path)


def plot_generalisation(flips: pd.DataFrame, path: str) -> str:
  sizes = sizes_of(flips)
  fig = MplFigure(figsize=(6.5 * len(sizes), 3.6), layout="constrained")
  axes = fig.subplots(1, len(sizes), squeeze=False)[0]
  for ax, size in zip(axes, sizes):
    d = _final(flips[flips["size"] == size]).groupby(["kind", "p"]).flip_rate.mean().unstack(
        "p")
    kinds = list(d.index)
    width = 0.8 / max(len(d.columns), 1)
    for i, p in enumerate(d.columns):
      ax.bar(np.arange(len(kinds)) + i * width, d[p].values, width, label=f"p = {p:g}")
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, fontsize=8, rotation=20)
    ax.set_ylabel("flip rate at the final step")
    ax.set_ylim(0, 1.02)
    legend(ax, fontsize=8)
    ax.set_title(f"{size}: generalisation by prompt kind (target facts)", fontsize=9)
  return save(fig, path)


def plot_collateral(collateral: pd.DataFrame, heldout: pd.DataFrame, path: str) -> str:
  """Per size: non-target accuracy and the held-out answer NLL against step, a line per p."""
  sizes = sizes_of(collateral)
  fig = MplFigure(figsize=(10, 3.6 * len(sizes)), layout="constrained")
  axes = fig.subplots(len(sizes), 2, squeeze=False)
  for row, size in zip(axes, sizes):
    d = collateral[(collateral.kind == "prompt") & (collateral["size"] == size)]
    for p, g in d.groupby("p"):
      g = g.groupby("step").accuracy.mean()
      row[0].plot(g.index, g.values, marker=".", label=f"p = {p:g}")
    row[0].set_title(f"{size}: non-target facts: accuracy (training prompt)", fontsize=9)
    row[0].set_ylim(-0.02, 1.02)
    h = heldout[heldout["size"] == size]
    for p, g in h.groupby("p"):
      g = g.groupby("step").loss.mean()
      row[1].plot(g.index, g.values, marker=".", label=f"p = {p:g}")
    row[1].set_title(f"{size}: held-out answer NLL", fontsize=9)
    for ax in row:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      legend(ax, fontsize=8)
  return save(fig, path)


def headline(tables: dict[str, pd.DataFrame], base: dict[str, Any]) -> dict[str, Any]:
  """The numbers the terminal summary and the page lead with."""
  flips, patching, coll = tables["flips"], tables["patching"], tables["collateral"]
  fin = _final(flips)
  out: dict[str, Any] = {"base_accuracy": base}
  out["final_flip_rate"] = {f"{p:g}": float(v) for p, v in
                            fin[fin.kind == "prompt"].groupby("p").flip_rate.mean().items()}
  out["final_ambiguity_rate"] = {f"{p:g}": float(v) for p, v in
                                 fin[fin.kind == "prompt"].groupby("p").ambiguity_rate.mean()
                                 .items()}
  top = fin[fin.p == fin.p.max()]
  out["final_flip_rate_by_kind_at_max_p"] = {k: float(v) for k, v in
                                             top.groupby("kind").flip_rate.mean().items()}
  ab = tables["abruptness"]
  ab = ab[ab.kind == "prompt"]
  out["abruptness"] = {f"{p:g}": float(v) for p, v in ab.groupby("p").abruptness.mean().items()}
  cf = _final(coll)
  out["control_accuracy_final"] = {f"{p:g}": float(v) for p, v in
                                   cf[cf.kind == "prompt"].groupby("p").accuracy.mean().items()}
  if flips["size"].nunique() > 1:
    out["final_flip_rate_by_size"] = {
        size: {f"{p:g}": float(v) for p, v in g.groupby("p").flip_rate.mean().items()}
        for size, g in fin[fin.kind == "prompt"].groupby("size", sort=False)}
  if len(patching):
    pf = _final(patching)
    pf = pf[pf.p == pf.p.max()]
    best = pf.sort_values("reversal_rate", kind="stable").iloc[-1]
    out["best_reversal"] = {k: (v.item() if hasattr(v, "item") else v)
                            for k, v in best.items()}
  return out


# What each figure shows, under its title on the page (definitions: studies/poisoning.py).
CAPTIONS = {
    "flips": "Target facts on the training prompt. Flip rate: share of the items correct at "
             "step 0 (ΔLL > τ) that are counterfactual (ΔLL < −τ) at the step; ambiguity "
             "rate: share with |ΔLL| ≤ τ. A line per poisoning ratio p, a column per size.",
    "lens": "Logit lens: the flip rate computed from each layer's residual stream through the "
            "final norm and unembedding (the top row is the output), per checkpoint.",
    "reversal": "Cross-model patching at the final step of the largest p: the base model's "
                "activations (site, window of layers from the first patched layer, subject "
                "or last-token positions) copied into the poisoned model; reversal rate = "
                "share of the flipped items whose patched ΔLL returns above 0.",
    "first_flips": "How many target items first become counterfactual at each checkpoint "
                   "(abruptness: the largest single-interval rise over the total rise is in "
                   "summary.json and abruptness.csv).",
    "scaling": "Final flip and ambiguity rate against p, a line per model size.",
    "generalisation": "Final flip rate by prompt kind: the poisoned (training) prompt, held-out "
                      "paraphrases, questions, other languages, neighbours (other subjects: "
                      "should not move) and two-hop compositions through the target.",
    "collateral": "Non-target (control) facts' accuracy and the held-out answer NLL during "
                  "continual pretraining: a broad collapse would show here.",
}


def _final(df: pd.DataFrame) -> pd.DataFrame:
  """Rows at each run's (size, seed, p) last probed step."""
  return final_rows(df, ("size", "seed", "p"))


def figures(tables: dict[str, pd.DataFrame], heldout: pd.DataFrame, out_dir: str
            ) -> list[Figure]:
  """Every report figure drawn from the results tables into out_dir, with its caption."""
  os.makedirs(out_dir, exist_ok=True)
  plots = [
      ("Flip and ambiguity rates", "flips", plot_flips, ("flips",)),
      ("Logit-lens flip rate by layer and checkpoint", "lens", plot_lens, ("lens",)),
      ("Patching reversal", "reversal", plot_reversal, ("patching",)),
      ("First flips", "first_flips", plot_first_flips, ("first_flips",)),
      ("Final flip and ambiguity rate by model size", "scaling", plot_scaling, ("flips",)),
      ("Generalisation", "generalisation", plot_generalisation, ("flips",)),
  ]
  out = [Figure(title, fn(*[tables[n] for n in names], os.path.join(out_dir, f"{name}.png")),
                CAPTIONS[name]) for title, name, fn, names in plots]
  out.append(Figure("Collateral", plot_collateral(tables["collateral"], heldout, os.path.join(
      out_dir, "collateral.png")), CAPTIONS["collateral"]))
  return out


def paper_checks(head: dict[str, Any]) -> list[dict[str, Any]]:
  """Paper A's findings beside this run's measured values (the suite's report)."""
  flips = {float(p): v for p, v in head["final_flip_rate"].items()}
  amb = {float(p): v for p, v in head["final_ambiguity_rate"].items()}
  high = {p: v for p, v in flips.items() if p >= 0.5}
  rows = [{"finding": "> 55% of the targets the base knew flip at p >= 0.5",
           "measured": "flip rate " + ", ".join(f"p {p:g}: {v:.2f}" for p, v in flips.items()),
           "reproduced": bool(high) and min(high.values()) > 0.55}]
  if 0.0 in amb and high:
    delta = max(abs(amb[p] - amb[0.0]) for p in high)
    rows.append({"finding": "ambiguity nearly unchanged by poisoning (within 0.10 of p = 0)",
                 "measured": "ambiguity " + ", ".join(f"p {p:g}: {v:.2f}"
                                                      for p, v in amb.items()),
                 "reproduced": delta <= 0.10})
  best = head.get("best_reversal")
  if best:
    rows.append({"finding": "patching the base's activations reverses at most 56.8% of flips",
                 "measured": f"best reversal {best['reversal_rate']:.2f} ({best['site']}, "
                             f"layer {best['layer']}, window {best['window']})",
                 "reproduced": best["reversal_rate"] <= 0.568})
  return rows
