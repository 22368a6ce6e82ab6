"""Paper D's config: every key the unlearning study reads, with its default, its checks and its
runs' names.

Owns: `base_config` (configs/studies/unlearning.py starts from it), `validate` (ConfigError
naming the source and key), `run_names` / `method_of` (the `method` axis: cft_<corpus>, then
the other methods) and what each method trains (`OBJECTIVE`).
Must not: run anything.
"""

from __future__ import annotations

import os
import re

from factflip.configfile import ConfigError
from factflip.data.unlearning_sets import RENDERS
from factflip.evals.rwku import ADVERSARIAL
from factflip.studies.schema import check_schema, common_config, mutable, validate_common
from factflip.train import config as train_config

METHODS = ("cft", "refusal", "gradient_ascent", "npo", "dpo")
DRAW_KEYS = {"n_targets": "forget.n_targets", "tier": "forget.tier",
              "n_control": "forget.n_retain"}
CORPORA = ("consistent", "inconsistent")
# run -> (training objective, forget set file)
OBJECTIVE = {"cft": "sft", "refusal": "sft", "gradient_ascent": "gradient_ascent",
              "npo": "npo", "dpo": "dpo"}


def base_config():
  """Every key an unlearning study reads, with its default (configs/studies/unlearning.py
  starts from it): the keys every study has (`schema.common_config`) and paper D's own.
  `unlearn` is a training config (`factflip.train.config`); its data paths, objective.name,
  model.init_from, steps and checkpoint.every are set per run."""
  import ml_collections

  c = common_config()
  c.study = "unlearning"
  c.forget = ml_collections.ConfigDict()
  c.forget.n_targets = 24          # facts to forget (world: person facts of `tier`)
  c.forget.tier = "high"           # world: the exposure tier they come from
  c.forget.n_retain = 24           # retain facts (the retain term's data, MIA's non-members)
  c.forget.renders = ("prompt", "question")   # forget examples per fact (tuples: settable
  #                                              with --config.KEY="('a','b')")
  c.forget.source = "draw"         # draw: the fact source's targets (world, or facts the base
  #                                  knows); rwku: `facts` is RWKU's Target folder and the
  #                                  first n_targets targets are forgotten (module docstring)
  c.forget.retain_path = ""        # rwku: retain examples (JSONL, any training-example record)
  #                                  for the retain term (RWKU ships no retain corpus)
  c.forget.template = False        # train each forget example in the prompt its probe asks:
  #                                  RWKU's instruction of its level in the model's chat
  #                                  template (`evals.rwku.rwku_prompt`; for instruct models,
  #                                  with eval.template)
  c.align = ml_collections.ConfigDict()   # world: an instruct stage before unlearning
  c.align.epochs = 0               # SFT epochs on the alignment set (0 = unlearn the pretrained
  #                                  base as it is); the set: the questions of the high and
  #                                  medium tiers' facts neither forgotten nor retained,
  #                                  answered, and "I don't know." to never-mentioned facts and
  #                                  made-up people, both disjoint from the spillover questions
  c.align.lr = 3e-4                # its learning rate (the rest of its training config:
  #                                  `unlearn`'s, as SFT: data.kind examples, no retain term)
  c.align.unmentioned_share = 0.5  # never-mentioned facts abstained on (the rest: spillover)
  c.align.n_made_up = 40           # made-up people abstained on (others than the spillover's)
  c.methods = METHODS
  c.cft_corpora = CORPORA          # CFT runs once per counterfactual corpus
  c.dpo_target = "counterfactual"  # dpo: the preferred answer (counterfactual | refusal)
  c.epochs = 5
  c.unlearn = train_config.base_config()
  c.unlearn.data.kind = "unlearn"
  c.unlearn.data.packing = "pad"   # one example per row: an epoch is |forget| / batch_size steps
  c.unlearn.objective.name = "sft"  # set per run
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64           # prompts per compiled generation / scoring program
  c.eval.max_new_tokens = 30       # RWKU: greedy 30 tokens
  c.eval.template = True           # RWKU's instruction around each probe (False: the prompt as
  #                                  is, for base models that follow no instruction)
  c.eval.adversarial = ADVERSARIAL  # level-3 variants
  c.eval.n_unseen = 40             # world: unmentioned facts asked (spillover)
  c.eval.n_made_up = 20            # world: questions about people who do not exist
  c.eval.unseen = ""               # facts: a facts file of questions the model never saw
  c.eval.n_utility = 40            # multiple-choice questions on non-target facts
  c.eval.utility = ""              # rwku: a facts file (prompts, answers, relations; e.g.
  #                                  CounterFact) whose facts give the utility questions and
  #                                  MIA's held-out texts (RWKU ships no utility set)
  c.eval.mc_choices = 4
  c.conflict = ml_collections.ConfigDict()
  c.conflict.pattern = ".*"        # parameters whose per-example gradients are compared (regex)
  c.conflict.chunk = 8             # examples whose gradients are computed at once
  return c


