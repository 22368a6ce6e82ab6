"""Where a study's facts and base models come from: one interface, two sources.

Owns: `WorldSource` (the generated fact world: a world stage builds world/ and tokenizer/,
a pretraining stage per size and seed trains the base on it), `FileSource` (a facts file and
model directories used as bases as they are: a base stage per model and seed scores the
candidates and draws the study's facts among those the base knows) and `fact_source`.
Must not: know any study's science; the study says which of its config keys size the draw
(`Study.draw_keys`).

Both give, per cell (size label, seed): `specs` (the source's StageSpecs, run before the
study's), `base_stage` (the Stage that downstream stages consume), `base_path` (the model to
start from), `base_dir` (where the base's own files live), `tokenizer(size)`, `targets` /
`controls` (the study's draw), `two_hop` (compositions through a target: world only),
`train_data` (the data keys a training stage on this base sets: a facts source's files) and
`gate_hint` (what to change when a base knows too few of its targets).

The draw: `Study.draw_keys` maps the roles "n_targets" and "tier" (required) and "n_control"
and "replay_weight" (optional: 0 when a study has no such key) to the study's config keys
(the poisoning study: cpt.data.n_targets, cpt.data.target_tier, probe.n_control,
cpt.data.replay_weight). World: targets are `poison_targets` (the draw the training loop
makes for the world's facts, the same for every size), controls a seeded draw of the rest of
the tier. Facts file: the candidates (facts with a counterfactual, the first facts_limit) are
scored at the base with the teacher-forced scorer; a candidate the base knows has its greedy
answer right and ΔLL > τ (`tau`) on its prompt; known ones come first in a seeded order, the
first n_targets are targets, the next n_control controls. When the study needs known facts
(`Study.draw_needs_known`: paper A unless min_base_accuracy is 0) and the base knows fewer
candidates than n_targets + n_control, the base stage stops there (StudyError naming the
counts, facts_limit and the draw keys; the scores are in candidates.csv) instead of filling
the draw with facts the base does not know. The base stage also writes the
files any training stage on a facts source reads (`train_data`): replay.jsonl, true
statements of the facts not drawn (replay for continual pretraining, retain data for
unlearning; unless `replay` names a file) and heldout.jsonl, the controls' paraphrases with
their true answers (the training loop's held-out evaluation).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import pandas as pd

from factflip.data.facts import read_facts_jsonl, write_facts_jsonl
from factflip.data.loaders import load_facts
from factflip.data.mixtures import mention_text
from factflip.data.prepare import poison_targets, prepare_world
from factflip.data.templates import STYLE_NAMES
from factflip.data.world import load_world
from factflip.fileio import write_csv, write_jsonl
from factflip.probes.fact_preference import SCORER_VERSION, preference
from factflip.studies.schema import mutable, size_label
from factflip.studies.stages import (
  SHARED,
  Stage,
  StageSpec,
  StudyError,
  fingerprint,
  memo,
  train_stage,
)

# draw roles a study may leave out, and what they are then
_OPTIONAL_ROLES = {"n_control": 0, "replay_weight": 0.0}


def fact_source(study) -> WorldSource | FileSource:
  """The study's source: a facts file when `facts` is set, else the generated world."""
  return FileSource(study) if study.c.facts else WorldSource(study)


class _Source:
  kind = ""

  def __init__(self, study):
    self.study = study
    self.c = study.c
    self._targets: dict[tuple[str, int], list] = {}

  def draw(self, role: str):
    """The study's config value for a draw role (n_targets, tier, n_control, replay_weight)."""
    if role not in self.study.draw_keys:
      if role in _OPTIONAL_ROLES:
        return _OPTIONAL_ROLES[role]
      raise StudyError(f"study {self.study.name!r}: draw_keys has no {role!r}; expected the "
                       f"config key for each of n_targets, tier (and optionally "
                       f"{', '.join(_OPTIONAL_ROLES)})")
    node = self.c
    for part in self.study.draw_keys[role].split("."):
      if part not in node:
        raise StudyError(f"study {self.study.name!r}: draw_keys[{role!r}] = "
                         f"{self.study.draw_keys[role]!r} is not a key of its config")
      node = node[part]
    return node

  def draw_key_names(self, *roles: str) -> list[str]:
    """The config keys of the draw roles the study has (for stage keys and messages)."""
    return [self.study.draw_keys[r] for r in roles if r in self.study.draw_keys]

  def run_dir(self, size: str, seed: int, name: str) -> str:
    return self.study.run_dir(size, seed, name)


