"""Paper C's report: figures, captions, headline, terminal summary and paper checks.

Owns: `headline` (monotonic latents found, the best steering's Δaccuracy and R_K beside the
composite direction's and the random controls', paper C's ranges: `PAPER_C`), `figures`
(activation vs %Unknown of the top latents; Δaccuracy by α per direction kind), `summary`
(terminal lines) and `paper_checks` (paper C's findings beside the measured values).
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


def headline(study, t: dict[str, pd.DataFrame]) -> dict[str, Any]:
  """Over every size and seed: latents tested and monotonic; M_0 and M_100 accuracy; per kind
  of direction (latent, composite, control) the best steering."""
  lat, st = t["latents"], t["steering"]
  head: dict[str, Any] = {"latents_alive": int(lat.alive.sum()),
                          "latents_monotonic": int(lat.monotonic.sum()),
                          "monotonic_rising": int((lat.monotonic & (lat.direction == "rises"))
                                                  .sum()),
                          "monotonic_falling": int((lat.monotonic & (lat.direction == "falls"))
                                                   .sum())}
  head["accuracy_m0"] = _f(st[st.kind == "M0"].accuracy.mean())
  head["accuracy_m100"] = _f(st[st.kind == "none"].accuracy.mean())
  for kind in ("latent", "composite", "control"):
    head[f"best_{kind}"] = _best(st[st.kind == kind])
  head["paper_c"] = PAPER_C
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
    for (size, seed, j), g in trend.groupby(["size", "seed", "latent"]):
      row = lat[(lat["size"] == size) & (lat.seed == seed) & (lat.latent == j)].iloc[0]
      ax.plot(100 * g.unknown_share, g.mean_activation, "o-",
              label=f"latent {j} (ρ {row.rho:+.2f}, MK p {row.mk_p:.3f})")
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
  steer = st[st.kind.isin(["latent", "composite", "control"])]
  if len(steer):
    fig, ax = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    for (kind, j), g in steer.groupby(["kind", "latent"]):
      g = g.groupby("alpha").delta_accuracy.mean()
      style = {"latent": "o-", "composite": "s--", "control": "x:"}[kind]
      name = kind if kind == "composite" else f"{kind} {j}"
      ax.plot(g.index, 100 * g.values, style, label=name, alpha=1.0 if kind != "control" else 0.6)
    lo, hi = PAPER_C["delta_accuracy_points"]
    ax.axhspan(lo, hi, color="tab:green", alpha=0.12, label="paper C (+22 to +40)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("α (units of mean ‖h‖ at the site)")
    ax.set_ylabel("Δ accuracy of M_100 (points)")
    legend(ax, fontsize=7)
    figs.append(Figure("Steering the 100%-Unknown model", save(fig, os.path.join(
        out_dir, "steering.png")), "Closed-book accuracy change of the 100%-Unknown model "
        "when steered along each monotonic latent's decoder direction (sign against its "
        "trend), the composite direction mean(h|M_0) − mean(h|M_100), and random non-trending "
        "latents (controls), by strength α; the band is paper C's reported gain."))
    plt.close(fig)
  return figs


def summary(head: dict[str, Any]) -> list[str]:
  found = (f"monotonic latents: {head['latents_monotonic']} of {head['latents_alive']} active "
           f"({head['monotonic_rising']} rise, {head['monotonic_falling']} fall with %Unknown)")
  acc = (f"closed-book accuracy: M_0 {short(head['accuracy_m0'])}, M_100 "
         f"{short(head['accuracy_m100'])}")
  lines = [found, acc]
  for kind in ("latent", "composite", "control"):
    b = head[f"best_{kind}"]
    d = b["delta_accuracy"]
    lines.append(f"best {kind} steering: Δaccuracy {short(None if d is None else 100 * d)} "
                 f"points (α {short(b['alpha'])}), R_K {short(b['r_k'])}")
  lines.append("paper C: +22 to +40 points, R_K 0.69-0.85")
  return lines


def paper_checks(head: dict[str, Any]) -> list[dict[str, Any]]:
  """Paper C's findings beside this run's measured values (the suite's report)."""
  b = head["best_latent"]
  d = None if b["delta_accuracy"] is None else 100 * b["delta_accuracy"]
  lo, _ = PAPER_C["delta_accuracy_points"]
  return [{"finding": "latents move monotonically with %Unknown",
           "measured": f"{head['latents_monotonic']} of {head['latents_alive']} active latents",
           "reproduced": head["latents_monotonic"] > 0},
          {"finding": "steering one monotonic latent recovers +22 to +40 points (R_K 0.69-0.85)",
           "measured": f"best single latent {short(d)} points, R_K {short(b['r_k'])}",
           "reproduced": d is not None and d >= lo}]
