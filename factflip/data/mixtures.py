"""Mixtures: the controlled data of each study, as grain MapDatasets of text examples.

Owns: continual pretraining with poisoning (`poisoning_plan`, `cpt_source`), SFT knowledge
mixtures (`sft_mixture`), unlearning sets (`unlearning_sets`, DPO `preference_pairs`), the
text forms they share (`render_qa`, `mention_text`) and their statistics (`write_stats`).
Must not: tokenise, pack or batch (pipeline.py does), or read files (facts/world/loaders do).

An example is a dict: `segments`, a tuple of (text, trained) pairs whose concatenation is the
example's text and whose flag says whether its tokens carry loss; plus `kind` and metadata
(`fact`, `counterfactual`, `style`, `category`, ...) that statistics and tests read and the
pipeline drops.

Exact poisoning ratio. For T target facts with m mentions each per pass (N = T·m), exactly
K = p·N mentions state the counterfactual (K must be whole: the config is rejected otherwise, with
the nearest feasible mention counts). K is spread over facts as evenly as possible (each fact gets
floor(K/T) or one more, the extra ones chosen by the seed), styles cycle per fact so each fact's
mentions use the styles equally, and every pass is a fresh permutation of the same N mentions.
Replay documents are interleaved exactly R = round(N·w / (1 − w)) per pass (w = replay weight),
so every block of N + R consecutive examples holds one full pass: realised p = K / N exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem, normalise_answer
from factflip.fileio import write_json


def _answer_segment(answer: str) -> str:
  return answer if answer[:1].isspace() else " " + answer


def render_qa(item: FactItem, answer: str, kind: str = "question",
              question_format: str = T.QUESTION_FORMAT, language: str | None = None) -> tuple:
  """(prompt, trained answer) segments for an item: `kind` "question" uses the question in
  `question_format` (falls back to the cloze prompt when the item has no question), "prompt"
  the cloze prompt. `language` picks a translation."""
  src = item if language in (None, item.language) else item.translations[language]
  question, prompt = src.question, src.prompt
  if kind == "question" and question is not None:
    context = question_format.replace("{Q}", question)
  elif prompt is not None:
    context = prompt
  else:
    context = question_format.replace("{Q}", question)
  return ((context, False), (_answer_segment(answer), True))


# ---------------------------------------------------------------------------------------------
# Continual pretraining with poisoning.

INFINITE = 1 << 62  # the length of an endless stream (grain's repeat() reports sys.maxsize)


class _EpochPermutation:
  """Global index -> element index: epoch e = i // n reads a fresh seeded permutation of n."""

  def __init__(self, n: int, seed: int):
    self.n, self.seed = n, seed

  @functools.lru_cache(maxsize=4)  # noqa: B019 (a few epochs live at once; instances are few)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __call__(self, i: int) -> int:
    return int(self.permutation(i // self.n)[i % self.n])


def epoch_shuffled(n: int, seed: int) -> grain.MapDataset:
  """The infinite index stream 0..n-1, each pass in a new seeded order (random access, so
  grain can shard and checkpoint it; a numpy permutation per epoch is cheaper per element than
  grain's index_shuffle)."""
  return grain.MapDataset.range(INFINITE).map(_EpochPermutation(n, seed))

@dataclasses.dataclass(frozen=True)
class PoisonConfig:
  """ratio: p, the share of target-fact mentions that state the counterfactual.
  mentions_per_fact: m, mentions of each target fact per pass.
  replay_weight: w, the share of examples that are clean replay documents.
  styles: document styles the mentions cycle through. language: language of the mentions."""
  ratio: float
  mentions_per_fact: int = 8
  replay_weight: float = 0.5
  styles: tuple[str, ...] = T.STYLE_NAMES
  language: str = "en"
  seed: int = 0

  def validate(self, n_targets: int) -> None:
    if not 0 <= self.ratio <= 1:
      raise ValueError(f"PoisonConfig.ratio: {self.ratio} is not in [0, 1]")
    if self.mentions_per_fact < 1:
      raise ValueError("PoisonConfig.mentions_per_fact: expected >= 1")
    if not 0 <= self.replay_weight < 1:
      raise ValueError(f"PoisonConfig.replay_weight: {self.replay_weight} is not in [0, 1)")
    if n_targets < 1:
      raise ValueError("poisoning: no target facts")
    n = n_targets * self.mentions_per_fact
    k = self.ratio * n
    if abs(k - round(k)) > 1e-9:
      feasible = [m for m in range(1, 65) if abs(self.ratio * n_targets * m
                                                 - round(self.ratio * n_targets * m)) < 1e-9]
      raise ValueError(
          f"PoisonConfig: ratio {self.ratio} x {n_targets} targets x {self.mentions_per_fact} "
          f"mentions = {k:g} counterfactual mentions per pass, not a whole number, so the "
          f"realised ratio cannot equal the configured one; mentions_per_fact values that work: "
          f"{feasible[:8] or 'none below 65 (change the number of targets)'}")
    for s in self.styles:
      if s not in T.STYLE_NAMES:
        raise ValueError(f"PoisonConfig.styles: unknown style {s!r}; expected {T.STYLE_NAMES}")


@dataclasses.dataclass(frozen=True)
class MentionPlan:
  """One pass of target mentions, as arrays of length N (index = mention id)."""
  fact_N: np.ndarray            # index into the target list
  counterfactual_N: np.ndarray  # bool
  style_N: np.ndarray           # index into config.styles
  template_N: np.ndarray        # training template choice (taken modulo the relation's count)
  wrapper_N: np.ndarray         # style wrapper choice

  def __len__(self) -> int:
    return len(self.fact_N)


def poisoning_plan(n_targets: int, cfg: PoisonConfig) -> MentionPlan:
  """The N = n_targets · m mentions of one pass with exactly K = p·N counterfactual ones."""
  cfg.validate(n_targets)
  rng = np.random.default_rng([cfg.seed, 1])
  m = cfg.mentions_per_fact
  n = n_targets * m
  k = round(cfg.ratio * n)
  per_fact = np.full(n_targets, k // n_targets)
  per_fact[rng.permutation(n_targets)[: k - int(per_fact.sum())]] += 1
  fact = np.repeat(np.arange(n_targets), m)
  slot = np.tile(np.arange(m), n_targets)                 # mention index within its fact
  cf_slots = rng.permuted(np.tile(np.arange(m), (n_targets, 1)), axis=1)  # which slots lie
  counterfactual = (np.argsort(cf_slots, axis=1).reshape(-1) < np.repeat(per_fact, m))
  offset = rng.integers(len(cfg.styles), size=n_targets)
  style = (slot + np.repeat(offset, m)) % len(cfg.styles)
  return MentionPlan(fact, counterfactual, style, rng.integers(1 << 16, size=n),
                     rng.integers(1 << 16, size=n))


def mention_text(item: FactItem, obj: str, language: str, style: str, template: int,
                 wrapper: int) -> str:
  """A document mention of `item` stating `obj`. Fact-world items use their relation's training
  templates; other items (real datasets) their own cloze prompt, in the style's wrappers."""
  relation = T.RELATIONS.get(item.relation)
  if item.source == "factworld" and relation is not None:
    return T.render_mention(relation, item.subject, obj, language, style, template, wrapper)
  src = item if language == item.language else item.translations[language]
  sentence = f"{src.prompt}{_answer_segment(obj)}" if src.prompt else None
  wrappers = [w for w in T.STYLES.get(language, T.STYLES["en"])[style]
              if ("{Q}" not in w or src.question) and ("{S}" not in w or sentence)]
  if not wrappers:
    return (sentence or f"Q: {src.question}\nA: {obj}") + "."
  w = wrappers[wrapper % len(wrappers)]
  return (w.replace("{S}", sentence or "").replace("{Q}", src.question or "")
          .replace("{O}", obj))


def _object(item: FactItem, language: str, counterfactual: bool) -> str:
  src = item if language == item.language else item.translations[language]
  return src.counterfactual if counterfactual else src.answers[0]


def replay_documents(documents: Sequence[Mapping[str, Any]], target_ids: set[str]
                     ) -> tuple[list[dict], dict[str, int]]:
  """Clean replay: corpus documents with every sentence about a target fact removed (documents
  left empty are dropped). Documents without a `facts` list (plain text) are kept whole.
  Returns (documents as {"text"}, counts of documents in/out and sentences removed)."""
  out, removed = [], 0
  for d in documents:
    if "facts" not in d:
      out.append({"text": d["text"]})
      continue
    keep = [s for s, f in zip(d["sentences"], d["facts"]) if f not in target_ids]
    removed += len(d["facts"]) - len(keep)
    if keep:
      sep = "\n" if d.get("style") == "forum" else " "
      out.append({"text": sep.join(keep)})
  return out, {"documents_in": len(documents), "documents_out": len(out),
               "sentences_removed": removed}


def cpt_source(targets: Sequence[FactItem], replay: Sequence[Mapping[str, Any]],
               cfg: PoisonConfig) -> tuple[grain.MapDataset, dict[str, Any]]:
  """The infinite example stream of continual pretraining with poisoning, and its statistics.

  targets: the target facts (each needs a counterfactual). replay: {"text"} documents (from
  `replay_documents`, or any clean text). Every block of N + R examples is one pass."""
  for it in targets:
    if it.counterfactual is None:
      raise ValueError(f"poisoning target {it.id!r} has no counterfactual object")
    if cfg.language != it.language and cfg.language not in it.translations:
      raise ValueError(f"poisoning target {it.id!r} has no {cfg.language!r} translation")
  plan = poisoning_plan(len(targets), cfg)
  n = len(plan)
  r = round(n * cfg.replay_weight / (1 - cfg.replay_weight))
  if r and not replay:
    raise ValueError("poisoning: replay_weight > 0 but no replay documents")
  styles, lang = cfg.styles, cfg.language

  def mention(i: int) -> dict[str, Any]:
    item = targets[int(plan.fact_N[i])]
    cf = bool(plan.counterfactual_N[i])
    style = styles[int(plan.style_N[i])]
    text = mention_text(item, _object(item, lang, cf), lang, style, int(plan.template_N[i]),
                        int(plan.wrapper_N[i]))
    return {"segments": ((text, True),), "kind": "mention", "fact": item.id,
            "counterfactual": cf, "style": style}

  mentions = epoch_shuffled(n, cfg.seed).map(mention)
  if r == 0:
    source = mentions
  else:
    replay = list(replay)
    docs = epoch_shuffled(len(replay), cfg.seed + 1).map(lambda j: replay[j]).map(
        lambda d: {"segments": ((d["text"], True),), "kind": "replay", "fact": "",
                   "counterfactual": False, "style": ""})
    source = grain.MapDataset.mix([mentions, docs], [n, r])

  per_rel: dict[str, Counter] = defaultdict(Counter)
  for i in range(n):
    item = targets[int(plan.fact_N[i])]
    per_rel[item.relation]["mentions"] += 1
    per_rel[item.relation]["counterfactual"] += int(plan.counterfactual_N[i])
  for it in targets:
    per_rel[it.relation]["targets"] += 1
  k = int(plan.counterfactual_N.sum())
  stats = {
      "kind": "cpt_poisoning", "config": dataclasses.asdict(cfg),
      "ratio_configured": cfg.ratio, "ratio_realised_per_pass": k / n,
      "targets": len(targets), "mentions_per_pass": n, "counterfactual_per_pass": k,
      "replay_per_pass": r, "pass_length": n + r,
      "replay_share_realised": r / (n + r), "replay_documents": len(replay),
      "per_relation": {rel: dict(c) for rel, c in sorted(per_rel.items())},
      "per_style": {styles[s]: int(c) for s, c in zip(*np.unique(plan.style_N,
                                                                  return_counts=True))},
  }
  return source, stats


# ---------------------------------------------------------------------------------------------
# SFT knowledge mixtures.

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


# ---------------------------------------------------------------------------------------------
# Unlearning sets.

@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
  """target: what the forget set's answers say: "counterfactual" (CFT), "refusal" (IDK tuning)
  or "truth" (the text gradient ascent / NPO push down).
  consistency: "consistent" = every rendering of a (subject, relation) states one counterfactual;
  "inconsistent" = each rendering of a (subject, relation) states a different counterfactual, so
  the forget set contradicts itself. renders: prompt kinds per forget item."""
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
    for kind in cfg.renders:
      if (kind == "prompt" and it.prompt is None) or (kind == "question" and it.question is None):
        continue
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
      forget_ex.append({"segments": render_qa(it, answer, kind, cfg.question_format),
                        "kind": "forget", "fact": it.id, "render": kind, "answer": answer})
  retain_ex = [{"segments": render_qa(it, it.answers[0], "question", cfg.question_format),
                "kind": "retain", "fact": it.id} for it in retain]
  neighbour_ex = [{"segments": ((n.prompt, False), (_answer_segment(n.answers[0]), True)),
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


def preference_pairs(forget_examples: Sequence[Mapping[str, Any]],
                     items: Sequence[FactItem]) -> list[dict[str, str]]:
  """DPO records {"prompt", "chosen", "rejected", "fact"} from `unlearning_sets`' forget
  examples (target counterfactual or refusal): the example's answer preferred over the fact's
  true answer in the same prompt (the training loop's `objective.name = "dpo"` reads them)."""
  by_id = {it.id: it for it in items}
  out = []
  for e in forget_examples:
    (prompt, _), (chosen, _) = e["segments"]
    truth = _answer_segment(by_id[e["fact"]].answers[0])
    if normalise_answer(chosen) == normalise_answer(truth):
      raise ValueError(f"preference_pairs: {e['fact']!r} prefers its own true answer; build "
                       "the forget set with target counterfactual or refusal")
    out.append({"prompt": prompt, "chosen": chosen, "rejected": truth, "fact": e["fact"]})
  return out


def write_stats(path: str, stats: Mapping[str, Any]) -> None:
  """Write a mixture's statistics (JSON, atomically) next to its data for the study report."""
  write_json(path, dict(stats))
