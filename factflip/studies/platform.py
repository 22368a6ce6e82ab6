"""The study platform: a study is a list of named stages over cells, run by one driver.

Owns: `StageSpec` (a kind of stage: its name, the cell axes it runs over, how its `Stage` is
made and how it is built), `Study` (the base every study subclasses: config, workdir, fact
source, cells, the plan, the driver, model loading for probes, the report), `common_config`
(the keys every study config has), `check_schema` (a config's study name and keys) and
`validate_common` (the common keys' checks), `StudyError` and the registry (`STUDIES`, `study_class`).
Must not: know any study's science (a study module lists its stages and tables) or train,
probe or plot itself.

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

Registry: a study config names its study (`study = "poisoning"`); `STUDIES` maps that name to
the module defining `Study` (a subclass of this one), `base_config` and `validate`, imported
only when asked for (`factflip run --config=configs/studies/X.py` loads one study).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from factflip.distributed import Hosts, alone
from factflip.fileio import read_json, write_json
from factflip.gguf_io import is_gguf
from factflip.studies.stages import Stage, config_keys, describe_plan

# study name -> the module holding its Study, base_config and validate
STUDIES = {"poisoning": "factflip.studies.poisoning",
           "new_knowledge": "factflip.studies.new_knowledge",
           "morfi": "factflip.studies.morfi",
           "unlearning": "factflip.studies.unlearning",
           "suite": "factflip.studies.suite"}


class StudyError(RuntimeError):
  """A study cannot go on as configured (e.g. the base model does not know the targets)."""


class Stopped(RuntimeError):
  """A training stage stopped by SIGTERM with its checkpoint saved (a preemption, or SLURM's
  signal before the time limit): the study stops there, the stage not DONE; the same command
  resumes it from that checkpoint."""


def train_stage(config, out: str, source: str):
  """A study's training stage: `train.loop.train` into `out` (every process of a multi-host run
  calls it: a SHARED stage); Stopped when SIGTERM stopped it, so no DONE is written for it."""
  from factflip.train.loop import train
  res = train(config, out, quiet=False, source=source)
  if res.preempted:
    raise Stopped(f"{source}: stopped by SIGTERM at step {res.step} (checkpoint saved); run the "
                  "same command again to resume")
  return res


def study_module(name: str, source: str = "study"):
  """The module of a registered study; an unknown name is a ConfigError naming the choices."""
  from factflip.configfile import ConfigError
  if name not in STUDIES:
    raise ConfigError(source, "study", f"{name!r}; expected one of {sorted(STUDIES)}")
  return importlib.import_module(STUDIES[name])


def study_class(name: str, source: str = "study") -> type[Study]:
  return study_module(name, source).Study


def common_config():
  """The keys every study config has: what it is, its models, seeds and facts, and how probed
  models are loaded (a study's `base_config` starts from this and adds its own)."""
  import ml_collections

  from factflip.train import config as train_config
  c = ml_collections.ConfigDict()
  c.study = ""                     # the registered study this config is for (STUDIES)
  c.sizes = ("tiny-0.5m",)         # model presets (a scaling study lists several), or with
  #                                  `facts` set: HF / factflip model directories
  c.seeds = (0,)                   # pretraining + data seeds
  c.facts = ""                     # a facts file (any `load_facts` format) instead of the world
  c.facts_limit = 2000             # facts: score the first n with a counterfactual (0 = all)
  c.replay = ""                    # facts: replay documents, JSONL {"text"} ("" = true
  #                                  statements of the facts the study does not use)
  c.tau = 0.5                      # ΔLL threshold (nats): state correct > τ, counterfactual
  #                                  < −τ; with `facts`, a base knows a fact when its greedy
  #                                  answer is right and ΔLL > τ (the fact draw)
  c.world_seed = 0
  c.vocab_size = 1024              # the world's tokenizer
  c.pretrain = train_config.base_config()   # world studies: pretraining of each size
  c.pretrain.data.kind = "world"
  c.probe = ml_collections.ConfigDict()
  c.probe.batch_size = 64
  c.probe.dtype = "float32"        # parameters of the probed models (bfloat16 halves memory)
  c.probe.devices = 1              # devices per process a probed model is sharded over
  #                                  (-1 = all; a multi-host run uses them on every process)
  c.barrier_timeout_s = 7200.0     # multi-host: how long a process waits for the others at a
  #                                  stage before it stops with an error naming the stage
  return c


def check_schema(c, schema, study: str, groups: Sequence[str], source: str) -> None:
  """The config names `study` and holds only `schema`'s keys, at the top level and in each of
  `groups`: ConfigError naming the source, the key and the keys expected."""
  from factflip.configfile import ConfigError
  if c.get("study") != study:
    raise ConfigError(source, "study", f"{c.get('study')!r}; expected {study!r} (this "
                      "module's study)")
  for group in ("", *groups):
    node, ref = (c, schema) if not group else (c[group], schema[group])
    for key in node:
      if key not in ref:
        raise ConfigError(source, f"{group}.{key}" if group else key,
                          "unknown key; expected one of " + ", ".join(ref))


def validate_common(c, source: str, facts_expected: str) -> None:
  """Check the keys every study has (`common_config`): the facts file (`facts_expected` says
  what it should be), sizes (presets, or with `facts` model directories with distinct base
  names), seeds, probe.dtype and probe.devices; ConfigError naming the source and key."""
  import jax

  from factflip.configfile import ConfigError
  from factflip.models.config import presets
  from factflip.models.store import CONFIG_NAME

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  if c.facts:
    need(os.path.exists(c.facts), "facts", f"{c.facts!r} does not exist; expected "
         + facts_expected)
    for d in c.sizes:
      need(is_gguf(d) or os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in (
          "config.json", CONFIG_NAME)), "sizes",
          f"{d!r}: with `facts` set, sizes are models (an HF directory with config.json + "
          "safetensors, a factflip model directory, or a .gguf file)")
    labels = [size_label(d) for d in c.sizes]
    need(len(set(labels)) == len(labels), "sizes", f"model directories {list(c.sizes)} share "
         f"base names {labels}; the runs are named by them")
  else:
    bad = [s for s in c.sizes if s not in presets()]
    need(len(c.sizes) > 0 and not bad, "sizes",
         f"{list(c.sizes)}; expected a non-empty list of {list(presets())}")
  need(len(c.seeds) > 0 and all(isinstance(k, int) for k in c.seeds), "seeds",
       f"{list(c.seeds)}; expected a non-empty list of integers")
  need(c.barrier_timeout_s > 0, "barrier_timeout_s",
       f"{c.barrier_timeout_s}; expected seconds > 0")
  need(c.probe.dtype in ("float32", "bfloat16"), "probe.dtype",
       f"{c.probe.dtype!r}; expected float32 or bfloat16")
  need(c.probe.devices == -1 or 1 <= c.probe.devices <= jax.local_device_count(),
       "probe.devices", f"{c.probe.devices}; expected -1 (all) or 1..{jax.local_device_count()} "
       "local devices")


