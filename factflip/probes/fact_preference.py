"""Fact preference: teacher-forced answer log-probs, ΔLL, states and flips (SCIENCE.md, common
objects and section A), and the logit lens of the same quantity.

Owns: `prompt_rows` (the prompts of each item by kind, with their true and counterfactual
answers), the one teacher-forced answer scorer — `answer_ids` (how a (prompt, answer) pair is
tokenised) and `answer_logprob` (Σ log p of the answer tokens and greedy agreement, from the
logits at the answer positions), which patching (`fact_patching`) scores with too — `score`
(that scorer for many pairs: bucketed padding, one compiled program per (batch, length)
bucket, logits only at answer positions), `preference`
(a table of ΔLL per item and prompt kind), `lens_preference` (ΔLL from every layer's residual
stream), `states`, `flip_rate`, `ambiguity_rate`, `first_flip` and `abruptness`.
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

import jax
import jax.numpy as jnp
import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem
from factflip.data.tokenizer import TokenIds
from factflip.models.config import ModelConfig
from factflip.models.transformer import Transformer, forward, unembed
from factflip.probes.tuned_lens import TunedLens, check_fits, translate

KINDS = ("prompt", "paraphrase", "question", "language", "neighbour")
CORRECT, AMBIGUOUS, COUNTERFACTUAL = 1, 0, -1


def _space(answer: str) -> str:
  return answer if not answer or answer[:1].isspace() else " " + answer


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


def answer_ids(enc: TokenIds, prompt: str, answer: str, where: str
               ) -> tuple[list[int], list[int]]:
  """The tokens of a teacher-forced (prompt, answer) pair: BOS (when the tokenizer has one) +
  the prompt's tokens, and the answer as its own segment with a leading space. `where` names
  the pair in the error when either tokenises to nothing."""
  a_ids = list(enc(_space(answer))) if answer.strip() else []
  if not a_ids:
    raise ValueError(f"{where}: answer {answer!r} tokenises to nothing")
  p_ids = ([] if enc.bos is None else [enc.bos]) + list(enc(prompt))
  if not p_ids:
    raise ValueError(f"{where}: prompt {prompt!r} tokenises to nothing and there is no BOS")
  return p_ids, a_ids


def answer_logprob(logits_BxAxV: jax.Array, target_BxA: jax.Array, amask_BxA: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """From the logits at the A positions that predict the answer tokens `target_BxA` (amask 0
  on padding): Σ log p(answer) [B] (log-softmax in float32) and greedy [B] (every answer
  token is the argmax given the ones before it)."""
  logp_BxAxV = jax.nn.log_softmax(logits_BxAxV.astype(jnp.float32), axis=-1)
  logp_BxA = jnp.take_along_axis(logp_BxAxV, target_BxA[..., None], axis=-1)[..., 0]
  hit_BxA = (logits_BxAxV.argmax(-1) == target_BxA) | (amask_BxA == 0)
  return (logp_BxA * amask_BxA).sum(-1), hit_BxA.all(-1)


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg", "lens"))
def _answer_logprob(params, cfg: ModelConfig, tokens_BxT, mask_BxT, where_BxA, target_BxA,
                    amask_BxA, tuned=None, lens: bool = False):
  """Σ log p(target) over answer tokens: [B], or [L + 1, B] from every layer (lens; through the
  `tuned` lens's translators when given). Logits are computed only at the A answer
  positions."""
  out = forward(params, cfg, tokens_BxT, mask_BxT, capture=("resid_pre",) if lens else (),
                return_logits=False)
  if lens:
    h_LxBxTxD = jnp.concatenate([out.captures["resid_pre"], out.residual[None]], axis=0)
  else:
    h_LxBxTxD = out.residual[None]
  h_LxBxAxD = jnp.take_along_axis(h_LxBxTxD, where_BxA[None, :, :, None], axis=2)
  if tuned is not None:
    L, B, A, D = h_LxBxAxD.shape
    t_LxBxAxD = translate(tuned, h_LxBxAxD[:-1].reshape(L - 1, B * A, D)).reshape(
        L - 1, B, A, D).astype(h_LxBxAxD.dtype)
    h_LxBxAxD = jnp.concatenate([t_LxBxAxD, h_LxBxAxD[-1:]], axis=0)

  res, greedy_LxB = jax.lax.map(
      lambda h_BxAxD: answer_logprob(unembed(params, cfg, h_BxAxD), target_BxA, amask_BxA),
      h_LxBxAxD)
  return (res if lens else res[0]), greedy_LxB[-1]


def score(model: Transformer, tokenizer, prompts: Sequence[str], answers: Sequence[str],
          batch_size: int = 64, lens: bool | TunedLens = False, return_greedy: bool = False):
  """Σ log p(answer | prompt) per pair, float32 [N] (or [L + 1, N] with lens=True, the logit
  lens, or lens=a TunedLens). return_greedy=True also returns bool [N]: greedy decoding from
  the prompt reproduces the answer's tokens (every answer token is the argmax given the ones
  before it — closed-book exact match). Pairs are sorted by length into power-of-two buckets
  so each (batch, length) compiles once."""
  tuned = lens if isinstance(lens, TunedLens) else None
  if tuned is not None:
    check_fits(tuned, model.cfg, "score")
  lens = lens is not False and lens is not None
  if len(prompts) != len(answers):
    raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
  enc = TokenIds(tokenizer)
  cfg = model.cfg
  seqs = []
  for i, (p, a) in enumerate(zip(prompts, answers)):
    p_ids, a_ids = answer_ids(enc, p, a, f"pair {i}")
    ids = p_ids + a_ids
    if len(ids) > cfg.max_seq_len:
      raise ValueError(f"pair {i}: prompt + answer is {len(ids)} tokens, longer than the "
                       f"model's context of {cfg.max_seq_len}")
    seqs.append((ids, len(p_ids), len(a_ids)))
  n_out = cfg.n_layers + 1 if lens else 1
  out = np.zeros((n_out, len(seqs)), np.float32)
  greedy = np.zeros(len(seqs), bool)
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
  params = model.params()
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    T_ = _bucket(max(len(seqs[i][0]) for i in idx))
    A = _bucket(max(seqs[i][2] for i in idx), minimum=4)
    B = batch_size if len(order) > batch_size else _bucket(len(idx), minimum=1)
    tokens = np.zeros((B, T_), np.int32)
    mask = np.zeros((B, T_), bool)
    where = np.zeros((B, A), np.int32)
    target = np.zeros((B, A), np.int32)
    amask = np.zeros((B, A), np.float32)
    for r, i in enumerate(idx):
      ids, n_p, n_a = seqs[i]
      tokens[r, :len(ids)] = ids
      mask[r, :len(ids)] = True
      where[r, :n_a] = np.arange(n_p - 1, n_p - 1 + n_a)   # position predicting answer token j
      target[r, :n_a] = ids[n_p:]
      amask[r, :n_a] = 1.0
    res, hit = _answer_logprob(params, cfg, tokens, mask, where, target, amask, tuned,
                               lens=lens)
    out[:, idx] = np.asarray(res).reshape(n_out, B)[:, :len(idx)]
    greedy[idx] = np.asarray(hit)[:len(idx)]
  out = out if lens else out[0]
  return (out, greedy) if return_greedy else out


def preference(model: Transformer, tokenizer, items: Sequence[FactItem],
               kinds: Sequence[str] = KINDS, batch_size: int = 64,
               lens: bool | TunedLens = False,
               question_format: str = T.QUESTION_FORMAT) -> dict[str, np.ndarray]:
  """A table (dict of equal-length columns; `pandas.DataFrame(table)` opens it) with one row
  per (item, prompt): item, kind, variant, prompt, true, cf, logp_true, logp_cf, dll, correct
  (greedy decoding gives the true answer: closed-book accuracy); with
  lens=True also dll_layers [rows, L + 1] (layer 0 = embeddings, L = the output) by the logit
  lens, or by a tuned lens when lens=TunedLens (`factflip.probes.tuned_lens`)."""
  lens_on = lens is not False and lens is not None
  rows = prompt_rows(items, kinds, question_format)
  if not rows:
    raise ValueError("no prompts to score (items need answers and a counterfactual)")
  prompts = [r["prompt"] for r in rows]
  lt, greedy = score(model, tokenizer, prompts, [r["true"] for r in rows], batch_size, lens,
                     return_greedy=True)
  lc = score(model, tokenizer, prompts, [r["cf"] for r in rows], batch_size, lens)
  table = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
  if lens_on:
    table["dll_layers"] = (lt - lc).T
    lt, lc = lt[-1], lc[-1]
  table.update(logp_true=lt, logp_cf=lc, dll=lt - lc, correct=greedy)
  return table


def states(dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """+1 correct (ΔLL > τ), −1 counterfactual (ΔLL < −τ), 0 ambiguous; int8, same shape."""
  dll = np.asarray(dll)
  return np.where(dll > tau, CORRECT, np.where(dll < -tau, COUNTERFACTUAL, AMBIGUOUS)).astype(
      np.int8)


def flip_rate(reference_dll: np.ndarray, dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """Share of items correct at the reference that are counterfactual now, over the last axis.
  dll: [..., items] (e.g. [checkpoints, items] or [checkpoints, layers, items]); the reference
  broadcasts against it (e.g. [items], or [layers, items] for a per-layer reference). NaN
  where no item was correct at the reference. The one definition every table uses."""
  ref = states(reference_dll, tau) == CORRECT
  now = states(dll, tau) == COUNTERFACTUAL
  ref = np.broadcast_to(ref, np.broadcast_shapes(ref.shape, now.shape))
  n = ref.sum(-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(n > 0, (now & ref).sum(-1) / np.maximum(n, 1), np.nan)


def ambiguity_rate(dll: np.ndarray, tau: float = 0.5) -> np.ndarray:
  """Share of items ambiguous, over the last axis."""
  return (states(dll, tau) == AMBIGUOUS).mean(-1)


def first_flip(reference_dll: np.ndarray, dll_CxN: np.ndarray, steps: Sequence[int],
               tau: float = 0.5) -> np.ndarray:
  """Per item, the first checkpoint step at which an item correct at the reference is
  counterfactual; −1 if it never flips (or was not correct at the reference)."""
  ref = states(reference_dll, tau) == CORRECT
  flipped_CxN = (states(dll_CxN, tau) == COUNTERFACTUAL) & ref[None]
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
