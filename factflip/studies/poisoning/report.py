"""Paper A's report: figures, captions, headline numbers, terminal lines and paper checks.

Owns: the poisoning study's plots (report/*.png), what each shows (CAPTIONS), the headline
numbers (summary.json) from its results tables, the terminal summary (`summary`) and paper A's
findings beside the measured values (`paper_checks`, the suite's findings table).
Must not: compute metrics (`results.py` makes the tables), run models or write the page
(`studies.report`).
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


def plot_reversal_depth(patching: pd.DataFrame, path: str) -> str:
  """Single-layer patching (window 1) at the final step of the largest p: reversal rate against
  relative depth ℓ / L, a line per size, site and position group (sizes side by side on one
  axis: depths are comparable across model depths)."""
  fig = MplFigure(figsize=(7, 3.8), layout="constrained")
  ax = fig.subplots()
  d = _final(patching) if len(patching) else patching
  d = d[(d.window == 1) & (d.p == d.p.max())] if len(d) else d
  for (size, site, pos), g in d.groupby(["size", "site", "position"], sort=False):
    g = g.groupby("depth").reversal_rate.mean()
    ax.plot(g.index, g.values, marker="o", label=f"{size} {site} {pos}")
  ax.set_title("reversal of flipped items by single patched layer (window 1)"
               + (f", p = {d.p.max():g}, final step" if len(d) else ": nothing to patch"),
               fontsize=9)
  ax.set_xlabel("relative depth ℓ / L of the patched layer")
  ax.set_ylabel("reversal rate")
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  legend(ax, fontsize=7, ncol=2)
  return save(fig, path)


def plot_heads(attribution: pd.DataFrame, knockout: pd.DataFrame, path: str) -> str:
  """At the last probed step of the largest p, for the flipped targets: left, the median
  change from the base of each layer's attn_out and mlp_out direct logit attribution to
  logit(true) − logit(cf); right, the median relative change of p(true) (solid) and p(cf)
  (dashed) with the subject knocked out around each layer, at the base (step 0) and at that
  step. Layers as relative depth ℓ / L, a line per size."""
  fig = MplFigure(figsize=(10, 3.6), layout="constrained")
  left, right = fig.subplots(1, 2)
  for ax, df, title in ((left, attribution, "attribution change from the base (flipped)"),
                        (right, knockout, "subject knockout: p_knocked / p − 1")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("relative depth ℓ / L")
    ax.grid(alpha=0.3)
    if not len(df):
      ax.text(0.5, 0.5, "not probed (probe.attribution / probe.knockout_window)",
              ha="center", fontsize=8, transform=ax.transAxes)
  if len(attribution):
    a = attribution[(attribution.p == attribution.p.max()) & (attribution.group == "flipped")
                    & attribution.component.isin(["attn", "mlp"])]
    a = a[a.step == a.step.max()] if len(a) else a
    for (size, comp), g in a.groupby(["size", "component"], sort=False):
      L = g.layer.max() + 1
      g = g.groupby("layer").change.mean()
      left.plot((g.index + 1) / L, g.values, marker="o", label=f"{size} {comp}_out")
    left.axhline(0, color="k", lw=0.5)
    left.set_ylabel("Δ attribution (logits)")
    legend(left, fontsize=7)
  if len(knockout):
    k = knockout[knockout.p == knockout.p.max()]
    last = k.step.max() if len(k) else 0
    for (size, step, group), g in k[k.step.isin([0, last])].groupby(
        ["size", "step", "group"], sort=False):
      if step == 0 and group != "all" or step and group != "flipped":
        continue
      L = g.layer.max() + 1
      label = f"{size} step {step} ({'all' if step == 0 else 'flipped'})"
      for column, answer, style in (("relative_change", "true", "-"),
                                    ("relative_change_cf", "cf", "--")):
        m = g.groupby("layer")[column].mean()
        right.plot((m.index + 1) / L, m.values, style, marker="o", ms=3,
                   label=f"{label}: p({answer})")
    right.axhline(0, color="k", lw=0.5)
    right.set_yscale("symlog", linthresh=1.0)   # a small p can grow many-fold; −1 is the floor
    right.set_ylabel("relative change of p(answer)")
    legend(right, fontsize=7)
  return save(fig, path)


def plot_responses(flips: pd.DataFrame, path: str) -> str:
  """Final flip rate (training prompt) against p by three rules: ΔLL states at τ, ΔLL states at
  τ = 0, and the greedy answer (true → counterfactual); a panel per size."""
  d = _final(flips[flips.kind == "prompt"])
  sizes = sizes_of(d)
  fig = MplFigure(figsize=(5 * len(sizes), 3.6), layout="constrained")
  axes = fig.subplots(1, len(sizes), squeeze=False)[0]
  for ax, size in zip(axes, sizes):
    g = d[d["size"] == size].groupby("p")[["flip_rate", "flip_rate_tau0",
                                           "response_flip_rate"]].mean()
    for col, label in (("flip_rate", "ΔLL, τ"), ("flip_rate_tau0", "ΔLL, τ = 0"),
                       ("response_flip_rate", "greedy answer")):
      ax.plot(g.index, g[col], marker="o", label=label)
    ax.set_title(f"{size}: final flip rate by rule (training prompt)", fontsize=9)
    ax.set_xlabel("poisoning ratio p")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=8)
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


def _rules(alerts: pd.DataFrame) -> tuple[list[str], str | None]:
  """The monitor's warning rules (in config order) and its flip rule."""
  rules = list(dict.fromkeys(alerts.rule))
  flip = next((r for r in rules if r.startswith("flip:")), None)
  return [r for r in rules if r != flip], flip