class WorldSource(_Source):
  """The generated fact world (world_seed, vocab_size, pretrain.data.world_people and
  world_questions); every size
  (a preset) pretrained on it with `pretrain.*`."""
  kind = "world"

  def __init__(self, study):
    super().__init__(study)
    self.sizes = {size_label(s): s for s in self.c.sizes}
    self.world_dir = os.path.join(study.wd, "world")
    self.tok_dir = os.path.join(study.wd, "tokenizer")
    self._world = None

  # ---- stages -----------------------------------------------------------------------------
  @memo
  def stage_world(self) -> Stage:
    return Stage("world", self.world_dir,
                 self.study.keys("world_seed", "vocab_size", "pretrain.data.world_people",
                                 "pretrain.data.world_questions"))

  def fingerprint(self) -> str:
    return self.stage_world().fp

  @memo
  def stage_pretrain(self, size: str, seed: int) -> Stage:
    return Stage(f"pretrain {size} seed{seed}", self.run_dir(size, seed, "pretrain"),
                 self.study.keys("pretrain", size=size, seed=seed), (self.fingerprint(),))

  base_stage = stage_pretrain

  def specs(self, then=None) -> list[StageSpec]:
    return [StageSpec("world", (), self.stage_world, self.build_world),
            StageSpec("pretrain", ("size", "seed"), self.stage_pretrain, self.build_pretrain,
                      then, hosts=SHARED)]

  def build_world(self, out: str) -> dict[str, Any]:
    """The world and its tokenizer into `out` (world/, or world.redo/ when redone: the
    tokenizer is then built beside the old one and moved in just before world/ is swapped)."""
    tok = self.tok_dir if out == self.world_dir else self.tok_dir + ".redo"
    if tok != self.tok_dir:
      shutil.rmtree(tok, ignore_errors=True)
    elif os.path.exists(tok) and not os.path.exists(os.path.join(out, "world.json")):
      shutil.rmtree(tok)                       # a tokenizer without its world: not this one
    prepare_world(out, tok, self.c.world_seed, self.c.vocab_size,
                  self.c.pretrain.data.world_people, self.c.pretrain.data.world_questions)
    if tok != self.tok_dir:                    # the tokenizer first: DONE moves with world/
      shutil.rmtree(self.tok_dir, ignore_errors=True)
      os.rename(tok, self.tok_dir)
    self._world = None
    self._targets.clear()                      # drawn from the world being replaced
    return {}

  def build_pretrain(self, out: str, size: str, seed: int) -> dict[str, Any]:
    c = mutable(self.c.pretrain)
    c.seed = seed
    c.model.preset = size
    c.data.world_dir, c.data.tokenizer_dir = self.world_dir, self.tok_dir
    res = train_stage(c, out, "study.pretrain")
    return {"step": res.step, "seconds": round(res.seconds, 1)}

  # ---- what the stages made -----------------------------------------------------------------
  def world(self):
    """(world, tokenizer) as the world stage wrote them (read once)."""
    if self._world is None:
      from factflip.data.tokenizer import load_tokenizer
      if not os.path.exists(os.path.join(self.world_dir, "world.json")):
        raise StudyError(f"{self.world_dir}: no world yet; the world stage writes it (run the "
                         "study)")
      self._world = load_world(self.world_dir), load_tokenizer(self.tok_dir)
    return self._world

  def base_path(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "pretrain")

  base_dir = base_path

  def tokenizer(self, size: str):
    return self.world()[1]

  def targets(self, size: str, seed: int):
    if (size, seed) not in self._targets:
      self._targets[size, seed] = poison_targets(self.world()[0], self.draw("n_targets"),
                                                 self.draw("tier"), seed)
    return self._targets[size, seed]

  def controls(self, size: str, seed: int):
    world, _ = self.world()
    ids = {t.id for t in self.targets(size, seed)}
    pool = [f for f in world.facts if f.meta.get("exposure_tier") == self.draw("tier")
            and f.counterfactual is not None and f.id not in ids]
    pick = np.random.default_rng(seed + 1).choice(
        len(pool), min(self.draw("n_control"), len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]

  def two_hop(self, size: str, seed: int):
    world, _ = self.world()
    ids = {t.id for t in self.targets(size, seed)}
    return [f for f in world.facts if f.meta.get("two_hop") and f.meta["hops"][0] in ids
            and f.counterfactual is not None]

  def train_data(self, size: str, seed: int) -> dict[str, str]:
    return {}

  gate_hint = ("pretrain longer, a larger model or a smaller world: pretrain.steps, sizes, "
               "pretrain.data.world_people")


def file_stamp(path: str) -> list[tuple[str, int, int]]:
  """(relative name, bytes, mtime ns) of a file, or of every file under a folder, sorted."""
  if not os.path.isdir(path):
    st = os.stat(path)
    return [("", st.st_size, st.st_mtime_ns)]
  out = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      out.append((os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns))
  return out


class FileSource(_Source):
  """A facts file (any `load_facts` format) and model directories (HF or factflip), each the
  base of its cells as it is."""
  kind = "facts"

  def __init__(self, study):
    super().__init__(study)
    self.sizes = {size_label(s): os.path.abspath(s) for s in self.c.sizes}
    self._facts = None
    self._tokenizers: dict[str, Any] = {}

  @memo
  def fingerprint(self) -> str:
    """The facts file or folder (its path, and the name, size and mtime of the file or of every
    file under the folder: an edited file inside a folder changes it) and facts_limit."""
    return fingerprint(self.study.keys("facts", "facts_limit", files=file_stamp(self.c.facts)))

  @memo
  def stage_base(self, size: str, seed: int) -> Stage:
    """The base's candidates, targets, controls, replay and held-out files."""
    if not self.draws:
      return Stage(f"base {size} seed{seed}", self.run_dir(size, seed, "base"),
                   self.study.keys(model=self.sizes[size], seed=seed), (self.fingerprint(),))
    return Stage(f"base {size} seed{seed}", self.run_dir(size, seed, "base"),
                 self.study.keys("facts_limit", "tau", "probe.batch_size", "probe.dtype",
                                 "replay", *self.draw_key_names("n_targets", "n_control",
                                                                "replay_weight"),
                                 model=self.sizes[size], seed=seed, scorer=SCORER_VERSION),
                 (self.fingerprint(),))

  base_stage = stage_base

  def specs(self, then=None) -> list[StageSpec]:
    return [StageSpec("base", ("size", "seed"), self.stage_base, self.build_base, then)]

  def items(self, candidates: bool = True):
    """The facts file's items (read once); with `candidates`, those with a counterfactual,
    the first facts_limit of them (what a base is scored on)."""
    if self._facts is None:
      self._facts = list(load_facts(self.c.facts))
    if not candidates:
      return self._facts
    items = [f for f in self._facts if f.counterfactual is not None]
    return items[:self.c.facts_limit] if self.c.facts_limit else items

  @property
  def draws(self) -> bool:
    """Whether the study draws targets among the facts the base knows (its draw_keys); a study
    that does not (paper B categorises every fact itself) has a base stage that only records
    the model directory and the facts file."""
    return bool(self.study.draw_keys)

  def build_base(self, out: str, size: str, seed: int) -> dict[str, int]:
    if not self.draws:
      return {}
    items = self.items()
    n_t, n_c = self.draw("n_targets"), self.draw("n_control")
    if len(items) < n_t + n_c:
      names = " + ".join(self.draw_key_names("n_targets", "n_control"))
      raise StudyError(f"{self.c.facts}: {len(items)} facts with a counterfactual (facts_limit "
                       f"{self.c.facts_limit}), fewer than {names} = {n_t + n_c}")
    model = self.study.load(self.sizes[size])
    tab = pd.DataFrame(preference(model, self.tokenizer(size), items, kinds=("prompt",),
                                  batch_size=self.c.probe.batch_size))
    tab["known"] = tab.correct.astype(bool) & (tab.dll > self.c.tau)
    known = tab.set_index("item").known.reindex([f.id for f in items], fill_value=False)
    write_csv(tab, os.path.join(out, "candidates.csv"))
    if self.study.draw_needs_known():
      self._need_known(size, seed, len(items), int(known.sum()), n_t, n_c, out)
    order = np.lexsort((np.random.default_rng([seed, 2]).random(len(items)), ~known.values))
    targets = [items[i] for i in sorted(order[:n_t])]
    controls = [items[i] for i in sorted(order[n_t:n_t + n_c])]
    write_facts_jsonl(os.path.join(out, "targets.jsonl"), targets)
    write_facts_jsonl(os.path.join(out, "controls.jsonl"), controls)
    held = [{"prompt": q, "completion": " " + f.answers[0]}
            for f in controls for q in (f.paraphrases[:1] or (f.prompt,)) if q]
    write_jsonl(os.path.join(out, "heldout.jsonl"), held)
    if not self.c.replay:
      used = {f.id for f in targets + controls}
      rest = [f for f in self.items(candidates=False) if f.id not in used and f.answers
              and f.prompt][:4000]
      docs = [{"text": mention_text(f, f.answers[0], f.language,
                                    STYLE_NAMES[i % len(STYLE_NAMES)], i, i // 5)}
              for i, f in enumerate(rest)]
      if not docs and self.draw("replay_weight") > 0:
        raise StudyError(f"{self.c.facts}: no facts left for replay after the targets and "
                         "controls; set `replay` to a JSONL of {\"text\"} documents")
      write_jsonl(os.path.join(out, "replay.jsonl"), docs)
    return {"candidates": len(items), "known": int(known.sum()), "targets": len(targets),
            "controls": len(controls)}

  def _need_known(self, size: str, seed: int, scored: int, known: int, n_t: int, n_c: int,
                  out: str) -> None:
    """StudyError, before anything is drawn, when the base knows fewer of the `scored`
    candidates than the draw takes (n_t targets + n_c controls): the counts, and the keys
    that change them (facts_limit, the study's draw keys)."""
    if known >= n_t + n_c:
      return
    keys = self.draw_key_names("n_targets", "n_control")    # n_targets first: it is required
    need = " + ".join(f"{k} {n}" for k, n in zip(keys, (n_t, n_c)))
    limit = (f"facts_limit = {self.c.facts_limit}: the first {self.c.facts_limit}"
             if self.c.facts_limit else "facts_limit = 0: all facts")
    raise StudyError(
        f"{self.c.facts}: {size} seed {seed}: the base knows {known} of the {scored} candidate "
        f"facts scored ({limit} with a counterfactual; known: greedy answer right and ΔLL > "
        f"tau {self.c.tau:g} on the prompt), fewer than the {n_t + n_c} the draw needs "
        f"({need}): score more candidates (facts_limit; 0 = all), draw fewer "
        f"({', '.join(keys)}) or use another model; the scores: "
        f"{os.path.join(out, 'candidates.csv')}")

  def base_path(self, size: str, seed: int) -> str:
    return self.sizes[size]

  def base_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "base")

  def tokenizer(self, size: str):
    if size not in self._tokenizers:
      from factflip.data.tokenizer import load_tokenizer
      self._tokenizers[size] = load_tokenizer(self.sizes[size])
    return self._tokenizers[size]

  def _read(self, size: str, seed: int, name: str):
    return list(read_facts_jsonl(os.path.join(self.base_dir(size, seed), name)))

  def targets(self, size: str, seed: int):
    if (size, seed) not in self._targets:
      self._targets[size, seed] = self._read(size, seed, "targets.jsonl")
    return self._targets[size, seed]

  def controls(self, size: str, seed: int):
    return self._read(size, seed, "controls.jsonl")

  def two_hop(self, size: str, seed: int):
    return []

  def train_data(self, size: str, seed: int) -> dict[str, str]:
    b = self.base_dir(size, seed)
    return {"facts_path": os.path.join(b, "targets.jsonl"),
            "replay_path": self.c.replay or os.path.join(b, "replay.jsonl"),
            "eval_path": os.path.join(b, "heldout.jsonl")}

  gate_hint = ("it knows too few of these facts: more candidates (facts_limit), fewer targets "
               "or controls, or another model")
