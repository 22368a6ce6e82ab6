"""Unlearning sets (paper D): forget examples (counterfactual, refusal or true answers, in
consistent or inconsistent corpora), retain examples, and DPO preference pairs.

Owns: `unlearning_sets` and its config (`UnlearnConfig`), the forget renderings (`RENDERS`,
`renderings`), `alignment_set` (answer the known, abstain on the unknown: the instruct stage a
world base goes through before unlearning) and `preference_pairs`.
Must not: tokenise (`data.pipeline`) or choose the forget facts (the study does).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem, normalise_answer
from factflip.data.mixtures import answer_segment, render_qa

# How a forget fact is written into the forget set. "prompt" / "question" are the probes' own
# level-1 cloze and level-2 question; "restatement" (the relation's other training templates as
# cloze prompts) and "rephrased_question" (its question templates after the probed one and the
# held-out one) are world renderings no probe asks: a forget corpus that is not the probe set,
# as RWKU's is not.
RENDERS = ("prompt", "question", "restatement", "rephrased_question")


def renderings(item: FactItem, kind: str, question_format: str = T.QUESTION_FORMAT
               ) -> list[str]:
  """The contexts (what precedes the trained answer) of one fact for render `kind`; [] when
  the item has nothing to render (no prompt, no question). "restatement" and
  "rephrased_question" read the world's templates of the item's relation and language."""
  if kind not in RENDERS:
    raise ValueError(f"render {kind!r}; expected one of {RENDERS}")
  if kind in ("prompt", "question"):
    if getattr(item, kind) is None:
      return []
    return [render_qa(item, "", kind, question_format)[0][0]]
  relation = T.RELATIONS.get(item.relation or "")
  if item.source != "factworld" or relation is None or not item.subject:
    raise ValueError(f"{item.id}: render {kind!r} needs a fact of the embedded world (its "
                     "relation's templates); facts from a file have 'prompt' and 'question'")
  lang = item.language or "en"
  if kind == "restatement":
    return [T.cloze(t, item.subject) for t in relation.train[lang][1:]]
  return [question_format.replace("{Q}", q.replace("{s}", item.subject))
          for q in relation.question[lang][2:]]


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
  """target: what the forget set's answers say: "counterfactual" (CFT), "refusal" (IDK tuning)
  or "truth" (the text gradient ascent / NPO push down).
  consistency: "consistent" = every rendering of a (subject, relation) states one counterfactual;
  "inconsistent" = each rendering of a (subject, relation) states a different counterfactual, so
  the forget set contradicts itself. renders: how each forget item is written (`RENDERS`; each
  context of each render one example)."""
  target: str = "counterfactual"
  consistency: str = "consistent"
  renders: tuple[str, ...] = ("prompt", "question")
  question_format: str = T.QUESTION_FORMAT
  refusal: str = T.REFUSALS["en"]
  seed: int = 0


def unlearning_sets(forget: Sequence[FactItem], retain: Sequence[FactItem],
                    cfg: UnlearnConfig = UnlearnConfig(),
                    candidates: Sequence[FactItem] | None = None
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
  """{"forget", "retain", "neighbour"} example lists and statistics.

  Counterfactual objects: an item's own `counterfactual` first; otherwise (and for the extra ones
  an inconsistent set needs) answers and counterfactuals of the same relation among `candidates`
  (default: forget + retain), never equal to the truth. retain: retain items with their true answers. neighbour: forget
  items' neighbourhood prompts with their true answers (must not change)."""
  if cfg.target not in ("counterfactual", "refusal", "truth"):
    raise ValueError(f"UnlearnConfig.target: {cfg.target!r}; expected counterfactual, refusal "
                     "or truth")
  if cfg.consistency not in ("consistent", "inconsistent"):
    raise ValueError(f"UnlearnConfig.consistency: {cfg.consistency!r}; expected consistent or "
                     "inconsistent")
  forget_ids = {it.id for it in forget}
  overlap = forget_ids & {it.id for it in retain}
  if overlap:
    raise ValueError(f"unlearning_sets: {len(overlap)} items are in both forget and retain, "
                     f"e.g. {min(overlap)!r}")
  rng = np.random.default_rng([cfg.seed, 3])
  pool: dict[str, list[str]] = defaultdict(list)
  for it in (candidates if candidates is not None else (*forget, *retain)):
    for a in (*it.answers[:1], *([it.counterfactual] if it.counterfactual else [])):
      if a not in pool[it.relation]:
        pool[it.relation].append(a)

  def draw(item: FactItem, exclude: set[str]) -> str:
    truth = {normalise_answer(a) for a in item.answers}
    choices = [a for a in pool[item.relation]
               if normalise_answer(a) not in truth and a not in exclude]
    if not choices:
      raise ValueError(f"unlearning_sets: no counterfactual object left for {item.id!r} "
                       f"(relation {item.relation!r} has too few distinct answers)")
    return choices[int(rng.integers(len(choices)))]

  forget_ex = []
  group_cf: dict[tuple, list[str]] = defaultdict(list)
  for it in forget:
    for kind, context in ((k, c) for k in cfg.renders
                          for c in renderings(it, k, cfg.question_format)):
      group = (it.subject, it.relation)
      if cfg.target == "truth":
        answer = it.answers[0]
      elif cfg.target == "refusal":
        answer = cfg.refusal
      elif cfg.consistency == "consistent":
        if not group_cf[group]:
          group_cf[group].append(it.counterfactual or draw(it, set()))
        answer = group_cf[group][0]
      else:
        used = set(group_cf[group])
        answer = (it.counterfactual if it.counterfactual and it.counterfactual not in used
                  else draw(it, used))
        group_cf[group].append(answer)
      forget_ex.append({"segments": ((context, False), (answer_segment(answer), True)),
                        "kind": "forget", "fact": it.id, "render": kind, "answer": answer})
  retain_ex = [{"segments": render_qa(it, it.answers[0], "question", cfg.question_format),
                "kind": "retain", "fact": it.id} for it in retain]
  neighbour_ex = [{"segments": ((n.prompt, False), (answer_segment(n.answers[0]), True)),
                   "kind": "neighbour", "fact": it.id}
                  for it in forget for n in it.neighbours]
  stats = {
      "kind": "unlearning", "config": dataclasses.asdict(cfg),
      "forget_items": len(forget), "forget": len(forget_ex), "retain": len(retain_ex),
      "neighbour": len(neighbour_ex),
      "distinct_counterfactuals_per_group": (
          float(np.mean([len(set(v)) for v in group_cf.values()])) if group_cf else 0.0),
  }
  return {"forget": forget_ex, "retain": retain_ex, "neighbour": neighbour_ex}, stats


