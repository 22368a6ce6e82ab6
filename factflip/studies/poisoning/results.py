"""Paper A's results: table → table functions from one CPT run's probe tables (SCIENCE.md A).

Owns: `COLUMNS` (every results table and its columns), `run_tables` (flips, collateral,
states, lens, lens agreement, patching, first flips and abruptness of one run from its
per-checkpoint probe rows), `head_tables` (attribution and knockout of one run, when the probe
stage made them), `stream_row` (what one run's CPT stream held, under both readings
of p), `monitor_tables` (alerts and monitor rows of one run from its watched prompts and
alerts) and the per-item rules they use: `response_states`, `response_flip_rate`,
`agreement_layer`, `belief_recovery_rho`.
Must not: read or write files (the study's results stage does), run models or plot.

Definitions (τ = config.tau): the reference state of an item is its state at the run's first
checkpoint (CPT step 0 = the base); flip rate(t) = #(correct at base and counterfactual at t)
/ #(correct at base); ambiguity rate(t) = share ambiguous at t; accuracy(t) = share whose
greedy answer is the true one; lens flip rate per layer uses ΔLL_ℓ with the same states
(targets, training prompt; layer L is the output); reversal rate(site, window, layer, group) =
share of the flipped items whose patched ΔLL > 0, at relative depth ℓ / L (L blocks; patching
layer ℓ replaces block ℓ's site, and resid_pre ℓ is what the lens reads at layer ℓ), with
belief_rho = Spearman ρ between the base's ΔLL (belief strength) and the normalised recovery
over those items. first_flips: per target item and kind the first checkpoint at which it is
counterfactual (−1: never); abruptness: the largest single-interval rise of the flip-rate
curve over its total rise (NaN: it never rose).
τ = 0 split (SCIENCE.md, common objects: states): flip_rate_tau0 and cf_share_tau0 are the
flip rate and the counterfactual share with τ = 0, where only ΔLL = 0 is ambiguous. Response
level (`states.csv` and the response_* columns): the greedy answer of a prompt is "true"
(greedy decoding gives the true answer's tokens: `correct`), "counterfactual" (it gives the
counterfactual's: `greedy_cf`) or "other"; response flip rate(t) = #(true at the reference and
counterfactual at t) / #(true at the reference). Lens agreement (SCIENCE.md A): per prompt the
earliest lens layer from which the sign of ΔLL_ℓ equals the output's at every later layer; its
median over the target prompts (training prompt), all of them and those flipped at the step,
and as depth ℓ / L.
Stream (`stream_row`): per pass, counterfactual, true and replay examples; a run's p read both
ways: cf_share_of_mentions (the restate reading) and cf_share_of_stream (the replay reading).
Monitor (`monitor_tables`): per watched prompt and rule the first alert step, the step of its
flip:τ alert (−1: none) and lead time = flip step − alert step (NaN unless both; > 0: the rule
warned before the output flipped); per rule and set: prompts watched, alerted, flipped,
detected (alerted at or before the flip), the median lead time of the detected, false alarms
(alerted, never flipped).
Heads (`head_tables`, probe.attribution / probe.knockout_window): direct logit attribution of
logit(true) − logit(cf) (first answer tokens, last prompt token) per component (embed, attn,
mlp, head) and layer, its median over the targets and over those flipped by the step, and the
median change from the base; knockout: the median p_knocked / p − 1 of the true answer (and of
the counterfactual one) when the answer position cannot read the subject in a window of layers
centred on each layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factflip.probes.fact_preference import (
  AMBIGUOUS,
  CORRECT,
  COUNTERFACTUAL,
  abruptness,
  ambiguity_rate,
  first_flip,
  flip_rate,
  flipped,
  state_share,
  states,
)
from factflip.probes.patching import reversal_rate

_RUN = ["size", "seed", "p", "step"]
_RATES = ["flip_rate", "ambiguity_rate", "accuracy", "items", "correct_at_base",
          "response_flip_rate", "response_cf", "response_other", "flip_rate_tau0",
          "cf_share_tau0"]
COLUMNS = {
    "flips": _RUN + ["kind"] + _RATES,
    "collateral": _RUN + ["kind"] + _RATES,
    "states": _RUN + ["set", "kind", "dll_state", "response", "items"],
    "lens": _RUN + ["layer", "flip_rate", "ambiguity_rate"],
    "lens_agreement": _RUN + ["group", "items", "agree_layer", "agree_depth", "n_layers"],
    "patching": _RUN + ["site", "window", "layer", "position", "reversal_rate", "recovery",
                        "flipped_items", "depth", "belief_rho"],
    "first_flips": ["size", "seed", "p", "item", "kind", "first_flip_step"],
    "abruptness": ["size", "seed", "p", "kind", "abruptness", "final_flip_rate"],
    "streams": ["size", "seed", "p", "reading", "counterfactual", "true", "replay",
                "cf_share_of_mentions", "cf_share_of_stream"],
    "alerts": ["size", "seed", "p", "set", "item", "kind", "variant", "rule", "alert_step",
               "flip_step", "lead_time"],
    "monitor": ["size", "seed", "p", "rule", "set", "prompts", "alerted", "flipped",
                "detected", "median_lead", "false_alarms"],
    "attribution": ["size", "seed", "p", "step", "group", "component", "layer", "head", "items",
                    "value", "change"],
    "knockout": ["size", "seed", "p", "step", "group", "layer", "window", "items",
                 "relative_change", "relative_change_cf"],
}
DLL_STATES = {CORRECT: "correct", AMBIGUOUS: "ambiguous", COUNTERFACTUAL: "counterfactual"}
RESPONSES = ("true", "counterfactual", "other")
_KEY = ["item", "kind", "variant"]


def response_states(greedy_true, greedy_cf) -> np.ndarray:
  """Per prompt, the state of its greedy answer: "true" when greedy decoding gives the true
  answer's tokens, else "counterfactual" when it gives the counterfactual's, else "other"."""
  t, c = np.asarray(greedy_true, bool), np.asarray(greedy_cf, bool)
  return np.where(t, "true", np.where(c, "counterfactual", "other"))


def response_flip_rate(reference, now) -> float:
  """#(prompts whose greedy answer is true at the reference and counterfactual now) / #(true at
  the reference) (`response_states` arrays); NaN when none was true at the reference."""
  ref, now = np.asarray(reference) == "true", np.asarray(now) == "counterfactual"
  return float((ref & now).sum() / ref.sum()) if ref.any() else float("nan")


def agreement_layer(dll_NxL1) -> np.ndarray:
  """Per row of lens ΔLL [N, L + 1] (layer 0 = embeddings, L = the output), the earliest layer
  ℓ from which sign(ΔLL_ℓ') equals the output's at every ℓ' ≥ ℓ (L when only the output
  agrees with itself)."""
  sign = np.sign(np.asarray(dll_NxL1, np.float64))
  agree = sign == sign[:, -1:]
  trailing = np.cumprod(agree[:, ::-1], axis=1).sum(axis=1)   # agreeing layers at the top
  return agree.shape[1] - trailing


def belief_recovery_rho(dll_base, recovery) -> float:
  """Spearman ρ between the base's ΔLL (how strongly the base believed the true answer) and the
  normalised recovery of patching, over the items with both; NaN with fewer than 3 or when
  either side is constant."""
  from scipy.stats import spearmanr
  x, y = np.asarray(dll_base, np.float64), np.asarray(recovery, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(spearmanr(x, y).statistic)


def stream_row(cell: Mapping[str, Any], reading: str, stats: Mapping[str, Any]) -> dict:
  """What one CPT run's stream held per pass (its data statistics, `data.mixtures.cpt_source`):
  counterfactual, true and replay examples, and its p under both readings."""
  n, k, r = (int(stats[k]) for k in ("mentions_per_pass", "counterfactual_per_pass",
                                     "replay_per_pass"))
  return {**cell, "reading": reading, "counterfactual": k, "true": n - k, "replay": r,
          "cf_share_of_mentions": k / n, "cf_share_of_stream": k / (n + r)}


def _rates(g: pd.DataFrame, tau: float) -> dict[str, Any]:
  """The flips / collateral columns of one group of merged rows (dll, dll_base, responses)."""
  ok = states(g.dll_base.values, tau) == CORRECT
  return {"flip_rate": float(flip_rate(g.dll_base.values, g.dll.values, tau)),
          "ambiguity_rate": float(ambiguity_rate(g.dll.values, tau)),
          "accuracy": float(g.correct.astype(bool).mean()),
          "items": len(g), "correct_at_base": int(ok.sum()),
          "response_flip_rate": response_flip_rate(g.response_base.values, g.response.values),
          "response_cf": float((g.response == "counterfactual").mean()),
          "response_other": float((g.response == "other").mean()),
          "flip_rate_tau0": float(flip_rate(g.dll_base.values, g.dll.values, 0.0)),
          "cf_share_tau0": float(state_share(g.dll.values, COUNTERFACTUAL, 0.0))}


def run_tables(cell: Mapping[str, Any], frames: Mapping[int, pd.DataFrame],
               patches: Mapping[int, pd.DataFrame], tau: float) -> dict[str, list[dict]]:
  """One CPT run's rows of flips, collateral, states, lens, lens_agreement, patching,
  first_flips and abruptness.

  Args:
    cell: {"size", "seed", "p"} of the run (the rows' leading columns).
    frames: checkpoint step -> its probe rows (item, set, kind, variant, dll, correct,
      greedy_cf, and the lens columns dll_l<ℓ>), ascending; the first step is the reference
      (the base).
    patches: checkpoint step -> its patching rows (item, site, window, layer, position,
      dll_patched, dll_base, recovery), for the steps that were patched.
    tau: the state threshold τ (nats).
  """
  rows: dict[str, list[dict]] = {name: [] for name in COLUMNS}
  steps = list(frames)
  ref = frames[steps[0]]
  lens_cols = sorted((c for c in ref if c.startswith("dll_l")), key=lambda c: int(c[5:]))
  n_layers = int(lens_cols[-1][5:]) if lens_cols else 0
  ref = ref.assign(response=response_states(ref.correct, ref.greedy_cf))
  for s, df in frames.items():
    m = df.assign(response=response_states(df.correct, df.greedy_cf)).merge(
        ref[_KEY + ["dll", "response"] + lens_cols], on=_KEY, suffixes=("", "_base"))
    m["flipped"] = flipped(m.dll_base.values, m.dll.values, tau)
    m["dll_state"] = pd.Series(states(m.dll.values, tau)).map(DLL_STATES).values
    for (set_, kind), g in m.groupby(["set", "kind"]):
      rows["collateral" if set_ == "control" else "flips"].append(
          {**cell, "step": s, "kind": kind, **_rates(g, tau)})
      counts = g.groupby(["dll_state", "response"]).size()
      for state in DLL_STATES.values():
        for response in RESPONSES:
          rows["states"].append({**cell, "step": s, "set": set_, "kind": kind,
                                 "dll_state": state, "response": response,
                                 "items": int(counts.get((state, response), 0))})
    tgt = m[(m.set == "target") & (m.kind == "prompt")]
    for c in lens_cols:
      rows["lens"].append({
          **cell, "step": s, "layer": int(c[5:]),
          "flip_rate": float(flip_rate(tgt[c + "_base"].values, tgt[c].values, tau)),
          "ambiguity_rate": float(ambiguity_rate(tgt[c].values, tau))})
    if lens_cols:
      agree = agreement_layer(tgt[lens_cols].values)
      for group, sel in (("all", np.ones(len(tgt), bool)), ("flipped", tgt.flipped.values)):
        layer = float(np.median(agree[sel])) if sel.any() else np.nan
        rows["lens_agreement"].append({
            **cell, "step": s, "group": group, "items": int(sel.sum()), "agree_layer": layer,
            "agree_depth": layer / n_layers if n_layers else np.nan, "n_layers": n_layers})
    if s in patches:
      pt = patches[s]
      pt = pt[pt.item.isin(set(tgt[tgt.flipped].item))]
      for (site, window, layer, pos), g in pt.groupby(["site", "window", "layer", "position"]):
        rows["patching"].append({
            **cell, "step": s, "site": site, "window": int(window), "layer": int(layer),
            "position": pos,
            "reversal_rate": float(reversal_rate(g.dll_patched.values, np.ones(len(g), bool))),
            "recovery": float(g.recovery.median()), "flipped_items": len(g),
            "depth": int(layer) / n_layers if n_layers else np.nan,
            "belief_rho": belief_recovery_rho(g.dll_base.values, g.recovery.values)})
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


def head_tables(cell: Mapping[str, Any], frames: Mapping[int, pd.DataFrame],
                attributions: Mapping[int, pd.DataFrame], knockouts: Mapping[int, pd.DataFrame],
                tau: float) -> dict[str, list[dict]]:
  """One CPT run's attribution and knockout rows, per checkpoint step and group of target
  items: "flipped" (the targets whose prompt flipped by that step) and "all".

  attribution: per (component, layer, head) the median over the group's items of the direct
  logit attribution to logit(true) − logit(cf) (`value`), and of its change from the base
  (the first step's table; NaN at the base itself). knockout: per layer the median relative
  change of p(true), and of p(cf), when the answer position cannot read the subject in that
  layer's window.
  frames: as `run_tables` (the reference first); attributions / knockouts: step -> the
  `probes.fact_heads` tables of that step (empty when the probe stage did not make them)."""
  rows: dict[str, list[dict]] = {"attribution": [], "knockout": []}
  if not attributions and not knockouts:
    return rows
  ref_step = next(iter(frames))
  ref = frames[ref_step]
  ref = ref[(ref.set == "target") & (ref.kind == "prompt")].set_index("item").dll
  comp = ["component", "layer", "head"]
  base = attributions.get(ref_step)
  for step in sorted(set(attributions) | set(knockouts)):
    now = frames[step]
    now = now[(now.set == "target") & (now.kind == "prompt")].set_index("item").dll
    hit = flipped(ref.reindex(now.index).values, now.values, tau)
    groups = {"all": set(now.index), "flipped": set(now.index[hit])}
    for group, items in groups.items():
      if step in attributions:
        a = attributions[step]
        a = a[a.item.isin(items)]
        if base is not None:
          a = a.merge(base[["item"] + comp + ["value"]], on=["item"] + comp, how="left",
                      suffixes=("", "_base"))
          a["change"] = a.value - a.value_base
        else:
          a = a.assign(change=np.nan)
        for key, g in a.groupby(comp, sort=True):
          rows["attribution"].append({
              **cell, "step": step, "group": group, **dict(zip(comp, key)), "items": len(g),
              "value": float(g.value.median()),
              "change": float(g.change.median()) if step != ref_step else np.nan})
      if step in knockouts:
        k = knockouts[step]
        k = k[k.item.isin(items)]
        for (layer, window), g in k.groupby(["layer", "window"], sort=True):
          rows["knockout"].append({
              **cell, "step": step, "group": group, "layer": int(layer),
              "window": int(window), "items": len(g),
              "relative_change": float(g.relative_change.median()),
              "relative_change_cf": float(g.relative_change_cf.median())})
  return rows