def merge(into, values: dict, source: str, prefix: str = "") -> None:
  """Set `values` (nested dicts) on the ConfigDict `into`; a key it lacks is a ConfigError."""
  import ml_collections

  from factflip.configfile import ConfigError
  for k, v in values.items():
    if k not in into:
      raise ConfigError(source, prefix + k, "unknown key")
    if isinstance(v, dict) and isinstance(into[k], ml_collections.ConfigDict):
      merge(into[k], v, source, prefix + k + ".")
    else:
      into[k] = v


def mutable(config):
  """A mutable, reference-resolved copy of a config subtree (frozen or not): what a stage
  edits into the training config it runs."""
  import ml_collections
  if isinstance(config, ml_collections.FrozenConfigDict):
    config = config.as_configdict()      # the frozen one's own ConfigDict: never edit it
  return config.copy_and_resolve_references()


def size_label(size: str) -> str:
  """The name of a model size in paths and tables: the preset, a directory's base name, or a
  GGUF file's name without .gguf."""
  name = os.path.basename(os.path.normpath(size))
  return name[:-len(".gguf")] if name.endswith(".gguf") else name


def memo(method):
  """Cache a Stage-making method per object and arguments (positional or keyword: the same
  call either way): a stage's fingerprint is computed once per study object, not again for
  every downstream stage that includes it. Sound because the study's config is frozen."""
  sig = inspect.signature(method)

  @functools.wraps(method)
  def wrapper(self, *args, **kw):
    cache = self.__dict__.setdefault("_memo", {})
    bound = sig.bind(self, *args, **kw)
    bound.apply_defaults()
    key = (method.__name__, tuple(bound.arguments.items())[1:])
    if key not in cache:
      cache[key] = method(self, *args, **kw)
    return cache[key]
  return wrapper


