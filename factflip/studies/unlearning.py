"""Paper D's study: unlearning by counterfactual tuning and its hidden costs — methods, gradient
conflict, hallucination spillover and RWKU-style metrics (SCIENCE.md D).

Owns: paper D's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or a model directory and the base's fact draw) the training sets, one
unlearning run per method with a checkpoint per epoch, the evaluation of the base and of every
checkpoint, the knowledge-conflict diagnostics, and the results tables; the layout below.
Must not: train (`factflip.train`), build sets (`data.mixtures`), score (`factflip.evals`),
compute gradients (`probes.gradients`) or plot (`unlearning_report.py`).

RWKU (`forget.source = "rwku"`, `facts` = RWKU's Target folder, with hf=): the forget facts are
the level-1 and level-2 forget probes of the folder's first `forget.n_targets` targets (one
example per probe, the first whole number of batches), every probe of theirs (levels 1–3,
forget and neighbour) is scored with RWKU's instruction, MIA compares their forget_mia and
retain_mia texts, the retain term reads `forget.retain_path`; RWKU has no counterfactuals
(no CFT, DPO towards the refusal) and no utility set: `eval.utility` names a facts file whose
facts give the multiple-choice utility questions and MIA's held-out texts (without it
utility_acc is NaN). `forget.template` trains each probe in the prompt it is asked with
(RWKU's instruction in the model's chat template), and `eval.template` asks the unseen
questions through the chat template too.

Runs (the `method` axis; `run_names`): `cft_<corpus>` (SFT on counterfactual answers, once per
corpus in `cft_corpora`: "consistent" = every rendering of a fact states one counterfactual,
"inconsistent" = each rendering a different one), `refusal` (SFT on "I don't know."),
`gradient_ascent` and `npo` (on the true answers) and `dpo` (the `dpo_target` answer preferred
over the truth); every one with the retain term `unlearn.objective.retain_weight` · retain NLL
(0 = none). Forget facts are the source's targets (world: `forget.n_targets` person facts of
`forget.tier`), retain facts its controls (`forget.n_retain` more of the tier), each forget fact
rendered as `forget.renders` (cloze prompt, question). An epoch is |forget set| / batch_size
steps; checkpoint e·steps_per_epoch is epoch e, and the base is epoch 0 of every run.

Workdir layout (every stage writes DONE last with the fingerprint of the keys it read):
  study.json, world/, tokenizer/, runs/<size>/seed<k>/pretrain/ (or base/)   the source's
  runs/<size>/seed<k>/sets/    forget_<set>.jsonl (cf_consistent, cf_inconsistent, refusal,
                               truth: {"segments"}; dpo: {"prompt","chosen","rejected"}),
                               retain.jsonl, forget.jsonl / retain_facts.jsonl (the facts),
                               stats.json (sizes, steps per epoch)
  runs/<size>/seed<k>/<run>/   the unlearning run (checkpoints/<step>, metrics.jsonl)
  runs/<size>/seed<k>/eval/base/<table>_000000.csv and eval/<run>/<table>_<step>.csv, tables:
      probes   RWKU-style greedy probes (`evals.rwku.fact_probes`): set, level, type, prompt,
               prediction, answer, rouge_l_recall
      unseen   closed-book QA on facts the model never saw (world: the unmentioned tier and
               made-up people; facts: `eval.unseen`): outcome right / wrong / abstained
      utility  multiple choice on non-target facts (lm-eval scoring): acc, acc_norm
      mia      LOSS, zlib, Min-K%, Min-K%++ of forget / retain / heldout texts
      cf       CounterFact ES/PS/NS per forget fact (its own counterfactual)
      dll      ΔLL = log p(true) − log p(counterfactual) per forget prompt
  runs/<size>/seed<k>/conflict/conflict.csv   per CFT corpus and checkpoint of its run
  results/tradeoff.csv, probes.csv, conflict.csv, spillover.csv

Definitions: forget_rougeL = the mean of the forget set's level means (L1 cloze, L2 question,
L3 adversarial), each level's mean over its probes; neighbour_rougeL = the mean over neighbour
probes. hallucination_rate / abstention_rate on unseen questions (`evals.qa.qa_summary`; a
made-up person's question has no right answer). utility_acc = multiple-choice accuracy (choices
= the truth and `eval.mc_choices` − 1 other objects of the relation, context = the cloze
prompt). heldout_loss = mean token NLL of held-out texts (paraphrase + true answer of utility
facts). mia_auc = AUC of the LOSS score, forget texts vs retain texts (the statements "<cloze
prompt> <answer>."): 0.5 = indistinguishable; below 0.5 the forget texts look less like
members. fluency = mean n-gram entropy of the forget probes' generations. conflict: per-example
gradients (`conflict.pattern`) of the run's forget examples; conflict_ratio and mean_cos over
all pairs, same_fact_* over the pairs of renderings of one fact; forget_retain_cos = cosine of
the mean forget gradient and the mean retain gradient.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pandas as pd

from factflip.fileio import read_json, write_csv, write_json
from factflip.studies import platform
from factflip.studies.checkpoints import CheckpointProbe, probe_checkpoints, table_path, table_steps
from factflip.studies.platform import StudyError, memo
from factflip.studies.sources import file_stamp
from factflip.studies.stages import Stage

METHODS = ("cft", "refusal", "gradient_ascent", "npo", "dpo")
_DRAW_KEYS = {"n_targets": "forget.n_targets", "tier": "forget.tier",
              "n_control": "forget.n_retain"}
CORPORA = ("consistent", "inconsistent")
# run -> (training objective, forget set file)
_OBJECTIVE = {"cft": "sft", "refusal": "sft", "gradient_ascent": "gradient_ascent",
              "npo": "npo", "dpo": "dpo"}
COLUMNS = {
    "tradeoff": ["size", "seed", "method", "corpus", "run", "epoch", "step", "forget_rougeL",
                 "forget_L1", "forget_L2", "forget_L3", "neighbour_rougeL", "utility_acc",
                 "utility_acc_norm", "heldout_loss", "mia_auc", "mia_auc_zlib",
                 "mia_auc_min_k", "mia_auc_min_kpp", "hallucination_rate", "abstention_rate",
                 "unseen_accuracy", "fluency", "es", "ps", "ns", "s", "forget_correct",
                 "forget_counterfactual"],
    "probes": ["size", "seed", "method", "corpus", "run", "epoch", "set", "level", "type",
               "rougeL", "probes"],
    "conflict": ["size", "seed", "corpus", "step", "epoch", "conflict_ratio", "mean_cos",
                 "same_fact_conflict_ratio", "same_fact_mean_cos", "forget_retain_cos",
                 "pairs", "same_fact_pairs", "examples"],
    "spillover": ["size", "seed", "method", "corpus", "run", "when", "epoch",
                  "hallucination_rate", "abstention_rate", "accuracy", "questions"],
}


def base_config():
  """Every key an unlearning study reads, with its default (configs/studies/unlearning.py
  starts from it): the keys every study has (`platform.common_config`) and paper D's own.
  `unlearn` is a training config (`factflip.train.config`); its data paths, objective.name,
  model.init_from, steps and checkpoint.every are set per run."""
  import ml_collections

  from factflip.evals.rwku import ADVERSARIAL
  from factflip.train import config as train_config
  c = platform.common_config()
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

  from factflip.configfile import ConfigError
  from factflip.evals.rwku import ADVERSARIAL
  from factflip.train import config as train_config

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  platform.check_schema(c, base_config(), "unlearning", ("forget", "eval", "conflict", "probe"),
                        source)
  platform.validate_common(c, source, "a facts file with counterfactual objects (`factflip "
                           "facts --facts=PATH` checks one)")
  need(c.forget.n_targets >= 2, "forget.n_targets", f"{c.forget.n_targets}; expected >= 2")
  need(c.forget.n_retain >= 0, "forget.n_retain", f"{c.forget.n_retain}; expected >= 0")
  need(len(c.forget.renders) > 0 and set(c.forget.renders) <= {"prompt", "question"},
       "forget.renders", f"{list(c.forget.renders)}; expected some of prompt, question")
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
    sub = platform.mutable(c.pretrain)
    sub.model.preset = c.sizes[0]
    train_config.validate(sub, source=f"{source}: pretrain", n_devices=jax.device_count(),
                          n_processes=jax.process_count())
  for objective in dict.fromkeys(_OBJECTIVE[method_of(r)[0]] for r in run_names(c)):
    sub = platform.mutable(c.unlearn)      # what build_unlearn sets per run
    sub.model.init_from = c.sizes[0] if c.facts else "runs/<size>/seed<k>/pretrain"
    sub.objective.name = objective
    sub.data.path = "runs/<size>/seed<k>/sets/forget_<set>.jsonl"
    sub.data.retain_path = ("runs/<size>/seed<k>/sets/retain.jsonl"
                            if c.unlearn.objective.retain_weight else "")
    train_config.validate(sub, source=f"{source}: unlearn ({objective})",
                          n_devices=jax.device_count(), n_processes=jax.process_count())


def _mean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(x.mean()) if len(x) else float("nan")


def conflict_rows(G_NxP, facts, retain_G_MxP=None) -> dict[str, float]:
  """Conflict statistics of per-example gradients (module docstring): over all pairs, over the
  pairs of examples of one fact (`facts`: each row's fact id), and the forget-retain cosine."""
  from factflip.probes.gradients import conflict_stats, cosine_matrix, gradient_cosine
  cos = cosine_matrix(G_NxP)
  out = conflict_stats(cos)
  facts = np.asarray(facts)
  i, j = np.triu_indices(len(cos), 1)
  same = facts[i] == facts[j]
  c = cos[i[same], j[same]]
  out.update(same_fact_conflict_ratio=float((c < 0).mean()) if len(c) else float("nan"),
             same_fact_mean_cos=float(c.mean()) if len(c) else float("nan"),
             same_fact_pairs=len(c), examples=len(cos))
  out["forget_retain_cos"] = (
      gradient_cosine(np.asarray(G_NxP).mean(0), np.asarray(retain_G_MxP).mean(0))
      if retain_G_MxP is not None else float("nan"))
  return out


class Study(platform.Study):
  """Paper D's study: the fact source's stages, then per (size, seed) the training sets, per
  run an unlearning run and the evaluation of each epoch's checkpoint (the base once), the
  conflict diagnostics along the CFT runs, then the results tables."""
  name = "unlearning"
  title = "unlearning by counterfactual tuning: conflict, spillover, RWKU metrics"
  base_config = staticmethod(base_config)
  validate = staticmethod(validate)

  @property
  def draw_keys(self) -> dict[str, str]:
    """The fact source draws the forget (targets) and retain (controls) facts, except from
    RWKU's folder, whose targets the study picks itself."""
    return {} if self.c.forget.source == "rwku" else _DRAW_KEYS

  def grid(self) -> dict[str, list]:
    return {"method": run_names(self.c)}

  # ---- layout -----------------------------------------------------------------------------
  def sets_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "sets")

  def unlearn_dir(self, size: str, seed: int, method: str) -> str:
    return self.run_dir(size, seed, method)

  def checkpoints(self, size: str, seed: int, method: str) -> str:
    return os.path.join(self.unlearn_dir(size, seed, method), "checkpoints")

  def eval_dir(self, size: str, seed: int, name: str) -> str:
    """eval/base (the base, step 0) or eval/<run> (its checkpoints after step 0)."""
    return os.path.join(self.run_dir(size, seed, "eval"), name)

  def conflict_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "conflict")

  def tables(self) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(os.path.join(self.wd, "results", f"{name}.csv"),
                              keep_default_na=False, na_values=[""])
            for name in COLUMNS}

  # ---- facts --------------------------------------------------------------------------------
  def _asked(self, items):
    """World items ask the corpus's question template (the tiny models answer it)."""
    if self.c.facts:
      return list(items)
    from factflip.data.world import with_train_question
    return [with_train_question(f) for f in items]

  def forget_facts(self, size: str, seed: int):
    """The facts to forget (RWKU: the chosen targets' level-1 and level-2 forget probes)."""
    if self.c.forget.source == "rwku":
      return self.rwku()["train"]
    return self._asked(self.source.targets(size, seed))

  def retain_facts(self, size: str, seed: int):
    return [] if self.c.forget.source == "rwku" else self._asked(self.source.controls(size,
                                                                                      seed))

  @memo
  def rwku(self) -> dict[str, Any]:
    """RWKU mode: the first forget.n_targets targets of the folder (its order), their probes
    (every level, forget and neighbour), the level-1/2 forget probes trained on, and their
    membership-inference texts."""
    from factflip.data.loaders import load_rwku_mia
    items = [f for f in self.source.items(candidates=False) if f.source == "rwku"]
    targets = list(dict.fromkeys(f.meta["target"] for f in items))
    n = self.c.forget.n_targets
    if len(targets) < n:
      raise StudyError(f"{self.c.facts}: {len(targets)} RWKU targets, fewer than "
                       f"forget.n_targets {n} (forget.source 'rwku' reads RWKU's Target "
                       "folder: <N>_<Name>/forget_level*.json, neighbor_level*.json)")
    chosen = targets[:n]
    probes = [f for f in items if f.meta["target"] in chosen]
    mia = load_rwku_mia(self.c.facts)
    missing = [t for t in chosen if not (mia.get(t, {}).get("forget")
                                         and mia.get(t, {}).get("retain"))]
    if missing:
      raise StudyError(f"{self.c.facts}: no forget_mia.json / retain_mia.json texts for "
                       f"RWKU targets {missing}")
    return {"targets": chosen, "probes": probes, "mia": {t: mia[t] for t in chosen},
            "train": [f for f in probes if f.split == "forget" and f.meta["level"] in (1, 2)]}

  def _others(self, size: str, seed: int):
    """Facts neither forgotten nor retained, that the base should know (world: the high and
    medium tiers; facts: the file's other facts with an answer and a prompt)."""
    if self.c.forget.source == "rwku":
      return []                      # RWKU's probes are all about its targets
    used = {f.id for f in self.source.targets(size, seed)} | {
        f.id for f in self.source.controls(size, seed)}
    if self.c.facts:
      pool = [f for f in self.source.items(candidates=False) if f.id not in used and f.prompt
              and f.answers]
    else:
      world, _ = self.source.world()
      pool = [f for f in world.facts if f.id not in used and not f.meta.get("two_hop")
              and f.meta.get("exposure_tier") in ("high", "medium")]
    return self._asked(pool)

  @memo
  def eval_sets(self, size: str, seed: int) -> dict[str, Any]:
    """What every checkpoint is evaluated on (a pure function of the source, config and seed):
    probes, unseen questions, utility questions (RWKU: from eval.utility), MIA texts, forget
    facts."""
    from factflip.evals.rwku import fact_probes
    forget = self.forget_facts(size, seed)
    rng = np.random.default_rng([seed, 11])
    unseen = self._unseen(rng, seed)
    if self.c.forget.source == "rwku":
      r = self.rwku()
      mia = [(k, t) for name in r["targets"] for k in ("forget", "retain")
             for t in r["mia"][name][k]]
      utility: list = []
      if self.c.eval.utility:
        from factflip.data.loaders import load_facts
        utility, heldout = self._utility([], [
            f for f in load_facts(self.c.eval.utility) if f.prompt and f.answers], rng)
        mia += [("heldout", t) for t in heldout]
      return {"probes": r["probes"], "unseen": unseen, "utility": utility, "mia": mia,
              "forget": forget}
    others = self._others(size, seed)
    probes = fact_probes(forget, others + self.retain_facts(size, seed),
                         kinds=tuple(self.c.eval.adversarial))
    utility, heldout = self._utility(forget, others, rng)

    def statement(f):
      return f"{f.prompt or f.question} {f.answers[0]}."
    mia = ([("forget", statement(f)) for f in forget]
           + [("retain", statement(f)) for f in self.retain_facts(size, seed)]
           + [("heldout", t) for t in heldout])
    return {"probes": probes, "unseen": unseen, "utility": utility, "mia": mia,
            "forget": forget}

  def _unseen(self, rng, seed: int):
    """Questions about facts the model never saw: `eval.unseen`, or the world's unmentioned
    facts and made-up people."""
    from factflip.data.world import made_up_questions
    if self.c.facts:
      from factflip.data.loaders import load_facts
      unseen = [f for f in load_facts(self.c.eval.unseen) if f.question and f.answers]
      if not unseen:
        raise StudyError(f"{self.c.eval.unseen}: no facts with a question and answers (the "
                         "hallucination-spillover questions)")
      return unseen
    world, _ = self.source.world()
    pool = [f for f in world.facts if f.meta.get("exposure_tier") == "none"
            and not f.meta.get("two_hop")]
    pick = sorted(rng.choice(len(pool), min(self.c.eval.n_unseen, len(pool)), replace=False))
    return self._asked([pool[i] for i in pick]) + made_up_questions(
        world, self.c.eval.n_made_up, seed)

  def _utility(self, forget, others, rng):
    """(multiple-choice questions on non-target facts: the cloze prompt, the truth among
    eval.mc_choices − 1 other objects of its relation; held-out texts: their paraphrases with
    the true answer)."""
    from factflip.evals.multiple_choice import MCQuestion
    objects: dict[str, list[str]] = {}
    for f in others + forget:
      objects.setdefault(f.relation, [])
      if f.answers[0] not in objects[f.relation]:
        objects[f.relation].append(f.answers[0])
    k = self.c.eval.mc_choices
    pool = [f for f in others if len(objects[f.relation]) >= k]
    if not pool:
      raise StudyError(f"no utility questions: no non-target facts with {k} distinct objects "
                       "in their relation (lower eval.mc_choices)")
    utility, heldout = [], []
    for i in sorted(rng.choice(len(pool), min(self.c.eval.n_utility, len(pool)),
                               replace=False)):
      f = pool[i]
      wrong = [o for o in objects[f.relation] if o != f.answers[0]]
      choices = [wrong[j] for j in rng.choice(len(wrong), k - 1, replace=False)]
      gold = int(rng.integers(k))
      choices.insert(gold, f.answers[0])
      utility.append(MCQuestion(f.prompt, tuple(choices), gold, f.id))
      if f.paraphrases:
        heldout.append(f"{f.paraphrases[0]} {f.answers[0]}.")
    return utility, heldout

  # ---- stages -------------------------------------------------------------------------------
  @memo
  def stage_sets(self, size: str, seed: int) -> Stage:
    return Stage(f"sets {size} seed{seed}", self.sets_dir(size, seed),
                 self.keys("forget", "unlearn.data.batch_size", seed=seed,
                           retain_file=file_stamp(self.c.forget.retain_path)
                           if self.c.forget.retain_path else []),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_unlearn(self, size: str, seed: int, method: str) -> Stage:
    return Stage(f"unlearn {size} seed{seed} {method}", self.unlearn_dir(size, seed, method),
                 self.keys("unlearn", "epochs", *(["dpo_target"] if method == "dpo" else []),
                           method=method, seed=seed),
                 (self.stage_sets(size, seed).fp, self.source.base_stage(size, seed).fp))

  def _eval_keys(self, seed: int) -> dict[str, Any]:
    from factflip.evals.generation import GENERATION_VERSION
    from factflip.evals.qa import QA_VERSION
    from factflip.probes.fact_preference import SCORER_VERSION
    unseen = file_stamp(self.c.eval.unseen) if self.c.eval.unseen else []
    utility = file_stamp(self.c.eval.utility) if self.c.eval.utility else []
    return self.keys("eval", "probe.dtype", "forget", seed=seed, unseen_file=unseen,
                     utility_file=utility,
                     generation=GENERATION_VERSION, scorer=SCORER_VERSION, qa=QA_VERSION)

  @memo
  def stage_eval_base(self, size: str, seed: int) -> Stage:
    return Stage(f"eval {size} seed{seed} base", self.eval_dir(size, seed, "base"),
                 self._eval_keys(seed), (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_eval(self, size: str, seed: int, method: str) -> Stage:
    return Stage(f"eval {size} seed{seed} {method}", self.eval_dir(size, seed, method),
                 self._eval_keys(seed), (self.stage_unlearn(size, seed, method).fp,))

  @memo
  def stage_conflict(self, size: str, seed: int) -> Stage:
    runs = [r for r in run_names(self.c) if r.startswith("cft_")]
    return Stage(f"conflict {size} seed{seed}", self.conflict_dir(size, seed),
                 self.keys("conflict", "probe.dtype", "unlearn.data.seq_len", runs=runs),
                 tuple(self.stage_unlearn(size, seed, r).fp for r in runs))

  @memo
  def stage_results(self) -> Stage:
    cells = list(self.cells(("size", "seed")))
    ups = ([self.stage_eval_base(**c).fp for c in cells]
           + [self.stage_eval(**c).fp for c in self.cells(("size", "seed", "method"))]
           + [self.stage_conflict(**c).fp for c in cells])
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("seeds", "tau", sizes=list(self.sizes)), tuple(ups))

  def specs(self) -> list[platform.StageSpec]:
    cell, run = ("size", "seed"), ("size", "seed", "method")
    S = platform.StageSpec
    return [S("sets", cell, self.stage_sets, self.build_sets),
            S("unlearn", run, self.stage_unlearn, self.build_unlearn, hosts=platform.SHARED),
            S("eval_base", cell, self.stage_eval_base, self.build_eval_base),
            S("eval", run, self.stage_eval, self.build_eval),
            S("conflict", cell, self.stage_conflict, self.build_conflict),
            S("results", (), self.stage_results, self.build_results)]

  # ---- training sets --------------------------------------------------------------------------
  def build_sets(self, out: str, size: str, seed: int) -> dict[str, Any]:
    """Every forget set any run could train on (so adding a run reuses this stage): the
    counterfactual corpora (when every forget fact has a counterfactual), refusal, truth, the
    DPO pairs for both targets, and the retain set."""
    from factflip.data.facts import write_facts_jsonl
    from factflip.data.mixtures import UnlearnConfig, preference_pairs, unlearning_sets
    from factflip.fileio import write_jsonl
    from factflip.train.inputs import read_examples
    forget, retain = self.forget_facts(size, seed), self.retain_facts(size, seed)
    B = self.c.unlearn.data.batch_size
    stats: dict[str, Any] = {"forget_facts": len(forget), "retain_facts": len(retain)}
    if self.c.forget.source == "rwku":
      # one example per probe: the first whole number of batches in the folder's order
      keep = len(forget) // B * B
      if not keep:
        raise StudyError(f"RWKU: {len(forget)} level-1/2 forget probes, fewer than "
                         f"unlearn.data.batch_size {B}; more forget.n_targets")
      stats["rwku_probes_left_out"] = len(forget) - keep
      forget = forget[:keep]
      self.log(f"    RWKU targets {self.rwku()['targets']}: {keep} probes trained on, "
               f"{stats['rwku_probes_left_out']} left out (not a whole batch)")
    has_cf = all(f.counterfactual for f in forget)
    needs = {"truth": ("truth", "consistent"), "refusal": ("refusal", "consistent")}
    if has_cf:
      needs.update({f"cf_{k}": ("counterfactual", k) for k in CORPORA})
    examples = {}

    def write(name, records):
      if len(records) % B:
        raise StudyError(f"forget set {name}: {len(records)} examples, not a multiple of "
                         f"unlearn.data.batch_size {B} (an epoch is a whole number of steps); "
                         "change forget.n_targets, forget.renders or the batch size")
      write_jsonl(os.path.join(out, f"forget_{name}.jsonl"), records)
      stats[name] = {"examples": len(records), "steps_per_epoch": len(records) // B}

    for name, (target, consistency) in needs.items():
      sets, st = unlearning_sets(forget, retain, UnlearnConfig(
          target=target, consistency=consistency, renders=tuple(self.c.forget.renders),
          seed=seed), candidates=forget + retain + self._others(size, seed))
      if self.c.forget.template:
        sets["forget"] = self._as_probed(sets["forget"], forget, size)
      examples[name] = sets["forget"]
      write(name, [{"segments": [list(x) for x in e["segments"]], "fact": e["fact"]}
                   for e in sets["forget"]])
      stats[name]["distinct_counterfactuals_per_group"] = st[
          "distinct_counterfactuals_per_group"]
      if name == "truth" and sets["retain"]:
        write_jsonl(os.path.join(out, "retain.jsonl"),
                    [{"segments": [list(x) for x in e["segments"]], "fact": e["fact"]}
                     for e in sets["retain"]])
    if self.c.forget.retain_path:              # given retain examples replace the facts'
      write_jsonl(os.path.join(out, "retain.jsonl"), [
          {"segments": [list(x) for x in e["segments"]]}
          for e in read_examples(self.c.forget.retain_path)])
    for target, src in (("counterfactual", "cf_consistent"), ("refusal", "refusal")):
      if src in examples:
        write(f"dpo_{target}", preference_pairs(examples[src], forget))
    write_facts_jsonl(os.path.join(out, "forget.jsonl"), forget)
    write_facts_jsonl(os.path.join(out, "retain_facts.jsonl"), retain)
    write_json(os.path.join(out, "stats.json"), stats)
    self.log(f"    forget {len(forget)} facts, retain {len(retain)}; " + ", ".join(
        f"{k}: {v['examples']}" for k, v in stats.items() if isinstance(v, dict)))
    return {"forget": len(forget), "retain": len(retain)}

  def _as_probed(self, examples, forget, size: str) -> list[dict[str, Any]]:
    """Forget examples with the context their probe asks (`forget.template`): RWKU's
    instruction of the level (a "prompt" render is level 1, a "question" render level 2, an
    RWKU probe its own level) in the model's chat template, then "Answer:"."""
    from factflip.evals.rwku import rwku_prompt
    tok, by_id = self.tokenizer(size), {f.id: f for f in forget}
    out = []
    for e in examples:
      f = by_id[e["fact"]]
      level = f.meta.get("level") or (1 if e["render"] == "prompt" else 2)
      query = f.prompt if e["render"] == "prompt" and f.prompt else f.question
      context = rwku_prompt(level, query, f.meta.get("type") or "", tok, chat=True)
      out.append(dict(e, segments=((context, False), *e["segments"][1:])))
    return out

  def set_stats(self, size: str, seed: int) -> dict[str, Any]:
    return read_json(os.path.join(self.sets_dir(size, seed), "stats.json"))

  def forget_set(self, size: str, seed: int, run: str) -> str:
    """The forget set a run trains on (sets/forget_<name>.jsonl); a StudyError when the sets
    stage could not build it (counterfactual sets need a counterfactual per forget fact)."""
    method, corpus = method_of(run)
    name = {"cft": f"cf_{corpus}", "refusal": "refusal", "gradient_ascent": "truth",
            "npo": "truth", "dpo": f"dpo_{self.c.dpo_target}"}[method]
    if name not in self.set_stats(size, seed):
      forget = self.forget_facts(size, seed)
      bad = next((f.id for f in forget if not f.counterfactual), "?")
      raise StudyError(f"run {run}: the forget facts have no counterfactual objects (e.g. "
                       f"{bad!r}, field 'counterfactual'); counterfactual tuning and DPO with "
                       "dpo_target 'counterfactual' need one per fact (use methods without "
                       "them, or a facts file with counterfactuals)")
    return name

  def steps_per_epoch(self, size: str, seed: int, run: str) -> int:
    return self.set_stats(size, seed)[self.forget_set(size, seed, run)]["steps_per_epoch"]

  # ---- unlearning runs ------------------------------------------------------------------------
  def build_unlearn(self, out: str, size: str, seed: int, method: str) -> dict[str, Any]:
    per_epoch = self.steps_per_epoch(size, seed, method)
    sets = self.sets_dir(size, seed)
    c = platform.mutable(self.c.unlearn)
    c.seed = seed
    c.objective.name = _OBJECTIVE[method_of(method)[0]]
    c.data.path = os.path.join(sets, f"forget_{self.forget_set(size, seed, method)}.jsonl")
    c.data.retain_path = (os.path.join(sets, "retain.jsonl")
                          if self.c.unlearn.objective.retain_weight else "")
    c.model.init_from = self.base_path(size, seed)
    c.steps = self.c.epochs * per_epoch
    c.checkpoint.every = per_epoch
    c.checkpoint.keep = 0
    if not self.c.facts:
      c.data.tokenizer_dir = self.source.tok_dir
    res = platform.train_stage(c, out, f"study.unlearn ({method})")
    return {"step": res.step, "seconds": round(res.seconds, 1), "steps_per_epoch": per_epoch}

  # ---- evaluation -----------------------------------------------------------------------------
  def _probes(self, size: str, seed: int) -> list[CheckpointProbe]:
    """The six tables of one model (module docstring), each a CheckpointProbe."""
    from factflip.evals.counterfact import counterfact_scores
    from factflip.evals.mia import mia_scores
    from factflip.evals.multiple_choice import mc_metrics, score_choices
    from factflip.evals.qa import closed_book_qa, is_abstention
    from factflip.evals.rwku import rwku_probe
    from factflip.probes.fact_preference import preference
    s, tok, e = self.eval_sets(size, seed), self.tokenizer(size), self.c.eval

    def probes(model, step):
      return pd.DataFrame(rwku_probe(model, tok, s["probes"], batch_size=e.batch_size,
                                     max_new_tokens=e.max_new_tokens, template=e.template))

    def unseen(model, step):
      rows = pd.DataFrame(closed_book_qa(model, tok, s["unseen"],
                                         max_new_tokens=e.max_new_tokens,
                                         batch_size=e.batch_size, chat=e.template))
      made_up = np.asarray([bool(f.meta.get("made_up")) for f in s["unseen"]])
      rows["made_up"] = made_up
      rows.loc[made_up, "outcome"] = ["abstained" if is_abstention(p) else "wrong"
                                      for p in rows.prediction[made_up]]
      return rows

    def utility(model, step):
      m = mc_metrics(s["utility"], score_choices(model, tok, s["utility"],
                                                 batch_size=e.batch_size))
      return pd.DataFrame(m["rows"])

    def mia(model, step):
      rows = pd.DataFrame(mia_scores(model, tok, [t for _, t in s["mia"]],
                                     batch_size=e.batch_size))
      rows.insert(0, "set", [k for k, _ in s["mia"]])
      return rows

    def cf(model, step):
      return pd.DataFrame(counterfact_scores(model, tok, s["forget"], e.batch_size)[0])

    def dll(model, step):
      return pd.DataFrame(preference(model, tok, s["forget"], kinds=("prompt", "question"),
                                     batch_size=e.batch_size))

    fns = {"probes": probes, "unseen": unseen, "utility": utility, "mia": mia, "cf": cf,
           "dll": dll}
    if not all(f.counterfactual for f in s["forget"]):
      fns.pop("cf"), fns.pop("dll")       # nothing to prefer the truth over
    if not s["utility"]:
      fns.pop("utility")                  # RWKU without eval.utility
    return [CheckpointProbe(name, fn, lambda i, step: step > 0) for name, fn in fns.items()]

  def build_eval_base(self, out: str, size: str, seed: int) -> dict[str, Any]:
    from factflip.data.facts import write_facts_jsonl
    model = self.load(self.base_path(size, seed))
    for p in self._probes(size, seed):
      write_csv(p.fn(model, 0), table_path(out, p.name, 0))
    s = self.eval_sets(size, seed)
    write_facts_jsonl(os.path.join(out, "probe_items.jsonl"), s["probes"])
    write_facts_jsonl(os.path.join(out, "unseen_items.jsonl"), s["unseen"])
    return {"probes": len(s["probes"]), "unseen": len(s["unseen"]),
            "utility": len(s["utility"])}

  def build_eval(self, out: str, size: str, seed: int, method: str) -> dict[str, Any]:
    return probe_checkpoints(self.checkpoints(size, seed, method), out,
                             self._probes(size, seed), self.load, self.log,
                             f"eval {size} seed {seed} {method}")

  # ---- conflict -------------------------------------------------------------------------------
  def build_conflict(self, out: str, size: str, seed: int) -> dict[str, Any]:
    from factflip.data.pipeline import pad_examples
    from factflip.fileio import iter_json_records
    from factflip.models.store import valid_steps
    from factflip.probes.gradients import per_example_grads
    from factflip.train.inputs import read_examples
    sets, tok = self.sets_dir(size, seed), self.tokenizer(size)
    L = self.c.unlearn.data.seq_len
    runs = [r for r in run_names(self.c) if r.startswith("cft_")]
    retain_path = os.path.join(sets, "retain.jsonl")
    retain = (pad_examples(read_examples(retain_path), tok, L)
              if runs and os.path.exists(retain_path) else None)
    rows = []
    for run in runs:
      path = os.path.join(sets, f"forget_{self.forget_set(size, seed, run)}.jsonl")
      facts = [r["fact"] for _, _, r in iter_json_records(path)]
      batch = pad_examples(read_examples(path), tok, L)
      per_epoch = self.steps_per_epoch(size, seed, run)
      ckpts = self.checkpoints(size, seed, run)
      for step in valid_steps(ckpts):
        model = self.load(os.path.join(ckpts, str(step)))
        params = model.params()
        G = per_example_grads(params, model.cfg, batch, self.c.conflict.pattern,
                              self.c.conflict.chunk)
        R = (per_example_grads(params, model.cfg, retain, self.c.conflict.pattern,
                               self.c.conflict.chunk) if retain is not None else None)
        rows.append({"corpus": method_of(run)[1], "step": step, "epoch": step // per_epoch,
                     **conflict_rows(np.asarray(G), facts,
                                     None if R is None else np.asarray(R))})
        self.log(f"    conflict {run} step {step}: ratio {rows[-1]['conflict_ratio']:.3f}, "
                 f"same fact {rows[-1]['same_fact_conflict_ratio']:.3f}, forget-retain cos "
                 f"{rows[-1]['forget_retain_cos']:.3f}")
    cols = [k for k in COLUMNS["conflict"] if k not in ("size", "seed")]
    write_csv(pd.DataFrame(rows, columns=cols), os.path.join(out, "conflict.csv"))
    return {"rows": len(rows)}

  # ---- results --------------------------------------------------------------------------------
  def build_results(self, out: str) -> dict[str, int]:
    return {name: len(df) for name, df in self.results(out).items()}

  def _read(self, d: str, name: str, step: int) -> pd.DataFrame | None:
    path = table_path(d, name, step)
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if os.path.exists(
        path) else None

  def checkpoint_row(self, d: str, step: int) -> tuple[dict[str, float], pd.DataFrame,
                                                       dict[str, float]]:
    """One evaluated model's trade-off metrics, its per-level probe means and its spillover
    summary, from its tables in `d`."""
    from factflip.evals.counterfact import fluency, summarize
    from factflip.evals.mia import auc
    from factflip.evals.qa import qa_summary
    from factflip.probes.fact_preference import CORRECT, COUNTERFACTUAL, state_share
    p = self._read(d, "probes", step)
    p["prediction"] = p.prediction.fillna("").astype(str)
    f, n = p[p.set == "forget"], p[p.set == "neighbour"]
    levels = {lv: _mean(f[f.level == lv].rouge_l_recall) for lv in (1, 2, 3)}
    by = p.groupby(["set", "level", "type"], sort=False).rouge_l_recall.agg(["mean", "size"])
    probes = by.reset_index().rename(columns={"mean": "rougeL", "size": "probes"})
    u = self._read(d, "unseen", step)
    q = qa_summary(list(u.outcome))
    mc = self._read(d, "utility", step)
    if mc is None:
      mc = pd.DataFrame({"acc": [], "acc_norm": []})
    mia = self._read(d, "mia", step)
    fm, rm = mia[mia.set == "forget"], mia[mia.set == "retain"]
    row = {"forget_rougeL": _mean([v for v in levels.values() if np.isfinite(v)]),
           **{f"forget_L{lv}": v for lv, v in levels.items()},
           "neighbour_rougeL": _mean(n.rouge_l_recall), "utility_acc": _mean(mc.acc),
           "utility_acc_norm": _mean(mc.acc_norm),
           "heldout_loss": -_mean(mia[mia.set == "heldout"].loss),
           "hallucination_rate": q["hallucination_rate"],
           "abstention_rate": q["abstention_rate"], "unseen_accuracy": q["accuracy"],
           "fluency": fluency(list(f.prediction))}
    for col, key in (("loss", "mia_auc"), ("zlib", "mia_auc_zlib"),
                     ("min_k_0.2", "mia_auc_min_k"), ("min_k++_0.2", "mia_auc_min_kpp")):
      row[key] = (auc(fm[col], rm[col]) if len(fm) and len(rm) and col in mia
                  and fm[col].notna().all() and rm[col].notna().all() else float("nan"))
    cf = self._read(d, "cf", step)
    cfs = summarize(cf.to_dict("records")) if cf is not None else {}
    row.update({k.lower(): cfs.get(k, float("nan")) for k in ("ES", "PS", "NS", "S")})
    dl = self._read(d, "dll", step)
    tau = self.c.tau
    row["forget_correct"] = (float(state_share(dl.dll.values, CORRECT, tau))
                             if dl is not None else float("nan"))
    row["forget_counterfactual"] = (float(state_share(dl.dll.values, COUNTERFACTUAL, tau))
                                    if dl is not None else float("nan"))
    return row, probes, {**{k: q[k] for k in ("hallucination_rate", "abstention_rate",
                                              "accuracy")}, "questions": q["n"]}

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    t = {name: [] for name in COLUMNS}
    for cell in self.cells():
      size, seed = cell["size"], cell["seed"]
      base = self.checkpoint_row(self.eval_dir(size, seed, "base"), 0)
      for run in run_names(self.c):
        method, corpus = method_of(run)
        d = self.eval_dir(size, seed, run)
        per_epoch = self.steps_per_epoch(size, seed, run)
        steps = [s for s in table_steps(d, "probes") if s > 0]
        if not steps:
          raise StudyError(f"{d}: no probes_<step>.csv tables; the eval stage writes them")
        key = {"size": size, "seed": seed, "method": method, "corpus": corpus, "run": run}
        for step in [0, *steps]:
          row, probes, spill = base if step == 0 else self.checkpoint_row(d, step)
          epoch = step // per_epoch
          t["tradeoff"].append({**key, "epoch": epoch, "step": step, **row})
          for r in probes.to_dict("records"):
            t["probes"].append({**key, "epoch": epoch, **r})
          if step in (0, steps[-1]):
            t["spillover"].append({**key, "when": "before" if step == 0 else "after",
                                   "epoch": epoch, **spill})
      path = os.path.join(self.conflict_dir(size, seed), "conflict.csv")
      for r in pd.read_csv(path).to_dict("records"):
        t["conflict"].append({"size": size, "seed": seed, **r})
    out_dir = out or os.path.join(self.wd, "results")
    tables = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in t.items()}
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables

  # ---- report ---------------------------------------------------------------------------------
  def report(self, tables, out_dir):
    from factflip.studies import unlearning_report
    return unlearning_report.headline(tables), unlearning_report.figures(tables, out_dir)

  def summary(self, head: dict[str, Any]) -> list[str]:
    from factflip.studies.unlearning_report import summary_lines
    return summary_lines(head)
