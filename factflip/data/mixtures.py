"""Mixtures: the controlled data of each study, as grain MapDatasets of text examples.

Owns: continual pretraining with poisoning (`poisoning_plan`, `cpt_source`, the two readings
of a poisoning ratio: `read_ratio`), the text forms
every mixture shares (`render_qa`, `answer_segment`, `mention_text`) and their statistics
(`write_stats`). SFT knowledge mixtures: `data.sft_mixtures`; unlearning sets:
`data.unlearning_sets`.
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
Replay documents are interleaved exactly R = N·w / (1 − w) per pass (w = replay weight; R must
be whole too, or the config is rejected the same way), so every block of N + R consecutive
examples holds one full pass: realised p = K / N and replay share R / (N + R) = w exactly.

Two readings of a poisoning ratio p (`read_ratio`, the poisoning study's `ratio_reading`):
"restate" (SCIENCE.md A as written): p = K / N, the other N − K mentions restate the true object,
replay at weight w whatever p is; at p = .5 the stream states both objects equally often.
"replay" (a poison-to-clean ratio): every target mention states the counterfactual (K = N) and
the clean share is replay text, R = N·(1 − p) / p, so K / (N + R) = p exactly; no true
restatement. With the same m, the restate stream at p = 1 is the replay stream at p = 1 − w.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from factflip.data import templates as T
from factflip.data.facts import FactItem
from factflip.fileio import write_json


def answer_segment(answer: str) -> str:
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
  return ((context, False), (answer_segment(answer), True))


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


RATIO_READINGS = ("restate", "replay")


def read_ratio(reading: str, p: float, replay_weight: float) -> tuple[float, float]:
  """The stream of poisoning ratio p under `reading`, as (PoisonConfig.ratio, .replay_weight).

  restate: p is the counterfactual share of the target mentions, the rest true restatements;
    replay takes `replay_weight` of the stream whatever p is: (p, replay_weight).
  replay: p is the counterfactual mentions' share of the whole stream; every target mention is
    counterfactual and the clean rest is replay text (`replay_weight` unused): (1, 1 − p).
    p must be > 0: p = 0 would be replay alone, which has no target mention to poison.
  """
  if reading == "restate":
    return float(p), float(replay_weight)
  if reading == "replay":
    if not 0 < p <= 1:
      raise ValueError(f"poisoning ratio {p} read as 'replay' (the counterfactual share of the "
                       "stream) must be in (0, 1]: p = 0 would be replay alone")
    return 1.0, 1.0 - float(p)
  raise ValueError(f"ratio reading {reading!r}; expected one of {RATIO_READINGS}")


def _whole(x: float) -> bool:
  return abs(x - round(x)) < 1e-6


@dataclasses.dataclass(frozen=True)
class PoisonConfig:
  """ratio: p, the share of target-fact mentions that state the counterfactual.
  mentions_per_fact: m, mentions of each target fact per pass.
  replay_weight: w, the share of examples that are clean replay documents (R = N·w / (1 − w)
  per pass, whole).
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
    k, r = self.ratio * n, self.replay_of(n)
    if not (_whole(k) and _whole(r)):
      feasible = [m for m in range(1, 65) if _whole(self.ratio * n_targets * m)
                  and _whole(self.replay_of(n_targets * m))]
      what = (f"ratio {self.ratio} x {n_targets} targets x {self.mentions_per_fact} mentions = "
              f"{k:g} counterfactual mentions per pass" if not _whole(k) else
              f"replay_weight {self.replay_weight:g} over {n} mentions = {r:g} replay documents "
              f"per pass")
      raise ValueError(
          f"PoisonConfig: {what}, not a whole number, so the realised ratio cannot equal the "
          f"configured one; mentions_per_fact values that work: "
          f"{feasible[:8] or 'none below 65 (change the number of targets)'}")
    for s in self.styles:
      if s not in T.STYLE_NAMES:
        raise ValueError(f"PoisonConfig.styles: unknown style {s!r}; expected {T.STYLE_NAMES}")

  def replay_of(self, n_mentions: int) -> float:
    """Replay documents per pass of n_mentions mentions: N·w / (1 − w) (whole once validated)."""
    return n_mentions * self.replay_weight / (1 - self.replay_weight)


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
  sentence = f"{src.prompt}{answer_segment(obj)}" if src.prompt else None
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
  r = round(cfg.replay_of(n))
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


def write_stats(path: str, stats: Mapping[str, Any]) -> None:
  """Write a mixture's statistics (JSON, atomically) next to its data for the study report."""
  write_json(path, dict(stats))