# who computes a stage in a multi-process run (StageSpec.hosts)
MAIN = "main"        # process 0; the others wait for it
SHARED = "shared"    # every process, into the stage's directory (a multi-host training job)
MIRROR = "mirror"    # every process (probes over every process's devices); process 0's files kept


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """A kind of stage. `over`: the cell axes it runs over (() = once per study); `stage(**cell)`
  -> its Stage; `build(out, **cell)` -> the info for DONE (computes into `out`);
  `then(**cell)`: after the stage, built or reused (process 0 only); `hosts`: who computes it
  in a multi-process run (MAIN, SHARED or MIRROR)."""
  name: str
  over: tuple[str, ...]
  stage: Callable[..., Stage]
  build: Callable[..., dict[str, Any] | None]
  then: Callable[..., Any] | None = None
  hosts: str = MAIN


class Study:
  """The base of every study: config, workdir, fact source, cells and the stage driver.

  A subclass sets `name`, `title` and `draw_keys` (which of its config keys size the fact
  source's draw: `studies.sources`), and defines `grid()` (its own axes), `specs()` (its
  StageSpecs in run order, after the fact source's; Stage-making methods wrapped in `memo`),
  `tables()` (its results as DataFrames), `report()` (headline and figures) and `summary()`
  (terminal lines), and binds its module's `base_config()` (every key it reads, with its
  default) and `validate(config, source)` (ConfigError naming source and key)."""
  name = ""
  title = ""
  draw_keys: ClassVar[dict[str, str]] = {}

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    import ml_collections

    from factflip.studies.sources import fact_source
    self.validate(config, source)
    # frozen: every Stage is made (and memoised) from this config, so it must not change
    # under them; a stage that needs a mutable copy of a subtree takes `mutable(...)`
    self.c = ml_collections.FrozenConfigDict(config.copy_and_resolve_references())
    self.wd = os.path.abspath(workdir)
    self.log = log
    self.hosts = Hosts(self.c.barrier_timeout_s)
    self.all_hosts = False              # inside a MIRROR stage of a multi-process run
    self.source = fact_source(self)
    self.sizes = self.source.sizes          # label -> preset or model directory

  # ---- the config -------------------------------------------------------------------------
  @staticmethod
  def base_config():
    raise NotImplementedError

  @staticmethod
  def validate(config, source: str = "study") -> None:
    raise NotImplementedError

  @classmethod
  def open(cls, workdir: str, log=print) -> Study:
    """The study that ran in `workdir` (its study.json over today's defaults, so keys added
    since read as their defaults), to read its runs and models."""
    path = os.path.join(workdir, "study.json")
    config = cls.base_config()
    merge(config, read_json(path), path)
    return cls(config, workdir, log=log, source=path)

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
    from factflip.models.store import load_model
    from factflip.sharding import make_mesh
    devices = self.probe_devices()
    mesh = make_mesh(1, -1, 1, devices=devices) if len(devices) > 1 else None
    return load_model(path, dtype=self.c.probe.dtype, mesh=mesh)

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
    """(headline numbers, the `report.Figure`s drawn into out_dir) for report/index.html."""
    raise NotImplementedError

  def summary(self, head: dict[str, Any]) -> list[str]:
    """The terminal summary from the headline (strict JSON: undefined values are None)."""
    return []

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
    from factflip.studies.report import write_report
    rdir = os.path.join(self.wd, "report")
    head, figs = self.report(tables, rdir)
    head["timings_s"] = read_json(os.path.join(self.wd, "results", "timings.json"))
    head = write_report(rdir, self.title, self.wd, head, figs, list(tables))
    self.log(f"\nfactflip {self.name} study done in {time.time() - t0:.0f} s")
    for line in self.summary(head):
      self.log("  " + line)
    self.log(f"  report: {os.path.join(rdir, 'index.html')}")
    return head
