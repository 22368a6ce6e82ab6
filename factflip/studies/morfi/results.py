"""Paper C's results: table → table functions from the steering stages' outputs (SCIENCE.md C).

Owns: `COLUMNS` (every results table and its columns), `ranked_monotonic` (the order in which
monotonic latents are steered), `monotonic_counts` (latents monotonic across mixtures, across
the 100%-Unknown run's epochs, and both), `label_permutation_null` (the number of monotonic
latents when the mixtures' %Unknown labels are permuted: the same test, run by
`scipy.stats.permutation_test`) and `null_summary` (its mean, 95th percentile and p), `clamp_values`
(a latent clamped at a multiple of its own M_0 − M_100 difference), `cloze_check` (does M_100
still store what M_0 knew: ΔLL on the test facts' cloze prompts) and `cell_tables` (one (size,
seed, SAE layer)'s rows of every table).
Must not: read or write files (the study's results stage does), run models or plot.

Definitions (beside `probes.morfi`'s):
- the label-permutation null: the test (bootstrap Spearman interval excluding 0, Mann–Kendall
  p < mk_alpha, one sign) on the same activations with the %Unknown labels of the models
  permuted; every permutation when there are no more than `n` (exact), else `n` drawn at
  random (seeded); p = share of the null's counts >= the observed count (scipy's, with its +1
  correction when drawn at random).
- a latent's own scale: d_j = mean a_j(M_0) − mean a_j(M_100) over the held-out prompts; at
  strength α, steering adds α·d_j·(latent j's decoder contribution) and clamping sets latent j
  to max(0, a_j(M_100) + α·d_j) (α = 1: its M_0 value).
- cloze check (τ the study's ΔLL threshold), over the test facts with a counterfactual (ΔLL on
  the cloze prompt, or the QA prompt for a fact without one): known = share with ΔLL > τ;
  retained = of the facts M_0 knows, the share M_100 still knows; lost_qa = facts M_0 answers
  right and M_100 wrong (closed-book, every fact); lost_qa_stored = of those, the ones M_100
  still knows by ΔLL: the knowledge steering could recover. log p(true) over every fact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from factflip.probes import morfi as M
from factflip.probes.fact_preference import CORRECT, state_share, states

COLUMNS = {
    "cloze": ["size", "seed", "facts", "with_dll", "known_m0", "known_m100", "retained", "lost_qa",
              "lost_qa_stored", "dll_m0", "dll_m100", "logp_true_m0", "logp_true_m100"],
    "monotonic": ["size", "seed", "layer", "alive", "monotonic", "rising", "falling",
                  "monotonic_epochs", "both", "null_mean", "null_p95", "null_p", "permutations"],
    "latents": ["size", "seed", "layer", "latent", "rho", "rho_low", "rho_high", "mk_p", "mk_tau",
                "monotonic", "direction", "alive", "delta_m0_m100", "rho_epochs",
                "rho_epochs_low", "rho_epochs_high", "mk_p_epochs", "monotonic_epochs",
                "direction_epochs"],
    "steering": ["size", "seed", "layer", "kind", "latent", "alpha", "rel_norm", "accuracy",
                 "delta_accuracy", "recovered", "r_k"],
    "trend": ["size", "seed", "layer", "latent", "unknown_share", "mean_activation"],
}


def ranked_monotonic(table: pd.DataFrame) -> pd.DataFrame:
  """The monotonic latents, strongest first: by |ρ|, then Mann–Kendall p, then index (the
  order in which the steering stage picks them)."""
  mono = table[table.monotonic]
  return mono.assign(_a=-mono.rho.abs()).sort_values(["_a", "mk_p", "latent"]).drop(
      columns="_a")


def monotonic_counts(latents: pd.DataFrame) -> dict[str, int]:
  """Active latents; monotonic in %Unknown (rising, falling); monotonic across the 100%-Unknown
  run's epochs; both, with one direction."""
  mono, ep = latents.monotonic.astype(bool), latents.monotonic_epochs.astype(bool)
  return {"alive": int(latents.alive.sum()), "monotonic": int(mono.sum()),
          "rising": int((mono & (latents.direction == "rises")).sum()),
          "falling": int((mono & (latents.direction == "falls")).sum()),
          "monotonic_epochs": int(ep.sum()),
          "both": int((mono & ep & (latents.direction == latents.direction_epochs)).sum())}


