"""SliCK: knowledge categories of facts, read off the model's own few-shot answers (paper B).

Owns: `SliCKConfig` (every number of the protocol), `slick_prompts` (the N_ex k-shot prompts of
each fact), `categorise` (generate, score, categorise: one row per fact), `category` and
`category_shares`.
Must not: generate or score answers itself (`evals.generation`, `evals.qa`), or know studies.

Definitions (SCIENCE.md B; Gekhman et al. 2024, §3):
- per fact, N_ex = `n_prompts` k-shot prompts (`k_shot` exemplars each, drawn at random from the
  dev split of the fact's relation, never the fact itself nor its subject: `evals.qa`), in the
  QA format "Q: <question>\\nA:" of `evals.qa` (`form = "qa"`, the paper's), or with
  `form = "cloze"` as statements in the model's own form ("<cloze prompt> <answer>." per
  exemplar, then the fact's cloze prompt: `evals.qa.few_shot_cloze`) for a base that never saw a
  question (a world without questions in its corpus: SFT teaches the QA format, SliCK asks what
  the base knows); per prompt one greedy answer and `n_samples` answers sampled at
  `temperature` with top-k `top_k`; answers end at the first newline (qa) or where a sentence
  ends (cloze: `evals.qa.CLOZE_UNTIL`).
- correct = normalised exact match against any alias (`evals.qa.exact_match`).
- P(T=0) = p_greedy = share of the greedy answers correct; P(T>0) = p_sample = share of the
  sampled answers correct.
- HighlyKnown: p_greedy = 1; MaybeKnown: 0 < p_greedy < 1; WeaklyKnown: p_greedy = 0 and
  p_sample > 0; Unknown: both 0.

How it runs: every prompt's greedy answer and samples are one fan-out of the compiled
generation program (`models.generate`: the prompt prefilled once, 1 + n_samples continuations),
prompts of similar length batched together; the exemplar draw comes from `seed` and the fact's
id (a fact's prompts are its own), the sampling from `key` folded with the chunk of facts, so the
same (seed, key) and the same list of facts give the same categories.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import zlib
from collections.abc import Sequence

import numpy as np

from factflip.data.facts import FactItem
from factflip.data.sft_mixtures import CATEGORIES
from factflip.evals import generation, qa

HIGHLY, MAYBE, WEAKLY, UNKNOWN = CATEGORIES


@dataclasses.dataclass(frozen=True)
class SliCKConfig:
  """n_prompts: N_ex; k_shot: exemplars per prompt; n_samples, temperature, top_k: the sampled
  answers of each prompt; max_new_tokens: the answer budget; batch_size: continuations per
  compiled program (contexts per program = batch_size // (1 + n_samples)); answer_end: what
  ends each exemplar's answer ("" as in EntityQuestions; "." where the pretraining corpus writes
  "A: Paris."); form: "qa" or "cloze" (the module docstring)."""
  n_prompts: int = 10
  k_shot: int = 4
  n_samples: int = 16
  temperature: float = 0.5
  top_k: int = 40
  max_new_tokens: int = 16
  batch_size: int = 544
  answer_end: str = ""
  form: str = "qa"

  def validate(self) -> None:
    for name in ("n_prompts", "max_new_tokens", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"SliCKConfig.{name}: {getattr(self, name)}; expected >= 1")
    if self.k_shot < 0 or self.n_samples < 0 or self.top_k < 0:
      raise ValueError(f"SliCKConfig: k_shot {self.k_shot}, n_samples {self.n_samples}, top_k "
                       f"{self.top_k}; expected >= 0")
    if self.form not in ("qa", "cloze"):
      raise ValueError(f"SliCKConfig.form: {self.form!r}; expected 'qa' or 'cloze'")
    if self.n_samples and self.temperature <= 0:
      raise ValueError(f"SliCKConfig.temperature: {self.temperature}; sampled answers need a "
                       "temperature > 0")


def category(p_greedy: float, p_sample: float) -> str:
  """The SliCK category of a fact from P(T=0) and P(T>0)."""
  if p_greedy >= 1.0:
    return HIGHLY
  if p_greedy > 0.0:
    return MAYBE
  return WEAKLY if p_sample > 0.0 else UNKNOWN


def slick_prompts(items: Sequence[FactItem], dev: Sequence[FactItem], cfg: SliCKConfig,
                  seed: int) -> list[list[str]]:
  """Per fact, its `n_prompts` k-shot prompts. The exemplars come from a generator seeded by
  (`seed`, the fact's id), so a fact's prompts do not depend on which other facts are
  categorised with it or in what order."""
  pool = qa.by_relation(dev)
  out = []
  for f in items:
    rng = np.random.default_rng([seed, 15, zlib.crc32(f.id.encode())])
    if cfg.form == "cloze":
      out.append([qa.few_shot_cloze(f, qa.draw_exemplars(f, pool, cfg.k_shot, rng, "prompt")
                                    if cfg.k_shot else ()) for _ in range(cfg.n_prompts)])
    else:
      out.append([qa.few_shot_prompt(f, qa.draw_exemplars(f, pool, cfg.k_shot, rng)
                                     if cfg.k_shot else (), cfg.answer_end)
                  for _ in range(cfg.n_prompts)])
  return out


def categorise(model, tokenizer, items: Sequence[FactItem], dev: Sequence[FactItem],
               cfg: SliCKConfig = SliCKConfig(), *, seed: int = 0, key=None,
               log=None) -> list[dict]:
  """One row per fact: item, relation, split, p_greedy, p_sample, category, answer (the first
  alias), greedy (the greedy answers, one per prompt), top_sample (the most common sampled
  answer) and top_sample_share. `log` (e.g. print) gets a progress line (facts/s, ETA) per
  chunk of facts; each chunk fills whole generation programs, so chunks reuse one program."""
  import time

  import jax

  cfg.validate()
  need = "prompt" if cfg.form == "cloze" else "question"
  for f in items:
    if not getattr(f, need) or not f.answers:
      raise ValueError(f"{f.id}: SliCK in form {cfg.form!r} needs a {need} and answers "
                       f"(fields {need!r}, 'answers')")
  if cfg.n_samples and key is None:
    raise ValueError("SliCK samples answers: pass an explicit PRNG key (key=)")
  prompts = slick_prompts(items, dev, cfg, seed)
  temps = (0.0,) + (cfg.temperature,) * cfg.n_samples
  per_program = max(1, cfg.batch_size // len(temps))     # contexts per compiled program
  unit = per_program // math.gcd(per_program, cfg.n_prompts)   # facts filling whole programs
  chunk = unit * max(1, (8 * per_program) // (unit * cfg.n_prompts))   # facts per progress line
  rows, t0 = [], time.time()
  for c, start in enumerate(range(0, len(items), chunk)):
    part = items[start:start + chunk]
    flat = [p for ps in prompts[start:start + chunk] for p in ps]
    answers = generation.generate_until(
        model, tokenizer, flat, until=qa.CLOZE_UNTIL if cfg.form == "cloze" else ("\n",),
        max_new_tokens=cfg.max_new_tokens,
        temperature=temps if cfg.n_samples else 0.0, top_k=cfg.top_k,
        key=jax.random.fold_in(key, c) if cfg.n_samples else None, batch_size=cfg.batch_size)
    for i, f in enumerate(part):
      mine = answers[i * cfg.n_prompts:(i + 1) * cfg.n_prompts]
      greedy = [a[0].strip() for a in mine]
      sampled = [s.strip() for a in mine for s in a[1:]]
      p0 = float(np.mean([qa.exact_match(a, f.answers) for a in greedy]))
      ps = float(np.mean([qa.exact_match(a, f.answers) for a in sampled])) if sampled else 0.0
      top, n = (collections.Counter(sampled).most_common(1) or [("", 0)])[0]
      rows.append({"item": f.id, "relation": f.relation, "split": f.split, "p_greedy": p0,
                   "p_sample": ps, "category": category(p0, ps), "answer": f.answers[0],
                   "greedy": " | ".join(greedy), "top_sample": top,
                   "top_sample_share": n / len(sampled) if sampled else 0.0})
    if log is not None:
      rate = len(rows) / max(time.time() - t0, 1e-9)
      log(f"    slick: {len(rows)}/{len(items)} facts, {rate:.2f} facts/s, ETA "
          f"{(len(items) - len(rows)) / rate:.0f} s")
  return rows


def category_shares(rows: Sequence[dict], by: Sequence[str] = ("relation", "split")):
  """Share of each category per group (a DataFrame: the `by` columns, then one per category,
  and `facts`); an "all" row per split over every relation."""
  import pandas as pd
  df = pd.DataFrame(list(rows))
  if df.empty:
    return pd.DataFrame(columns=[*by, *CATEGORIES, "facts"])
  out = []
  groups = [df.groupby(list(by))]
  if "relation" in by:
    groups.append(df.assign(relation="all").groupby(list(by)))
  for grouped in groups:
    for key, g in grouped:
      key = key if isinstance(key, tuple) else (key,)
      share = g.category.value_counts(normalize=True)
      out.append({**dict(zip(by, key)), **{c: float(share.get(c, 0.0)) for c in CATEGORIES},
                  "facts": len(g)})
  return pd.DataFrame(out, columns=[*by, *CATEGORIES, "facts"])
