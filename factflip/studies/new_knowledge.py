"""Paper B's study: SFT on new knowledge — SliCK categories, %Unknown mixtures, fitting dynamics
and the linear fit (SCIENCE.md B; Gekhman et al. 2024).

Owns: paper B's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or a model directory as it is) the SliCK categories of every fact, the SFT
mixtures, an SFT run per mixture with a checkpoint per epoch, closed-book QA on every
checkpoint, and the results tables (dynamics, stops, the linear fit); the workdir layout below.
Must not: train (`factflip.train`), categorise or score answers (`probes.slick`, `evals.qa`),
build mixtures (`data.mixtures`) or plot (`new_knowledge_report.py`).

Facts. World studies use the world's person facts of `relations` (fine-tuned and tested
in-distribution) and `ood_relations` (tested only), split per relation
into train / dev / test with the shares `splits` (seeded by world_seed: every size and seed
sees the same split); `question = "train"` asks the question template the corpus's forum
posts use (the tiny models answer it; "heldout" asks the facts' held-out template). With
`facts` set (EntityQuestions' folder, or any `load_facts` file whose items carry a split), the
relations are the file's, each split the file's own (`max_facts` per relation and split).

Workdir layout (every stage writes DONE last with the fingerprint of the keys it read):
  study.json                              the config as run (`Study.open`)
  world/, tokenizer/, runs/<size>/seed<k>/pretrain/      world studies (`studies.sources`)
  runs/<size>/seed<k>/slick/facts.csv     SliCK per fact: item, relation, split, distribution,
                                          p_greedy, p_sample, category, answer, greedy, ...
  runs/<size>/seed<k>/mixtures/<m>.jsonl  the SFT set of mixture m ({"segments"}), stats.json
                                          (every mixture's realised shares), members.csv
                                          (mixture, item, category, idk)
  runs/<size>/seed<k>/sft_<m>/            the SFT run (checkpoints/<step>: one per epoch)
  runs/<size>/seed<k>/eval/<m>/qa_<step>.csv   greedy QA per fact at that checkpoint: item,
                                          split, distribution, category, member, part,
                                          prediction, em, outcome
  results/dynamics.csv, stops.csv, fit.csv, categories.csv, tiers.csv, mixtures.csv

Definitions. Mixture names: `unk<X>` (X% Unknown, rest Known, X per relation), `idk<X>` (the
same set with its Unknown answers relabelled "I don't know."), and the single-category sets
`HighlyKnown`, `MaybeKnown`, `WeaklyKnown`, `Natural` (D_Unk is unk100). |D| (`mixtures.size`;
0 = the largest multiple of sft.data.batch_size for which every unk/idk mixture exists); a
single-category set takes |D| or, when its category has fewer train facts, the largest
batch multiple it has (its realised size is in mixtures.csv). An epoch is |D| / batch_size
steps (one example per row: packing "pad"); checkpoint e·steps_per_epoch is epoch e (0 = the
base). Train accuracy: greedy exact match on the mixture's own questions, per part (known:
the Known examples, unknown: the Unknown ones; an IDK-relabelled example counts as fitted when
the model abstains). Test accuracy: in-distribution (test facts of `relations`), per SliCK
category, and out-of-distribution (test facts of `ood_relations`). EARLY_STOP = the epoch of
best dev accuracy (first of ties); CONVERGENCE = the first epoch whose train accuracy (both
parts) reaches `convergence` (else the last epoch; `converged` says which). The linear fit (per
size, seed, distribution): test accuracy in percent = β0 + β_kn·N_kn/|D| + β_unk·N_unk/|D| by
least squares over every checkpoint of the unk<X> mixtures, N = the fitted Known / Unknown
training examples; R², and percentile bootstrap intervals over checkpoints (scipy.stats).
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from factflip.fileio import read_json, write_csv, write_json
from factflip.studies import platform
from factflip.studies.checkpoints import CheckpointProbe, probe_checkpoints, table_steps
from factflip.studies.platform import StudyError, memo
from factflip.studies.stages import Stage

SINGLE = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Natural")
PARTS = ("known", "unknown")
# Paper B's in-distribution fit (Table 1 of Gekhman et al. 2024; accuracy in percent)
PAPER_FIT = {"beta_0": 36.9, "beta_kn": 7.3, "beta_unk": -8.3, "r2": 0.86}
# EntityQuestions relations (paper B §2): fine-tuned and tested, tested only
ENTITYQUESTIONS_IN = ("P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69",
                      "P740", "P800")
ENTITYQUESTIONS_OOD = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")

_RUN = ["size", "seed", "mixture", "epoch", "step"]
_CATS = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
_EVAL = (["dev_accuracy", "test_accuracy_in", "test_accuracy_ood"]
         + [f"test_accuracy_{c}" for c in _CATS] + ["test_answer_rate", "test_answered_accuracy"])
COLUMNS = {
    "dynamics": _RUN + ["part", "train_accuracy", "fitted", "examples"] + _EVAL,
    "stops": ["size", "seed", "mixture", "unknown_share", "stop", "epoch", "converged",
              "train_accuracy", "train_accuracy_known", "train_accuracy_unknown"] + _EVAL,
    "fit": ["size", "seed", "distribution", "points", "beta_0", "beta_0_lo", "beta_0_hi",
            "beta_kn", "beta_kn_lo", "beta_kn_hi", "beta_unk", "beta_unk_lo", "beta_unk_hi",
            "r2"],
    "categories": ["size", "seed", "relation", "split", *_CATS, "facts"],
    "tiers": ["size", "seed", "tier", *_CATS, "facts"],
    "mixtures": ["size", "seed", "mixture", "examples", "unknown_share_configured",
                 "unknown_share_realised", *_CATS, "idk_relabelled", "steps_per_epoch"],
    "fitting": ["size", "seed", "mixture", "part", "epochs_to_half", "final_train_accuracy"],
}


def base_config():
  """Every key a new-knowledge study reads, with its default (configs/studies/new_knowledge.py
  starts from it): the keys every study has (`platform.common_config`) and paper B's own.
  `sft` is a training config (`factflip.train.config`); its data.path, model.init_from,
  steps and checkpoint.every are set per mixture."""
  import ml_collections

  from factflip.train import config as train_config
  c = platform.common_config()
  c.study = "new_knowledge"
  c.relations = ("birth_city", "occupation", "employer", "instrument")  # fine-tuned + tested
  c.ood_relations = ("sport",)     # tested only (out of distribution)
  c.question = "train"             # world: "train" (the corpus's forum template) | "heldout"
  c.answer_end = ""                # ends every exemplar and trained answer ("." on the world:
  #                                  its forum posts write "A: Paris.")
  c.splits = (0.5, 0.25, 0.25)     # world: train / dev / test shares per relation
  c.max_facts = 0                  # facts file: first n per relation and split (0 = all)
  c.slick = ml_collections.ConfigDict()
  c.slick.n_prompts = 10           # N_ex k-shot prompts per fact
  c.slick.k_shot = 4               # exemplars per prompt (dev split, same relation)
  c.slick.n_samples = 16           # sampled answers per prompt
  c.slick.temperature = 0.5
  c.slick.top_k = 40
  c.slick.max_new_tokens = 16
  c.slick.batch_size = 544         # continuations per compiled generation program
  c.mixtures = ml_collections.ConfigDict()
  c.mixtures.size = 0              # |D| (0 = as large as the categories allow)
  c.mixtures.unknown_shares = (0.0, 0.25, 0.5, 0.75, 1.0)   # X of the unk<X> mixtures
  c.mixtures.single = SINGLE       # single-category sets (D_HK, D_MK, D_WK, D_Natural)
  c.mixtures.idk_shares = (0.5,)   # X of the "I don't know" variants
  c.epochs = 20                    # SFT epoch cap per mixture
  c.convergence = 0.99             # CONVERGENCE: train accuracy reached (both parts)
  c.sft = train_config.base_config()
  c.sft.data.kind = "examples"
  c.sft.data.packing = "pad"       # one example per row: an epoch is |D| / batch_size steps
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256          # QA prompts per compiled generation program
  c.eval.max_new_tokens = 12
  c.fit = ml_collections.ConfigDict()
  c.fit.bootstrap = 1000           # bootstrap resamples of the checkpoints (0 = no intervals)
  c.fit.confidence = 0.95
  return c


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs: ConfigError naming the source and key."""
  import jax

  from factflip.configfile import ConfigError
  from factflip.data.world import GEO_RELATIONS, PERSON_RELATIONS
  from factflip.probes.slick import SliCKConfig
  from factflip.train import config as train_config

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  platform.check_schema(c, base_config(), "new_knowledge",
                        ("slick", "mixtures", "eval", "fit", "probe"), source)
  platform.validate_common(c, source, "a facts file or folder whose items carry a split "
                           "(EntityQuestions' folder)")
  need(len(c.relations) > 0, "relations", "empty; expected the fine-tuned relations")
  need(not set(c.relations) & set(c.ood_relations), "ood_relations",
       f"{list(c.ood_relations)} overlaps relations {list(c.relations)}")
  if c.facts:
    need(c.max_facts >= 0, "max_facts", f"{c.max_facts}; expected >= 0 (0 = all)")
  else:
    world = (*PERSON_RELATIONS, *GEO_RELATIONS)
    for key in ("relations", "ood_relations"):
      bad = [r for r in c[key] if r not in world]
      need(not bad, key, f"{bad}; expected world relations {list(world)}")
    need(c.question in ("train", "heldout"), "question",
         f"{c.question!r}; expected 'train' or 'heldout'")
    need(len(c.splits) == 3 and min(c.splits) > 0 and abs(sum(c.splits) - 1) < 1e-9, "splits",
         f"{list(c.splits)}; expected three positive train / dev / test shares summing to 1")
  try:
    SliCKConfig(**c.slick.to_dict(), answer_end=c.answer_end).validate()
  except ValueError as e:
    raise ConfigError(source, "slick", str(e)) from None
  shares = list(c.mixtures.unknown_shares) + list(c.mixtures.idk_shares)
  need(all(0 <= x <= 1 for x in shares) and len(set(c.mixtures.unknown_shares)) == len(
      c.mixtures.unknown_shares), "mixtures.unknown_shares",
      f"{shares}; expected distinct shares in [0, 1]")
  need(len(c.mixtures.unknown_shares) > 0, "mixtures.unknown_shares",
       "empty; the %Unknown mixtures are the study")
  need(all(s in SINGLE for s in c.mixtures.single), "mixtures.single",
       f"{list(c.mixtures.single)}; expected some of {list(SINGLE)}")
  need(c.mixtures.size >= 0 and c.mixtures.size % c.sft.data.batch_size == 0, "mixtures.size",
       f"{c.mixtures.size}; expected 0 (auto) or a multiple of sft.data.batch_size "
       f"{c.sft.data.batch_size} (an epoch is |D| / batch_size steps)")
  need(c.epochs >= 1, "epochs", f"{c.epochs}; expected >= 1")
  need(0 < c.convergence <= 1, "convergence", f"{c.convergence}; expected a share in (0, 1]")
  need(c.eval.batch_size >= 1 and c.eval.max_new_tokens >= 1, "eval",
       "batch_size and max_new_tokens must be >= 1")
  need(c.fit.bootstrap >= 0 and 0 < c.fit.confidence < 1, "fit",
       f"bootstrap {c.fit.bootstrap} (>= 0), confidence {c.fit.confidence} (in (0, 1))")
  need(c.sft.data.kind == "examples", "sft.data.kind", f"{c.sft.data.kind!r}; expected "
       "'examples' (the mixtures' JSONL)")
  need(c.sft.data.packing == "pad", "sft.data.packing", f"{c.sft.data.packing!r}; expected "
       "'pad' (one example per row, so an epoch is a whole number of steps)")
  stages = ("sft",) if c.facts else ("pretrain", "sft")
  for stage in stages:
    sub = platform.mutable(c[stage])
    if stage == "sft":
      sub.data.path = "runs/<size>/seed<k>/mixtures/<m>.jsonl"
      sub.model.init_from = c.sizes[0] if c.facts else "runs/<size>/seed<k>/pretrain"
    else:
      sub.model.preset = c.sizes[0]
    train_config.validate(sub, source=f"{source}: {stage}", n_devices=jax.device_count(),
                          n_processes=jax.process_count())