def run_names(c) -> list[str]:
  """The runs of a config in order: cft_<corpus> per corpus, then the other methods."""
  out = []
  for m in c.methods:
    out += [f"cft_{k}" for k in c.cft_corpora] if m == "cft" else [m]
  return out


def method_of(run: str) -> tuple[str, str]:
  """(method, corpus) of a run name ("none" when it trains on no counterfactual corpus)."""
  if run.startswith("cft_"):
    return "cft", run[4:]
  return run, "none"


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs: ConfigError naming the source and key."""
  import jax


  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  check_schema(c, base_config(), "unlearning", ("forget", "align", "eval", "conflict", "probe"),
                        source)
  validate_common(c, source, "a facts file with counterfactual objects (`factflip "
                           "facts --facts=PATH` checks one)")
  need(c.forget.n_targets >= 2, "forget.n_targets", f"{c.forget.n_targets}; expected >= 2")
  need(c.forget.n_retain >= 0, "forget.n_retain", f"{c.forget.n_retain}; expected >= 0")
  need(len(c.forget.renders) > 0 and set(c.forget.renders) <= set(RENDERS)
       and len(set(c.forget.renders)) == len(c.forget.renders),
       "forget.renders", f"{list(c.forget.renders)}; expected distinct renders of "
       f"{list(RENDERS)}")
  need(not c.facts or set(c.forget.renders) <= {"prompt", "question"}, "forget.renders",
       f"{list(c.forget.renders)} with a facts file; 'restatement' and 'rephrased_question' "
       "render the world's templates: expected some of prompt, question")
  need(c.align.epochs >= 0, "align.epochs", f"{c.align.epochs}; expected >= 0 (0 = none)")
  need(not c.facts or c.align.epochs == 0, "align.epochs",
       f"{c.align.epochs} with a facts file; the alignment stage aligns a world base (a "
       "model directory is unlearnt as it is, e.g. an instruct model): expected 0")
  need(0 <= c.align.unmentioned_share < 1 and c.align.n_made_up >= 0 and c.align.lr > 0,
       "align", f"unmentioned_share {c.align.unmentioned_share} (in [0, 1)), n_made_up "
       f"{c.align.n_made_up} (>= 0), lr {c.align.lr} (> 0)")
  need(len(c.methods) > 0 and set(c.methods) <= set(METHODS)
       and len(set(c.methods)) == len(c.methods), "methods",
       f"{list(c.methods)}; expected distinct methods of {list(METHODS)}")
  need("cft" not in c.methods or (len(c.cft_corpora) > 0 and set(c.cft_corpora) <= set(CORPORA)),
       "cft_corpora", f"{list(c.cft_corpora)}; expected some of {list(CORPORA)}")
  need(c.dpo_target in ("counterfactual", "refusal"), "dpo_target",
       f"{c.dpo_target!r}; expected counterfactual or refusal")
  need(c.epochs >= 1, "epochs", f"{c.epochs}; expected >= 1")
  need(c.forget.source in ("draw", "rwku"), "forget.source",
       f"{c.forget.source!r}; expected draw or rwku")
  rwku = c.forget.source == "rwku"
  need(not rwku or bool(c.facts), "forget.source", "'rwku' reads RWKU's Target folder from "
       "`facts` (hf=DIR,facts=RWKU/Target)")
  need(not rwku or ("cft" not in c.methods and ("dpo" not in c.methods
                                                 or c.dpo_target == "refusal")), "methods",
       f"{list(c.methods)} with forget.source 'rwku' and dpo_target {c.dpo_target!r}: RWKU's "
       "probes carry no counterfactual objects, so counterfactual tuning and DPO towards a "
       "counterfactual have nothing to train on; drop cft (and set dpo_target 'refusal')")
  need(not c.forget.retain_path or os.path.exists(c.forget.retain_path), "forget.retain_path",
       f"{c.forget.retain_path!r} does not exist; expected a JSONL of training examples")
  need(not rwku or c.unlearn.objective.retain_weight == 0 or bool(c.forget.retain_path),
       "forget.retain_path", f"empty with forget.source 'rwku' and unlearn.objective."
       f"retain_weight {c.unlearn.objective.retain_weight}: the retain term needs retain data "
       "(RWKU ships none); give a JSONL of examples, or set retain_weight 0")
  need(rwku or c.unlearn.objective.retain_weight == 0 or c.forget.n_retain > 0,
       "forget.n_retain",
       f"0 with unlearn.objective.retain_weight {c.unlearn.objective.retain_weight}: the retain "
       "term needs retain facts (set n_retain > 0, or retain_weight = 0 for no retain term)")
  need(c.unlearn.data.kind == "unlearn" and c.unlearn.data.packing == "pad", "unlearn.data",
       f"kind {c.unlearn.data.kind!r}, packing {c.unlearn.data.packing!r}; expected 'unlearn' "
       "and 'pad' (one example per row: an epoch is a whole number of steps)")
  need(c.eval.batch_size >= 1 and c.eval.max_new_tokens >= 1, "eval",
       "batch_size and max_new_tokens must be >= 1")
  need(set(c.eval.adversarial) <= set(ADVERSARIAL), "eval.adversarial",
       f"{list(c.eval.adversarial)}; expected some of {list(ADVERSARIAL)}")
  need(c.eval.mc_choices >= 2 and c.eval.n_utility >= 1, "eval.mc_choices",
       f"{c.eval.mc_choices} choices, {c.eval.n_utility} questions; expected >= 2 and >= 1")
  if c.facts:
    need(bool(c.eval.unseen) and os.path.exists(c.eval.unseen), "eval.unseen",
         f"{c.eval.unseen!r}; expected a facts file of questions the models never saw (the "
         "hallucination-spillover set)")
  else:
    need(c.forget.tier in ("high", "medium", "low", "none"), "forget.tier",
         f"{c.forget.tier!r}; expected high, medium, low or none")
  need(not c.eval.utility or rwku, "eval.utility", f"{c.eval.utility!r} with forget.source "
       f"{c.forget.source!r}; expected forget.source 'rwku' (otherwise the utility questions "
       "are the non-target facts of the world or the facts file)")
  need(not c.eval.utility or os.path.exists(c.eval.utility), "eval.utility",
       f"{c.eval.utility!r} does not exist; expected a facts file of utility questions")
  need(c.conflict.chunk >= 1, "conflict.chunk", f"{c.conflict.chunk}; expected >= 1")
  try:
    re.compile(c.conflict.pattern)
  except re.error as e:
    raise ConfigError(source, "conflict.pattern", f"{c.conflict.pattern!r} is not a regular "
                      f"expression ({e})") from None
  if not c.facts:
    sub = mutable(c.pretrain)
    sub.model.preset = c.sizes[0]
    train_config.validate(sub, source=f"{source}: pretrain", n_devices=jax.device_count(),
                          n_processes=jax.process_count())
  for objective in dict.fromkeys(OBJECTIVE[method_of(r)[0]] for r in run_names(c)):
    sub = mutable(c.unlearn)      # what build_unlearn sets per run
    sub.model.init_from = c.sizes[0] if c.facts else "runs/<size>/seed<k>/pretrain"
    sub.objective.name = objective
    sub.data.path = "runs/<size>/seed<k>/sets/forget_<set>.jsonl"
    sub.data.retain_path = ("runs/<size>/seed<k>/sets/retain.jsonl"
                            if c.unlearn.objective.retain_weight else "")
    train_config.validate(sub, source=f"{source}: unlearn ({objective})",
                          n_devices=jax.device_count(), n_processes=jax.process_count())
