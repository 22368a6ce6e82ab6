"""Closed-book question answering: normalised exact match against any alias, token F1, k-shot
prompts from a dev split of the same relation, and abstention ("I don't know") detection.

Owns: `normalize_answer`, `exact_match`, `token_f1`, `is_abstention`, `outcome`, `few_shot_prompt`
(`with_end`), `chat_prompt`,
`draw_exemplars`, `closed_book_qa` (generate and score a list of facts), `closed_book_cloze`
(the same for cloze prompts), `few_shot_cloze` (a k-shot prompt of statements) and
`qa_summary`.
Must not: generate by itself (`evals.generation`) or know which study asks.

Definitions:
- normalize_answer (SQuAD's evaluation script, as EntityQuestions and SliCK use it): lowercase,
  remove punctuation, remove the articles a / an / the, collapse whitespace.
- exact_match(prediction, aliases) = 1 if the normalised prediction equals any normalised alias.
- token_f1(prediction, aliases) = max over aliases of the F1 of the normalised tokens' multiset
  overlap (SQuAD); 0 when either side has no tokens (1 when both have none).
- abstention: the normalised prediction is empty or starts with one of `ABSTAIN` (normalised
  phrases such as "i dont know", "unknown", "no answer"); an abstaining answer is neither right
  nor wrong. outcome ∈ {right, wrong, abstained}; the hallucination rate (SCIENCE.md D: the
  share of non-abstaining wrong answers) = wrong / all; the abstention rate = abstained / all;
  the error rate when answering = wrong / (right + wrong).
- k-shot prompt: k exemplars "Q: <question>\\nA: <answer>\\n\\n" from the dev split of the same
  relation (never the fact itself), then "Q: <question>\\nA:"; the model's answer is its greedy
  (or sampled) continuation up to the first newline.
- chat (an instruct model, `closed_book_qa(chat=True)` with a tokenizer that has a chat
  template): each exemplar a user turn (its question) and an assistant turn (its answer), then
  the question as the user turn, through the model's chat template with the generation prompt
  (lm-eval's `--apply_chat_template --fewshot_as_multiturn`).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

from factflip.data.facts import FactItem
from factflip.evals.generation import generate_until

ABSTAIN = ("i dont know", "i do not know", "dont know", "unknown", "no answer", "noanswer",
           "i am not sure", "im not sure", "not sure", "i cannot answer", "i cant answer",
           "cannot answer", "i have no idea", "no idea", "none",
           # an instruct model's refusals ("I'm sorry, but I don't have information on ...")
           "im sorry", "i am sorry", "sorry", "unfortunately", "i dont have", "i do not have",
           "i couldnt find", "i could not find", "i cannot provide", "i cant provide",
           "im not aware", "i am not aware", "im unable", "i am unable", "there is no information",
           "as an ai")
# Bumped when what closed-book QA returns for the same predictions changes (2: an instruct
# model's refusals count as abstentions, and `chat` asks through the chat template); stages
# that score QA outcomes put it among their keys.
QA_VERSION = 2
QA_FORMAT = "Q: {question}\nA:"
EXEMPLAR_FORMAT = "Q: {question}\nA: {answer}\n\n"
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _aliases(aliases: Sequence[str], where: str) -> list[str]:
  if isinstance(aliases, str) or not aliases:
    raise ValueError(f"{where}: answers {aliases!r}; expected a non-empty list of aliases")
  return list(aliases)


def exact_match(prediction: str, aliases: Sequence[str], where: str = "item") -> bool:
  p = normalize_answer(prediction)
  return any(p == normalize_answer(a) for a in _aliases(aliases, where))


def token_f1(prediction: str, aliases: Sequence[str], where: str = "item") -> float:
  p = normalize_answer(prediction).split()
  best = 0.0
  for a in _aliases(aliases, where):
    g = normalize_answer(a).split()
    if not p or not g:
      best = max(best, float(p == g))
      continue
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common:
      prec, rec = common / len(p), common / len(g)
      best = max(best, 2 * prec * rec / (prec + rec))
  return best


def is_abstention(prediction: str, phrases: Sequence[str] = ABSTAIN) -> bool:
  p = normalize_answer(prediction)
  return not p or any(p == a or p.startswith(a + " ") for a in phrases)


def outcome(prediction: str, aliases: Sequence[str], where: str = "item",
            phrases: Sequence[str] = ABSTAIN) -> str:
  """"right", "wrong" or "abstained" (an abstention that matches an alias counts as right)."""
  if exact_match(prediction, aliases, where):
    return "right"
  return "abstained" if is_abstention(prediction, phrases) else "wrong"


def draw_exemplars(item: FactItem, dev: Mapping[str, Sequence[FactItem]], k: int,
                   rng: np.random.Generator, field: str = "question") -> list[FactItem]:
  """k exemplars of the item's relation from `dev` (relation → facts) that have `field`
  ("question" or "prompt"), never the item itself (nor a fact with its subject and relation);
  an error when the relation has fewer."""
  pool = [f for f in dev.get(item.relation, ()) if f.id != item.id and getattr(f, field)
          and f.answers and f.subject != item.subject]
  if len(pool) < k:
    raise ValueError(f"{item.id}: {len(pool)} dev exemplars of relation {item.relation!r}, "
                     f"fewer than k = {k}")
  return [pool[i] for i in rng.choice(len(pool), k, replace=False)]


def with_end(answer: str, end: str) -> str:
  """`answer` ending with `end` (e.g. "." where a corpus writes "A: Paris."), not doubled."""
  return answer if not end or answer.endswith(end) else answer + end


def few_shot_prompt(item: FactItem, exemplars: Sequence[FactItem], answer_end: str = "") -> str:
  """The k-shot prompt; `answer_end` ends each exemplar's answer (the format the model saw)."""
  if not item.question:
    raise ValueError(f"{item.id}: no question to ask (field 'question')")
  shots = "".join(EXEMPLAR_FORMAT.format(question=e.question,
                                         answer=with_end(e.answers[0], answer_end))
                  for e in exemplars)
  return shots + QA_FORMAT.format(question=item.question)


