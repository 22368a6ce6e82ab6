"""The study platform: a study is a list of named stages over cells, run by one driver.

Owns: `StudyRecord` and the registry (`STUDIES`, `study_record`: one record per study package,
read by the platform, the suite and the command line), `Driven` (what every study object has:
its frozen config, workdir, log, hosts and record) and `Study` (the base every staged study
subclasses: fact source, cells, the plan, the driver, model loading for probes, the report).
Must not: know any study's science (a study package lists its stages and tables) or train,
probe or plot itself. Stage kinds and the fingerprint rule are `studies.stages`'; the keys
every config has `studies.schema`'s; where facts and bases come from `studies.sources`'.

A cell is one point of the study's grid as keyword arguments: size × seed × the study's own
axes (`Study.grid`, e.g. the poisoning ratio p). A `StageSpec` over ("size", "seed", "p")
runs once per such cell; over () once per study. `Study.run` goes through the specs in
order, each over its cells: `spec.stage(**cell)` is the `studies.stages.Stage` (output
directory, config keys, upstream fingerprints); a stage whose fingerprint matches its DONE
record is reused, otherwise `spec.build(out, **cell)` computes it into `out` and returns the
info its DONE record keeps; `spec.then(**cell)` runs after it either way (a gate).

Many hosts: the same `factflip run` on every process of a multi-process job (TPU pod workers,
SLURM tasks) runs the study SPMD. Every process goes through the same stages in the same order;
process 0 decides each stage's status (and prepares its directory) and tells the others;
`StageSpec.hosts` says who computes it: MAIN (process 0; the others wait), SHARED (every
process, into the stage's directory: a training stage, whose loop is a multi-host job with a
global mesh and writes its own outputs per process) or MIRROR (every process, with the probed
models and their batches sharded over the probe devices of every process; process 0 writes the
stage's directory, the others the same files into a private copy that is discarded). Only
process 0 writes DONE records, results, reports and study.json, and runs gates (`then`); what
process 0 computes alone runs inside `distributed.alone` (its checkpoint reads, input shards
and meshes are this process's only). A process waiting longer than `barrier_timeout_s` stops
with an error naming the stage, and a failure on any process stops the waiting ones with its
message (`distributed.Hosts`).

Registry: a study config names its study (`study = "poisoning"`); `STUDIES` lists the study
packages (`factflip/studies/<name>/`), each exporting one `StudyRecord` as `STUDY`, imported
only when asked for (`factflip run --config=configs/studies/X.py` loads one study).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import ml_collections

from factflip.configfile import ConfigError
from factflip.distributed import Hosts, alone
from factflip.fileio import read_json, write_json
from factflip.models.store import load_model
from factflip.sharding import make_mesh
from factflip.studies.report import write_report
from factflip.studies.schema import merge, mutable
from factflip.studies.sources import fact_source
from factflip.studies.stages import (
  MAIN,
  MIRROR,
  Stage,
  StageSpec,
  config_keys,
  describe_plan,
  train_stage,
)

# the study packages, factflip/studies/<name>/, each exporting its StudyRecord as STUDY
STUDIES = ("poisoning", "new_knowledge", "morfi", "unlearning", "suite")


@dataclasses.dataclass(frozen=True)
class StudyRecord:
  """What a study package exports as `STUDY`: the one entry the platform, the suite and the
  command line read.

  `base_config()`: every key the study reads, with its default; `validate(config, source)`:
  ConfigError naming the source and key; `study`: its class (stages and builds);
  `headline(study, tables)` and `figures(study, tables, out_dir)`: its report (headline numbers
  for summary.json, the `report.Figure`s drawn); `summary(head)`: terminal lines;
  `paper_checks(head)`: rows {finding, measured, reproduced} of its paper's findings beside
  the headline (the suite's findings table)."""
  name: str
  title: str
  base_config: Callable[[], Any]
  validate: Callable[..., None]
  study: type
  headline: Callable[..., dict[str, Any]] | None = None
  figures: Callable[..., list] | None = None
  summary: Callable[[dict[str, Any]], list[str]] | None = None
  paper_checks: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None


def study_record(name: str, source: str = "study") -> StudyRecord:
  """The record of a registered study; an unknown name is a ConfigError naming the choices."""
  if name not in STUDIES:
    raise ConfigError(source, "study", f"{name!r}; expected one of {sorted(STUDIES)}")
  return importlib.import_module(f"factflip.studies.{name}").STUDY


class Driven:
  """What every study object has: its record (by `name`), its config (validated, frozen), its
  workdir, log and hosts (`distributed.Hosts`)."""
  name = ""

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    self.record.validate(config, source)
    # frozen: every Stage is made (and memoised) from this config, so it must not change
    # under them; a stage that needs a mutable copy of a subtree takes `schema.mutable(...)`
    self.c = ml_collections.FrozenConfigDict(config.copy_and_resolve_references())
    self.wd = os.path.abspath(workdir)
    self.log = log
    self.hosts = Hosts(self.c.barrier_timeout_s)

  @classmethod
  def record_of(cls) -> StudyRecord:
    """Its package's record: by `name`, or for a subclass that is not registered (a variant
    of a study, as tests make) its nearest registered ancestor's."""
    return study_record(next((c.name for c in cls.__mro__ if getattr(c, "name", "") in STUDIES),
                             cls.name))

  @property
  def record(self) -> StudyRecord:
    return self.record_of()

  @property
  def title(self) -> str:
    return self.record.title

  @classmethod
  def open(cls, workdir: str, log=print):
    """The study that ran in `workdir` (its study.json over today's defaults, so keys added
    since read as their defaults), to read its runs and models."""
    path = os.path.join(workdir, "study.json")
    config = cls.record_of().base_config()
    merge(config, read_json(path), path)
    return cls(config, workdir, log=log, source=path)


class Study(Driven):
  """The base of every staged study: fact source, cells, the stage driver, the report.

  A subclass sets `name` (its registry name: config, validation, title and report come from
  its package's `StudyRecord`) and `draw_keys` (which of its config keys size the fact
  source's draw: `studies.sources`), and defines `grid()` (its own axes), `specs()` (its
  StageSpecs in run order, after the fact source's; Stage-making methods wrapped in
  `stages.memo`) and `tables()` (its results as DataFrames)."""
  draw_keys: ClassVar[dict[str, str]] = {}

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    super().__init__(config, workdir, log, source)
    self.all_hosts = False              # inside a MIRROR stage of a multi-process run
    self.source = fact_source(self)
    self.sizes = self.source.sizes          # label -> preset or model directory

  def keys(self, *prefixes: str, **extra) -> dict[str, Any]:
    """The resolved config values under `prefixes` (flattened) plus `extra`: a Stage's keys."""
    return dict(config_keys(self.c, prefixes), **extra)

  # ---- cells and layout -------------------------------------------------------------------
  def grid(self) -> dict[str, list]:
    """The study's own axes beyond size and seed, e.g. {"p": [0.0, 0.5, 1.0]}."""
    return {}

  def axes(self) -> dict[str, list]:
    return {"size": list(self.sizes), "seed": [int(k) for k in self.c.seeds], **self.grid()}

  def cells(self, over: Sequence[str] = ("size", "seed")) -> Iterator[dict[str, Any]]:
    """Every point of the grid over the axes `over`, in axis order (size slowest)."""
    axes = self.axes()
    out = [{}]
    for name in over:
      out = [dict(cell, **{name: v}) for cell in out for v in axes[name]]
    yield from out

  def run_dir(self, size: str, seed: int, name: str) -> str:
    return os.path.join(self.wd, "runs", size, f"seed{seed}", name)

  # ---- stages -----------------------------------------------------------------------------
  def specs(self) -> list[StageSpec]:
    raise NotImplementedError

  def all_specs(self) -> list[StageSpec]:
    """The fact source's stages (world, pretraining or the base's fact draw), then the study's."""
    return self.source.specs(then=self.base_ready) + self.specs()

  def base_ready(self, size: str, seed: int) -> None:
    """After the base stage of a cell (a study's gate on its base goes here)."""

  def draw_needs_known(self) -> bool:
    """Whether the fact draw from a facts file (`studies.sources`) must find as many
    candidates the base knows as it draws (targets + controls) and stop before drawing when
    it does not; False (the default): facts the base does not know fill the draw."""
    return False

  def stages(self) -> list[Stage]:
    """Every stage in the order `run` computes them."""
    return [spec.stage(**cell) for spec in self.all_specs() for cell in self.cells(spec.over)]

  def plan(self) -> list[str]:
    """What a run would compute and why (which keys changed), before any work."""
    lines, counts = describe_plan(self.stages())
    return ["plan: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)] + lines

  # ---- models for probes ------------------------------------------------------------------
  def probe_devices(self) -> list:
    """The devices a probed model (and its patching sweep) uses: `probe.devices` of this
    process, or inside a MIRROR stage of a multi-process run that many of every process."""
    import jax
    n = self.c.probe.devices
    if not self.all_hosts:
      return jax.local_devices() if n == -1 else jax.local_devices()[:n]
    taken: dict[int, int] = {}
    out = []
    for d in jax.devices():
      k = taken.get(d.process_index, 0)
      if n == -1 or k < n:
        out.append(d)
        taken[d.process_index] = k + 1
    return out

  def load(self, path: str):
    """A model to probe (a base, a checkpoint step), in `probe.dtype`, its parameters sharded
    (fsdp) over `probe_devices()` when that is more than one device."""
    devices = self.probe_devices()
    mesh = make_mesh(1, -1, 1, devices=devices) if len(devices) > 1 else None
    return load_model(path, dtype=self.c.probe.dtype, mesh=mesh)

  # ---- fine-tuning from a base ------------------------------------------------------------
  def train_epochs(self, config, out: str, size: str, seed: int, per_epoch: int, label: str,
                   settings: dict[str, Any], epochs: int | None = None,
                   init_from: str | None = None) -> dict[str, Any]:
    """A fine-tuning stage (SFT, unlearning): the training config `config` from the base of
    (size, seed) (or `init_from`) for `epochs` (default the study's) epochs of `per_epoch`
    steps, a checkpoint kept per epoch (the base is epoch 0), with `settings` ({"data.path":
    ..., dotted keys}) set on it."""
    c = mutable(config)
    c.seed = seed
    c.model.init_from = init_from or self.base_path(size, seed)
    for key, value in settings.items():
      group, name = key.rsplit(".", 1)
      c[group][name] = value
    c.steps = (self.c.epochs if epochs is None else epochs) * per_epoch
    c.checkpoint.every = per_epoch
    c.checkpoint.keep = 0
    if not self.c.facts:
      c.data.tokenizer_dir = self.source.tok_dir
    res = train_stage(c, out, label)
    return {"step": res.step, "seconds": round(res.seconds, 1), "steps_per_epoch": per_epoch}

  def base_path(self, size: str, seed: int) -> str:
    return self.source.base_path(size, seed)

  def base_dir(self, size: str, seed: int) -> str:
    return self.source.base_dir(size, seed)

  def tokenizer(self, size: str):
    return self.source.tokenizer(size)

  # ---- the driver -------------------------------------------------------------------------
  def run(self, dry_run: bool = False) -> dict[str, Any] | None:
    """Every stage: first the plan (which stages are reused, computed, resumed or redone and
    which keys changed); with `dry_run` only that (None is returned). Then each spec over its
    cells; the tables at the end (`tables()`). Wall seconds per spec name are summed over
    resumed invocations into results/timings.json; study.json (the config, what `open`
    reads) is written when every stage is done, so it always describes complete outputs."""
    if self.hosts.main:
      for line in self.plan():
        self.log(line)
    if dry_run:
      return None
    timings = self.drive(self.all_specs())

    def finish():
      path = os.path.join(self.wd, "results", "timings.json")
      before = read_json(path) if os.path.exists(path) else {}
      write_json(path, {k: round(before.get(k, 0.0) + timings.get(k, 0.0), 1)
                        for k in dict.fromkeys([*before, *timings])})
      write_json(os.path.join(self.wd, "study.json"), self.c.to_dict())
      return self.tables()
    return self.hosts.on_main("the results tables", finish)

  def drive(self, specs: Sequence[StageSpec]) -> dict[str, float]:
    """Build or reuse every stage of `specs`, each over its cells, in order; `stage_done` after
    each. Returns the wall seconds per spec name. In a multi-process run every process calls
    this (the module docstring: who computes what)."""
    t0 = time.time()
    timings: dict[str, float] = {}
    for spec in specs:
      for cell in self.cells(spec.over):
        st = spec.stage(**cell)
        t = time.time()
        self.log(f"[{st.name}] ...")
        try:
          built = self._drive_one(spec, st, cell)
        except BaseException as e:
          self.hosts.fail(f"stage {st.name!r}", e)
          raise
        timings[spec.name] = timings.get(spec.name, 0.0) + time.time() - t
        self.log(f"[{st.name}] done in {time.time() - t:.1f} s (total {time.time() - t0:.0f} s)")
        self.stage_done(st, built)
    return timings

  def _drive_one(self, spec: StageSpec, st: Stage, cell: dict[str, Any]) -> bool:
    """One stage on this process: process 0 decides reuse or build (and where: `Stage.build`)
    and tells the others; who builds follows `spec.hosts`; process 0 writes DONE after every
    builder is through, then runs the gate; the others wait for it. Returns: built now."""
    where = f"stage {st.name!r}"
    h = self.hosts
    with contextlib.ExitStack() as stack:
      out = stack.enter_context(st.build()) if h.main else None
      out = h.share(where + " (its directory)", out or "") or None
      if out is not None and (h.main or spec.hosts != MAIN):
        if not h.main and spec.hosts == MIRROR:    # the same files, into a discarded copy
          private = tempfile.mkdtemp(prefix=f"factflip-p{h.index}-")
          stack.callback(shutil.rmtree, private, True)
          out = shutil.copytree(out, os.path.join(private, "out"))
        self.all_hosts = h.many and spec.hosts == MIRROR
        try:
          with alone() if spec.hosts == MAIN else contextlib.nullcontext():
            info = spec.build(out, **cell) or {}
        finally:
          self.all_hosts = False
        if h.main:
          st.info = info
        if spec.hosts != MAIN:
          h.barrier(where + " (every process's outputs written)")
    if h.main and spec.then is not None:
      with alone():
        spec.then(**cell)
    h.share(where, "done")
    return out is not None

  def stage_done(self, stage: Stage, built: bool) -> None:
    """After each stage of `drive` (built: computed now rather than reused); a driver of
    several studies (the suite) follows progress here."""

  def tables(self) -> dict[str, Any]:
    """The results tables as DataFrames, read from what the stages wrote."""
    raise NotImplementedError

  def report(self, tables: dict[str, Any], out_dir: str) -> tuple[dict[str, Any], list]:
    """(headline numbers, the `report.Figure`s drawn into out_dir) for report/index.html: the
    record's `headline` and `figures`."""
    return (self.record.headline(self, tables),
            self.record.figures(self, tables, out_dir))

  def summary(self, head: dict[str, Any]) -> list[str]:
    """The terminal summary from the headline (strict JSON: undefined values are None)."""
    return self.record.summary(head) if self.record.summary else []

  def figures(self, out_dir: str) -> list[tuple[str, str]]:
    """Every report figure drawn into out_dir from the results: [(title, path)]."""
    _, figs = self.report(self.tables(), out_dir)
    return [(f.title, os.path.join(out_dir, f.file)) for f in figs if f.file]

  def run_and_report(self, dry_run: bool = False) -> dict[str, Any] | None:
    """All stages, then plots, report/index.html, summary.json and the terminal summary
    (with `dry_run`, only the plan)."""
    t0 = time.time()
    tables = self.run(dry_run)
    if dry_run:
      return None
    return self.hosts.on_main("the report", lambda: self._report(tables, t0))

  def _report(self, tables: dict[str, Any], t0: float) -> dict[str, Any]:
    rdir = os.path.join(self.wd, "report")
    head, figs = self.report(tables, rdir)
    head["timings_s"] = read_json(os.path.join(self.wd, "results", "timings.json"))
    head = write_report(rdir, self.title, self.wd, head, figs, list(tables))
    self.log(f"\nfactflip {self.name} study done in {time.time() - t0:.0f} s")
    for line in self.summary(head):
      self.log("  " + line)
    self.log(f"  report: {os.path.join(rdir, 'index.html')}")
    return head
