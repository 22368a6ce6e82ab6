"""Paper C's results: table → table functions from the steering stages' outputs (SCIENCE.md C).

Owns: `COLUMNS` (every results table and its columns), `ranked_monotonic` (the order in which
monotonic latents are steered) and `cell_tables` (one (size, seed)'s latents, steering and
trend rows).
Must not: read or write files (the study's results stage does), run models or plot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = {
    "latents": ["size", "seed", "latent", "rho", "rho_low", "rho_high", "mk_p", "mk_tau",
                "monotonic", "direction", "alive", "rho_epochs", "mk_p_epochs"],
    "steering": ["size", "seed", "kind", "latent", "alpha", "accuracy", "delta_accuracy",
                 "recovered", "r_k"],
    "trend": ["size", "seed", "latent", "unknown_share", "mean_activation"],
}


def ranked_monotonic(table: pd.DataFrame) -> pd.DataFrame:
  """The monotonic latents, strongest first: by |ρ|, then Mann–Kendall p, then index (the
  order in which the steering stage picks them)."""
  mono = table[table.monotonic]
  return mono.assign(_a=-mono.rho.abs()).sort_values(["_a", "mk_p", "latent"]).drop(
      columns="_a")


def cell_tables(cell: Mapping[str, Any], latents: pd.DataFrame, steering: pd.DataFrame,
                final: Mapping[float, np.ndarray], top: int) -> dict[str, pd.DataFrame]:
  """One (size, seed)'s rows: its latent test (latents), its steering accuracies (steering),
  and the mean activation of the `top` steered latents in each mixture's last checkpoint
  against its Unknown share (trend; `final`: share -> latents [P, d_sae], increasing share)."""
  keep = list(ranked_monotonic(latents).latent[:top])
  trend = [{**cell, "latent": int(j), "unknown_share": x, "mean_activation": float(m[j])}
           for x, acts in final.items() for m in (acts.mean(0),) for j in keep]
  return {"latents": latents.assign(**cell)[COLUMNS["latents"]],
          "steering": steering.assign(**cell)[COLUMNS["steering"]],
          "trend": pd.DataFrame(trend, columns=COLUMNS["trend"])}