def few_shot_cloze(item: FactItem, exemplars: Sequence[FactItem]) -> str:
  """The k-shot prompt in a corpus's own form: each exemplar's statement ("<cloze prompt>
  <answer>."), then the item's cloze prompt, joined by spaces as a document's sentences; the
  answer ends where a sentence would (`CLOZE_UNTIL`)."""
  if not item.prompt:
    raise ValueError(f"{item.id}: no cloze prompt (field 'prompt')")
  return " ".join([*(f"{e.prompt} {with_end(e.answers[0], '.')}" for e in exemplars),
                   item.prompt])


def by_relation(items: Sequence[FactItem]) -> dict[str, list[FactItem]]:
  out: dict[str, list[FactItem]] = {}
  for f in items:
    out.setdefault(f.relation, []).append(f)
  return out


def chat_prompt(tokenizer, item: FactItem, exemplars: Sequence[FactItem] = (),
                answer_end: str = "") -> str:
  """The k-shot prompt as a chat: exemplars as user / assistant turns, then the question,
  through the tokenizer's chat template with the generation prompt."""
  if not item.question:
    raise ValueError(f"{item.id}: no question to ask (field 'question')")
  turns = []
  for e in exemplars:
    turns += [{"role": "user", "content": e.question},
              {"role": "assistant", "content": with_end(e.answers[0], answer_end)}]
  turns.append({"role": "user", "content": item.question})
  return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def closed_book_qa(model, tokenizer, items: Sequence[FactItem], dev: Sequence[FactItem] = (),
                   k: int = 0, seed: int = 0, max_new_tokens: int = 16, batch_size: int = 32,
                   phrases: Sequence[str] = ABSTAIN, chat: bool = False) -> list[dict]:
  """Greedy answers to each item's question (k-shot with exemplars from `dev`, drawn with
  `seed`), cut at the first newline, scored: one row per item with item, relation, prompt,
  prediction, em, f1, outcome. chat=True asks through the tokenizer's chat template
  (`chat_prompt`) when it has one."""
  rng = np.random.default_rng(seed)
  pool = by_relation(dev)
  chat = chat and bool(getattr(tokenizer, "chat_template", None))
  prompts = []
  for f in items:
    _aliases(f.answers, f"{f.id}: field 'answers'")
    shots = draw_exemplars(f, pool, k, rng) if k else ()
    prompts.append(chat_prompt(tokenizer, f, shots) if chat else few_shot_prompt(f, shots))
  preds = generate_until(model, tokenizer, prompts, until=("\n",),
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
  rows = []
  for f, prompt, (pred,) in zip(items, prompts, preds):
    pred = pred.strip()
    rows.append({"item": f.id, "relation": f.relation, "prompt": prompt, "prediction": pred,
                 "em": exact_match(pred, f.answers), "f1": token_f1(pred, f.answers),
                 "outcome": outcome(pred, f.answers, f.id, phrases)})
  return rows


CLOZE_UNTIL = (".", "\n", ",", "!", " (", " #")


def closed_book_cloze(model, tokenizer, items: Sequence[FactItem], max_new_tokens: int = 12,
                      batch_size: int = 32) -> list[dict]:
  """Greedy completions of each item's cloze prompt (its statement cut before the object: "X
  was born in"), cut where a sentence of the corpus would end (`CLOZE_UNTIL`), scored by exact
  match: one row per item with item, relation, prediction, em. The knowledge a base holds in
  the form its corpus states it, whatever format it answers questions in."""
  for f in items:
    if not f.prompt:
      raise ValueError(f"{f.id}: no cloze prompt (field 'prompt')")
    _aliases(f.answers, f"{f.id}: field 'answers'")
  preds = generate_until(model, tokenizer, [f.prompt for f in items], until=CLOZE_UNTIL,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
  return [{"item": f.id, "relation": f.relation, "prediction": p.strip(),
           "em": exact_match(p.strip(), f.answers)} for f, (p,) in zip(items, preds)]


def qa_summary(outcomes: Sequence[str]) -> dict[str, float]:
  """Counts of right / wrong / abstained, accuracy (right / all), hallucination rate (wrong /
  all), abstention rate (abstained / all) and the error rate when answering (wrong / (right +
  wrong); NaN when nothing was answered)."""
  c = collections.Counter(outcomes)
  bad = set(c) - {"right", "wrong", "abstained"}
  if bad:
    raise ValueError(f"outcomes {sorted(bad)}; expected right, wrong or abstained")
  n, answered = len(outcomes), c["right"] + c["wrong"]
  nan = float("nan")
  return {"n": n, "right": c["right"], "wrong": c["wrong"], "abstained": c["abstained"],
          "accuracy": c["right"] / n if n else nan,
          "hallucination_rate": c["wrong"] / n if n else nan,
          "abstention_rate": c["abstained"] / n if n else nan,
          "answered_error_rate": c["wrong"] / answered if answered else nan}
