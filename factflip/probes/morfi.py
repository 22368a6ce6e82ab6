"""MoRFI (paper C): SAE latents whose activation moves monotonically with the share of Unknown
facts a model was fine-tuned on, and steering that recovers the knowledge.

Owns: `prompt_activations` and `latent_activations` (per prompt, a site's activation or an SAE's
latents there, at the last prompt token or averaged over the prompt), `spearman_rows` and `mann_kendall` (vectorised over latents),
`monotonic_latents` (the table of ρ with its bootstrap interval over prompts, the Mann–Kendall
test, and the verdict), `composite_direction`, `steered_answers` (greedy answers of one model
under a batch of steering vectors, one per row) and `recovery` (Δaccuracy and R_K).
Must not: train SAEs or models, choose mixtures or write tables (the morfi study does).

Definitions (SCIENCE.md C; paper C):
- x: the Unknown share X of each fine-tuned model; a_j(X): latent j's mean activation over the
  held-out QA prompts in the model fine-tuned with X% Unknown.
- ρ_j = Spearman(X, a_j(X)); its interval: percentile bootstrap over prompts (the same prompts
  resampled for every model: they are paired), from `scipy.stats.bootstrap`.
- Mann–Kendall on a_j ordered by X: S = Σ_{i<k} sign(a_k − a_i), Var(S) with the tie correction,
  z with continuity correction, two-sided normal p, τ = S / (n(n−1)/2) (pymannkendall's
  original_test, which the tests hold it to).
- monotonic: the interval excludes 0, p < mk_alpha, and ρ and τ share a sign; direction "rises"
  (ρ > 0) or "falls".
- Steering M_100 along latent j: h ← h + α·s_j·W_dec[j]/‖W_dec[j]‖ at the SAE's site, every
  position, s_j = −1 for latents that rise with X, +1 for those that fall; α in units of the
  mean ‖h‖ at that site. The composite direction: mean(h | M_0) − mean(h | M_100), normalised.
- Recovery: Δaccuracy = acc(M_100 + steer) − acc(M_100); R_K = P(M_0 correct | M_100 + steer
  correct, M_100 wrong) (NaN when no answer was recovered).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from factflip.evals.generation import cut_at_stops, stop_tokens
from factflip.evals.requests import Encoder
from factflip.models.generate import generate
from factflip.models.hooks import Intervention
from factflip.sae.core import encode
from factflip.sae.steering import SAEEdit, sae_site

POSITIONS = ("last", "mean")


def _prompt_batch(tokenizer, prompts: Sequence[str]):
  """Right-aligned token batch [P, T] and mask of the prompts (left padding)."""
  enc = Encoder(tokenizer)
  ids = [list(enc.encode(p)) for p in prompts]
  T = max(len(i) for i in ids)
  pad = tokenizer.pad_token_id or 0
  tokens = np.full((len(ids), T), pad, np.int32)
  mask = np.zeros((len(ids), T), bool)
  for r, i in enumerate(ids):
    tokens[r, T - len(i):] = i
    mask[r, T - len(i):] = True
  return tokens, mask


def _per_prompt(model, tokenizer, prompts: Sequence[str], site: str, layer: int,
                positions: str, batch_size: int, features) -> np.ndarray:
  """features(site activation [B, T, ...]) -> [B, T, F], read per prompt at its last token or
  averaged over its tokens: [P, F]."""
  if positions not in POSITIONS:
    raise ValueError(f"positions {positions!r}; expected one of {POSITIONS}")
  out = []
  for i in range(0, len(prompts), batch_size):
    tokens, mask = _prompt_batch(tokenizer, prompts[i:i + batch_size])
    positions_BxT = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    h = model.forward(tokens, mask, positions_BxT, capture=(site,),
                      return_logits=False).captures[site][layer]
    f_BxTxF = np.asarray(features(h), np.float32)
    if positions == "last":
      out.append(f_BxTxF[:, -1])
    else:
      out.append((f_BxTxF * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
  return np.concatenate(out)


def prompt_activations(model, tokenizer, prompts: Sequence[str], site: str, layer: int,
                     positions: str = "last", batch_size: int = 64) -> np.ndarray:
  """The residual (or any site's, flattened) activation per prompt [P, D]: at the last prompt
  token or averaged over the prompt's tokens."""
  return _per_prompt(model, tokenizer, prompts, site, layer, positions, batch_size,
                     lambda h: np.asarray(h).reshape(*h.shape[:2], -1))


def latent_activations(model, tokenizer, sae, prompts: Sequence[str], positions: str = "last",
                       layer: int | None = None, batch_size: int = 64) -> np.ndarray:
  """Per prompt, the SAE's latents [P, d_sae] at its site: of the last prompt token's activation,
  or the mean of the latents over the prompt's tokens."""
  site, layer = sae_site(sae, layer)
  return _per_prompt(model, tokenizer, prompts, site, layer, positions, batch_size,
                     lambda h: encode(sae, h))


# ---- trend statistics ------------------------------------------------------------------------
def spearman_rows(x_M, y_SxM) -> np.ndarray:
  """Spearman's ρ of x against each row of y (average ranks for ties; NaN for a constant row),
  as `scipy.stats.spearmanr` computes it row by row."""
  from scipy.stats import rankdata
  rx = rankdata(np.asarray(x_M, np.float64))
  ry = rankdata(np.asarray(y_SxM, np.float64), axis=-1)
  rx = rx - rx.mean()
  ry = ry - ry.mean(-1, keepdims=True)
  denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum(-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, (ry @ rx) / np.where(denom > 0, denom, 1.0), np.nan)


def mann_kendall(y_SxN) -> dict[str, np.ndarray]:
  """The Mann–Kendall trend test of each row (values in order): s, var_s, z, p (two-sided), tau
  — pymannkendall.original_test's numbers, vectorised over rows."""
  from scipy.stats import norm
  y = np.asarray(y_SxN, np.float64)
  n = y.shape[-1]
  i, k = np.triu_indices(n, 1)
  s = np.sign(y[..., k] - y[..., i]).sum(-1)
  var = np.full(y.shape[:-1], n * (n - 1) * (2 * n + 5), np.float64)
  srt = np.sort(y, axis=-1)                           # tie groups, row by row
  for row in np.ndindex(*y.shape[:-1]):
    _, t = np.unique(srt[row], return_counts=True)
    var[row] -= (t * (t - 1) * (2 * t + 5)).sum()
  var /= 18.0
  sd = np.sqrt(np.where(var > 0, var, 1.0))
  z = np.where(s > 0, (s - 1) / sd, np.where(s < 0, (s + 1) / sd, 0.0))
  z = np.where(var > 0, z, 0.0)
  return {"s": s, "var_s": var, "z": z, "p": 2 * norm.sf(np.abs(z)),
          "tau": s / (0.5 * n * (n - 1))}


def monotonic_latents(x_M, acts_PxMxS, *, n_boot: int = 1000, confidence: float = 0.95,
                      mk_alpha: float = 0.05, seed: int = 0, min_activation: float = 0.0):
  """One row per latent (a pandas DataFrame): latent, rho, rho_low, rho_high, mk_p, mk_tau,
  monotonic, direction, alive, and mean_<X> per model. acts: per prompt, model (ordered as x)
  and latent. Latents whose mean activation never exceeds `min_activation` in any model are
  kept as rows (alive = False) but never monotonic."""
  import pandas as pd
  from scipy.stats import DegenerateDataWarning, bootstrap
  x = np.asarray(x_M, np.float64)
  order = np.argsort(x, kind="stable")
  x, acts = x[order], np.asarray(acts_PxMxS, np.float64)[:, order]
  P, _, S = acts.shape
  means_MxS = acts.mean(0)
  alive = (means_MxS > min_activation).any(0)
  rho = spearman_rows(x, means_MxS.T)
  lo = np.full(S, np.nan)
  hi = np.full(S, np.nan)
  idx = np.flatnonzero(alive)
  if n_boot and len(idx) and P > 1:
    sub = acts[:, :, idx]

    def stat(rows):
      return spearman_rows(x, sub[rows.astype(int)].mean(0).T)
    with warnings.catch_warnings():        # a latent constant under resampling: NaN bounds
      warnings.simplefilter("ignore", DegenerateDataWarning)
      res = bootstrap((np.arange(P),), stat, n_resamples=n_boot, confidence_level=confidence,
                      method="percentile", vectorized=False, rng=np.random.default_rng(seed))
    lo[idx], hi[idx] = res.confidence_interval.low, res.confidence_interval.high
  mk = mann_kendall(means_MxS.T)
  sig_rho = (lo > 0) | (hi < 0)
  same_sign = np.sign(rho) == np.sign(mk["tau"])
  monotonic = alive & sig_rho & (mk["p"] < mk_alpha) & same_sign
  df = pd.DataFrame({"latent": np.arange(S), "rho": rho, "rho_low": lo, "rho_high": hi,
                     "mk_p": mk["p"], "mk_tau": mk["tau"], "monotonic": monotonic,
                     "direction": np.where(rho > 0, "rises", np.where(rho < 0, "falls", "")),
                     "alive": alive})
  for m, xm in enumerate(x):
    df[f"mean_{xm:g}"] = means_MxS[m]
  return df


# ---- steering --------------------------------------------------------------------------------
def composite_direction(h_known_PxD, h_unknown_PxD) -> np.ndarray:
  """mean(h | M_0) − mean(h | M_100), unit norm."""
  d = np.asarray(h_known_PxD, np.float64).mean(0) - np.asarray(h_unknown_PxD, np.float64).mean(0)
  return (d / max(np.linalg.norm(d), 1e-12)).astype(np.float32)


def answers_per_row(model, tokenizer, prompts: Sequence[str], n_rows: int,
                    intervention_for: Callable[[np.ndarray], object], *,
                    max_new_tokens: int = 12, batch_rows: int = 256,
                    until: Sequence[str] = ("\n",)) -> list[list[str]]:
  """Greedy answers [G][P]: every prompt under each of `n_rows` interventions, the (row,
  prompt) pairs batched as rows of one generation program per bucket (rows padded to a power
  of two); `intervention_for(rows_B)` gives the intervention of a chunk whose batch row b runs
  under intervention row rows_B[b]."""
  G, P = n_rows, len(prompts)
  enc = Encoder(tokenizer)
  ids = [list(enc.encode(p)) for p in prompts]
  rows = [(g, p) for g in range(G) for p in np.argsort([len(i) for i in ids], kind="stable")]
  out = [[""] * P for _ in range(G)]
  stops = stop_tokens(tokenizer, model, until)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  for start in range(0, len(rows), batch_rows):
    chunk = rows[start:start + batch_rows]
    B = 1 << (len(chunk) - 1).bit_length()
    chunk_b = chunk + [chunk[0]] * (B - len(chunk))
    iv = intervention_for(np.asarray([g for g, _ in chunk_b]))
    gen = generate(model, [ids[p] for _, p in chunk_b], max_new_tokens, stop_tokens=stops,
                   pad_id=pad, interventions=(iv,))
    for r, (g, p) in enumerate(chunk):
      n = int(gen.lengths[r])
      text = tokenizer.decode([int(t) for t in gen.tokens[r, :n]], skip_special_tokens=True)
      out[g][p] = cut_at_stops(text, until).strip()
  return out


def steered_answers(model, tokenizer, prompts: Sequence[str], vectors_GxD, site: str,
                    layer: int, **kw) -> list[list[str]]:
  """Greedy answers [G][P]: every prompt under every steering vector (added at `site` of
  `layer`, every position); `answers_per_row`'s batching (kw: max_new_tokens, batch_rows,
  until)."""
  vecs = np.asarray(vectors_GxD, np.float32)
  L = model.cfg.n_layers

  def add(rows_B):
    values = np.zeros((L, len(rows_B), 1, *vecs.shape[1:]), np.float32)
    values[layer] = vecs[rows_B][:, None]
    return Intervention(jnp.arange(L) == layer, jnp.ones((1,), bool), jnp.asarray(values),
                        site=site, mode="add")
  return answers_per_row(model, tokenizer, prompts, len(vecs), add, **kw)


def clamped_answers(model, tokenizer, prompts: Sequence[str], sae, latents_N, values_GxN,
                    site: str, layer: int, **kw) -> list[list[str]]:
  """Greedy answers [G][P]: every prompt with latents `latents` clamped to row g of `values`
  (every position, the SAE's error term kept: `sae.steering.SAEEdit`); `answers_per_row`'s
  batching (kw: max_new_tokens, batch_rows, until)."""
  latents = jnp.asarray(np.asarray(latents_N, np.int32).reshape(-1))
  vals = np.asarray(values_GxN, np.float32)
  if vals.ndim != 2 or vals.shape[1] != latents.shape[0]:
    raise ValueError(f"values of shape {vals.shape}; expected [rows, {latents.shape[0]}]: one "
                     f"value per clamped latent")
  L = model.cfg.n_layers

  def clamp(rows_B):
    return SAEEdit(jnp.arange(L) == layer, jnp.ones((1,), bool), jnp.zeros((L,)), sae, latents,
                   jnp.asarray(vals[rows_B][:, None]), site=site, keep_error=True)
  return answers_per_row(model, tokenizer, prompts, len(vals), clamp, **kw)


def recovery(correct_base, correct_m100, correct_steered) -> dict[str, float]:
  """Δaccuracy and R_K = P(M_0 correct | steered correct, M_100 wrong) over paired questions."""
  b, m, s = (np.asarray(v, bool) for v in (correct_base, correct_m100, correct_steered))
  recovered = s & ~m
  return {"accuracy": float(s.mean()), "delta_accuracy": float(s.mean() - m.mean()),
          "recovered": int(recovered.sum()),
          "r_k": float(b[recovered].mean()) if recovered.any() else float("nan")}

