"""Membership-inference scores per text — LOSS, zlib, Min-K% and Min-K%++ — from one forward
pass, and the AUC that separates a forget set from a retain set (RWKU's `eval_mia`).

Owns: `mia_scores` (a table of scores per text), `min_k`, `min_k_plus_plus`, `auc` and
`mia_summary` (per score: the two sets' means and the AUC between them).
Must not: run models itself (`evals.loglik.score_pairs` with stats gives the per-token log p
and the mean and variance of log p under the full next-token distribution, computed on device).

Definitions (RWKU `LLaMA-Factory/src/llmtuner/eval/eval_mia.py`; larger = more likely a
member): the text is encoded with the tokenizer's special tokens and every token after the
first is scored given those before it (HF `labels=input_ids`); texts longer than the model's
context are scored in lm-eval's rolling windows.
- loss = mean over tokens of log p(t_i | t_<i) (−mean NLL);
- zlib = loss / len(zlib.compress(text as UTF-8));
- min_k(k) = mean of the int(n·k) lowest token log-probs (NaN when int(n·k) = 0);
- min_k_plus_plus(k) = the same over (log p(t_i) − μ_i) / σ_i, where μ_i = E_{v∼p_i}[log p_i(v)]
  and σ_i² = E[log p_i(v)²] − μ_i² under the model's next-token distribution p_i;
- AUC(forget, retain) = P(score of a forget text > score of a retain text) + ½ P(tie), from
  the Mann–Whitney U statistic (scipy.stats.mannwhitneyu): U_forget / (n_forget · n_retain).
- `mia_summary`: a score missing (NaN) on any text of either set has no mean and no AUC (NaN):
  an AUC over the texts a score happens to cover would compare other sets than RWKU's.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from factflip.evals.requests import Encoder, rolling_scores

KS = (0.2,)


def min_k(token_logp: np.ndarray, k: float = 0.2) -> float:
  n = int(len(token_logp) * k)
  return float(np.sort(token_logp)[:n].mean()) if n else float("nan")


def min_k_plus_plus(token_logp: np.ndarray, mu: np.ndarray, var: np.ndarray,
                    k: float = 0.2) -> float:
  z = (np.asarray(token_logp) - mu) / np.sqrt(var)
  return min_k(z, k)


def mia_scores(model, tokenizer, texts: Sequence[str], ks: Sequence[float] = KS,
               batch_size: int = 32) -> list[dict[str, float]]:
  """One row per text: loss, zlib, min_k_<k>, min_k++_<k> for each k in `ks`, tokens."""
  for k in ks:
    if not 0 < k <= 1:
      raise ValueError(f"k = {k}; expected a share in (0, 1]")
  enc = Encoder(tokenizer)
  ids = [enc.encode(text) for text in texts]
  for i, toks in enumerate(ids):
    if len(toks) < 2:
      raise ValueError(f"text {i}: {len(toks)} token(s); expected at least 2 (one to score "
                       "after the first)")
  s = rolling_scores(model, [t[1:] for t in ids], [t[0] for t in ids], batch_size, stats=True)
  rows = []
  for text, lp, mu, var in zip(texts, s.token_logp, s.token_mu, s.token_var):
    loss = float(lp.mean())
    row = {"loss": loss, "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
           "tokens": len(lp)}
    for k in ks:
      row[f"min_k_{k:g}"] = min_k(lp, k)
      row[f"min_k++_{k:g}"] = min_k_plus_plus(lp, mu, var, k)
    rows.append(row)
  return rows


def auc(forget: Sequence[float], retain: Sequence[float]) -> float:
  """P(forget score > retain score) + ½ P(tie) (Mann–Whitney U / (n₁ n₂))."""
  from scipy.stats import mannwhitneyu
  f, r = np.asarray(forget, np.float64), np.asarray(retain, np.float64)
  if not len(f) or not len(r):
    raise ValueError(f"AUC needs both sets: {len(f)} forget and {len(r)} retain scores")
  if np.isnan(f).any() or np.isnan(r).any():
    raise ValueError("AUC of scores with NaN (a Min-K% over too few tokens?)")
  return float(mannwhitneyu(f, r, alternative="two-sided").statistic / (len(f) * len(r)))


def mia_summary(sets: Sequence[str], scores: Mapping[str, Sequence[float]],
                members: str = "forget", nonmembers: str = "retain"
                ) -> dict[str, dict[str, float]]:
  """Per score column (`scores`: column -> one value per text, `sets`: each text's set): the
  members' mean, the non-members' mean and AUC(members, non-members), each NaN when a set has
  no texts or a score is missing on any of its texts (the module docstring)."""
  sets = np.asarray(sets)
  out = {}
  for col, values in scores.items():
    v = np.asarray(values, np.float64)
    f, r = v[sets == members], v[sets == nonmembers]
    ok = len(f) and len(r) and not (np.isnan(f).any() or np.isnan(r).any())
    out[col] = {members: float(f.mean()) if len(f) and not np.isnan(f).any() else float("nan"),
                nonmembers: (float(r.mean()) if len(r) and not np.isnan(r).any()
                             else float("nan")),
                "auc": auc(f, r) if ok else float("nan")}
  return out
