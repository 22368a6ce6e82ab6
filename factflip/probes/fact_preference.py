"""Fact preference: teacher-forced answer log-probs, ΔLL, states and flips (SCIENCE.md, common
objects and section A), and the logit lens of the same quantity.

Owns: `prompt_rows` (the prompts of each item by kind, with their true and counterfactual
answers), `score` (many pairs through the evals layer's one
teacher-forced scorer, `evals.loglik.score_pairs`), `preference`
(a table of ΔLL per item and prompt kind), `lens_preference` (ΔLL from every layer's residual
stream), `states`, `flipped`, `flip_rate`, `state_share`, `ambiguity_rate`, `first_flip` and
`abruptness`: the state rule and the rates built on it, which every study and the training
monitor call (no copies).
Must not: train, or know where checkpoints live (callers pass models).

Definitions (written as in SCIENCE.md):
- ΔLL(q) = Σ log p(a_true | q) − Σ log p(a_cf | q), sums over the answer's tokens, teacher
  forced; the answer is tokenised as its own segment with a leading space (" Paris"), after the
  prompt's tokens and a BOS when the tokenizer has one.
- state at threshold τ: correct if ΔLL > τ, counterfactual if ΔLL < −τ, ambiguous otherwise.
- flip rate(t) = #(correct at the reference and counterfactual at t) / #(correct at the
  reference); ambiguity rate(t) = share ambiguous at t.
- abruptness: the largest single-interval rise of the flip rate divided by its total rise.
- logit lens: ΔLL_ℓ from final_norm(h_ℓ) @ W_U (with the model's own final soft-cap) at every
  layer boundary ℓ = 0 (embeddings) ... L (the output; equal to the model's ΔLL).
- neighbour prompts (other subjects) compare their own true answer with the item's
  counterfactual object (CounterFact's neighbourhood score): they must stay positive.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem
from factflip.data.tokenizer import TokenIds
from factflip.evals.loglik import PairLayout, layout_pairs, score_layout
from factflip.evals.requests import answer_ids
from factflip.models.transformer import Transformer
from factflip.probes.tuned_lens import TunedLens

KINDS = ("prompt", "paraphrase", "question", "language", "neighbour")
CORRECT, AMBIGUOUS, COUNTERFACTUAL = 1, 0, -1


def prompt_rows(items: Sequence[FactItem], kinds: Sequence[str] = KINDS,
                question_format: str = T.QUESTION_FORMAT) -> list[dict[str, Any]]:
  """One row per (item, prompt): item, kind, variant (paraphrase index, language or neighbour
  index), prompt, true and cf answers. Items without a counterfactual are skipped for the
  kinds that need one (all of them)."""
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f"unknown prompt kinds {bad}; expected some of {KINDS}")
  rows = []
  for it in items:
    if it.counterfactual is None or not it.answers:
      continue
    true, cf = it.answers[0], it.counterfactual

    def add(kind, variant, prompt, t=true, c=cf):
      if prompt:
        rows.append({"item": it.id, "kind": kind, "variant": variant, "prompt": prompt,
                     "true": t, "cf": c})
    if "prompt" in kinds:
      add("prompt", "", it.prompt)
    if "paraphrase" in kinds:
      for i, p in enumerate(it.paraphrases):
        add("paraphrase", str(i), p)
    if "question" in kinds and it.question:
      add("question", "", question_format.replace("{Q}", it.question))
    if "language" in kinds:
      for lang, tr in sorted(it.translations.items()):
        if tr.answers and tr.counterfactual:
          add("language", lang, tr.prompt or (tr.question and question_format.replace(
              "{Q}", tr.question)), tr.answers[0], tr.counterfactual)
    if "neighbour" in kinds:
      for i, nb in enumerate(it.neighbours):
        if nb.answers:
          add("neighbour", str(i), nb.prompt, nb.answers[0], cf)
  return rows


# The version of the teacher-forced scorer (`evals.loglik`: answer_ids, score_pairs): part of every
# study stage key that scores answers, so a change to what it computes redoes those stages.
# 2: log-softmax in float32 whatever the parameters' dtype. 3: `preference` scores the true and
# counterfactual answers of a prompt in one row (the prompt once; ΔLL within ~1e-5 of v2's).
# 4: a continuation shares its context's row only where that pays (`loglik._rows`; sums
# within ~1e-5 of v3's).
SCORER_VERSION = 4


@functools.lru_cache(maxsize=16)
def _layout(tokenizer, prompts: tuple[str, ...], answers: tuple[str, ...], batch_size: int,
            cfg) -> PairLayout:
  """The scorer's layout of these pairs, kept for the next model of the same shape (a probe
  stage scores the same prompts at every checkpoint: tokenised and laid out once)."""
  enc = TokenIds(tokenizer)
  pairs = [answer_ids(enc, p, a, f"pair {i}") for i, (p, a) in enumerate(zip(prompts, answers))]
  return layout_pairs(cfg, pairs, batch_size)


def score(model: Transformer, tokenizer, prompts: Sequence[str], answers: Sequence[str],
          batch_size: int = 64, lens: bool | TunedLens = False, return_greedy: bool = False):
  """Σ log p(answer | prompt) per pair, float32 [N] (or [L + 1, N] with lens=True, the logit
  lens, or lens=a TunedLens). return_greedy=True also returns bool [N]: greedy decoding from
  the prompt reproduces the answer's tokens (every answer token is the argmax given the ones
  before it — closed-book exact match). Pairs are tokenised by `answer_ids` and scored by the
  evals layer's one scorer (`evals.loglik.score_layout`: buckets, shared prompts once; the
  layout of the last few prompt sets is kept, so the next checkpoint skips tokenising)."""
  if len(prompts) != len(answers):
    raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
  if not isinstance(lens, bool) and lens is not None:
    lens.check_fits(model.cfg, "score")
  layout = _layout(tokenizer, tuple(prompts), tuple(answers), batch_size,
                   model.cfg)
  s = score_layout(model.params(), model.cfg, layout, lens=lens)
  out = (s.lens if s.lens is not None else s.logprob).astype(np.float32)
  return (out, s.greedy) if return_greedy else out


def preference(model: Transformer, tokenizer, items: Sequence[FactItem],
               kinds: Sequence[str] = KINDS, batch_size: int = 64,
               lens: bool | TunedLens = False,
               question_format: str = T.QUESTION_FORMAT) -> dict[str, np.ndarray]:
  """A table (dict of equal-length columns; `pandas.DataFrame(table)` opens it) with one row
  per (item, prompt): item, kind, variant, prompt, true, cf, logp_true, logp_cf, dll, correct
  (greedy decoding gives the true answer: closed-book accuracy), greedy_cf (it gives the
  counterfactual: with correct, the response-level state); with
  lens=True also dll_layers [rows, L + 1] (layer 0 = embeddings, L = the output) by the logit
  lens, or by a tuned lens when lens=TunedLens (`factflip.probes.tuned_lens`)."""
  lens_on = lens is not False and lens is not None
  rows = prompt_rows(items, kinds, question_format)
  if not rows:
    raise ValueError("no prompts to score (items need answers and a counterfactual)")
  prompts = [r["prompt"] for r in rows]
  n = len(rows)        # true and counterfactual answers in one call: each prompt runs once
  both, hit = score(model, tokenizer, prompts * 2, [r["true"] for r in rows]
                    + [r["cf"] for r in rows], batch_size, lens, return_greedy=True)
  lt, lc, greedy = both[..., :n], both[..., n:], hit[:n]
  table = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
  if lens_on:
    table["dll_layers"] = (lt - lc).T
    lt, lc = lt[-1], lc[-1]
  table.update(logp_true=lt, logp_cf=lc, dll=lt - lc, correct=greedy, greedy_cf=hit[n:])
  return table


def states(dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """+1 correct (ΔLL > τ), −1 counterfactual (ΔLL < −τ), 0 ambiguous; int8, same shape."""
  dll = np.asarray(dll)
  return np.where(dll > tau, CORRECT, np.where(dll < -tau, COUNTERFACTUAL, AMBIGUOUS)).astype(
      np.int8)


def flipped(reference_dll: np.ndarray, dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """Per item: correct at the reference and counterfactual now (bool; the arrays broadcast).
  The one flip rule: the rates below, the studies' tables and the training monitor's rules."""
  return (states(reference_dll, tau) == CORRECT) & (states(dll, tau) == COUNTERFACTUAL)


def flip_rate(reference_dll: np.ndarray, dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """Share of items correct at the reference that are counterfactual now, over the last axis.
  dll: [..., items] (e.g. [checkpoints, items] or [checkpoints, layers, items]); the reference
  broadcasts against it (e.g. [items], or [layers, items] for a per-layer reference). NaN
  where no item was correct at the reference. The one definition every table uses."""
  ref = states(reference_dll, tau) == CORRECT
  now = flipped(reference_dll, dll, tau)
  ref = np.broadcast_to(ref, now.shape)
  n = ref.sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(n > 0, now.sum(-1) / np.maximum(n, 1), np.nan)


def state_share(dll: np.ndarray, state: int, tau: float = 0.5) -> np.ndarray:
  """Share of items in `state` (CORRECT, COUNTERFACTUAL or AMBIGUOUS), over the last axis."""
  return (states(dll, tau) == state).mean(-1)


def ambiguity_rate(dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """Share of items ambiguous, over the last axis."""
  return state_share(dll, AMBIGUOUS, tau)


def first_flip(reference_dll: np.ndarray, dll_CxN: np.ndarray, steps: Sequence[int],
               tau: float = 0.5) -> np.ndarray:
  """Per item, the first checkpoint step at which an item correct at the reference is
  counterfactual; −1 if it never flips (or was not correct at the reference)."""
  flipped_CxN = flipped(np.asarray(reference_dll)[None], dll_CxN, tau)
  any_N = flipped_CxN.any(0)
  first_N = np.asarray(steps)[flipped_CxN.argmax(0)]
  return np.where(any_N, first_N, -1)


def abruptness(flip_rates: Sequence[float]) -> float:
  """The largest single-interval rise of a flip-rate curve divided by its total rise (max −
  first value); NaN when it never rises."""
  f = np.asarray(flip_rates, np.float64)
  total = f.max() - f[0]
  if not total > 0:
    return float("nan")
  return float(np.diff(f).max() / total)
