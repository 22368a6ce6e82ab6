"""Paper D's study: unlearning by counterfactual tuning and its hidden costs — methods, gradient
conflict, hallucination spillover and RWKU-style metrics (SCIENCE.md D).

Owns: paper D's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or a model directory and the base's fact draw) the training sets, on the
world the alignment stage (`align.epochs`: SFT that answers the known facts and abstains on the
unknown, as RWKU's instruct models do; every run starts from it), one unlearning run per method
with a checkpoint per epoch, the evaluation of the base and of every
checkpoint, the knowledge-conflict diagnostics, and the results tables; the layout below.
Must not: train (`factflip.train`), build sets (`data.unlearning_sets`), score (`factflip.evals`),
compute gradients (`probes.gradients`), build evaluation sets (`data.eval_sets`), compute
results from the evaluation tables (`results.py`) or plot (`report.py`).

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
  runs/<size>/seed<k>/align/    world: the aligned base (a training workdir; sets/align.jsonl)
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
  results/<table>.csv                     `results.COLUMNS` (tradeoff, probes, conflict,
                                          spillover, matched, curves)

Definitions of the results tables: `results.py`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from factflip.data.eval_sets import (
  rwku_forget_set,
  statement,
  unmentioned_split,
  unseen_questions,
  utility_questions,
)
from factflip.data.facts import write_facts_jsonl
from factflip.data.loaders import load_facts
from factflip.data.pipeline import pad_examples
from factflip.data.qa_datasets import load_rwku_mia
from factflip.data.unlearning_sets import (
  UnlearnConfig,
  alignment_set,
  preference_pairs,
  unlearning_sets,
)
from factflip.data.world import made_up_questions, with_train_question
from factflip.evals.checkpoints import CheckpointProbe, probe_checkpoints, table_path, table_steps
from factflip.evals.generation import GENERATION_VERSION
from factflip.evals.qa import QA_VERSION
from factflip.evals.rwku import fact_probes
from factflip.fileio import iter_json_records, read_json, write_csv, write_json, write_jsonl
from factflip.models.store import valid_steps
from factflip.probes.fact_preference import SCORER_VERSION
from factflip.probes.gradients import per_example_grads
from factflip.studies import platform
from factflip.studies.schema import mutable
from factflip.studies.sources import file_stamp
from factflip.studies.stages import SHARED, Stage, StageSpec, StudyError, memo
from factflip.studies.unlearning.config import CORPORA, DRAW_KEYS, OBJECTIVE, method_of, run_names
from factflip.studies.unlearning.evaluation import as_probed, checkpoint_probes
from factflip.studies.unlearning.results import (
  COLUMNS,
  checkpoint_row,
  conflict_rows,
  curve_rows,
  matched_rows,
  run_rows,
)
from factflip.train.inputs import read_examples


class Study(platform.Study):
  """Paper D's study: the fact source's stages, then per (size, seed) the training sets, per
  run an unlearning run and the evaluation of each epoch's checkpoint (the base once), the
  conflict diagnostics along the CFT runs, then the results tables."""
  name = "unlearning"

  @property
  def draw_keys(self) -> dict[str, str]:
    """The fact source draws the forget (targets) and retain (controls) facts, except from
    RWKU's folder, whose targets the study picks itself."""
    return {} if self.c.forget.source == "rwku" else DRAW_KEYS

  def grid(self) -> dict[str, list]:
    return {"method": run_names(self.c)}

  # ---- layout -----------------------------------------------------------------------------
  def sets_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "sets")

  @property
  def aligned(self) -> bool:
    """Whether a world base goes through the alignment stage first (align.epochs > 0)."""
    return not self.c.facts and self.c.align.epochs > 0

  def align_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "align")

  def base_path(self, size: str, seed: int) -> str:
    """The model every run starts from: the aligned base when there is an alignment stage."""
    return self.align_dir(size, seed) if self.aligned else super().base_path(size, seed)

  def base_fp(self, size: str, seed: int) -> str:
    return (self.stage_align(size, seed) if self.aligned
            else self.source.base_stage(size, seed)).fp

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
    membership-inference texts (`data.eval_sets.rwku_forget_set`)."""
    return rwku_forget_set(self.source.items(candidates=False), load_rwku_mia(self.c.facts),
                           self.c.forget.n_targets, self.c.facts)

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
    facts (`data.eval_sets`)."""
    forget = self.forget_facts(size, seed)
    rng = np.random.default_rng([seed, 11])
    unseen = self._unseen(rng, seed)
    e = self.c.eval
    if self.c.forget.source == "rwku":
      r = self.rwku()
      mia = [(k, t) for name in r["targets"] for k in ("forget", "retain")
             for t in r["mia"][name][k]]
      utility: list = []
      if e.utility:
        pool = [f for f in load_facts(e.utility) if f.prompt and f.answers]
        utility, heldout = self._utility(pool, pool, rng)
        mia += [("heldout", t) for t in heldout]
      return {"probes": r["probes"], "unseen": unseen, "utility": utility, "mia": mia,
              "forget": forget}
    others = self._others(size, seed)
    retain = self.retain_facts(size, seed)
    probes = fact_probes(forget, others + retain, kinds=tuple(e.adversarial))
    utility, heldout = self._utility(others, others + forget, rng)
    mia = ([("forget", statement(f)) for f in forget] + [("retain", statement(f)) for f in retain]
           + [("heldout", t) for t in heldout])
    return {"probes": probes, "unseen": unseen, "utility": utility, "mia": mia,
            "forget": forget}

  def _utility(self, pool, objects_from, rng):
    try:
      return utility_questions(pool, objects_from, self.c.eval.n_utility, self.c.eval.mc_choices,
                               rng)
    except ValueError as err:
      raise StudyError(str(err)) from None

  def _unseen(self, rng, seed: int):
    """Questions about facts the model never saw: `eval.unseen`, or the world's unmentioned
    facts and made-up people."""
    if self.c.facts:
      unseen = [f for f in load_facts(self.c.eval.unseen) if f.question and f.answers]
      if not unseen:
        raise StudyError(f"{self.c.eval.unseen}: no facts with a question and answers (the "
                         "hallucination-spillover questions)")
      return unseen
    return unseen_questions(self.source.world()[0], self.c.eval.n_unseen, self.c.eval.n_made_up,
                            rng, seed, self._asked,
                            self.c.align.unmentioned_share if self.aligned else 0.0)

  def alignment_facts(self, size: str, seed: int) -> tuple[list, list]:
    """(known, unknown) of the alignment set: the questions of the facts neither forgotten nor
    retained of the high and medium tiers (answered), and of the never-mentioned facts
    `unmentioned_split` gives the alignment stage and `align.n_made_up` made-up people whose
    names the spillover questions' made-up people do not share (abstained on)."""
    world = self.source.world()[0]
    spill = made_up_questions(world, self.c.eval.n_made_up, seed)
    made_up = made_up_questions(world, self.c.align.n_made_up, seed + 7919,
                                avoid=[f.subject for f in spill], prefix="made_up_align")
    unmentioned = unmentioned_split(world, self.c.align.unmentioned_share, seed)[0]
    return self._others(size, seed), self._asked(unmentioned) + made_up

  # ---- stages -------------------------------------------------------------------------------
  @memo
  def stage_sets(self, size: str, seed: int) -> Stage:
    return Stage(f"sets {size} seed{seed}", self.sets_dir(size, seed),
                 self.keys("forget", "unlearn.data.batch_size", "align", seed=seed,
                           retain_file=file_stamp(self.c.forget.retain_path)
                           if self.c.forget.retain_path else []),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_align(self, size: str, seed: int) -> Stage:
    return Stage(f"align {size} seed{seed}", self.align_dir(size, seed),
                 self.keys("unlearn", "align", seed=seed),
                 (self.stage_sets(size, seed).fp, self.source.base_stage(size, seed).fp))

  @memo
  def stage_unlearn(self, size: str, seed: int, method: str) -> Stage:
    return Stage(f"unlearn {size} seed{seed} {method}", self.unlearn_dir(size, seed, method),
                 self.keys("unlearn", "epochs", *(["dpo_target"] if method == "dpo" else []),
                           method=method, seed=seed),
                 (self.stage_sets(size, seed).fp, self.base_fp(size, seed)))

  def _eval_keys(self, seed: int) -> dict[str, Any]:
    unseen = file_stamp(self.c.eval.unseen) if self.c.eval.unseen else []
    utility = file_stamp(self.c.eval.utility) if self.c.eval.utility else []
    return self.keys("eval", "probe.dtype", "forget", "align", seed=seed, unseen_file=unseen,
                     utility_file=utility,
                     generation=GENERATION_VERSION, scorer=SCORER_VERSION, qa=QA_VERSION)

  @memo
  def stage_eval_base(self, size: str, seed: int) -> Stage:
    return Stage(f"eval {size} seed{seed} base", self.eval_dir(size, seed, "base"),
                 self._eval_keys(seed), (self.base_fp(size, seed),))

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

  def specs(self) -> list[StageSpec]:
    cell, run = ("size", "seed"), ("size", "seed", "method")
    S = StageSpec
    return [S("sets", cell, self.stage_sets, self.build_sets),
            *([S("align", cell, self.stage_align, self.build_align, hosts=SHARED)]
              if self.aligned else []),
            S("unlearn", run, self.stage_unlearn, self.build_unlearn, hosts=SHARED),
            S("eval_base", cell, self.stage_eval_base, self.build_eval_base),
            S("eval", run, self.stage_eval, self.build_eval),
            S("conflict", cell, self.stage_conflict, self.build_conflict),
            S("results", (), self.stage_results, self.build_results)]

  # ---- training sets --------------------------------------------------------------------------
  def build_sets(self, out: str, size: str, seed: int) -> dict[str, Any]:
    """Every forget set any run could train on (so adding a run reuses this stage): the
    counterfactual corpora (when every forget fact has a counterfactual), refusal, truth, the
    DPO pairs for both targets, and the retain set."""
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
        sets["forget"] = as_probed(sets["forget"], forget, self.tokenizer(size))
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
    if self.aligned:                           # whole batches: the last known facts left out
      known, unknown = self.alignment_facts(size, seed)
      known = known[:len(known) - (len(known) + len(unknown)) % B]
      write_jsonl(os.path.join(out, "align.jsonl"),
                  [{"segments": [list(x) for x in e["segments"]], "fact": e["fact"]}
                   for e in alignment_set(known, unknown)])
      stats["align"] = {"examples": len(known) + len(unknown), "known": len(known),
                        "unknown": len(unknown),
                        "steps_per_epoch": (len(known) + len(unknown)) // B}
    write_facts_jsonl(os.path.join(out, "forget.jsonl"), forget)
    write_facts_jsonl(os.path.join(out, "retain_facts.jsonl"), retain)
    write_json(os.path.join(out, "stats.json"), stats)
    self.log(f"    forget {len(forget)} facts, retain {len(retain)}; " + ", ".join(
        f"{k}: {v['examples']}" for k, v in stats.items() if isinstance(v, dict)))
    return {"forget": len(forget), "retain": len(retain)}

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

  # ---- alignment ------------------------------------------------------------------------------
  def build_align(self, out: str, size: str, seed: int) -> dict[str, Any]:
    """SFT of the pretrained base on the alignment set (sets/forget_align.jsonl)."""
    c = mutable(self.c.unlearn)
    c.data.kind, c.data.retain_path = "examples", ""
    c.objective.name, c.objective.retain_weight = "lm", 0.0   # answer-only loss: segments
    c.optim.lr = self.c.align.lr
    return self.train_epochs(
        c, out, size, seed, self.set_stats(size, seed)["align"]["steps_per_epoch"],
        "study.align", {"data.path": os.path.join(self.sets_dir(size, seed), "align.jsonl")},
        epochs=self.c.align.epochs, init_from=self.source.base_path(size, seed))

  # ---- unlearning runs ------------------------------------------------------------------------
  def build_unlearn(self, out: str, size: str, seed: int, method: str) -> dict[str, Any]:
    sets = self.sets_dir(size, seed)
    return self.train_epochs(
        self.c.unlearn, out, size, seed, self.steps_per_epoch(size, seed, method),
        f"study.unlearn ({method})",
        {"objective.name": OBJECTIVE[method_of(method)[0]],
         "data.path": os.path.join(sets, f"forget_{self.forget_set(size, seed, method)}.jsonl"),
         "data.retain_path": (os.path.join(sets, "retain.jsonl")
                              if self.c.unlearn.objective.retain_weight else "")})

  # ---- evaluation -----------------------------------------------------------------------------
  def _probes(self, size: str, seed: int) -> list[CheckpointProbe]:
    return checkpoint_probes(self.eval_sets(size, seed), self.tokenizer(size), self.c.eval)

  def build_eval_base(self, out: str, size: str, seed: int) -> dict[str, Any]:
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

  def checkpoint_tables(self, d: str, step: int) -> dict[str, pd.DataFrame | None]:
    """One evaluated model's tables in `d` (None where not evaluated)."""
    out = {}
    for name in ("probes", "unseen", "utility", "mia", "cf", "dll"):
      path = table_path(d, name, step)
      out[name] = (pd.read_csv(path, keep_default_na=False, na_values=[""])
                   if os.path.exists(path) else None)
    return out

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables (`results.py`) from the evaluation and conflict stages' outputs,
    written to `out` (default results/)."""
    t: dict[str, list[dict]] = {name: [] for name in COLUMNS}
    tau = float(self.c.tau)
    for cell in self.cells():
      size, seed = cell["size"], cell["seed"]
      base = checkpoint_row(self.checkpoint_tables(self.eval_dir(size, seed, "base"), 0), tau)
      for run in run_names(self.c):
        method, corpus = method_of(run)
        d = self.eval_dir(size, seed, run)
        steps = [s for s in table_steps(d, "probes") if s > 0]
        if not steps:
          raise StudyError(f"{d}: no probes_<step>.csv tables; the eval stage writes them")
        evaluated = [(0, base)] + [(s, checkpoint_row(self.checkpoint_tables(d, s), tau))
                                   for s in steps]
        key = {**cell, "method": method, "corpus": corpus, "run": run}
        per_epoch = self.steps_per_epoch(size, seed, run)
        for name, r in run_rows(key, evaluated, per_epoch).items():
          t[name] += r
        metrics = os.path.join(self.unlearn_dir(size, seed, run), "metrics.jsonl")
        t["curves"] += curve_rows(key, [r for _, _, r in iter_json_records(metrics)],
                                  per_epoch)
      path = os.path.join(self.conflict_dir(size, seed), "conflict.csv")
      t["conflict"] += [{**cell, **r} for r in pd.read_csv(path).to_dict("records")]
    t["matched"] = matched_rows(pd.DataFrame(t["tradeoff"], columns=COLUMNS["tradeoff"]))
    out_dir = out or os.path.join(self.wd, "results")
    tables = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in t.items()}
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables
