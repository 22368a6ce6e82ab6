"""Paper B's study: SFT on new knowledge — SliCK categories, %Unknown mixtures, fitting dynamics
and the linear fit (SCIENCE.md B; Gekhman et al. 2024).

Owns: paper B's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or a model directory as it is) the SliCK categories of every fact, the SFT
mixtures, an SFT run per mixture with a checkpoint per epoch, closed-book QA on every
checkpoint, and the results tables (dynamics, stops, the linear fit); the workdir layout below.
Must not: train (`factflip.train`), categorise or score answers (`probes.slick`, `evals.qa`),
build mixtures (`data.sft_mixtures`), compute results from the QA rows (`results.py`) or plot
(`report.py`).

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
                                          p_greedy, p_sample, category, answer, greedy, ...,
                                          cloze, cloze_em (the base's greedy cloze answer)
  runs/<size>/seed<k>/mixtures/<m>.jsonl  the SFT set of mixture m ({"segments"}), stats.json
                                          (every mixture's realised shares), members.csv
                                          (mixture, item, category, idk)
  runs/<size>/seed<k>/sft_<m>/            the SFT run (checkpoints/<step>: one per epoch)
  runs/<size>/seed<k>/eval/<m>/qa_<step>.csv   greedy QA per fact at that checkpoint: item,
                                          split, distribution, category, member, part,
                                          prediction, em, outcome
  results/<table>.csv                     `results.COLUMNS`

Definitions. Mixture names: `unk<X>` (X% Unknown, rest Known, X per relation), `idk<X>` (the
same set with its Unknown answers relabelled "I don't know."), and the single-category sets
`HighlyKnown`, `MaybeKnown`, `WeaklyKnown`, `Natural` (D_Unk is unk100). |D| (`mixtures.size`;
0 = the largest multiple of sft.data.batch_size for which every unk/idk mixture exists); a
single-category set takes |D| or, when its category has fewer train facts, the largest
batch multiple it has (its realised size is in mixtures.csv). An epoch is |D| / batch_size
steps (one example per row: packing "pad"); checkpoint e·steps_per_epoch is epoch e (0 = the
base). Definitions of the results: `results.py`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar

import jax
import numpy as np
import pandas as pd

from factflip.data.loaders import load_facts
from factflip.data.prepare import assign_splits
from factflip.data.sft_mixtures import CATEGORIES, SFTConfig, sft_mixture
from factflip.data.world import with_train_question
from factflip.evals.checkpoints import CheckpointProbe, probe_checkpoints, table_steps
from factflip.evals.generation import GENERATION_VERSION
from factflip.evals.qa import QA_VERSION, closed_book_cloze, closed_book_qa
from factflip.fileio import read_json, write_csv, write_json, write_jsonl
from factflip.probes.slick import SliCKConfig, categorise, category_shares
from factflip.studies import platform
from factflip.studies.new_knowledge.config import mixture_names, unknown_share
from factflip.studies.new_knowledge.results import (
  COLUMNS,
  base_rows,
  category_rows,
  dynamics_rows,
  fit_rows,
  mixture_rows,
  stop_rows,
)
from factflip.studies.stages import SHARED, Stage, StageSpec, StudyError, memo


class Study(platform.Study):
  """Paper B's study: the fact source's stages, then per (size, seed) SliCK categories and the
  SFT mixtures, per (size, seed, mixture) an SFT run and QA on each epoch's checkpoint, then
  the results tables."""
  name = "new_knowledge"
  draw_keys: ClassVar[dict[str, str]] = {}       # categorises every fact: no target draw

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
    rels = {**dict.fromkeys(self.c.relations, "in"), **dict.fromkeys(self.c.ood_relations,
                                                                      "ood")}
    if self.c.facts:
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
    return Stage(f"slick {size} seed{seed}", self.run_dir(size, seed, "slick"),
                 self.keys("slick", "probe.dtype", "answer_end", "eval", *self._fact_keys(),
                           seed=seed, generation=GENERATION_VERSION,
                           table=2),            # 2: the cloze columns; the facts the study uses
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
    return Stage(f"eval {size} seed{seed} {mixture}", self.eval_dir(size, seed, mixture),
                 self.keys("eval", "probe.dtype", generation=GENERATION_VERSION,
                           qa=QA_VERSION),
                 (self.stage_sft(size, seed, mixture).fp, self.stage_mixtures(size, seed).fp))

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_eval(**cell).fp for cell in self.cells(("size", "seed", "mixture"))]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("convergence", "fit", "seeds", sizes=list(self.sizes)), tuple(ups))

  def specs(self) -> list[StageSpec]:
    cell, run = ("size", "seed"), ("size", "seed", "mixture")
    S = StageSpec
    return [S("slick", cell, self.stage_slick, self.build_slick),
            S("mixtures", cell, self.stage_mixtures, self.build_mixtures),
            S("sft", run, self.stage_sft, self.build_sft, hosts=SHARED),
            S("eval", run, self.stage_eval, self.build_eval),
            S("results", (), self.stage_results, self.build_results)]

  # ---- SliCK ------------------------------------------------------------------------------
  def build_slick(self, out: str, size: str, seed: int) -> dict[str, Any]:
    """SliCK categories of the facts the study uses: every in-distribution fact (the mixtures'
    train facts, dev, test) and the out-of-distribution test facts (accuracy per category);
    exemplars from the dev facts of each relation."""
    dev = [f for f in self.facts() if f.split == "dev"]
    facts = [f for f in self.facts() if f.meta["distribution"] == "in" or f.split == "test"]
    cfg = SliCKConfig(**self.c.slick.to_dict(), answer_end=self.c.answer_end)
    model = self.load(self.base_path(size, seed))
    t0 = time.time()
    rows = categorise(model, self.tokenizer(size), facts, dev, cfg, seed=seed,
                      key=jax.random.key(seed), log=self.log)
    df = pd.DataFrame(rows)
    cloze = [f for f in facts if f.prompt]     # the base's knowledge as the corpus states it
    if cloze:
      got = pd.DataFrame(closed_book_cloze(model, self.tokenizer(size), cloze,
                                           self.c.eval.max_new_tokens, self.c.eval.batch_size))
      df = df.merge(got[["item", "prediction", "em"]].rename(
          columns={"prediction": "cloze", "em": "cloze_em"}), on="item", how="left")
      df["cloze_em"] = df.cloze_em.map({True: "True", False: "False"}).fillna("")
      df["cloze"] = df.cloze.fillna("")
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
    cats = self.categories(size, seed).set_index("item").category
    return [dataclasses.replace(f, category=cats[f.id]) for f in self.facts()
            if f.split == "train" and f.meta["distribution"] == "in" and f.id in cats.index]

  def build_mixtures(self, out: str, size: str, seed: int) -> dict[str, Any]:
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
    return self.train_epochs(
        self.c.sft, out, size, seed, self.mixture_stats(size, seed)[mixture]["steps_per_epoch"],
        f"study.sft ({mixture})",
        {"data.path": os.path.join(self.mixture_dir(size, seed), f"{mixture}.jsonl")})

  # ---- QA on every checkpoint ---------------------------------------------------------------
  def build_eval(self, out: str, size: str, seed: int, mixture: str) -> dict[str, Any]:
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
    """The results tables (`results.py`) from the stages' outputs, written to `out` (default
    results/)."""
    t: dict[str, list[dict]] = {name: [] for name in COLUMNS}
    for cell in self.cells():
      for name, rows in category_rows(cell, self.categories(**cell)).items():
        t[name] += rows
      t["mixtures"] += mixture_rows(cell, self.mixture_stats(**cell), mixture_names(self.c))
    for cell in self.cells(("size", "seed", "mixture")):
      d = self.eval_dir(**cell)
      steps = table_steps(d, "qa")
      if not steps:
        raise StudyError(f"{d}: no qa_<step>.csv tables; the eval stage writes them")
      if cell["mixture"] == mixture_names(self.c)[0] and steps[0] == 0:   # the base
        t["base"] += base_rows({"size": cell["size"], "seed": cell["seed"]},
                               self.categories(cell["size"], cell["seed"]),
                               self.qa_table(d, 0))
      t["dynamics"] += dynamics_rows(cell, {step: self.qa_table(d, step) for step in steps},
                                     self.mixture_stats(cell["size"], cell["seed"])[
                                         cell["mixture"]]["steps_per_epoch"])
    dyn = pd.DataFrame(t["dynamics"], columns=COLUMNS["dynamics"])
    for name, rows in stop_rows(dyn, self.c.convergence).items():
      t[name] += rows
    for cell in self.cells():
      t["fit"] += fit_rows(cell, dyn, self.c.fit.bootstrap, self.c.fit.confidence)
    out_dir = out or os.path.join(self.wd, "results")
    tables = {k: (dyn if k == "dynamics" else pd.DataFrame(v, columns=COLUMNS[k]))
              for k, v in t.items()}
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables

  @staticmethod
  def qa_table(d: str, step: int) -> pd.DataFrame:
    """One checkpoint's QA rows (eval/<m>/qa_<step>.csv), booleans read back as booleans."""
    qa = pd.read_csv(os.path.join(d, f"qa_{step:06d}.csv"), keep_default_na=False)
    for col in ("member", "idk", "em"):
      qa[col] = qa[col].astype(str).eq("True")
    return qa