def plot_lead_times(alerts: pd.DataFrame, path: str) -> str:
  """Per warning rule, a histogram of lead times (flip step − first alert step) over the
  watched prompts that flipped, every p > 0, size and seed pooled; missed flips counted."""
  warn, _ = _rules(alerts)
  fig = MplFigure(figsize=(3.6 * max(len(warn), 1), 3.2), layout="constrained")
  axes = fig.subplots(1, max(len(warn), 1), squeeze=False)[0]
  flipped = alerts[(alerts.set == "watch") & (alerts.flip_step >= 0) & (alerts.p > 0)]
  for ax, rule in zip(axes, warn):
    g = flipped[flipped.rule == rule]
    lead = g.lead_time.dropna()
    missed = int(g.lead_time.isna().sum())
    if len(lead):
      lo, hi = min(lead.min(), 0), max(lead.max(), 0)
      # bins as wide as the smallest gap between alert steps (the monitor's interval), <= 2
      step = max(np.diff(np.unique(g.alert_step[g.alert_step >= 0])).min(initial=2), 1)
      ax.hist(lead, bins=np.arange(lo - step / 2, hi + step, step), color="C0")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_title(f"{rule}: {len(lead)} alerted, {missed} missed", fontsize=9)
    ax.set_xlabel("lead time (steps before the output flip)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("flipped target prompts")
  return save(fig, path)


def plot_alert_timeline(alerts: pd.DataFrame, path: str) -> str:
  """Cumulative share of prompts alerted against the CPT step, a line per rule (solid: targets,
  dashed: controls), a panel per p; sizes and seeds pooled."""
  ps = sorted(set(alerts.p))
  rules = list(dict.fromkeys(alerts.rule))
  fig = MplFigure(figsize=(3.4 * len(ps) + 0.6, 3.2), layout="constrained")
  axes = fig.subplots(1, len(ps), squeeze=False, sharey=True)[0]
  last = int(max(alerts.alert_step.max(), alerts.flip_step.max(), 1))
  steps = np.arange(0, last + 1)
  for ax, p in zip(axes, ps):
    for i, rule in enumerate(rules):
      for set_, style in (("watch", "-"), ("control", "--")):
        a = alerts[(alerts.p == p) & (alerts.rule == rule) & (alerts.set == set_)].alert_step
        if not len(a):
          continue
        a = a.to_numpy()
        share = [((a >= 0) & (a <= s)).mean() for s in steps]
        ax.step(steps, share, where="post", ls=style, color=f"C{i}",
                label=f"{rule} ({'targets' if set_ == 'watch' else 'controls'})")
    ax.set_title(f"p = {p:g}")
    ax.set_xlabel("continual-pretraining step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("share of prompts alerted")
  legend(axes[-1], fontsize=7)
  return save(fig, path)


def monitor_headline(monitor: pd.DataFrame) -> dict[str, Any]:
  """Per rule, summed over sizes and seeds: at the largest p, detected / flipped target
  prompts and the median of the runs' median lead times; false-alarm rates (alerted, never
  flipped) on controls (every p) and on targets at p = 0 (nothing there should move)."""
  out = {}
  top = monitor[monitor.p == monitor.p.max()]
  for rule, g in monitor.groupby("rule", sort=False):
    t = top[(top.rule == rule) & (top.set == "watch")]
    ctl = g[g.set == "control"]
    zero = g[(g.set == "watch") & (g.p == 0)]
    out[rule] = {"detected": int(t.detected.sum()), "flipped": int(t.flipped.sum()),
                 "median_lead": (float(t.median_lead.median()) if t.median_lead.notna().any()
                                 else None),
                 "control_false_alarm_rate": (float(ctl.false_alarms.sum() / ctl.prompts.sum())
                                              if ctl.prompts.sum() else None),
                 "p0_target_alarm_rate": (float(zero.false_alarms.sum() / zero.prompts.sum())
                                          if zero.prompts.sum() else None)}
  return out


def headline(study, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
  """The numbers the terminal summary and the page lead with (the base's accuracy from the
  study's base.json files)."""
  base = study.base_accuracy()
  flips, patching, coll = tables["flips"], tables["patching"], tables["collateral"]
  fin = _final(flips)
  out: dict[str, Any] = {"base_accuracy": base, "ratio_reading": study.c.ratio_reading,
                         "lens": study.c.probe.lens,
                         "protocol": f"p read as {study.c.ratio_reading!r}; states by ΔLL (τ) "
                                     f"and by the greedy answer; the {study.c.probe.lens} lens"}
  prompt = fin[fin.kind == "prompt"].groupby("p")

  def by_p(col, g=prompt):
    return {f"{p:g}": float(v) for p, v in g[col].mean().items()}
  out["final_flip_rate"] = by_p("flip_rate")
  out["final_ambiguity_rate"] = by_p("ambiguity_rate")
  streams = tables.get("streams")
  if streams is not None and len(streams):
    out["cf_share_of_mentions"] = by_p("cf_share_of_mentions", streams.groupby("p"))
    out["cf_share_of_stream"] = by_p("cf_share_of_stream", streams.groupby("p"))
  out["final_flip_rate_tau0"] = by_p("flip_rate_tau0")
  out["final_cf_share_tau0"] = by_p("cf_share_tau0")
  out["final_response_flip_rate"] = by_p("response_flip_rate")
  out["final_responses"] = {f"{p:g}": {"true": float(g.accuracy.mean()),
                                       "counterfactual": float(g.response_cf.mean()),
                                       "other": float(g.response_other.mean())}
                            for p, g in prompt}
  agree = tables.get("lens_agreement")
  if agree is not None and len(agree):
    fa = _final(agree)
    out["lens_agreement_depth"] = {
        group: {f"{p:g}": (None if np.isnan(v) else float(v))
                for p, v in g.groupby("p").agree_depth.mean().items()}
        for group, g in fa.groupby("group", sort=False)}
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
  if len(tables.get("monitor", ())):
    out["monitor"] = monitor_headline(tables["monitor"])
  if len(patching):
    pf = _final(patching)
    pf = pf[pf.p == pf.p.max()]
    def plain(row):
      return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    out["best_reversal"] = plain(pf.sort_values("reversal_rate", kind="stable").iloc[-1])
    # per site: a resid_pre patch late in a deep model replaces most of what is left of its
    # computation, so the blocks' own outputs are read beside it
    out["best_reversal_by_site"] = {
        site: plain(g.sort_values("reversal_rate", kind="stable").iloc[-1])
        for site, g in pf.groupby("site", sort=False)}
    one = pf[pf.window == 1]
    if len(one):                 # one layer patched: comparable across depths and sizes
      out["best_single_layer_reversal"] = plain(
          one.sort_values("reversal_rate", kind="stable").iloc[-1])
  return out


# What each figure shows, under its title on the page (definitions: results.py).
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
    "reversal_depth": "Single-layer patching (window 1) at the final step of the largest p: "
                      "reversal rate against the patched layer's relative depth ℓ / L, so "
                      "models of different depths share one axis (patching.csv also has "
                      "belief_rho: Spearman ρ between the base's ΔLL and the recovery).",
    "responses": "The final flip rate on the training prompt by three rules: ΔLL states at τ "
                 "(correct at step 0, counterfactual now), the same at τ = 0 (every item on "
                 "one side), and the greedy answer (true at step 0, the counterfactual now: "
                 "the paper's responses).",
    "first_flips": "How many target items first become counterfactual at each checkpoint "
                   "(abruptness: the largest single-interval rise over the total rise is in "
                   "summary.json and abruptness.csv).",
    "scaling": "Final flip and ambiguity rate against p, a line per model size.",
    "generalisation": "Final flip rate by prompt kind: the poisoned (training) prompt, held-out "
                      "paraphrases, questions, other languages, neighbours (other subjects: "
                      "should not move) and two-hop compositions through the target.",
    "lead_times": "The factual-integrity monitor during CPT (targets watched on the live "
                  "parameters every `cpt.monitor.every` steps): per warning rule, how many "
                  "steps before a target prompt's output flip (its flip:τ alert) the rule "
                  "first fired; 0 = at the same observation, < 0 = after it; missed = flipped "
                  "without an alert. Every p > 0, size and seed pooled.",
    "alert_timeline": "Share of watched prompts a rule has fired on by each CPT step, solid "
                      "for the targets, dashed for the controls (an alert on a prompt that "
                      "never flips is a false alarm), a panel per poisoning ratio p.",
    "collateral": "Non-target (control) facts' accuracy and the held-out answer NLL during "
                  "continual pretraining: a broad collapse would show here.",
    "heads": "Attention-level probes at the last probed step of the largest p (probe."
             "attribution, probe.knockout_window). Left: per layer, the median change from the "
             "base of attn_out's and mlp_out's direct contribution to logit(true) − "
             "logit(cf) through the final norm, over the targets flipped by then; a drop marks "
             "the layers that stopped writing the true answer. Right: the median p(true) "
             "(solid) and p(cf) (dashed) with the answer position blocked from the subject's "
             "tokens in a window of layers centred on each layer, relative to unblocked (Geva "
             "et al. 2023), at the base (all targets) and at that step (flipped targets); a "
             "drop marks the windows where that answer is read from the subject. The axis is "
             "linear within ±1 and logarithmic beyond (a small p can grow many-fold).",
}


def _final(df: pd.DataFrame) -> pd.DataFrame:
  """Rows at each run's (size, seed, p) last probed step."""
  return final_rows(df, ("size", "seed", "p"))


def figures(study, tables: dict[str, pd.DataFrame], out_dir: str) -> list[Figure]:
  """Every report figure drawn from the results tables (and the CPT runs' held-out loss:
  `Study.heldout`) into out_dir, with its caption."""
  heldout = study.heldout()
  os.makedirs(out_dir, exist_ok=True)
  plots = [
      ("Flip and ambiguity rates", "flips", plot_flips, ("flips",)),
      ("Logit-lens flip rate by layer and checkpoint", "lens", plot_lens, ("lens",)),
      ("Patching reversal", "reversal", plot_reversal, ("patching",)),
      ("Patching reversal by relative depth", "reversal_depth", plot_reversal_depth,
       ("patching",)),
      ("Flip rate by rule: ΔLL at τ and at 0, greedy answers", "responses", plot_responses,
       ("flips",)),
      ("First flips", "first_flips", plot_first_flips, ("first_flips",)),
      ("Final flip and ambiguity rate by model size", "scaling", plot_scaling, ("flips",)),
      ("Generalisation", "generalisation", plot_generalisation, ("flips",)),
  ]
  out = [Figure(title, fn(*[tables[n] for n in names], os.path.join(out_dir, f"{name}.png")),
                CAPTIONS[name]) for title, name, fn, names in plots]
  out.append(Figure("Collateral", plot_collateral(tables["collateral"], heldout, os.path.join(
      out_dir, "collateral.png")), CAPTIONS["collateral"]))
  attribution, knockout = (tables.get(n, pd.DataFrame()) for n in ("attribution", "knockout"))
  if len(attribution) or len(knockout):
    out.append(Figure("Heads: attribution and subject knockout", plot_heads(
        attribution, knockout, os.path.join(out_dir, "heads.png")), CAPTIONS["heads"]))
  alerts = tables.get("alerts")
  if alerts is not None and len(alerts):
    out += [Figure("Monitor: lead time before the output flip", plot_lead_times(
                alerts, os.path.join(out_dir, "lead_times.png")), CAPTIONS["lead_times"]),
            Figure("Monitor: alert timeline", plot_alert_timeline(
                alerts, os.path.join(out_dir, "alert_timeline.png")), CAPTIONS["alert_timeline"])]
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
  responses = {float(p): v for p, v in head.get("final_response_flip_rate", {}).items()}
  high_r = {p: v for p, v in responses.items() if p >= 0.5 and v is not None
            and not np.isnan(v)}
  if high_r:
    rows.append({"finding": "> 55% of the responses (greedy answers) correct at the base turn "
                            "counterfactual at p >= 0.5",
                 "measured": "response flip rate " + ", ".join(
                     f"p {p:g}: {_rate(v)}" for p, v in responses.items()),
                 "reproduced": min(high_r.values()) > 0.55})
  depth = head.get("lens_agreement_depth", {}).get("flipped", {})
  depth = {float(p): v for p, v in depth.items() if v is not None}
  if depth:
    top = max(depth)
    rows.append({"finding": "flips concentrate in late layers (29-36 of 36: the lens agrees "
                            "with the flipped output from depth 29/36 = 0.81)",
                 "measured": f"median earliest lens layer agreeing with the flipped output at "
                             f"p {top:g}: depth {depth[top]:.2f}",
                 "reproduced": depth[top] >= 29 / 36})
  best = head.get("best_reversal")
  if best:
    rows.append({"finding": "patching the base's activations reverses at most 56.8% of flips",
                 "measured": f"best reversal {best['reversal_rate']:.2f} ({best['site']}, "
                             f"layer {best['layer']}, window {best['window']})",
                 "reproduced": best["reversal_rate"] <= 0.568})
  return rows


def _rate(v) -> str:
  """A headline share for the terminal: 2 decimals, or n/a where undefined (null)."""
  return "n/a" if v is None else f"{v:.2f}"


def summary(head: dict[str, Any]) -> list[str]:
  """The terminal summary from the headline (strict JSON: undefined values are None)."""
  def by_p(key, d=None):
    return ", ".join(f"{p}: {_rate(v)}" for p, v in (head.get(key, {}) if d is None else d
                                                     ).items())
  lines = [f"base accuracy (greedy, targets): {head['base_accuracy']}",
           (f"p read as {head.get('ratio_reading', 'restate')!r}; counterfactual share of the "
            f"target mentions: {by_p('cf_share_of_mentions')}; of the stream: "
            f"{by_p('cf_share_of_stream')}"),
           "final flip rate by p (training prompt; mean over sizes and seeds): "
           + by_p("final_flip_rate")]
  for size, rates in head.get("final_flip_rate_by_size", {}).items():
    lines.append(f"  {size}: " + ", ".join(f"{p}: {_rate(v)}" for p, v in rates.items()))
  lines += ["final ambiguity rate by p: "
            + ", ".join(f"{p}: {_rate(v)}" for p, v in head["final_ambiguity_rate"].items()),
            "final flip rate at tau = 0: " + by_p("final_flip_rate_tau0")
            + "; counterfactual share at tau = 0: " + by_p("final_cf_share_tau0"),
            "final response flip rate (greedy answer true -> counterfactual): "
            + by_p("final_response_flip_rate"),
            "final greedy answers true / counterfactual / other: " + ", ".join(
                f"{p}: {_rate(r['true'])} / {_rate(r['counterfactual'])} / {_rate(r['other'])}"
                for p, r in head.get("final_responses", {}).items())]
  for group, d in head.get("lens_agreement_depth", {}).items():
    lines.append(f"{head.get('lens', 'logit')} lens agrees with the output from depth "
                 f"(median, final step; {group} targets): " + by_p("", d))
  lines += ["flip rate by prompt kind at the largest p: "
            + ", ".join(f"{k}: {_rate(v)}" for k, v in
                        head["final_flip_rate_by_kind_at_max_p"].items())]
  for rule, m in head.get("monitor", {}).items():
    lead = "n/a" if m["median_lead"] is None else f"{m['median_lead']:g} steps"
    lines.append(f"monitor {rule}: {m['detected']}/{m['flipped']} flipped target prompts "
                 f"alerted by their flip at the largest p (median lead {lead}); false alarms: "
                 f"controls {_rate(m['control_false_alarm_rate'])}, targets at p = 0 "
                 f"{_rate(m['p0_target_alarm_rate'])}")
  if "best_reversal" in head:
    b = head["best_reversal"]
    lines.append(f"best patching reversal: {_rate(b['reversal_rate'])} ({b['site']} window "
                 f"{b['window']} from layer {b['layer']} at {b['position']}, p = {b['p']})")
    lines.append("  best per site: " + ", ".join(
        f"{site} {_rate(r['reversal_rate'])} (recovery {r['recovery']:.2f}, window "
        f"{r['window']} from layer {r['layer']} at {r['position']})"
        for site, r in head.get("best_reversal_by_site", {}).items()))
  if "best_single_layer_reversal" in head:
    b = head["best_single_layer_reversal"]
    lines.append(f"best single-layer reversal: {_rate(b['reversal_rate'])} ({b['site']} layer "
                 f"{b['layer']}, depth {_rate(b['depth'])}, at {b['position']}); belief strength "
                 f"vs recovery: Spearman rho {_rate(b['belief_rho'])}")
  return lines