def alignment_set(known: Sequence[FactItem], unknown: Sequence[FactItem],
                  question_format: str = T.QUESTION_FORMAT,
                  refusal: str = T.REFUSALS["en"]) -> list[dict[str, Any]]:
  """The instruct stage's examples: each `known` fact's question answered with its true
  object, each `unknown` one (never-mentioned facts, made-up people) answered with `refusal`;
  {"segments", "fact", "answer"} in that order (the training loop shuffles)."""
  out = []
  for items, answers in ((known, None), (unknown, refusal)):
    for it in items:
      if not it.question:
        raise ValueError(f"{it.id}: alignment asks questions; the item has none")
      answer = answers or it.answers[0]
      out.append({"segments": render_qa(it, answer, "question", question_format),
                  "fact": it.id, "answer": answer})
  return out


def preference_pairs(forget_examples: Sequence[Mapping[str, Any]],
                     items: Sequence[FactItem]) -> list[dict[str, str]]:
  """DPO records {"prompt", "chosen", "rejected", "fact"} from `unlearning_sets`' forget
  examples (target counterfactual or refusal): the example's answer preferred over the fact's
  true answer in the same prompt (the training loop's `objective.name = "dpo"` reads them)."""
  by_id = {it.id: it for it in items}
  out = []
  for e in forget_examples:
    (prompt, _), (chosen, _) = e["segments"]
    truth = answer_segment(by_id[e["fact"]].answers[0])
    if normalise_answer(chosen) == normalise_answer(truth):
      raise ValueError(f"preference_pairs: {e['fact']!r} prefers its own true answer; build "
                       "the forget set with target counterfactual or refusal")
    out.append({"prompt": prompt, "chosen": chosen, "rejected": truth, "fact": e["fact"]})
  return out
