"""CounterFact editing scores (ROME's protocol) and generation fluency as n-gram entropy.

Owns: `counterfact_scores` (per case: efficacy ES / EM on the rewrite prompt, paraphrase PS / PM,
neighbourhood NS / NM; their means and S), `n_gram_entropy` and `fluency`.
Must not: run models itself (the one scorer, `evals.loglik.score_pairs`, with the probes'
tokenisation `evals.requests.answer_ids`).

Definitions (ROME `compute_rewrite_quality_counterfact` and `summarize`):
- per prompt, the mean per-token NLL of target_new (the counterfactual) and of target_true (the
  item's answer), each tokenised as its own segment with a leading space after the prompt
  (ROME: tok(f" {target}")); P(x) = exp(−mean NLL(x)).
- ES = share of rewrite prompts with P(new) > P(true); EM = mean of P(new) − P(true).
  PS / PM: the same over the paraphrase prompts (mean per case, then over cases).
  NS = share of neighbourhood prompts with P(true) > P(new); NM = mean of P(true) − P(new).
  S = harmonic mean of ES, PS and NS (over the cases' means; scipy.stats.hmean).
- fluency = n-gram entropy of a generation (ROME / RWKU `compute_n_gram_entropy`): for n = 2
  and 3 the entropy (bits) of the n-gram frequency distribution of its word tokens, weighted
  2/3 and 4/3, averaged; then averaged over generations. Word tokens: NLTK's Treebank word
  tokenizer (`nltk.word_tokenize(text, preserve_line=True)`: ROME calls it with Punkt sentence
  splitting, which needs a data download; without it only periods inside a multi-sentence
  generation split differently). NLTK comes with the optional `evals` extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from factflip.data.facts import FactItem
from factflip.data.tokenizer import TokenIds
from factflip.evals.loglik import score_pairs
from factflip.evals.requests import answer_ids

SCORES = ("ES", "EM", "PS", "PM", "NS", "NM")


def case_scores(nll: dict[str, np.ndarray]) -> dict[str, float]:
  """One case's ES EM PS PM NS NM from the mean per-token NLLs of its prompts: `nll[kind]`
  [prompts, 2] = (NLL of target_new, NLL of target_true) for kind rewrite, paraphrase and
  neighbour (a kind it lacks gives NaN)."""
  row = {}
  for kind, (score, mag) in (("rewrite", ("ES", "EM")), ("paraphrase", ("PS", "PM")),
                             ("neighbour", ("NS", "NM"))):
    x = np.asarray(nll.get(kind, np.zeros((0, 2))), np.float64).reshape(-1, 2)
    if not len(x):
      row[score] = row[mag] = float("nan")
      continue
    p_new, p_true = np.exp(-x[:, 0]), np.exp(-x[:, 1])
    if kind == "neighbour":                     # the true answer must stay more likely
      row[score], row[mag] = float(np.mean(p_true > p_new)), float(np.mean(p_true - p_new))
    else:
      row[score], row[mag] = float(np.mean(p_new > p_true)), float(np.mean(p_new - p_true))
  return row


def summarize(rows: Sequence[dict]) -> dict[str, float]:
  """Means over cases (NaN-skipping) of each score, and S = hmean(ES, PS, NS)."""
  from scipy.stats import hmean
  means = {}
  for k in SCORES:
    v = np.asarray([r[k] for r in rows], np.float64)
    means[k] = float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan")
  parts = [means["ES"], means["PS"], means["NS"]]
  means["S"] = float(hmean(parts)) if not np.isnan(parts).any() else float("nan")
  return means


def counterfact_scores(model, tokenizer, items: Sequence[FactItem], batch_size: int = 64
                       ) -> tuple[list[dict], dict[str, float]]:
  """(one row per case with its ES EM PS PM NS NM, `summarize` of them). Items need a prompt,
  an answer and a counterfactual; paraphrases and neighbour prompts are used when present."""
  enc = TokenIds(tokenizer)
  pairs, where = [], []                          # where: (case, kind) per prompt
  for c, f in enumerate(items):
    if not f.prompt or not f.answers or not f.counterfactual:
      raise ValueError(f"{f.id}: CounterFact scores need a prompt, answers and a "
                       f"counterfactual (fields 'prompt', 'answers', 'counterfactual')")
    prompts = [("rewrite", f.prompt)] + [("paraphrase", p) for p in f.paraphrases] + [
        ("neighbour", n.prompt) for n in f.neighbours]
    for kind, p in prompts:
      for target in (f.counterfactual, f.answers[0]):
        pairs.append(answer_ids(enc, p, target, f"{f.id} {kind}"))
      where.append((c, kind))
  s = score_pairs(model, pairs, batch_size)
  n_tok = np.asarray([len(a) for _, a in pairs], np.float64)
  nll = (-s.logprob / n_tok).reshape(-1, 2)       # [prompts, (new, true)]
  per_case: list[dict[str, list]] = [{} for _ in items]
  for (c, kind), x in zip(where, nll):
    per_case[c].setdefault(kind, []).append(x)
  rows = [dict(item=f.id, **case_scores(d)) for f, d in zip(items, per_case)]
  return rows, summarize(rows)


def _word_tokens(text: str) -> list[str]:
  import nltk  # a core dependency; word_tokenize needs no downloaded data here
  return nltk.word_tokenize(text, preserve_line=True)


def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3),
                   weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
  """The weighted mean n-gram entropy (bits) of one text (0 for an order with no n-grams)."""
  import collections
  toks = _word_tokens(text)
  ent = []
  for n in ns:
    grams = collections.Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    if not grams:                              # ROME: an empty distribution has entropy 0
      ent.append(0.0)
      continue
    f = np.asarray(list(grams.values()), np.float64)
    f /= f.sum()
    ent.append(float(-(f * np.log2(f)).sum()))
  return float(np.mean(np.asarray(ent) * np.asarray(weights)))


def fluency(texts: Sequence[str]) -> float:
  """Mean n-gram entropy over generations (ROME's `n_gram_entropy`, arithmetic mean)."""
  if not texts:
    raise ValueError("fluency of no generations")
  return float(np.mean([n_gram_entropy(t) for t in texts]))
