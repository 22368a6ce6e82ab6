"""Paper A's results: table → table functions from one CPT run's probe tables (SCIENCE.md A).

Owns: `COLUMNS` (every results table and its columns), `run_tables` (flips, collateral, lens,
patching, first flips and abruptness of one run from its per-checkpoint probe rows) and
`monitor_tables` (alerts and monitor rows of one run from its watched prompts and alerts).
Must not: read or write files (the study's results stage does), run models or plot.

Definitions (τ = config.tau): the reference state of an item is its state at the run's first
checkpoint (CPT step 0 = the base); flip rate(t) = #(correct at base and counterfactual at t)
/ #(correct at base); ambiguity rate(t) = share ambiguous at t; accuracy(t) = share whose
greedy answer is the true one; lens flip rate per layer uses ΔLL_ℓ with the same states
(targets, training prompt; layer L is the output); reversal rate(site, window, layer, group) =
share of the flipped items whose patched ΔLL > 0. first_flips: per target item and kind the
first checkpoint at which it is counterfactual (−1: never); abruptness: the largest
single-interval rise of the flip-rate curve over its total rise (NaN: it never rose).
Monitor (`monitor_tables`): per watched prompt and rule the first alert step, the step of its
flip:τ alert (−1: none) and lead time = flip step − alert step (NaN unless both; > 0: the rule
warned before the output flipped); per rule and set: prompts watched, alerted, flipped,
detected (alerted at or before the flip), the median lead time of the detected, false alarms
(alerted, never flipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factflip.probes.fact_preference import (
  CORRECT,
  abruptness,
  ambiguity_rate,
  first_flip,
  flip_rate,
  flipped,
  states,
)
from factflip.probes.patching import reversal_rate

_RUN = ["size", "seed", "p", "step"]
COLUMNS = {
    "flips": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                     "correct_at_base"],
    "collateral": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                          "correct_at_base"],
    "lens": _RUN + ["layer", "flip_rate", "ambiguity_rate"],
    "patching": _RUN + ["site", "window", "layer", "position", "reversal_rate", "recovery",
                        "flipped_items"],
    "first_flips": ["size", "seed", "p", "item", "kind", "first_flip_step"],
    "abruptness": ["size", "seed", "p", "kind", "abruptness", "final_flip_rate"],
    "alerts": ["size", "seed", "p", "set", "item", "kind", "variant", "rule", "alert_step",
               "flip_step", "lead_time"],
    "monitor": ["size", "seed", "p", "rule", "set", "prompts", "alerted", "flipped",
                "detected", "median_lead", "false_alarms"],
}
_KEY = ["item", "kind", "variant"]


def run_tables(cell: Mapping[str, Any], frames: Mapping[int, pd.DataFrame],
               patches: Mapping[int, pd.DataFrame], tau: float) -> dict[str, list[dict]]:
  """One CPT run's rows of flips, collateral, lens, patching, first_flips and abruptness.

  Args:
    cell: {"size", "seed", "p"} of the run (the rows' leading columns).
    frames: checkpoint step -> its probe rows (item, set, kind, variant, dll, correct, and the
      lens columns dll_l<ℓ>), ascending; the first step is the reference (the base).
    patches: checkpoint step -> its patching rows (item, site, window, layer, position,
      dll_patched, recovery), for the steps that were patched.
    tau: the state threshold τ (nats).
  """
  rows: dict[str, list[dict]] = {name: [] for name in COLUMNS}
  steps = list(frames)
  ref = frames[steps[0]]
  for s, df in frames.items():
    m = df.merge(ref[_KEY + ["dll"] + [c for c in ref if c.startswith("dll_l")]],
                 on=_KEY, suffixes=("", "_base"))
    m["flipped"] = flipped(m.dll_base.values, m.dll.values, tau)
    for (set_, kind), g in m.groupby(["set", "kind"]):
      n_ok = int((states(g.dll_base.values, tau) == CORRECT).sum())
      rows["collateral" if set_ == "control" else "flips"].append({
          **cell, "step": s, "kind": kind,
          "flip_rate": float(flip_rate(g.dll_base.values, g.dll.values, tau)),
          "ambiguity_rate": float(ambiguity_rate(g.dll.values, tau)),
          "accuracy": float(g.correct.astype(bool).mean()),
          "items": len(g), "correct_at_base": n_ok})
    tgt = m[(m.set == "target") & (m.kind == "prompt")]
    for c in [c for c in tgt if c.startswith("dll_l") and not c.endswith("_base")]:
      rows["lens"].append({
          **cell, "step": s, "layer": int(c[5:]),
          "flip_rate": float(flip_rate(tgt[c + "_base"].values, tgt[c].values, tau)),
          "ambiguity_rate": float(ambiguity_rate(tgt[c].values, tau))})
    if s in patches:
      pt = patches[s]
      pt = pt[pt.item.isin(set(tgt[tgt.flipped].item))]
      for (site, window, layer, pos), g in pt.groupby(["site", "window", "layer", "position"]):
        rows["patching"].append({
            **cell, "step": s, "site": site, "window": int(window), "layer": int(layer),
            "position": pos,
            "reversal_rate": float(reversal_rate(g.dll_patched.values, np.ones(len(g), bool))),
            "recovery": float(g.recovery.median()), "flipped_items": len(g)})
  # per item: the first checkpoint at which it is counterfactual; per kind: abruptness
  tgt = pd.concat([df[df.set == "target"].assign(step=s) for s, df in frames.items()])
  for kind, g in tgt.groupby("kind"):
    dll = g.pivot_table(index="step", columns=_KEY, values="dll").sort_index()
    first = first_flip(dll.iloc[0].values, dll.values, dll.index.tolist(), tau)
    for (item, _, _), f in zip(dll.columns, first):
      rows["first_flips"].append({**cell, "item": item, "kind": kind,
                                  "first_flip_step": int(f)})
    curve = np.nan_to_num(np.asarray([r["flip_rate"] for r in rows["flips"]
                                      if r["kind"] == kind], np.float64))
    rows["abruptness"].append({**cell, "kind": kind, "abruptness": abruptness(curve),
                               "final_flip_rate": float(curve[-1])})
  return rows


def monitor_tables(cell: Mapping[str, Any], prompts: pd.DataFrame, alerts: pd.DataFrame,
                   rules: Sequence[str], flip_rule: str) -> dict[str, list[dict]]:
  """One CPT run's alerts and monitor rows.

  Args:
    cell: {"size", "seed", "p"} of the run.
    prompts: the watched prompts (set "watch" / "control", item, kind, variant).
    alerts: the monitor's alerts (set, item, kind, variant, step, rule).
    rules: every rule's text, in config order; flip_rule: the flip:τ rule's text.
  """
  key = ["set", "item", "kind", "variant"]
  first = {tuple(k): int(v) for k, v in alerts.groupby(key + ["rule"]).step.min().items()}
  rows = []
  for rule in rules:
    for k in prompts[key].itertuples(index=False, name=None):
      a, f = first.get(k + (rule,), -1), first.get(k + (flip_rule,), -1)
      rows.append(dict(zip(key, k), **cell, rule=rule, alert_step=a, flip_step=f,
                       lead_time=float(f - a) if a >= 0 and f >= 0 else np.nan))
  monitor = []
  for (rule, set_), g in pd.DataFrame(rows).groupby(["rule", "set"], sort=False):
    alerted, flips = g.alert_step >= 0, g.flip_step >= 0
    detected = alerted & flips & (g.alert_step <= g.flip_step)
    monitor.append({
        **cell, "rule": rule, "set": set_, "prompts": len(g),
        "alerted": int(alerted.sum()), "flipped": int(flips.sum()),
        "detected": int(detected.sum()),
        "median_lead": float(g.lead_time[detected].median()) if detected.any() else np.nan,
        "false_alarms": int((alerted & ~flips).sum())})
  return {"alerts": rows, "monitor": monitor}