def _percent(x: float) -> str:
  return f"{round(100 * x, 6):g}"                  # 0.25 -> "25", 0.125 -> "12.5"


def mixture_names(c) -> list[str]:
  """The mixtures of a config, in run order: unk<X>, idk<X> (X in percent, e.g. unk25,
  unk12.5), then the single-category sets."""
  return ([f"unk{_percent(x)}" for x in c.mixtures.unknown_shares]
          + [f"idk{_percent(x)}" for x in c.mixtures.idk_shares] + list(c.mixtures.single))


def unknown_share(name: str) -> float | None:
  """X of an unk<X> / idk<X> mixture name (None for a single-category set)."""
  for pre in ("unk", "idk"):
    if name.startswith(pre) and re.fullmatch(r"\d+(\.\d+)?", name[len(pre):]):
      return float(name[len(pre):]) / 100
  return None


def linear_fit(x_kn, x_unk, acc, n_boot: int = 1000, confidence: float = 0.95,
               seed: int = 0) -> dict[str, float]:
  """Least squares acc = β0 + β_kn·x_kn + β_unk·x_unk; R²; percentile bootstrap intervals over
  the points (scipy.stats.bootstrap, paired resampling). NaN where the design is singular."""
  import scipy.stats

  x_kn, x_unk, acc = (np.asarray(a, np.float64) for a in (x_kn, x_unk, acc))

  def coef(k, u, y):
    X = np.stack([np.ones_like(k), k, u], 1)
    b, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    return b if rank == 3 else np.full(3, np.nan)

  names = ("beta_0", "beta_kn", "beta_unk")
  b = coef(x_kn, x_unk, acc)
  pred = b[0] + b[1] * x_kn + b[2] * x_unk
  ss = float(((acc - acc.mean()) ** 2).sum())
  r2 = 1 - float(((acc - pred) ** 2).sum()) / ss if ss > 0 else float("nan")
  out = {"points": len(acc), **dict(zip(names, map(float, b))), "r2": r2}
  lo = hi = np.full(3, np.nan)
  if n_boot and len(acc) > 3 and np.isfinite(b).all():
    res = scipy.stats.bootstrap((x_kn, x_unk, acc), coef, paired=True, vectorized=False,
                                n_resamples=n_boot, confidence_level=confidence,
                                method="percentile", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
  for n, l, h in zip(names, lo, hi):
    out[f"{n}_lo"], out[f"{n}_hi"] = float(l), float(h)
  return out


def _acc(s: pd.Series) -> float:
  return float(s.mean()) if len(s) else float("nan")


def checkpoint_metrics(qa: pd.DataFrame) -> dict[str, Any]:
  """One checkpoint's QA rows -> train accuracy per part, dev / test accuracies (see the
  module docstring)."""
  train = qa[qa.member]
  fitted = np.where(train.idk, train.outcome == "abstained", train.em)
  test_in = qa[(qa.split == "test") & (qa.distribution == "in")]
  answered = test_in[test_in.outcome != "abstained"]
  out = {"parts": {p: (int(fitted[train.part == p].sum()), int((train.part == p).sum()))
                   for p in PARTS},
         "dev_accuracy": _acc(qa[(qa.split == "dev") & (qa.distribution == "in")].em),
         "test_accuracy_in": _acc(test_in.em),
         "test_accuracy_ood": _acc(qa[(qa.split == "test") & (qa.distribution == "ood")].em),
         "test_answer_rate": len(answered) / len(test_in) if len(test_in) else float("nan"),
         "test_answered_accuracy": _acc(answered.em)}
  for c in _CATS:
    out[f"test_accuracy_{c}"] = _acc(test_in[test_in.category == c].em)
  return out


def epochs_to(curve: pd.Series, level: float) -> float:
  """The first epoch at which a train-accuracy curve (indexed by epoch) reaches `level`
  (NaN: never)."""
  hit = curve[curve >= level]
  return float(hit.index[0]) if len(hit) else float("nan")


class Study(platform.Study):
  """Paper B's study: the fact source's stages, then per (size, seed) SliCK categories and the
  SFT mixtures, per (size, seed, mixture) an SFT run and QA on each epoch's checkpoint, then
  the results tables."""
  name = "new_knowledge"
  title = "SFT on new knowledge (SliCK, %Unknown, fitting dynamics)"
  draw_keys: ClassVar[dict[str, str]] = {}       # categorises every fact: no target draw
  base_config = staticmethod(base_config)
  validate = staticmethod(validate)

  def grid(self) -> dict[str, list]:
    return {"mixture": mixture_names(self.c)}

  # ---- facts ------------------------------------------------------------------------------
  def facts(self):
    """The study's facts with `split` set (train / dev / test) and `meta["distribution"]`
    (in / ood): see the module docstring. Read once."""
    if getattr(self, "_facts", None) is None:
      self._facts = self._read_facts()
    return self._facts

  def _read_facts(self):
    import dataclasses

    from factflip.data.prepare import assign_splits
    from factflip.data.world import with_train_question
    rels = {**dict.fromkeys(self.c.relations, "in"), **dict.fromkeys(self.c.ood_relations,
                                                                      "ood")}
    if self.c.facts:
      from factflip.data.loaders import load_facts
      loaded = load_facts(self.c.facts, lenient=True)
      if loaded.skipped:
        self.log(f"    {self.c.facts}: {len(loaded.skipped)} bad records skipped, e.g. "
                 f"{loaded.skipped[0]}")
      items = [f for f in loaded if f.relation in rels
               and f.question and f.answers and f.split in ("train", "dev", "test")]
      if self.c.max_facts:
        seen: dict[tuple[str, str], int] = {}
        keep = []
        for f in items:
          k = (f.relation, f.split)
          seen[k] = seen.get(k, 0) + 1
          if seen[k] <= self.c.max_facts:
            keep.append(f)
        items = keep
    else:
      world, _ = self.source.world()
      items = [f for f in world.facts if f.relation in rels and not f.meta.get("two_hop")]
      if self.c.question == "train":
        items = [with_train_question(f) for f in items]
      items = assign_splits(items, tuple(self.c.splits), self.c.world_seed)
    missing = [r for r in rels if not any(f.relation == r for f in items)]
    if missing:
      self.log(f"    relations without facts (left out): {missing}")
    items = [dataclasses.replace(f, meta={**f.meta, "distribution": rels[f.relation]})
             for f in items]
    if not items:
      raise StudyError(f"{self.c.facts or 'the world'}: no facts of relations "
                       f"{list(rels)} with a question, answers and a train/dev/test split")
    return items

  # ---- layout -----------------------------------------------------------------------------
  def slick_path(self, size: str, seed: int) -> str:
    return os.path.join(self.run_dir(size, seed, "slick"), "facts.csv")

  def mixture_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "mixtures")

  def sft_dir(self, size: str, seed: int, mixture: str) -> str:
    return self.run_dir(size, seed, f"sft_{mixture}")

  def checkpoints(self, size: str, seed: int, mixture: str) -> str:
    return os.path.join(self.sft_dir(size, seed, mixture), "checkpoints")

  def eval_dir(self, size: str, seed: int, mixture: str) -> str:
    return os.path.join(self.run_dir(size, seed, "eval"), mixture)

  def categories(self, size: str, seed: int) -> pd.DataFrame:
    """SliCK per fact at the base (runs/<size>/seed<k>/slick/facts.csv)."""
    return pd.read_csv(self.slick_path(size, seed), keep_default_na=False)

  def tables(self) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(os.path.join(self.wd, "results", f"{name}.csv"))
            for name in COLUMNS}

  # ---- stages -----------------------------------------------------------------------------
  def _fact_keys(self):
    return ("relations", "ood_relations", "question", "splits", "max_facts", "world_seed")

  @memo
  def stage_slick(self, size: str, seed: int) -> Stage:
    from factflip.evals.generation import GENERATION_VERSION
    return Stage(f"slick {size} seed{seed}", self.run_dir(size, seed, "slick"),
                 self.keys("slick", "probe.dtype", "answer_end", *self._fact_keys(), seed=seed,
                           generation=GENERATION_VERSION),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_mixtures(self, size: str, seed: int) -> Stage:
    return Stage(f"mixtures {size} seed{seed}", self.mixture_dir(size, seed),
                 self.keys("mixtures", "sft.data.batch_size", "answer_end", seed=seed),
                 (self.stage_slick(size, seed).fp,))

  @memo
  def stage_sft(self, size: str, seed: int, mixture: str) -> Stage:
    return Stage(f"sft {size} seed{seed} {mixture}", self.sft_dir(size, seed, mixture),
                 self.keys("sft", "epochs", mixture=mixture, seed=seed),
                 (self.stage_mixtures(size, seed).fp, self.source.base_stage(size, seed).fp))

  @memo
  def stage_eval(self, size: str, seed: int, mixture: str) -> Stage:
    from factflip.evals.generation import GENERATION_VERSION
    from factflip.evals.qa import QA_VERSION
    return Stage(f"eval {size} seed{seed} {mixture}", self.eval_dir(size, seed, mixture),
                 self.keys("eval", "probe.dtype", generation=GENERATION_VERSION,
                           qa=QA_VERSION),
                 (self.stage_sft(size, seed, mixture).fp, self.stage_mixtures(size, seed).fp))

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_eval(**cell).fp for cell in self.cells(("size", "seed", "mixture"))]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("convergence", "fit", "seeds", sizes=list(self.sizes)), tuple(ups))

  def specs(self) -> list[platform.StageSpec]:
    cell, run = ("size", "seed"), ("size", "seed", "mixture")
    S = platform.StageSpec
    return [S("slick", cell, self.stage_slick, self.build_slick),
            S("mixtures", cell, self.stage_mixtures, self.build_mixtures),
            S("sft", run, self.stage_sft, self.build_sft, hosts=platform.SHARED),
            S("eval", run, self.stage_eval, self.build_eval),
            S("results", (), self.stage_results, self.build_results)]

  # ---- SliCK ------------------------------------------------------------------------------
  def build_slick(self, out: str, size: str, seed: int) -> dict[str, Any]:
    import time

    import jax

    from factflip.probes.slick import SliCKConfig, categorise, category_shares
    facts = self.facts()
    dev = [f for f in facts if f.split == "dev"]
    cfg = SliCKConfig(**self.c.slick.to_dict(), answer_end=self.c.answer_end)
    model = self.load(self.base_path(size, seed))
    t0 = time.time()
    rows = categorise(model, self.tokenizer(size), facts, dev, cfg, seed=seed,
                      key=jax.random.key(seed), log=self.log)
    df = pd.DataFrame(rows)
    meta = {f.id: f.meta for f in facts}
    df.insert(3, "distribution", df.item.map(lambda i: meta[i]["distribution"]))
    if not self.c.facts:
      df.insert(4, "tier", df.item.map(lambda i: meta[i].get("exposure_tier", "")))
    write_csv(df, os.path.join(out, "facts.csv"))
    shares = category_shares(rows)
    write_csv(shares, os.path.join(out, "shares.csv"))
    secs = time.time() - t0
    self.log(f"    SliCK: {len(df)} facts in {secs:.0f} s ({len(df) / max(secs, 1e-9):.2f} "
             "facts/s); train shares " + ", ".join(
                 f"{c}: {v:.2f}" for c, v in df[df.split == "train"].category.value_counts(
                     normalize=True).items()))
    return {"facts": len(df), "seconds": round(secs, 1)}

  # ---- mixtures ---------------------------------------------------------------------------
  def _train_items(self, size: str, seed: int):
    import dataclasses
    cats = self.categories(size, seed).set_index("item").category
    return [dataclasses.replace(f, category=cats[f.id]) for f in self.facts()
            if f.split == "train" and f.meta["distribution"] == "in" and f.id in cats.index]

  def build_mixtures(self, out: str, size: str, seed: int) -> dict[str, Any]:
    from factflip.data.mixtures import SFTConfig, sft_mixture
    from factflip.fileio import write_jsonl
    items = self._train_items(size, seed)
    B = self.c.sft.data.batch_size

    def build(name, n):
      x = unknown_share(name)
      cfg = SFTConfig(size=n, unknown_share=x or 0.0, category=None if x is not None else name,
                      idk=name.startswith("idk"), answer_end=self.c.answer_end, seed=seed)
      return sft_mixture(items, cfg)

    def feasible(name, n):
      try:
        build(name, n)
        return True
      except ValueError:
        return False

    shared = [m for m in mixture_names(self.c) if unknown_share(m) is not None]
    size = self.c.mixtures.size
    if not size:
      size = (len(items) // B) * B
      while size and not all(feasible(m, size) for m in shared):
        size -= B
    if not size or not all(feasible(m, size) for m in shared):
      from factflip.probes.slick import CATEGORIES
      counts = pd.Series([it.category for it in items]).value_counts().reindex(
          CATEGORIES, fill_value=0).to_dict()
      raise StudyError(f"mixtures: no |D| (a multiple of sft.data.batch_size {B}) for which "
                       f"every mixture of {shared} exists among the train facts' categories "
                       f"{counts}; lower mixtures.size, the batch size or the shares")
    stats, members = {"size": size}, []
    for name in mixture_names(self.c):
      n = size
      while n and not feasible(name, n):
        n -= B
      if not n:
        raise StudyError(f"mixtures: {name} has fewer than {B} train facts of its category; "
                         "drop it from mixtures.single")
      examples, st = build(name, n)
      write_jsonl(os.path.join(out, f"{name}.jsonl"),
                  [{"segments": [list(s) for s in e["segments"]]} for e in examples])
      members += [{"mixture": name, "item": e["fact"], "category": e["category"],
                   "idk": e["idk"]} for e in examples]
      stats[name] = dict(st, steps_per_epoch=n // B)
    write_csv(pd.DataFrame(members), os.path.join(out, "members.csv"))
    write_json(os.path.join(out, "stats.json"), stats)
    self.log(f"    |D| = {size}; " + ", ".join(f"{m}: {stats[m]['size']}"
                                                for m in mixture_names(self.c)))
    return {"size": size}

  def mixture_stats(self, size: str, seed: int) -> dict[str, Any]:
    return read_json(os.path.join(self.mixture_dir(size, seed), "stats.json"))

  def members(self, size: str, seed: int) -> pd.DataFrame:
    return pd.read_csv(os.path.join(self.mixture_dir(size, seed), "members.csv"))

  # ---- SFT --------------------------------------------------------------------------------
  def build_sft(self, out: str, size: str, seed: int, mixture: str) -> dict[str, Any]:
    per_epoch = self.mixture_stats(size, seed)[mixture]["steps_per_epoch"]
    c = platform.mutable(self.c.sft)
    c.seed = seed
    c.data.path = os.path.join(self.mixture_dir(size, seed), f"{mixture}.jsonl")
    c.model.init_from = self.base_path(size, seed)
    c.steps = self.c.epochs * per_epoch
    c.checkpoint.every = per_epoch
    c.checkpoint.keep = 0
    if not self.c.facts:
      c.data.tokenizer_dir = self.source.tok_dir
    res = platform.train_stage(c, out, f"study.sft ({mixture})")
    return {"step": res.step, "seconds": round(res.seconds, 1), "steps_per_epoch": per_epoch}

  # ---- QA on every checkpoint ---------------------------------------------------------------
  def build_eval(self, out: str, size: str, seed: int, mixture: str) -> dict[str, Any]:
    from factflip.evals.qa import closed_book_qa
    facts = self.facts()
    cats = self.categories(size, seed).set_index("item").category
    mem = self.members(size, seed)
    mem = mem[mem.mixture == mixture].set_index("item")
    by_id = {f.id: f for f in facts}
    evaluated = ([by_id[i] for i in mem.index]
                 + [f for f in facts if (f.split == "dev" and f.meta["distribution"] == "in")
                    or f.split == "test"])
    frame = pd.DataFrame({
        "item": [f.id for f in evaluated], "relation": [f.relation for f in evaluated],
        "split": [f.split for f in evaluated],
        "distribution": [f.meta["distribution"] for f in evaluated],
        "category": [cats.get(f.id, "") for f in evaluated],
        "member": [i < len(mem) for i in range(len(evaluated))]})
    frame["part"] = np.where(~frame.member, "", np.where(
        frame.category.eq("Unknown"), "unknown", "known"))
    frame["idk"] = frame.member & frame.item.map(mem.idk).fillna(False).astype(bool)
    tok = self.tokenizer(size)

    def qa(model, step):
      rows = pd.DataFrame(closed_book_qa(model, tok, evaluated, k=0,
                                         max_new_tokens=self.c.eval.max_new_tokens,
                                         batch_size=self.c.eval.batch_size))
      return pd.concat([frame, rows[["prediction", "em", "outcome"]]], axis=1)

    return probe_checkpoints(self.checkpoints(size, seed, mixture), out,
                             [CheckpointProbe("qa", qa)], self.load, self.log,
                             f"eval {size} seed {seed} {mixture}")

  # ---- results ------------------------------------------------------------------------------
  def build_results(self, out: str) -> dict[str, int]:
    return {name: len(df) for name, df in self.results(out).items()}

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables from the stages' outputs, written to `out` (default results/)."""
    from factflip.probes.slick import category_shares
    t = {name: [] for name in COLUMNS}
    for cell in self.cells():
      size, seed = cell["size"], cell["seed"]
      cats = self.categories(size, seed)
      for r in category_shares(cats.to_dict("records")).to_dict("records"):
        t["categories"].append({"size": size, "seed": seed, **r})
      if "tier" in cats:
        for tier, g in cats[cats.split == "train"].groupby("tier"):
          n = g.category.value_counts()
          t["tiers"].append({"size": size, "seed": seed, "tier": tier, "facts": len(g),
                             **{c: int(n.get(c, 0)) for c in _CATS}})
      stats = self.mixture_stats(size, seed)
      for m in mixture_names(self.c):
        st = stats[m]
        t["mixtures"].append({
            "size": size, "seed": seed, "mixture": m, "examples": st["size"],
            "unknown_share_configured": st["unknown_share_configured"],
            "unknown_share_realised": st["unknown_share_realised"],
            **{c: st["per_category"].get(c, 0) for c in _CATS},
            "idk_relabelled": st["idk_relabelled"], "steps_per_epoch": st["steps_per_epoch"]})
    for cell in self.cells(("size", "seed", "mixture")):
      size, seed, m = cell["size"], cell["seed"], cell["mixture"]
      d = self.eval_dir(size, seed, m)
      per_epoch = self.mixture_stats(size, seed)[m]["steps_per_epoch"]
      steps = table_steps(d, "qa")
      if not steps:
        raise StudyError(f"{d}: no qa_<step>.csv tables; the eval stage writes them")
      for step in steps:
        qa = pd.read_csv(os.path.join(d, f"qa_{step:06d}.csv"), keep_default_na=False)
        for col in ("member", "idk", "em"):
          qa[col] = qa[col].astype(str).eq("True")
        met = checkpoint_metrics(qa)
        ev = {k: met[k] for k in _EVAL}
        for part, (fitted, n) in met["parts"].items():
          t["dynamics"].append({"size": size, "seed": seed, "mixture": m,
                                "epoch": step // per_epoch, "step": step, "part": part,
                                "train_accuracy": fitted / n if n else float("nan"),
                                "fitted": fitted, "examples": n, **ev})
    dyn = pd.DataFrame(t["dynamics"], columns=COLUMNS["dynamics"])
    for (size, seed, m), g in dyn.groupby(["size", "seed", "mixture"], sort=False):
      per = g.pivot_table(index="epoch", columns="part", values=["fitted", "examples"],
                          aggfunc="sum")
      allacc = per["fitted"].sum(1) / per["examples"].sum(1)
      part_acc = g.pivot_table(index="epoch", columns="part", values="train_accuracy")
      ev = g.drop_duplicates("epoch").set_index("epoch")
      conv = allacc[allacc >= self.c.convergence - 1e-12]
      stops = {"early_stop": int(ev.dev_accuracy.fillna(-1).idxmax()),
               "convergence": int(conv.index[0]) if len(conv) else int(allacc.index[-1])}
      for stop, e in stops.items():
        t["stops"].append({
            "size": size, "seed": seed, "mixture": m, "unknown_share": unknown_share(m),
            "stop": stop, "epoch": e, "converged": bool(len(conv)),
            "train_accuracy": float(allacc[e]),
            **{f"train_accuracy_{p}": float(part_acc[p][e]) if p in part_acc else float("nan")
               for p in PARTS},
            **{k: float(ev.loc[e, k]) for k in _EVAL}})
      for p in PARTS:
        if p in part_acc and g[g.part == p].examples.iloc[0] > 0:
          curve = part_acc[p]
          t["fitting"].append({"size": size, "seed": seed, "mixture": m, "part": p,
                               "epochs_to_half": epochs_to(curve, 0.5),
                               "final_train_accuracy": float(curve.iloc[-1])})
    for cell in self.cells():
      size, seed = cell["size"], cell["seed"]
      g = dyn[(dyn["size"] == size) & (dyn.seed == seed) & dyn.mixture.str.startswith("unk")]
      wide = g.pivot_table(index=["mixture", "epoch"], columns="part",
                           values=["fitted", "examples"], aggfunc="sum")
      if wide.empty:
        continue
      n = wide["examples"].sum(1)
      x_kn = (wide["fitted"].get("known", 0) / n).to_numpy()
      x_unk = (wide["fitted"].get("unknown", 0) / n).to_numpy()
      ev = g.drop_duplicates(["mixture", "epoch"]).set_index(["mixture", "epoch"]).loc[
          wide.index]
      for dist, col in (("in", "test_accuracy_in"), ("ood", "test_accuracy_ood")):
        y = 100 * ev[col].to_numpy(np.float64)
        if not np.isfinite(y).all():
          continue
        t["fit"].append({"size": size, "seed": seed, "distribution": dist,
                         **linear_fit(x_kn, x_unk, y, self.c.fit.bootstrap,
                                      self.c.fit.confidence, seed)})
    out_dir = out or os.path.join(self.wd, "results")
    tables = {k: (dyn if k == "dynamics" else pd.DataFrame(v, columns=COLUMNS[k]))
              for k, v in t.items()}
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables

  # ---- report -------------------------------------------------------------------------------
  def report(self, tables, out_dir):
    from factflip.studies import new_knowledge_report
    return (new_knowledge_report.headline(tables),
            new_knowledge_report.figures(tables, out_dir))

  def summary(self, head: dict[str, Any]) -> list[str]:
    from factflip.studies.new_knowledge_report import summary_lines
    return summary_lines(head)