def label_permutation_null(x_M, acts_PxMxS, n: int, *, seed: int = 0, **test: Any):
  """The number of monotonic latents (`probes.morfi.monotonic_latents` with `test`'s keywords)
  under permutations of the models' labels x: `scipy.stats.permutation_test` (one sample,
  pairings: every permutation when there are at most n, else n at random from `seed`), the
  alternative "greater". Returns its result: statistic (the observed count), null_distribution
  (the count per permutation) and pvalue.

  Permuting the labels is the same test on the models reordered, so each permutation's latents
  join one call of the test as extra columns (its bootstrap resamples prompts, the same for
  every column); only latents whose Mann–Kendall p passes are bootstrapped, as no other can be
  monotonic."""
  from scipy.stats import permutation_test

  x = np.asarray(x_M, np.float64)
  acts = np.asarray(acts_PxMxS, np.float64)
  means_MxS = acts.mean(0)
  live = np.flatnonzero((means_MxS > test.get("min_activation", 0.0)).any(0))
  mk_alpha = test.get("mk_alpha", 0.05)

  def count(x_BxM):                 # [B, M] labels -> [B] monotonic latents
    blocks, owner = [], []
    for b, xb in enumerate(x_BxM):
      order = np.argsort(xb, kind="stable")
      keep = live[M.mann_kendall(means_MxS[order][:, live].T)["p"] < mk_alpha]
      blocks.append(acts[:, order][:, :, keep])
      owner += [b] * len(keep)
    counts = np.zeros(len(x_BxM))
    if owner:
      table = M.monotonic_latents(np.sort(x), np.concatenate(blocks, axis=2), seed=seed, **test)
      np.add.at(counts, np.asarray(owner), table.monotonic.to_numpy(float))
    return counts

  def statistic(xs, axis=-1):
    xs = np.asarray(xs)
    return count(xs[None])[0] if xs.ndim == 1 else count(xs)
  return permutation_test((x,), statistic, permutation_type="pairings", vectorized=True,
                          n_resamples=n, alternative="greater", rng=np.random.default_rng(seed))


def null_summary(counts, p: float) -> dict[str, float]:
  """The label-permutation null's mean and 95th percentile (linear interpolation), its p and
  the number of permutations; NaN without permutations."""
  c = np.asarray(counts, np.float64)
  if not len(c):
    return {"null_mean": math.nan, "null_p95": math.nan, "null_p": math.nan, "permutations": 0}
  return {"null_mean": float(c.mean()), "null_p95": float(np.percentile(c, 95)),
          "null_p": float(p), "permutations": len(c)}


def clamp_values(m100_J, delta_J, alpha: float) -> np.ndarray:
  """Latents clamped at α times their own M_0 − M_100 difference from their M_100 value,
  max(0, a(M_100) + α·d): α = 1 is their M_0 value; an activation is never below 0."""
  return np.maximum(0.0, np.asarray(m100_J, np.float64) + alpha * np.asarray(delta_J,
                                                                           np.float64))


def cloze_check(items: pd.DataFrame, tau: float) -> dict[str, float]:
  """Whether M_100 still stores what M_0 knew (module docstring), from one row per test fact:
  dll_m0, dll_m100 (ΔLL on its cloze prompt; NaN without a counterfactual), logp_true_m0,
  logp_true_m100, qa_m0, qa_m100 (closed-book exact match). The ΔLL columns over the facts
  with a ΔLL (with_dll; NaN when none has one), the rest over all."""
  n = len(items)
  if not n:
    return {"facts": 0, "with_dll": 0, **{k: math.nan for k in COLUMNS["cloze"][5:]}}
  d0, d100 = items.dll_m0.to_numpy(float), items.dll_m100.to_numpy(float)
  has = ~np.isnan(d0) & ~np.isnan(d100)
  k0, k100 = states(d0, tau) == CORRECT, states(d100, tau) == CORRECT
  lost = items.qa_m0.to_numpy(bool) & ~items.qa_m100.to_numpy(bool)
  some = bool(has.any())
  return {"facts": n, "with_dll": int(has.sum()),
          "known_m0": float(state_share(d0[has], CORRECT, tau)) if some else math.nan,
          "known_m100": float(state_share(d100[has], CORRECT, tau)) if some else math.nan,
          "retained": float(k100[has & k0].mean()) if (has & k0).any() else math.nan,
          "lost_qa": int(lost.sum()),
          "lost_qa_stored": int((lost & has & k100).sum()) if some else math.nan,
          "dll_m0": float(d0[has].mean()) if some else math.nan,
          "dll_m100": float(d100[has].mean()) if some else math.nan,
          "logp_true_m0": float(items.logp_true_m0.mean()),
          "logp_true_m100": float(items.logp_true_m100.mean())}


def cell_tables(cell: Mapping[str, Any], latents: pd.DataFrame, steering: pd.DataFrame,
                final: Mapping[float, np.ndarray], top: int, *, cloze: pd.DataFrame,
                null_counts, null_p: float, tau: float) -> dict[str, pd.DataFrame]:
  """One (size, seed, layer)'s rows: the cloze check (cloze: one row per test fact), its latent test
  (latents) and their counts beside the label-permutation null (monotonic), its steering
  accuracies (steering), and the mean activation of the `top` steered latents in each
  mixture's last checkpoint against its Unknown share (trend; `final`: share -> latents
  [P, d_sae], increasing share)."""
  keep = list(ranked_monotonic(latents).latent[:top])
  trend = [{**cell, "latent": int(j), "unknown_share": x, "mean_activation": float(m[j])}
           for x, acts in final.items() for m in (acts.mean(0),) for j in keep]
  counts = {**cell, **monotonic_counts(latents), **null_summary(null_counts, null_p)}
  return {"cloze": pd.DataFrame([{**cell, **cloze_check(cloze, tau)}], columns=COLUMNS["cloze"]),
          "monotonic": pd.DataFrame([counts], columns=COLUMNS["monotonic"]),
          "latents": latents.assign(**cell)[COLUMNS["latents"]],
          "steering": steering.assign(**cell)[COLUMNS["steering"]],
          "trend": pd.DataFrame(trend, columns=COLUMNS["trend"])}
