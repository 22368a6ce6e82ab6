"""Paper C's report: figures, captions, headline, terminal summary and paper checks.

Owns: `headline` (first the cloze check — how much of what M_0 knew M_100 still stores, the
ceiling of any recovery — then the monotonic latents found beside the label-permutation null and
the epochs test, and the best steering per kind: single latents steered or clamped, every
monotonic latent clamped, the composite direction and the random controls; paper C's ranges:
`PAPER_C`), `figures` (activation vs %Unknown of the top latents; Δaccuracy by α per
direction kind), `summary` (terminal lines) and `paper_checks` (paper C's findings beside the
measured values).
Must not: compute results (`results.py`) or read stage outputs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd

from factflip.studies.report import Figure, legend, save, short

# paper C's reported ranges: steering's gain in accuracy points, and R_K
PAPER_C = {"delta_accuracy_points": (22, 40), "r_k": (0.69, 0.85)}


def _f(v) -> float | None:
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _best(g: pd.DataFrame) -> dict[str, Any]:
  """The row with the largest Δaccuracy (ties: smaller α)."""
  if g.empty:
    return {"delta_accuracy": None, "r_k": None, "alpha": None, "latent": None}
  r = g.sort_values(["delta_accuracy", "alpha"], ascending=[False, True]).iloc[0]
  return {"delta_accuracy": _f(r.delta_accuracy), "r_k": _f(r.r_k), "alpha": _f(r.alpha),
          "latent": int(r.latent)}


KINDS = ("latent", "clamp", "clamp_all", "composite", "control")


def headline(study, t: dict[str, pd.DataFrame]) -> dict[str, Any]:
  """Over every size and seed: the cloze check (summed counts, mean shares), latents tested and
  monotonic beside the label-permutation null (its mean, 95th percentile and p with one size
  and seed; None with more: per cell in the monotonic table), monotonic across epochs and both;
  M_0 and M_100 accuracy; per kind of direction the best steering, and the best single-latent
  intervention (steered or clamped)."""
  cl, mono, st = t["cloze"], t["monotonic"], t["steering"]
  stored = cl.lost_qa_stored.dropna()
  cfg = study.c
  head: dict[str, Any] = {"cloze": {
      "facts": int(cl.facts.sum()), "with_dll": int(cl.with_dll.sum()),
      "known_m0": _f(cl.known_m0.mean()), "known_m100": _f(cl.known_m100.mean()),
      "retained": _f(cl.retained.mean()), "lost_qa": int(cl.lost_qa.sum()),
      "lost_qa_stored": int(stored.sum()) if len(stored) else None,
      "dll_m0": _f(cl.dll_m0.mean()), "dll_m100": _f(cl.dll_m100.mean()),
      "logp_true_m0": _f(cl.logp_true_m0.mean()), "logp_true_m100": _f(cl.logp_true_m100.mean())}}
  head.update({"latents_alive": int(mono.alive.sum()),
               "latents_monotonic": int(mono.monotonic.sum()),
               "monotonic_rising": int(mono.rising.sum()),
               "monotonic_falling": int(mono.falling.sum()),
               **{k: _f(mono[k].iloc[0]) if len(mono) == 1 else None     # per cell: the table
                  for k in ("null_mean", "null_p95", "null_p")},
               "permutations": int(mono.permutations.min()) if len(mono) else 0,
               "monotonic_epochs": int(mono.monotonic_epochs.sum()),
               "monotonic_both": int(mono.both.sum())})
  head["accuracy_m0"] = _f(st[st.kind == "M0"].accuracy.mean())
  head["accuracy_m100"] = _f(st[st.kind == "none"].accuracy.mean())
  for kind in KINDS:
    head[f"best_{kind}"] = _best(st[st.kind == kind])
  head["best_single"] = _best(st[st.kind.isin(["latent", "clamp"])])
  if mono.layer.nunique() > 1:     # a layer sweep: the counts per layer
    head["layers"] = {str(layer): {"alive": int(g.alive.sum()), "monotonic": int(g.monotonic.sum()),
                                   "null_p95": _f(g.null_p95.iloc[0]) if len(g) == 1 else None,
                                   "monotonic_both": int(g.both.sum())}
                      for layer, g in mono.groupby("layer")}
  head["paper_c"] = PAPER_C
  head["protocol"] = ("paper B's base and SliCK"
                      + ("" if cfg.facts else " (the QA format new to the base)")
                      + "; steering and clamping in units of each latent's own M_0 - M_100 "
                      "difference; monotonic beyond a label-permutation null")
  return head


def figures(study, t: dict[str, pd.DataFrame], out_dir: str) -> list[Figure]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  figs = []
  trend, st, lat = t["trend"], t["steering"], t["latents"]
  if len(trend):
    fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    sweep = trend.layer.nunique() > 1
    for (size, seed, layer, j), g in trend.groupby(["size", "seed", "layer", "latent"]):
      row = lat[(lat["size"] == size) & (lat.seed == seed) & (lat.layer == layer)
                & (lat.latent == j)].iloc[0]
      at = f"layer {layer} " if sweep else ""
      ax.plot(100 * g.unknown_share, g.mean_activation, "o-",
              label=f"{at}latent {j} (ρ {row.rho:+.2f}, MK p {row.mk_p:.3f})")
    ax.set_xlabel("% Unknown in the fine-tuning set")
    ax.set_ylabel("mean activation (held-out prompts)")
    legend(ax, fontsize=7)
    figs.append(Figure("Monotonic latents", save(fig, os.path.join(out_dir, "trend.png")),
                       "Mean activation on the held-out QA prompts of the monotonic latents "
                       "steered (largest |ρ|), one point per fine-tuned model; ρ: Spearman "
                       "against %Unknown, MK: Mann–Kendall p."))
    plt.close(fig)
  else:
    figs.append(Figure("Monotonic latents", "", "No latent passed both tests (bootstrap "
                       "Spearman interval excluding 0 and Mann–Kendall p below the threshold, "
                       "same sign): nothing to draw."))
  steer = st[st.kind.isin(KINDS)]
  if st.layer.nunique() > 1:       # a layer sweep: the steering plot of the first layer
    steer = steer[steer.layer == steer.layer.min()]
  if len(steer):
    fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    styles = {"latent": "o-", "clamp": "^-", "clamp_all": "D-", "composite": "s--",
              "control": "x:"}
    for (kind, j), g in steer.groupby(["kind", "latent"]):
      g = g.groupby("alpha").delta_accuracy.mean()
      name = kind if j < 0 else f"{kind} {j}"
      ax.plot(g.index, 100 * g.values, styles[kind], label=name,
              alpha=1.0 if kind != "control" else 0.6)
    lo, hi = PAPER_C["delta_accuracy_points"]
    ax.axhspan(lo, hi, color="tab:green", alpha=0.12, label="paper C (+22 to +40)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("α (multiples of each direction's own M_0 − M_100 difference)")
    ax.set_ylabel("Δ accuracy of M_100 (points)")
    legend(ax, fontsize=7)
    figs.append(Figure("Steering the 100%-Unknown model", save(fig, os.path.join(
        out_dir, "steering.png")), "Closed-book accuracy change of the 100%-Unknown model, by "
        "strength α in units of each direction's own M_0 − M_100 difference (α = 1: M_0's "
        "level): each monotonic latent steered (latent) or clamped with the SAE's error term "
        "kept (clamp), every monotonic latent clamped (clamp_all), the composite direction "
        "mean(h|M_0) − mean(h|M_100), and random non-trending latents steered with the "
        "monotonic latents' mean vector norm (control); the band is paper C's reported gain"
        + (f"; the layer sweep's first layer ({st.layer.min()}), the others in steering.csv."
           if st.layer.nunique() > 1 else ".")))
    plt.close(fig)
  return figs


def _cloze_line(c: dict[str, Any]) -> str:
  logp = (f"mean log p(true) M_0 {short(c['logp_true_m0'])}, M_100 "
          f"{short(c['logp_true_m100'])}")
  if not c["with_dll"]:
    return (f"cloze check on {c['facts']} test facts (no counterfactuals, no ΔLL): {logp}; "
            f"M_100 lost {c['lost_qa']} closed-book answers")
  return (f"cloze check (ΔLL > τ on {c['with_dll']} test facts): M_0 knows "
          f"{short(c['known_m0'])}, M_100 {short(c['known_m100'])} (retains "
          f"{short(c['retained'])} of M_0's); of the {c['lost_qa']} answers M_100 lost, "
          f"{c['lost_qa_stored']} are still stored; {logp}")


def summary(head: dict[str, Any]) -> list[str]:
  found = (f"monotonic latents: {head['latents_monotonic']} of {head['latents_alive']} active "
           f"({head['monotonic_rising']} rise, {head['monotonic_falling']} fall with %Unknown)")
  if head["permutations"]:
    found += (f"; label-permutation null ({head['permutations']}): mean "
              f"{short(head['null_mean'])}, 95th percentile {short(head['null_p95'])}, p "
              f"{short(head['null_p'])}")
  epochs = (f"monotonic across the 100%-Unknown run's epochs: {head['monotonic_epochs']}; in "
            f"both, one direction: {head['monotonic_both']}")
  acc = (f"closed-book accuracy: M_0 {short(head['accuracy_m0'])}, M_100 "
         f"{short(head['accuracy_m100'])}")
  lines = [_cloze_line(head["cloze"]), found, epochs, acc]
  for layer, c in head.get("layers", {}).items():
    lines.append(f"  layer {layer}: {c['monotonic']} of {c['alive']} monotonic (null 95th "
                 f"percentile {short(c['null_p95'])}), {c['monotonic_both']} also across epochs")
  for kind in KINDS:
    b = head[f"best_{kind}"]
    d = b["delta_accuracy"]
    lines.append(f"best {kind}: Δaccuracy {short(None if d is None else 100 * d)} "
                 f"points (α {short(b['alpha'])}), R_K {short(b['r_k'])}")
  lines.append("paper C: +22 to +40 points, R_K 0.69-0.85")
  return lines


def paper_checks(head: dict[str, Any]) -> list[dict[str, Any]]:
  """Paper C's findings beside this run's measured values (the suite's report): first whether
  the knowledge is still stored (reproduced when M_100 still knows by ΔLL at least half of the
  facts whose answer it lost), then the monotonic latents (reproduced when more than the label-
  permutation null's 95th percentile, or more than 0 without a null), then single-latent
  steering or clamping."""
  c = head["cloze"]
  b = head["best_single"]
  d = None if b["delta_accuracy"] is None else 100 * b["delta_accuracy"]
  lo, _ = PAPER_C["delta_accuracy_points"]
  n, p95 = head["latents_monotonic"], head["null_p95"]
  chance = "" if p95 is None else (f" (label-permutation null: mean {short(head['null_mean'])}"
                                   f", 95th percentile {short(p95)})")
  return [{"finding": "Unknown SFT disrupts retrieval of knowledge that stays stored",
           "measured": (f"{'n/a' if c['lost_qa_stored'] is None else c['lost_qa_stored']} of "
                        f"the {c['lost_qa']} answers M_100 lost are "
                        f"still preferred by cloze ΔLL; M_100 retains {short(c['retained'])} "
                        f"of what M_0 knows"),
           "reproduced": (bool(c["lost_qa"]) and c["lost_qa_stored"] is not None
                          and c["lost_qa_stored"] >= c["lost_qa"] / 2)},
          {"finding": "latents move monotonically with %Unknown",
           "measured": f"{n} of {head['latents_alive']} active latents{chance}",
           "reproduced": n > (0 if p95 is None else p95)},
          {"finding": "steering one monotonic latent recovers +22 to +40 points (R_K 0.69-0.85)",
           "measured": (f"best single latent, steered or clamped at its own scale: {short(d)} "
                        f"points, R_K {short(b['r_k'])}"),
           "reproduced": d is not None and d >= lo}]
