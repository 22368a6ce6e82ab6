"""Multiple-choice scoring, lm-evaluation-harness compatible (SCIENCE.md "Multiple-choice
scoring"; lm-eval 0.4 `output_type: multiple_choice`).

Owns: `MCQuestion`, `score_choices` (one log-likelihood request per choice, through the one
scorer: a question's context is computed once for all its choices), `mc_metrics` (acc,
acc_norm and their standard errors) and `mean_stderr`.
Must not: tokenise or run models itself (`evals.loglik`).

Definitions (lm-eval): LL_i = Σ log p(delimiter + choice_i | context) with target delimiter " "
by default; acc = 1[argmax_i LL_i = gold]; acc_norm = 1[argmax_i LL_i / len(choice_i) = gold]
with len in characters of the choice itself (without the delimiter: lm-eval's
`len(doc_to_choice(doc)[i])`); ties go to the first choice (numpy argmax, as lm-eval); stderr of a
mean of per-question 0/1 scores = sqrt(sample variance (ddof 1) / n), lm-eval's
`mean_stderr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from factflip.data.facts import MCQuestion
from factflip.evals.requests import loglikelihood


def _check(q: MCQuestion, i: int) -> str:
  where = q.id or f"question {i}"
  if len(q.choices) < 2:
    raise ValueError(f"{where}: {len(q.choices)} choices; expected at least 2")
  if not 0 <= q.gold < len(q.choices):
    raise ValueError(f"{where}: gold {q.gold}; expected an index into its "
                     f"{len(q.choices)} choices")
  for j, c in enumerate(q.choices):
    if not c.strip():
      raise ValueError(f"{where}: choice {j} {c!r} is empty")
  return where


def score_choices(model, tokenizer, questions: Sequence[MCQuestion], delimiter: str = " ",
                  batch_size: int = 64) -> list[np.ndarray]:
  """LL_i of every choice of every question: [questions] arrays of [choices] float64."""
  reqs, names = [], []
  for i, q in enumerate(questions):
    where = _check(q, i)
    for j, c in enumerate(q.choices):
      reqs.append((q.context, delimiter + c))
      names.append(f"{where} choice {j}")
  try:
    ll = loglikelihood(model, tokenizer, reqs, batch_size).logprob
  except ValueError as e:          # name the question and choice, not the request number
    msg = str(e)
    if msg.startswith("request "):
      k = int(msg.split()[1].rstrip(":"))
      msg = names[k] + msg[msg.index(":"):]
    raise ValueError(msg) from None
  out, k = [], 0
  for q in questions:
    out.append(ll[k:k + len(q.choices)])
    k += len(q.choices)
  return out


def mean_stderr(x: Sequence[float]) -> float:
  """sqrt(var(x, ddof=1) / n) (lm-eval's `mean_stderr`); NaN for fewer than 2 values."""
  x = np.asarray(x, np.float64)
  return float(math.sqrt(x.var(ddof=1) / len(x))) if len(x) > 1 else float("nan")


def mc_metrics(questions: Sequence[MCQuestion], lls: Sequence[np.ndarray]) -> dict[str, Any]:
  """acc, acc_stderr, acc_norm, acc_norm_stderr over the questions, and per-question rows
  under "rows" (pred, pred_norm, acc, acc_norm)."""
  acc, norm, rows = [], [], []
  for q, ll in zip(questions, lls):
    lengths = np.asarray([len(c) for c in q.choices], np.float64)
    pred, pred_n = int(np.argmax(ll)), int(np.argmax(ll / lengths))
    acc.append(float(pred == q.gold))
    norm.append(float(pred_n == q.gold))
    rows.append({"id": q.id, "gold": q.gold, "pred": pred, "pred_norm": pred_n,
                 "acc": acc[-1], "acc_norm": norm[-1]})
  return {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc),
          "acc_norm": float(np.mean(norm)), "acc_norm_stderr": mean_stderr(norm), "rows": rows}
