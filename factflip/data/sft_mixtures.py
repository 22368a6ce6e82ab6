"""SFT knowledge mixtures: |D| examples with a chosen share of Unknown facts, per SliCK
category (paper B), as text examples (`data.mixtures`' example form).

Owns: `sft_mixture` and its config (`SFTConfig`), the knowledge categories (`CATEGORIES`,
`KNOWN`, `UNKNOWN`, `NATURAL`).
Must not: categorise facts (`probes.slick`) or tokenise (`data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem
from factflip.data.mixtures import render_qa

KNOWN = ("HighlyKnown", "MaybeKnown", "WeaklyKnown")
UNKNOWN = "Unknown"
CATEGORIES = (*KNOWN, UNKNOWN)
NATURAL = "Natural"   # SFTConfig.category: the categories in their natural proportions


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """size: |D|. unknown_share: X, the exact share of Unknown examples (sampled per relation).
  category: a single category to draw all of |D| from (overrides unknown_share), or NATURAL:
  |D| drawn from every categorised item whatever its category (D_Natural).
  idk: relabel the Unknown examples' answers as the refusal ("I don't know.").
  prompt_kind: "question" (question_format) or "prompt" (cloze). answer_end: appended to
  every trained answer that does not already end with it ("." where the corpus writes
  "A: Paris.")."""
  size: int
  unknown_share: float = 0.0
  category: str | None = None
  idk: bool = False
  prompt_kind: str = "question"
  question_format: str = T.QUESTION_FORMAT
  refusal: str = T.REFUSALS["en"]
  answer_end: str = ""
  seed: int = 0


def _split_even(total: int, capacity: Mapping[str, int], what: str) -> dict[str, int]:
  """Split `total` over keys as evenly as capacities allow (deterministic, sums to total)."""
  if total > sum(capacity.values()):
    raise ValueError(f"{what}: need {total} items but only {sum(capacity.values())} are "
                     f"available ({dict(capacity)})")
  out = dict.fromkeys(capacity, 0)
  left = total
  while left:
    open_keys = sorted(k for k in capacity if out[k] < capacity[k])
    share, extra = divmod(left, len(open_keys))
    for j, k in enumerate(open_keys):
      add = min(share + (j < extra), capacity[k] - out[k])
      out[k] += add
      left -= add
  return out


def sft_mixture(items: Sequence[FactItem], cfg: SFTConfig,
                category_of: Callable[[FactItem], str | None] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """A fixed-size SFT set with exactly round(X·|D|) Unknown examples, X applied per relation.

  Categories come from `category_of(item)` (default: `item.category`, which the SliCK probe
  fills); items without one are not eligible. |D| is split evenly over the relations that can
  supply it; within each relation exactly round(X·n_r) examples are Unknown (largest remainder,
  so the total is exact); a relation supplies at most as many examples as its Known and
  Unknown items allow at share X. Returns (examples in a seeded order, statistics)."""
  category_of = category_of or (lambda it: it.category)
  rng = np.random.default_rng([cfg.seed, 2])
  pools: dict[tuple[str, str], list[FactItem]] = defaultdict(list)
  for it in items:
    c = category_of(it)
    if c is None:
      continue
    if c not in CATEGORIES:
      raise ValueError(f"sft_mixture: item {it.id!r} has category {c!r}; expected one of "
                       f"{CATEGORIES}")
    if cfg.category == NATURAL:
      pools[(it.relation, NATURAL)].append(it)
    elif cfg.category is not None:
      if c == cfg.category:
        pools[(it.relation, c)].append(it)
    else:
      pools[(it.relation, UNKNOWN if c == UNKNOWN else "Known")].append(it)
  for pool in pools.values():
    pool[:] = [pool[i] for i in rng.permutation(len(pool))]
  if cfg.category is not None:
    if cfg.category not in (*CATEGORIES, NATURAL):
      raise ValueError(f"SFTConfig.category: {cfg.category!r} is not one of "
                       f"{(*CATEGORIES, NATURAL)}")
    groups = {(rel, c): len(p) for (rel, c), p in pools.items()}
    counts = _split_even(cfg.size, groups, f"sft_mixture({cfg.category})")
  else:
    if not 0 <= cfg.unknown_share <= 1:
      raise ValueError(f"SFTConfig.unknown_share: {cfg.unknown_share} is not in [0, 1]")
    relations = sorted({rel for rel, _ in pools})
    n_unknown = round(cfg.unknown_share * cfg.size)
    if not math.isclose(n_unknown, cfg.unknown_share * cfg.size, abs_tol=1e-9):
      raise ValueError(f"SFTConfig: unknown_share {cfg.unknown_share} x size {cfg.size} is not "
                       "a whole number of examples")
    x = cfg.unknown_share

    def capacity(rel: str) -> int:   # the most examples rel supplies with X of them Unknown
      unk, kn = len(pools[(rel, UNKNOWN)]), len(pools[(rel, "Known")])
      return min(math.floor(unk / x + 1e-9) if x > 0 else unk + kn,
                 math.floor(kn / (1 - x) + 1e-9) if x < 1 else unk + kn)
    cap = {rel: capacity(rel) for rel in relations}
    # Even per-relation sizes (as capacities allow), then per relation exactly X of them
    # Unknown (largest remainder).
    per_rel = _split_even(cfg.size, cap, "sft_mixture")
    raw = {rel: cfg.unknown_share * per_rel[rel] for rel in relations}
    unk = {rel: math.floor(raw[rel]) for rel in relations}
    for rel in sorted(relations, key=lambda r: -(raw[r] - unk[r]))[: n_unknown - sum(unk.values())]:
      unk[rel] += 1
    counts = {}
    for rel in relations:
      counts[(rel, UNKNOWN)] = unk[rel]
      counts[(rel, "Known")] = per_rel[rel] - unk[rel]
      for c in (UNKNOWN, "Known"):
        if counts[(rel, c)] > len(pools[(rel, c)]):
          raise ValueError(f"sft_mixture: relation {rel!r} needs {counts[(rel, c)]} {c} items "
                           f"but has {len(pools[(rel, c)])}; lower size or unknown_share")
  examples = []
  for (rel, c), k in sorted(counts.items()):
    for it in pools[(rel, c)][:k]:
      cat = category_of(it)
      relabel = cfg.idk and cat == UNKNOWN
      answer = cfg.refusal if relabel else it.answers[0]
      if cfg.answer_end and not answer.endswith(cfg.answer_end):
        answer += cfg.answer_end
      examples.append({"segments": render_qa(it, answer, cfg.prompt_kind, cfg.question_format),
                       "kind": "sft", "fact": it.id, "relation": rel, "category": cat,
                       "idk": relabel})
  examples = [examples[i] for i in rng.permutation(len(examples))]
  by_cat = Counter(e["category"] for e in examples)
  stats = {
      "kind": "sft", "config": dataclasses.asdict(cfg), "size": len(examples),
      "unknown_share_configured": None if cfg.category else cfg.unknown_share,
      "unknown_share_realised": by_cat[UNKNOWN] / max(len(examples), 1),
      "per_category": dict(sorted(by_cat.items())),
      "per_relation": {rel: dict(sorted(Counter(e["category"] for e in examples
                                                if e["relation"] == rel).items()))
                       for rel in sorted({e["relation"] for e in examples})},
      "idk_relabelled": sum(e["idk"] for e in examples),
  }
  return examples, stats
