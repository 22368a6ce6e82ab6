"""Evaluation sets built from facts: what a model is asked beside what it is trained on.

Owns: `utility_questions` (multiple choice on facts a run does not target, and their held-out
texts), `unseen_questions` (a world's never-mentioned facts and made-up people: the
hallucination-spillover questions), `unmentioned_split` (never-mentioned facts for an
alignment stage vs held out for spillover), `statement` (a fact as a membership-inference text) and
`rwku_forget_set` (RWKU's chosen targets, their probes and MIA texts).
Must not: score anything (`factflip.evals` does) or know a study's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from factflip.data.facts import FactItem, MCQuestion
from factflip.data.world import World, made_up_questions
from factflip.fileio import DataError


def statement(f: FactItem) -> str:
  """The fact as a sentence: its cloze prompt (or question) and true answer."""
  return f"{f.prompt or f.question} {f.answers[0]}."


def utility_questions(pool: Sequence[FactItem], objects_from: Sequence[FactItem], n: int,
                      k: int, rng: np.random.Generator) -> tuple[list[MCQuestion], list[str]]:
  """(n multiple-choice questions on facts of `pool` — the cloze prompt, the truth among k − 1
  other objects of its relation drawn from `objects_from`'s answers —, held-out texts: their
  first paraphrase with the true answer). Only facts whose relation has k distinct objects are
  asked; a ValueError when none has."""
  objects: dict[str, list[str]] = {}
  for f in objects_from:
    objects.setdefault(f.relation, [])
    if f.answers[0] not in objects[f.relation]:
      objects[f.relation].append(f.answers[0])
  asked = [f for f in pool if len(objects[f.relation]) >= k]
  if not asked:
    raise ValueError(f"no utility questions: no non-target facts with {k} distinct objects "
                     "in their relation (lower eval.mc_choices)")
  questions, heldout = [], []
  for i in sorted(rng.choice(len(asked), min(n, len(asked)), replace=False)):
    f = asked[i]
    wrong = [o for o in objects[f.relation] if o != f.answers[0]]
    choices = [wrong[j] for j in rng.choice(len(wrong), k - 1, replace=False)]
    gold = int(rng.integers(k))
    choices.insert(gold, f.answers[0])
    questions.append(MCQuestion(f.prompt, tuple(choices), gold, f.id))
    if f.paraphrases:
      heldout.append(f"{f.paraphrases[0]} {f.answers[0]}.")
  return questions, heldout


def unmentioned_split(world: World, share: float, seed: int
                      ) -> tuple[list[FactItem], list[FactItem]]:
  """The world's never-mentioned facts (exposure tier "none") cut in two by a permutation
  seeded with `seed`: floor(share · n) for an alignment stage to abstain on, and the rest,
  held out (the spillover questions draw from these only). Each part keeps the world's
  order."""
  pool = [f for f in world.facts if f.meta.get("exposure_tier") == "none"
          and not f.meta.get("two_hop")]
  order = np.random.default_rng([seed, 13]).permutation(len(pool))
  cut = set(order[:int(share * len(pool))].tolist())
  return ([f for i, f in enumerate(pool) if i in cut],
          [f for i, f in enumerate(pool) if i not in cut])


def unseen_questions(world: World, n_unseen: int, n_made_up: int, rng: np.random.Generator,
                     seed: int, asked: Callable[[list[FactItem]], list[FactItem]] = list,
                     held_out_share: float = 0.0) -> list[FactItem]:
  """Questions a world's models never saw the answer to: n_unseen of its never-mentioned facts
  (exposure tier "none"; `asked` renders them as the study asks; with `held_out_share` > 0 only
  among those `unmentioned_split(world, held_out_share, seed)` holds out) and n_made_up about
  people who do not exist (`made_up_questions`: every answer but an abstention is a
  hallucination)."""
  pool = unmentioned_split(world, held_out_share, seed)[1]
  pick = sorted(rng.choice(len(pool), min(n_unseen, len(pool)), replace=False))
  return asked([pool[i] for i in pick]) + made_up_questions(world, n_made_up, seed)


def rwku_forget_set(items: Sequence[FactItem], mia: Mapping[str, Mapping[str, list[str]]],
                    n: int, path: str) -> dict[str, Any]:
  """RWKU's first n targets of a Target folder (`path`, its order): {"targets": names,
  "probes": every probe of theirs (levels 1–3, forget and neighbour), "mia": their forget /
  retain MIA texts, "train": the level-1 and level-2 forget probes}; a DataError when the
  folder has fewer targets, or a chosen target no MIA texts."""
  rwku = [f for f in items if f.source == "rwku"]
  targets = list(dict.fromkeys(f.meta["target"] for f in rwku))
  if len(targets) < n:
    raise DataError(path, f"{len(targets)} RWKU targets, fewer than forget.n_targets {n} "
                    "(forget.source 'rwku' reads RWKU's Target folder: <N>_<Name>/"
                    "forget_level*.json, neighbor_level*.json)")
  chosen = targets[:n]
  probes = [f for f in rwku if f.meta["target"] in chosen]
  missing = [t for t in chosen if not (mia.get(t, {}).get("forget")
                                       and mia.get(t, {}).get("retain"))]
  if missing:
    raise DataError(path, f"no forget_mia.json / retain_mia.json texts for RWKU targets "
                    f"{missing}")
  return {"targets": chosen, "probes": probes, "mia": {t: mia[t] for t in chosen},
          "train": [f for f in probes if f.split == "forget" and f.meta["level"] in (1, 2)]}
