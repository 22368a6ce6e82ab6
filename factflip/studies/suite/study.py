"""The four-study suite: papers A–D on one world and one pretrained base per size and seed,
each study in its own subdirectory, read side by side against what its paper reports.

Owns: `Study` (registered as "suite"; its keys are `config.py`'s): the shared world, tokenizer and
pretraining built once in WORKDIR and linked into every study's workdir (each study's own world
and pretrain stages then find them done, by fingerprint), every study run in
WORKDIR/<study>/ with its own report, one progress line across studies, and
WORKDIR/report/index.html with each study's headline findings beside its paper's.
Must not: know any study's stages or science (each study's record says how its headline
compares with its paper: `paper_checks`; the suite's page is `report.py`'s).

Layout: WORKDIR/world, tokenizer/, runs/<size>/seed<k>/pretrain/ (shared), WORKDIR/<study>/
(that study's whole workdir: world, tokenizer and pretrain are links to the shared ones),
WORKDIR/report/ (index.html, summary.json: sizes, seeds, wall seconds), WORKDIR/results/
(timings.json: wall seconds per study, findings.csv: study, finding, measured, reproduced).
A study added to a finished suite runs alone; every other stage is reused by fingerprint.
On real models (hf=, each study with its own facts file) nothing is shared but the model
directories: there is no world or pretraining, and each study draws its own facts.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from factflip.fileio import read_json, write_json
from factflip.studies import platform
from factflip.studies.stages import describe_plan
from factflip.studies.suite.config import study_config
from factflip.studies.suite.report import report, summary


def eta_seconds(done: list[tuple[str, float]], todo: list[str]) -> float:
  """Seconds the stages still to compute will take: each at the mean duration of the computed
  stages of its kind (the first word of a stage's name: world, pretrain, cpt, sft, probes, ...),
  a kind of which none is computed yet at the mean of all computed stages. `done`: (kind,
  seconds) of the computed stages; `todo`: the kinds of those still to compute."""
  if not done:
    return 0.0
  by_kind: dict[str, list[float]] = {}
  for kind, seconds in done:
    by_kind.setdefault(kind, []).append(seconds)
  overall = sum(s for _, s in done) / len(done)
  mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
  return float(sum(mean.get(k, overall) for k in todo))


def _kind(stage_name: str) -> str:
  return stage_name.split(" ", 1)[0]


def _shared(stage) -> bool:
  """A world-source stage every study shares (the world, a size's pretraining)."""
  return stage.name == "world" or stage.name.startswith("pretrain ")


class Study(platform.Driven):
  """The suite (`factflip run --config=configs/studies/suite.py`): the studies in order on the
  shared world and bases, then the suite's report."""
  name = "suite"

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    super().__init__(config, workdir, log, source)
    # real models (hf=): each study's facts and fact draw are its own, nothing is pretrained
    self.on_facts = bool(self.c[self.c.studies[0]].get("facts"))
    self.studies: dict[str, platform.Study] = {}
    for name in self.c.studies:
      cls = platform.study_record(name).study
      self.studies[name] = cls(study_config(self.c, name), os.path.join(self.wd, name),
                               log=self._prefixed(name), source=f"{source}: {name}")

  def _prefixed(self, name: str):
    return lambda line: self.log(f"{name} | {line}")

  # ---- the shared world and bases -------------------------------------------------------------
  def shared(self) -> platform.Study:
    """A study object rooted at the suite's workdir whose source stages (world, tokenizer,
    pretraining) are the shared ones: the first study's class and config."""
    name = self.c.studies[0]
    return platform.study_record(name).study(study_config(self.c, name), self.wd,
                                      log=self._prefixed("shared"))

  def link(self, study: platform.Study, before: list[platform.Study] = ()) -> None:
    """Point a study's world, tokenizer and pretrain directories at the shared ones, and any
    stage equal to one an earlier study computed (same place in its workdir, same
    fingerprint: paper C's SliCK stage is paper B's) at that one. A directory already there
    is left alone (computed before the suite shared it); a redo replaces only the link."""
    shared = [] if self.on_facts else ["world", "tokenizer"] + [
        os.path.relpath(study.run_dir(size, seed, "pretrain"), study.wd)
        for size in study.sizes for seed in study.c.seeds]
    for rel in shared:                     # the same place under the suite's workdir
      path, target = os.path.join(study.wd, rel), os.path.join(self.wd, rel)
      if os.path.lexists(path):
        continue
      os.makedirs(os.path.dirname(path), exist_ok=True)
      os.symlink(target, path)
    for st in study.stages():
      if _shared(st) or os.path.lexists(st.path):
        continue
      rel = os.path.relpath(st.path, study.wd)
      for other in before:
        theirs = os.path.join(other.wd, rel)
        done = os.path.join(theirs, "DONE")
        if os.path.exists(done) and read_json(done).get("fingerprint") == st.fp:
          os.makedirs(os.path.dirname(st.path), exist_ok=True)
          os.symlink(theirs, st.path)
          self.log(f"{study.name} | [{st.name}] is {other.name}'s: linked")
          break

  # ---- the driver -----------------------------------------------------------------------------
  def _stages(self, base: platform.Study | None) -> dict[str, list]:
    """The stages each part computes or reuses: the shared world and pretraining (from `base`;
    none on real models), then each study's own (its world and pretrain stages are the shared
    ones, linked)."""
    out = {"shared": [] if base is None else [st for st in base.stages() if _shared(st)]}
    for name, study in self.studies.items():
      out[name] = [st for st in study.stages() if not _shared(st)]
    return out

  def plan(self, base: platform.Study | None = None) -> list[str]:
    """What a run would compute and why, per part (before any work)."""
    lines = []
    if base is None and not self.on_facts:
      base = self.shared()
    for part, stages in self._stages(base).items():
      body, counts = describe_plan(stages)
      lines.append(f"{part} | plan: " + (", ".join(f"{v} {k}" for k, v in counts.items() if v)
                                         or "nothing"))
      lines += [f"{part} | {line}" for line in body]
    return lines

  def run_and_report(self, dry_run: bool = False) -> dict[str, Any] | None:
    """The shared stages, every study (run and report), then the suite's report; with
    `dry_run` only the plan."""
    base = None if self.on_facts else self.shared()
    if self.hosts.main:
      for line in self.plan(base):
        self.log(line)
    if dry_run:
      return None
    t0 = time.time()
    todo = [st.name for stages in self._stages(base).values() for st in stages
            if st.status()[0] != "reuse"]
    n_todo, done, last = len(todo), [], [t0]

    def stage_done(stage, built):
      now = time.time()
      if built:
        done.append((_kind(stage.name), now - last[0]))
        if stage.name in todo:
          todo.remove(stage.name)
        eta = eta_seconds(done, [_kind(name) for name in todo])
        self.log(f"suite: {len(done)}/{n_todo} stages computed, {now - t0:.0f} s, ETA "
                 f"{eta:.0f} s (after {stage.name})")
      last[0] = now
    if base is not None:
      base.stage_done = stage_done
      base.drive(base.source.specs())
    timings, heads = {"shared": round(time.time() - t0, 1)}, {}
    for k, (name, study) in enumerate(self.studies.items()):
      t = time.time()
      self.hosts.on_main(f"linking {name}'s shared stages", functools.partial(
          self.link, study, list(self.studies.values())[:k]))
      study.stage_done = stage_done
      heads[name] = study.run_and_report()
      timings[name] = round(time.time() - t, 1)
    return self.hosts.on_main("the suite's report", lambda: self._finish(heads, timings, t0))

  def _finish(self, heads, timings, t0) -> dict[str, Any]:
    write_json(os.path.join(self.wd, "results", "timings.json"), timings)
    head = report(self, heads)
    self.log(f"\nfactflip suite done in {time.time() - t0:.0f} s")
    for line in summary(head):
      self.log("  " + line)
    self.log(f"  report: {os.path.join(self.wd, 'report', 'index.html')}")
    return head
