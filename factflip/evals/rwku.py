"""RWKU's forget and neighbour probes: ROUGE-L recall of greedy answers at each level.

Owns: `rwku_prompt` (RWKU's prompt per level and adversarial type), `rouge_l_recall` and
`rwku_probe` (generate, score, one row per probe and the mean per set and level).
Must not: generate by itself (`evals.generation`) or read RWKU's files (`data.loaders.load_rwku`
gives FactItems with meta level and type).

Protocol (RWKU `LLaMA-Factory/src/llmtuner/eval/eval_forget.py` / `eval_neighbor.py`): the user
message is "Please complete the blank in the following question.\\nQuestion: {query}\\n" for
level 1 and "Please briefly answer the following question.\\nQuestion: {query}\\n" for levels
2 and 3 (level-3 "affirmative suffix" probes: no trailing newline and no "Answer:"; "incontext
learning" probes: "Please briefly answer the following question.\\n{query}\\n"); it goes through
the tokenizer's chat template with the generation prompt when the tokenizer has one (`chat`),
and "Answer:" is appended. Greedy decoding of 30 new tokens, stopped at EOS or a newline; the
answer is stripped, an empty one becomes "NOANSWER". Score: ROUGE-L recall of the answer
against the reference from the `rouge` package (pltrdy/rouge 1.0.1, the implementation RWKU
imports: `Rouge().get_scores(hyps, refs, avg=True)["rouge-l"]["r"]`; whitespace tokens,
sentences split at ".", summary-level LCS, no lowercasing or stemming). The optional `evals`
extra installs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from factflip.data.facts import FactItem

COMPLETE = "Please complete the blank in the following question.\nQuestion: {}\n"
ANSWER = "Please briefly answer the following question.\nQuestion: {}\n"
MAX_NEW_TOKENS = 30


def rwku_prompt(level: int, query: str, kind: str = "", tokenizer=None, chat: bool = True
                ) -> str:
  """RWKU's prompt for a probe of `level` (1, 2, 3) and level-3 `kind` (its "type" field)."""
  if level == 1:
    message, answer = COMPLETE.format(query), True
  elif level in (2, 3):
    message, answer = ANSWER.format(query), True
    if level == 3 and kind == "affirmative suffix":
      message, answer = "Please briefly answer the following question.\nQuestion: " + query, False
    elif level == 3 and kind == "incontext learning":
      message = f"Please briefly answer the following question.\n{query}\n"
  else:
    raise ValueError(f"level {level!r}; expected 1, 2 or 3")
  if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
    message = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                            tokenize=False, add_generation_prompt=True)
  return message + "Answer:" if answer else message


def _rouge():
  try:
    from rouge import Rouge
  except ImportError as e:
    raise ImportError("RWKU's ROUGE-L needs the `rouge` package (pip install "
                      "'factflip[evals]', or rouge==1.0.1)") from e
  return Rouge()


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str],
                   names: Sequence[str] | None = None) -> np.ndarray:
  """ROUGE-L recall of each prediction against its reference (the `rouge` package, per pair;
  RWKU's avg=True is the mean of these). An empty prediction scores as "NOANSWER"."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
  r = _rouge()
  out = np.zeros(len(predictions))
  for i, (p, ref) in enumerate(zip(predictions, references)):
    if not ref.strip() or not ref.replace(".", "").strip():
      where = names[i] if names is not None else f"pair {i}"
      raise ValueError(f"{where}: empty reference answer {ref!r}")
    out[i] = r.get_scores(hyps=[p.strip() or "NOANSWER"], refs=[ref])[0]["rouge-l"]["r"]
  return out


def rwku_probe(model, tokenizer, items: Sequence[FactItem], chat: bool = True,
               batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
  """Greedy answers to RWKU probes (FactItems from `load_rwku`: question = query, meta level
  and type), one row each: item, set (forget / neighbour), level, type, prompt, prediction,
  answer, rouge_l_recall."""
  from factflip.evals.generation import generate_until
  prompts = []
  for f in items:
    level = f.meta.get("level")
    if level not in (1, 2, 3) or not f.question:
      raise ValueError(f"{f.id}: meta level {level!r} and question {f.question!r}; expected "
                       "an RWKU probe (level 1-3 and a query)")
    prompts.append(rwku_prompt(level, f.question, f.meta.get("type") or "", tokenizer, chat))
  preds = [p[0].strip() or "NOANSWER" for p in generate_until(
      model, tokenizer, prompts, until=("\n",), max_new_tokens=max_new_tokens,
      batch_size=batch_size)]
  scores = rouge_l_recall(preds, [f.answers[0] for f in items], [f.id for f in items])
  return [{"item": f.id, "set": f.split, "level": f.meta["level"],
           "type": f.meta.get("type") or "", "prompt": p, "prediction": pred,
           "answer": f.answers[0], "rouge_l_recall": float(s)}
          for f, p, pred, s in zip(items, prompts, preds, scores)]
