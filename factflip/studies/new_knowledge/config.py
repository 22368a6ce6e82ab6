"""Paper B's config: every key the new-knowledge study reads, with its default, its checks and
its mixtures' names.

Owns: `base_config` (configs/studies/new_knowledge.py starts from it), `validate`
(ConfigError naming the source and key), `mixture_names` / `unknown_share` (unk<X>, idk<X>
and the single-category sets) and EntityQuestions' relations as paper B splits them.
Must not: run anything.
"""

from __future__ import annotations

import re

from factflip.configfile import ConfigError
from factflip.data.world import GEO_RELATIONS, PERSON_RELATIONS
from factflip.probes.slick import SliCKConfig
from factflip.studies.schema import check_schema, common_config, mutable, validate_common
from factflip.train import config as train_config

SINGLE = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Natural")
# EntityQuestions relations (paper B §2): fine-tuned and tested, tested only
ENTITYQUESTIONS_IN = ("P131", "P136", "P17", "P19", "P26", "P264", "P36", "P40", "P495", "P69",
                      "P740", "P800")
ENTITYQUESTIONS_OOD = ("P127", "P50", "P407", "P176", "P170", "P175", "P112")


def base_config():
  """Every key a new-knowledge study reads, with its default (configs/studies/new_knowledge.py
  starts from it): the keys every study has (`schema.common_config`) and paper B's own.
  `sft` is a training config (`factflip.train.config`); its data.path, model.init_from,
  steps and checkpoint.every are set per mixture."""
  import ml_collections

  c = common_config()
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
  c.slick.form = "qa"              # k-shot prompts as questions ("qa", the paper's) or as the
  #                                  corpus's statements ("cloze": a base that never saw a
  #                                  question; factflip.probes.slick)
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


  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  check_schema(c, base_config(), "new_knowledge",
                        ("slick", "mixtures", "eval", "fit", "probe"), source)
  validate_common(c, source, "a facts file or folder whose items carry a split "
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
    sub = mutable(c[stage])
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
