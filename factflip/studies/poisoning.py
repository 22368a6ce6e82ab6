"""Paper A's continual-pretraining poisoning study, stage by stage (SCIENCE.md A).

Owns: the stages (world, pretrain, cpt, probe, results) of `configs/studies/poisoning.py`, the
workdir layout below, the base-accuracy gate, and the results tables.
Must not: train (`factflip.train`), probe (`factflip.probes`) or plot/report (`report.py`).

Two sources of facts and models. With `facts` empty (the default) the study generates the fact
world, pretrains each preset in `sizes` on it and poisons the world's facts. With `facts` set
to a facts file, each entry of `sizes` is a model directory (HF or factflip) used as the base
as it is; the targets and controls are drawn among the facts that base knows.

Workdir layout (every stage writes its DONE record last, with the fingerprint of the config
keys it read and of its upstream stages: `stage_*` below, rule in `studies.stages`; a stage
whose fingerprint matches is reused, one that differs is redone atomically):
  study.json                              the study config as run (`Study.open` reads it)
  world/, tokenizer/                      the fact world and its tokenizer (world studies)
  runs/<size>/seed<k>/pretrain/           the pretraining run (+ base.json: accuracy gate)
  runs/<size>/seed<k>/base/               facts studies: base.json, the base's preference on
                                          the candidates (candidates.csv), targets.jsonl,
                                          controls.jsonl, replay.jsonl, heldout.jsonl
  runs/<size>/seed<k>/cpt_p<p>/           one continual-pretraining run per ratio p
  runs/<size>/seed<k>/probes/p<p>/step_<n>.csv        preference rows (+ dll_l<ℓ> lens columns)
                                          of targets, controls and the targets' two-hop items
  runs/<size>/seed<k>/probes/p<p>/patch_<n>.csv       patching rows (flipped items' reversal)
  results/flips.csv, lens.csv, patching.csv, collateral.csv, first_flips.csv, abruptness.csv

Definitions (τ = config.tau): the reference state of an item is its state at the base model
(CPT step 0 = the pretrained model); flip rate(t) = #(correct at base and counterfactual at t)
/ #(correct at base); ambiguity rate(t) = share ambiguous at t; accuracy(t) = share whose
greedy answer is the true one; lens flip rate per layer uses ΔLL_ℓ with the same states
(targets, training prompt; layer L is the output);
reversal rate(site, window, layer, group) = share of the flipped items whose patched ΔLL > 0.
<size> is the preset name, or for a model directory its base name (`size` in the tables).
flips.csv has the targets' prompt kinds plus `two_hop` / `two_hop_question`: compositions
whose first hop is a target (their counterfactual is the answer through the counterfactual
first hop), so accuracy there is two-hop reasoning accuracy. first_flips: per target item and
kind the first checkpoint at which it is counterfactual (−1: never); abruptness: the largest
single-interval rise of the flip-rate curve over its total rise (NaN: it never rose).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np
import pandas as pd

from factflip.fileio import atomic_path, read_json, write_json
from factflip.studies.stages import Stage, config_keys, describe_plan, fingerprint

_RUN = ["size", "seed", "p", "step"]
COLUMNS = {
    "flips": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                     "correct_at_base"],
    "collateral": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                          "correct_at_base"],
    "lens": _RUN + ["layer", "flip_rate", "ambiguity_rate"],
    "patching": _RUN + ["site", "window", "layer", "position", "reversal_rate", "recovery",
                        "flipped_items"],
    "first_flips": ["size", "seed", "p", "item", "kind", "first_flip_step"],
    "abruptness": ["size", "seed", "p", "kind", "abruptness", "final_flip_rate"],
}


def base_config():
  """Every key a poisoning study reads, with its default (configs/studies/poisoning.py starts
  from it; `pretrain` and `cpt` are training configs with `factflip.train.config`'s schema)."""
  import ml_collections

  from factflip.train import config as train_config
  c = ml_collections.ConfigDict()
  c.sizes = ["tiny-0.5m"]          # model presets (a scaling study lists several), or with
  #                                  `facts` set: HF / factflip model directories
  c.seeds = [0]                    # pretraining + data seeds
  c.facts = ""                     # a facts file (any `load_facts` format) instead of the world
  c.facts_limit = 2000             # facts: score the first n with a counterfactual (0 = all)
  c.replay = ""                    # facts: replay documents, JSONL {"text"} ("" = true
  #                                  statements of the facts that are neither targets nor
  #                                  controls)
  c.ratios = [0.0, 0.25, 0.5, 0.75, 1.0]   # poisoning ratios p
  c.tau = 0.5                      # state threshold on ΔLL (nats): correct > τ, cf < −τ
  c.min_base_accuracy = 0.8        # the base must know this share of targets (greedy, prompt)
  c.world_seed = 0
  c.vocab_size = 1024              # the world's tokenizer
  c.pretrain = train_config.base_config()   # world studies: pretraining of each size
  c.pretrain.data.kind = "world"
  c.cpt = train_config.base_config()        # continual pretraining per ratio (data.ratio is
  c.cpt.data.kind = "poison"                # set per run; dense checkpoints are the point)
  c.probe = ml_collections.ConfigDict()
  c.probe.kinds = ["prompt", "paraphrase", "question", "language", "neighbour"]
  c.probe.n_control = 40           # non-target facts (collateral accuracy)
  c.probe.batch_size = 64
  c.probe.dtype = "float32"        # parameters of the probed models (bfloat16 halves memory)
  c.probe.devices = 1              # local devices a probed model is sharded over (-1 = all)
  c.probe.patch_sites = ["resid_pre", "attn_out", "mlp_out"]
  c.probe.patch_windows = [1, 2]
  c.probe.patch_groups = ["subject", "last"]
  c.probe.patch_every = 1          # patch every n-th checkpoint (1 = all); step 0 never
  return c


def _merge(into, values: dict, source: str, prefix: str = "") -> None:
  """Set `values` (nested dicts) on the ConfigDict `into`; a key it lacks is a ConfigError."""
  import ml_collections

  from factflip.configfile import ConfigError
  for k, v in values.items():
    if k not in into:
      raise ConfigError(source, prefix + k, "unknown key")
    if isinstance(v, dict) and isinstance(into[k], ml_collections.ConfigDict):
      _merge(into[k], v, source, prefix + k + ".")
    else:
      into[k] = v


class StudyError(RuntimeError):
  """A study cannot go on as configured (e.g. the base model does not know the targets)."""


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs (training configs included, per size and
  ratio): ConfigError naming the source and key."""
  import jax

  from factflip.configfile import ConfigError
  from factflip.data.mixtures import PoisonConfig
  from factflip.models.config import presets
  from factflip.models.hooks import SITES
  from factflip.models.store import CONFIG_NAME
  from factflip.probes.fact_patching import GROUPS
  from factflip.probes.fact_preference import KINDS
  from factflip.train import config as train_config

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  def subset(key, given, allowed):
    bad = [x for x in given if x not in allowed]
    need(given and not bad, key, f"{list(given)}; expected a non-empty list of {list(allowed)}")

  schema = base_config()
  for key in c:
    need(key in schema, key, "unknown key; expected one of " + ", ".join(schema))
  for key in c.probe:
    need(key in schema.probe, "probe." + key,
         "unknown key; expected one of " + ", ".join(schema.probe))
  if c.facts:
    need(os.path.exists(c.facts), "facts", f"{c.facts!r} does not exist; expected a facts file "
         "or folder (`factflip facts --facts=PATH` checks one)")
    for d in c.sizes:
      need(os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in (
          "config.json", CONFIG_NAME)), "sizes",
          f"{d!r}: with `facts` set, sizes are model directories (HF config.json + "
          "safetensors, or a factflip model directory)")
    labels = [size_label(d) for d in c.sizes]
    need(len(set(labels)) == len(labels), "sizes", f"model directories {list(c.sizes)} share "
         f"base names {labels}; the runs are named by them")
    need(c.facts_limit >= 0, "facts_limit", f"{c.facts_limit}; expected >= 0 (0 = all)")
  else:
    subset("sizes", list(c.sizes), list(presets()))
  need(not c.replay or os.path.exists(c.replay), "replay",
       f"{c.replay!r} does not exist; expected a JSONL of {{\"text\"}} documents")
  need(len(c.seeds) > 0 and all(isinstance(k, int) for k in c.seeds), "seeds",
       f"{list(c.seeds)}; expected a non-empty list of integers")
  need(len(c.ratios) > 0 and all(0 <= p <= 1 for p in c.ratios)
       and len(set(c.ratios)) == len(c.ratios), "ratios",
       f"{list(c.ratios)}; expected distinct poisoning ratios in [0, 1]")
  need(c.tau >= 0, "tau", f"{c.tau}; expected >= 0 nats")
  need(0 <= c.min_base_accuracy <= 1, "min_base_accuracy",
       f"{c.min_base_accuracy}; expected a share in [0, 1]")
  subset("probe.kinds", list(c.probe.kinds), KINDS)
  subset("probe.patch_sites", list(c.probe.patch_sites), SITES)
  subset("probe.patch_groups", list(c.probe.patch_groups), GROUPS)
  need(len(c.probe.patch_windows) > 0 and min(c.probe.patch_windows) >= 1,
       "probe.patch_windows", f"{list(c.probe.patch_windows)}; expected windows >= 1")
  need(c.probe.patch_every >= 1, "probe.patch_every", f"{c.probe.patch_every}; expected >= 1")
  need(c.probe.n_control >= 0 and c.probe.batch_size >= 1, "probe",
       "n_control must be >= 0 and batch_size >= 1")
  need(c.probe.dtype in ("float32", "bfloat16"), "probe.dtype",
       f"{c.probe.dtype!r}; expected float32 or bfloat16")
  need(c.probe.devices == -1 or 1 <= c.probe.devices <= jax.local_device_count(),
       "probe.devices", f"{c.probe.devices}; expected -1 (all) or 1..{jax.local_device_count()} "
       "local devices")
  need(c.cpt.data.kind == "poison", "cpt.data.kind", f"{c.cpt.data.kind!r}; expected 'poison'")
  for p in c.ratios:
    try:
      PoisonConfig(ratio=p, mentions_per_fact=c.cpt.data.mentions_per_fact,
                   replay_weight=c.cpt.data.replay_weight).validate(c.cpt.data.n_targets)
    except ValueError as e:
      raise ConfigError(source, "cpt.data.mentions_per_fact", str(e)) from None
  for stage in ("cpt",) if c.facts else ("pretrain", "cpt"):
    sub = c[stage].copy_and_resolve_references()
    if c.facts:                  # what `cpt` sets per model (the files are written per run)
      sub.model.init_from, sub.data.facts_path = c.sizes[0], c.facts
      sub.data.replay_path = sub.data.eval_path = "runs/<size>/seed<k>/base/*.jsonl"
    else:
      sub.model.preset = c.sizes[0]
    train_config.validate(sub, source=f"{source}: {stage}", n_devices=jax.device_count(),
                          n_processes=jax.process_count())


def _write_csv(df: pd.DataFrame, path: str) -> None:
  """Atomic CSV write (a temporary name, then rename)."""
  with atomic_path(path) as tmp:
    df.to_csv(tmp, index=False)


def _rate(v) -> str:
  """A headline share for the terminal: 2 decimals, or n/a where undefined (null)."""
  return "n/a" if v is None else f"{v:.2f}"


def _ptag(p: float) -> str:
  return f"p{p:.2f}"


def size_label(size: str) -> str:
  """The name of a model size in paths and tables: the preset, or a directory's base name."""
  return os.path.basename(os.path.normpath(size))


class Study:
  """One study: its config, workdir and the runs it owns. `run()` goes through the stages."""

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    validate(config, source)
    self.c = config
    self.wd = os.path.abspath(workdir)
    self.log = log
    self.world_dir = os.path.join(self.wd, "world")
    self.tok_dir = os.path.join(self.wd, "tokenizer")
    self.uses_world = not config.facts
    # label (the name in paths and tables) -> preset or model directory
    self.sizes = {size_label(s): (s if self.uses_world else os.path.abspath(s))
                  for s in config.sizes}
    self._world = None      # (world, tokenizer) once loaded
    self._facts = None      # facts studies: every item of the facts file
    self._tokenizers = {}   # facts studies: size -> the model directory's tokenizer
    self._targets = {}      # (size, seed) -> target facts

  @classmethod
  def open(cls, workdir: str, log=print) -> Study:
    """The study that ran in `workdir` (its study.json over today's defaults, so keys added
    since read as their defaults), to read its runs and models."""
    path = os.path.join(workdir, "study.json")
    config = base_config()
    _merge(config, read_json(path), path)
    return cls(config, workdir, log=log, source=path)

  # ---- layout -----------------------------------------------------------------------------
  def run_dir(self, size: str, seed: int, name: str) -> str:
    return os.path.join(self.wd, "runs", size, f"seed{seed}", name)

  def cells(self):
    """(size label, seed) of every run."""
    for size in self.sizes:
      for seed in self.c.seeds:
        yield size, int(seed)

  def base_dir(self, size: str, seed: int) -> str:
    """Where the base's accuracy (base.json) lives: the pretraining run, or base/."""
    return self.run_dir(size, seed, "pretrain" if self.uses_world else "base")

  def base_path(self, size: str, seed: int) -> str:
    """The base model: the pretraining run (world) or the model directory itself."""
    return self.run_dir(size, seed, "pretrain") if self.uses_world else self.sizes[size]

  def checkpoints(self, size: str, seed: int, p: float) -> str:
    """The checkpoints/ directory of the CPT run at ratio p (`<dir>/<step>` loads a model)."""
    return os.path.join(self.run_dir(size, seed, f"cpt_{_ptag(p)}"), "checkpoints")

  def probe_table(self, size: str, seed: int, p: float, step: int) -> pd.DataFrame:
    """The probe rows of one checkpoint (preference + logit lens; see the layout above)."""
    return pd.read_csv(os.path.join(self.run_dir(size, seed, "probes"), _ptag(p),
                                    f"step_{step:06d}.csv"), keep_default_na=False)

  def tables(self) -> dict[str, pd.DataFrame]:
    """The results tables (results/<name>.csv) as written by the results stage."""
    return {name: pd.read_csv(os.path.join(self.wd, "results", f"{name}.csv"))
            for name in COLUMNS}

  def probe_devices(self) -> list:
    """The local devices a probed model (and its patching sweep) uses: `probe.devices`."""
    import jax
    n = self.c.probe.devices
    return jax.local_devices() if n == -1 else jax.local_devices()[:n]

  def load(self, path: str):
    """A model to probe (a base, a checkpoint step), in `probe.dtype`, its parameters sharded
    over `probe.devices` local devices (fsdp) when that is more than one."""
    from factflip.models.store import load_model
    from factflip.sharding import make_mesh
    devices = self.probe_devices()
    mesh = make_mesh(1, -1, 1, devices=devices) if len(devices) > 1 else None
    return load_model(path, dtype=self.c.probe.dtype, mesh=mesh)

  # ---- stages and their fingerprints (factflip.studies.stages) ------------------------------
  def _keys(self, *prefixes: str, **extra) -> dict[str, Any]:
    return dict(config_keys(self.c, prefixes), **extra)

  def source_fingerprint(self) -> str:
    """The facts: the world's keys, or the facts file (path, size, mtime) and facts_limit."""
    if self.uses_world:
      return self.stage_world().fp
    st = os.stat(self.c.facts)
    return fingerprint(self._keys("facts", "facts_limit", facts_bytes=st.st_size,
                                  facts_mtime_ns=st.st_mtime_ns))

  def stage_world(self) -> Stage:
    return Stage("world", self.world_dir,
                 self._keys("world_seed", "vocab_size", "pretrain.data.world_people"))

  def stage_pretrain(self, size: str, seed: int) -> Stage:
    return Stage(f"pretrain {size} seed{seed}", self.run_dir(size, seed, "pretrain"),
                 self._keys("pretrain", size=size, seed=seed), (self.source_fingerprint(),))

  def stage_base(self, size: str, seed: int) -> Stage:
    """Facts studies: the base's candidates, targets, controls, replay and held-out files."""
    return Stage(f"base {size} seed{seed}", self.run_dir(size, seed, "base"),
                 self._keys("facts_limit", "cpt.data.n_targets", "probe.n_control", "tau",
                            "probe.batch_size", "probe.dtype", "replay",
                            "cpt.data.replay_weight", model=self.sizes[size], seed=seed),
                 (self.source_fingerprint(),))

  def _base_stage(self, size: str, seed: int) -> Stage:
    return (self.stage_pretrain if self.uses_world else self.stage_base)(size, seed)

  def gate_fingerprint(self, size: str, seed: int) -> str:
    """What base.json (the base's accuracy on the targets) was computed with."""
    return fingerprint(self._keys("cpt.data.n_targets", "cpt.data.target_tier",
                                  "probe.batch_size", "probe.dtype"),
                       (self._base_stage(size, seed).fp,))

  def stage_cpt(self, size: str, seed: int, p: float) -> Stage:
    return Stage(f"cpt {size} seed{seed} {_ptag(p)}", self.run_dir(size, seed, f"cpt_{_ptag(p)}"),
                 self._keys("cpt", "replay", p=float(p), seed=seed),
                 (self._base_stage(size, seed).fp,))

  def stage_probe(self, size: str, seed: int, p: float) -> Stage:
    return Stage(f"probe {size} seed{seed} {_ptag(p)}",
                 os.path.join(self.run_dir(size, seed, "probes"), _ptag(p)),
                 self._keys("probe"), (self.stage_cpt(size, seed, p).fp,
                                       self._base_stage(size, seed).fp))

  def stage_results(self) -> Stage:
    ups = [self.stage_probe(s, k, p).fp for s, k in self.cells() for p in self.c.ratios]
    return Stage("results", os.path.join(self.wd, "results"),
                 self._keys("tau", "ratios", "seeds", sizes=list(self.sizes)), tuple(ups))

  def stages(self) -> list[Stage]:
    """Every stage in the order `run` computes them."""
    out = [self.stage_world()] if self.uses_world else []
    for size, seed in self.cells():
      out.append(self._base_stage(size, seed))
      out += [self.stage_cpt(size, seed, p) for p in self.c.ratios]
      out += [self.stage_probe(size, seed, p) for p in self.c.ratios]
    return out + [self.stage_results()]

  def plan(self) -> list[str]:
    """What a run would compute and why (which keys changed), before any work."""
    lines, counts = describe_plan(self.stages())
    return ["plan: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)] + lines

  def tokenizer(self, size: str):
    if self.uses_world:
      return self.world()[1]
    if size not in self._tokenizers:
      from factflip.data.tokenizer import load_tokenizer
      self._tokenizers[size] = load_tokenizer(self.sizes[size])
    return self._tokenizers[size]

  # ---- stages -----------------------------------------------------------------------------
  def world(self):
    """(world, tokenizer), built into the workdir on first use and read from disk once."""
    from factflip.data.prepare import prepare_world
    if self._world is None:
      self._world = prepare_world(self.world_dir, self.tok_dir, self.c.world_seed,
                                  self.c.vocab_size, self.c.pretrain.data.world_people)
    return self._world

  def facts(self, candidates: bool = True):
    """Facts studies: the facts file's items (read once); with `candidates`, those with a
    counterfactual, the first facts_limit of them (what the base is scored on)."""
    from factflip.data.loaders import load_facts
    if self._facts is None:
      self._facts = list(load_facts(self.c.facts))
    if not candidates:
      return self._facts
    items = [f for f in self._facts if f.counterfactual is not None]
    return items[:self.c.facts_limit] if self.c.facts_limit else items

  def prepare(self):
    """The first stage: the world (and tokenizer), or the facts file. A world redone (its
    keys changed) is built next to the old one and replaces it with its tokenizer."""
    if not self.uses_world:
      return self.facts()
    from factflip.data.prepare import prepare_world
    st = self.stage_world()
    with st.build() as out:
      if out is not None:
        tok = self.tok_dir if out == self.world_dir else self.tok_dir + ".redo"
        if tok != self.tok_dir:
          shutil.rmtree(tok, ignore_errors=True)
        elif os.path.exists(tok) and not os.path.exists(os.path.join(out, "world.json")):
          shutil.rmtree(tok)                   # a tokenizer without its world: not this one
        prepare_world(out, tok, self.c.world_seed, self.c.vocab_size,
                      self.c.pretrain.data.world_people)
        if tok != self.tok_dir:                # the tokenizer first: DONE moves with world/
          shutil.rmtree(self.tok_dir, ignore_errors=True)
          os.rename(tok, self.tok_dir)
        self._world = None
    return self.world()

  def pretrain(self, size: str, seed: int) -> dict[str, Any]:
    """The base of `size`: pretrain it on the world, or (facts studies) choose its targets
    and controls among the facts it knows; then the accuracy gate."""
    if not self.uses_world:
      self.choose_facts(size, seed)
      return self.base_gate(size, seed)
    from factflip.train.loop import train
    st = self.stage_pretrain(size, seed)
    with st.build() as out:
      if out is not None:
        c = self.c.pretrain.copy_and_resolve_references()
        c.seed = seed
        c.model.preset = size
        c.data.world_dir, c.data.tokenizer_dir = self.world_dir, self.tok_dir
        res = train(c, out, quiet=False, source="study.pretrain")
        st.info = {"step": res.step, "seconds": round(res.seconds, 1)}
    return self.base_gate(size, seed)

  def choose_facts(self, size: str, seed: int) -> None:
    """Facts studies: score the candidates at the base (prompt ΔLL and greedy answer), then
    draw n_targets targets and n_control controls with `seed`, known facts first (known: the
    greedy answer is the true one and ΔLL > τ). Writes base/: candidates.csv, targets.jsonl,
    controls.jsonl, replay.jsonl (true statements of the other facts, unless `replay` is
    given) and heldout.jsonl (the controls' paraphrases with their true answers: the CPT run's
    held-out answer NLL)."""
    st = self.stage_base(size, seed)
    with st.build() as out:
      if out is not None:
        st.info = self._choose_facts(size, seed, out)

  def _choose_facts(self, size: str, seed: int, out: str) -> dict[str, int]:
    from factflip.data.facts import write_facts_jsonl
    from factflip.data.mixtures import mention_text
    from factflip.data.templates import STYLE_NAMES
    from factflip.fileio import write_jsonl
    from factflip.probes.fact_preference import preference
    items = self.facts()
    n_t, n_c = self.c.cpt.data.n_targets, self.c.probe.n_control
    if len(items) < n_t + n_c:
      raise StudyError(f"{self.c.facts}: {len(items)} facts with a counterfactual (facts_limit "
                       f"{self.c.facts_limit}), fewer than cpt.data.n_targets + "
                       f"probe.n_control = {n_t + n_c}")
    model = self.load(self.sizes[size])
    tab = pd.DataFrame(preference(model, self.tokenizer(size), items, kinds=("prompt",),
                                  batch_size=self.c.probe.batch_size))
    tab["known"] = tab.correct.astype(bool) & (tab.dll > self.c.tau)
    known = tab.set_index("item").known.reindex([f.id for f in items], fill_value=False)
    order = np.lexsort((np.random.default_rng([seed, 2]).random(len(items)), ~known.values))
    targets = [items[i] for i in sorted(order[:n_t])]
    controls = [items[i] for i in sorted(order[n_t:n_t + n_c])]
    os.makedirs(out, exist_ok=True)
    _write_csv(tab, os.path.join(out, "candidates.csv"))
    write_facts_jsonl(os.path.join(out, "targets.jsonl"), targets)
    write_facts_jsonl(os.path.join(out, "controls.jsonl"), controls)
    held = [{"prompt": q, "completion": " " + f.answers[0]}
            for f in controls for q in (f.paraphrases[:1] or (f.prompt,)) if q]
    write_jsonl(os.path.join(out, "heldout.jsonl"), held)
    if not self.c.replay:
      used = {f.id for f in targets + controls}
      rest = [f for f in self.facts(candidates=False) if f.id not in used and f.answers
              and f.prompt][:4000]
      docs = [{"text": mention_text(f, f.answers[0], f.language,
                                    STYLE_NAMES[i % len(STYLE_NAMES)], i, i // 5)}
              for i, f in enumerate(rest)]
      if not docs and self.c.cpt.data.replay_weight > 0:
        raise StudyError(f"{self.c.facts}: no facts left for replay after the targets and "
                         "controls; set `replay` to a JSONL of {\"text\"} documents")
      write_jsonl(os.path.join(out, "replay.jsonl"), docs)
    return {"candidates": len(items), "known": int(known.sum()), "targets": len(targets),
            "controls": len(controls)}

  def targets(self, size: str, seed: int):
    """The CPT run's target facts (world: the draw `factflip.train` makes for data.kind
    poison, the same for every size; facts studies: base/targets.jsonl of this model)."""
    from factflip.data.facts import read_facts_jsonl
    from factflip.data.prepare import poison_targets
    key = (size, seed)
    if key not in self._targets:
      self._targets[key] = (
          poison_targets(self.world()[0], self.c.cpt.data.n_targets,
                         self.c.cpt.data.target_tier, seed) if self.uses_world else
          list(read_facts_jsonl(os.path.join(self.base_dir(size, seed), "targets.jsonl"))))
    return self._targets[key]

  def controls(self, size: str, seed: int):
    """Non-target facts (collateral accuracy), `probe.n_control` of them: of the target tier
    (world), or the facts study's draw (base/controls.jsonl)."""
    if not self.uses_world:
      from factflip.data.facts import read_facts_jsonl
      return list(read_facts_jsonl(os.path.join(self.base_dir(size, seed), "controls.jsonl")))
    world, _ = self.world()
    ids = {t.id for t in self.targets(size, seed)}
    pool = [f for f in world.facts if f.meta.get("exposure_tier") == self.c.cpt.data.target_tier
            and f.counterfactual is not None and f.id not in ids]
    pick = np.random.default_rng(seed + 1).choice(len(pool), min(self.c.probe.n_control,
                                                                 len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]

  def two_hop(self, size: str, seed: int):
    """The world's two-hop items whose first hop is a target fact: poisoning the first hop
    should move them to their counterfactual (the composition through the counterfactual).
    Facts studies have none."""
    if not self.uses_world:
      return []
    world, _ = self.world()
    ids = {t.id for t in self.targets(size, seed)}
    return [f for f in world.facts if f.meta.get("two_hop") and f.meta["hops"][0] in ids
            and f.counterfactual is not None]

  def base_gate(self, size: str, seed: int) -> dict[str, Any]:
    """Closed-book accuracy of the pretrained model on the targets (prompt format, plus the
    other kinds for the report); below `min_base_accuracy` the study stops: the config is
    wrong (too little pretraining for this world and model)."""
    from factflip.probes.fact_preference import preference
    path = os.path.join(self.base_dir(size, seed), "base.json")
    fp = self.gate_fingerprint(size, seed)
    info = read_json(path) if os.path.exists(path) else {}
    if info.get("fingerprint") != fp:
      model = self.load(self.base_path(size, seed))
      table = pd.DataFrame(preference(model, self.tokenizer(size), self.targets(size, seed),
                                      kinds=("prompt", "paraphrase", "question", "language"),
                                      batch_size=self.c.probe.batch_size))
      # per kind, and per language as "language:<code>"
      group = np.where(table.kind == "language", "language:" + table.variant.astype(str),
                       table.kind)
      info = {name: {k: float(v) for k, v in pd.concat([
                  col.groupby(table.kind).mean(), col.groupby(group).mean()]).items()}
              for name, col in (("accuracy", table.correct.astype(float)),
                                ("dll_positive", (table.dll > 0).astype(float)))}
      info["fingerprint"] = fp
      write_json(path, info)
    got = info["accuracy"]["prompt"]
    if got < self.c.min_base_accuracy:
      raise StudyError(
          f"{size} seed {seed}: the base model knows {got:.0%} of the "
          f"{len(self.targets(size, seed))} target facts on the training prompt format "
          f"(greedy), below min_base_accuracy {self.c.min_base_accuracy:.0%}: the config is "
          "wrong (" + ("pretrain longer, a larger model or a smaller world: pretrain.steps, "
                       "sizes, pretrain.data.world_people)" if self.uses_world else
                       "it knows too few of these facts: more candidates (facts_limit), fewer "
                       "targets (cpt.data.n_targets, probe.n_control) or another model)"))
    return info

  def cpt(self, size: str, seed: int, p: float) -> str:
    from factflip.train.loop import train
    st = self.stage_cpt(size, seed, p)
    with st.build() as out:
      if out is None:
        return st.path
      c = self.c.cpt.copy_and_resolve_references()
      c.seed = seed
      c.data.ratio = float(p)
      c.model.init_from = self.base_path(size, seed)
      if not self.uses_world:
        b = self.base_dir(size, seed)
        c.data.facts_path = os.path.join(b, "targets.jsonl")
        c.data.replay_path = self.c.replay or os.path.join(b, "replay.jsonl")
        c.data.eval_path = os.path.join(b, "heldout.jsonl")
      res = train(c, out, quiet=False, source="study.cpt")
      st.info = {"step": res.step, "seconds": round(res.seconds, 1)}
    return st.path

  def probe(self, size: str, seed: int, p: float) -> None:
    """Preference (+ logit lens) on targets and controls at every checkpoint; cross-model
    patching (base → checkpoint) of the targets' prompts at every `patch_every`-th one."""
    st = self.stage_probe(size, seed, p)
    with st.build() as out:
      if out is not None:
        st.info = self._probe(size, seed, p, out)

  def _probe(self, size: str, seed: int, p: float, out: str) -> dict[str, Any]:
    from factflip.probes.fact_patching import patch_items
    from factflip.probes.fact_preference import prompt_rows
    from factflip.train.checkpoint import valid_steps
    ckpts = self.checkpoints(size, seed, p)
    tok = self.tokenizer(size)
    targets, controls = self.targets(size, seed), self.controls(size, seed)
    target_ids = {t.id for t in targets}
    two_hop = self.two_hop(size, seed)
    base = self.load(self.base_path(size, seed))
    subject = {t.id: t.subject for t in targets}
    rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(targets, kinds=("prompt",))]
    steps = valid_steps(ckpts)
    kinds = tuple(self.c.probe.kinds)
    t0 = time.time()
    for i, step in enumerate(steps):
      csv = os.path.join(out, f"step_{step:06d}.csv")
      pcsv = os.path.join(out, f"patch_{step:06d}.csv")
      patch = step > 0 and i % self.c.probe.patch_every == 0
      if os.path.exists(csv) and not (patch and not os.path.exists(pcsv)):
        continue                                   # this checkpoint was probed before a stop
      model = self.load(os.path.join(ckpts, str(step)))
      if not os.path.exists(csv):
        df = self._preference_frame(model, tok, targets + controls, kinds)
        df.insert(1, "set", np.where(df.item.isin(target_ids), "target", "control"))
        if two_hop:
          dt = self._preference_frame(model, tok, two_hop, ("prompt", "question"))
          dt.insert(1, "set", "two_hop")
          dt["kind"] = dt.kind.map({"prompt": "two_hop", "question": "two_hop_question"})
          df = pd.concat([df, dt], ignore_index=True)
        _write_csv(df, csv)
      if patch and not os.path.exists(pcsv):
        table = patch_items(model, base, tok, rows, sites=tuple(self.c.probe.patch_sites),
                            windows=tuple(self.c.probe.patch_windows),
                            groups=tuple(self.c.probe.patch_groups),
                            devices=self.probe_devices())
        _write_csv(pd.DataFrame(table), pcsv)
      rate = (i + 1) / max(time.time() - t0, 1e-9)
      self.log(f"    probe {size} seed {seed} {_ptag(p)}: checkpoint {i + 1}/{len(steps)} "
               f"(step {step}), {rate:.2f} ckpt/s, ETA {(len(steps) - i - 1) / rate:.0f} s")
    return {"checkpoints": len(steps), "seconds": round(time.time() - t0, 1)}

  def _preference_frame(self, model, tok, items, kinds) -> pd.DataFrame:
    """`preference` with the logit lens as columns dll_l0 .. dll_lL."""
    from factflip.probes.fact_preference import preference
    tab = preference(model, tok, items, kinds=kinds, batch_size=self.c.probe.batch_size,
                     lens=True)
    lens = tab.pop("dll_layers")
    df = pd.DataFrame(tab)
    for layer in range(lens.shape[1]):
      df[f"dll_l{layer}"] = lens[:, layer]
    return df

  # ---- results ------------------------------------------------------------------------------
  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables from the probe rows, written to `out` (default results/)."""
    from factflip.probes.fact_preference import abruptness, first_flip, flip_rate
    tables = {name: [] for name in COLUMNS}
    tau = float(self.c.tau)
    for size, seed in self.cells():
      for p in self.c.ratios:
        d = os.path.join(self.run_dir(size, seed, "probes"), _ptag(p))
        steps = sorted(int(f[5:11]) for f in os.listdir(d) if f.startswith("step_"))
        frames = {s: pd.read_csv(os.path.join(d, f"step_{s:06d}.csv"),
                                 keep_default_na=False) for s in steps}
        ref = frames[steps[0]]
        key = ["item", "kind", "variant"]
        for s, df in frames.items():
          m = df.merge(ref[key + ["dll"] + [c for c in ref if c.startswith("dll_l")]],
                       on=key, suffixes=("", "_base"))
          base_ok = m.dll_base > tau
          flipped = base_ok & (m.dll < -tau)
          m["flipped"] = flipped
          for (set_, kind), g in m.groupby(["set", "kind"]):
            n_ok = int((g.dll_base > tau).sum())
            tables["collateral" if set_ == "control" else "flips"].append({
                "size": size, "seed": seed, "p": p, "step": s, "kind": kind,
                "flip_rate": float(flip_rate(g.dll_base.values, g.dll.values, tau)),
                "ambiguity_rate": float((g.dll.abs() <= tau).mean()),
                "accuracy": float(g.correct.astype(bool).mean()),
                "items": len(g), "correct_at_base": n_ok})
          tgt = m[(m.set == "target") & (m.kind == "prompt")]
          for c in [c for c in tgt if c.startswith("dll_l") and not c.endswith("_base")]:
            tables["lens"].append({
                "size": size, "seed": seed, "p": p, "step": s, "layer": int(c[5:]),
                "flip_rate": float(flip_rate(tgt[c + "_base"].values, tgt[c].values, tau)),
                "ambiguity_rate": float((tgt[c].abs() <= tau).mean())})
          pcsv = os.path.join(d, f"patch_{s:06d}.csv")
          if os.path.exists(pcsv):
            pt = pd.read_csv(pcsv)
            flip_ids = set(m[(m.set == "target") & (m.kind == "prompt") & m.flipped].item)
            pt = pt[pt.item.isin(flip_ids)]
            for (site, window, layer, pos), g in pt.groupby(["site", "window", "layer",
                                                               "position"]):
              tables["patching"].append({
                  "size": size, "seed": seed, "p": p, "step": s, "site": site,
                  "window": int(window), "layer": int(layer), "position": pos,
                  "reversal_rate": float((g.dll_patched > 0).mean()),
                  "recovery": float(g.recovery.median()), "flipped_items": len(g)})
        # per item: the first checkpoint at which it is counterfactual; per kind: abruptness
        key = ["item", "kind", "variant"]
        tgt = pd.concat([df[df.set == "target"].assign(step=s) for s, df in frames.items()])
        for kind, g in tgt.groupby("kind"):
          dll = g.pivot_table(index="step", columns=key, values="dll").sort_index()
          first = first_flip(dll.iloc[0].values, dll.values, dll.index.tolist(), tau)
          for (item, _, _), f in zip(dll.columns, first):
            tables["first_flips"].append({"size": size, "seed": seed, "p": p, "item": item,
                                          "kind": kind, "first_flip_step": int(f)})
          curve = [r["flip_rate"] for r in tables["flips"] if (r["size"], r["seed"], r["p"],
                                                               r["kind"]) == (size, seed, p, kind)]
          curve = np.nan_to_num(np.asarray(curve, np.float64))
          tables["abruptness"].append({"size": size, "seed": seed, "p": p, "kind": kind,
                                       "abruptness": abruptness(curve),
                                       "final_flip_rate": float(curve[-1])})
    out_dir = out or os.path.join(self.wd, "results")
    out = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in tables.items()}
    for name, df in out.items():
      _write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return out

  # ---- driver -------------------------------------------------------------------------------
  def run(self, dry_run: bool = False) -> dict[str, pd.DataFrame] | None:
    """Every stage: first the plan (which stages are reused, computed, resumed or redone and
    which keys changed); with `dry_run` only that (None is returned)."""
    for line in self.plan():
      self.log(line)
    if dry_run:
      return None
    t0 = time.time()
    timings = {}
    path = os.path.join(self.wd, "results", "timings.json")   # wall seconds per stage, summed
    before = read_json(path) if os.path.exists(path) else {}  # over resumed invocations

    def stage(name, fn):
      t = time.time()
      self.log(f"[{name}] ...")
      fn()
      timings[name] = timings.get(name, 0.0) + time.time() - t
      self.log(f"[{name}] done in {time.time() - t:.1f} s (total {time.time() - t0:.0f} s)")
    write_json(os.path.join(self.wd, "study.json"), self.c.to_dict())
    stage("world" if self.uses_world else "facts", self.prepare)
    for size, seed in self.cells():
      stage("pretrain" if self.uses_world else "base", lambda size=size, seed=seed: self.log(
          f"    base accuracy: {self.pretrain(size, seed)['accuracy']}"))
      for p in self.c.ratios:
        stage("cpt", lambda p=p, size=size, seed=seed: self.cpt(size, seed, p))
      for p in self.c.ratios:
        stage("probe", lambda p=p, size=size, seed=seed: self.probe(size, seed, p))
    results = {}

    def tables():
      st = self.stage_results()
      with st.build() as out:
        results.update(self.tables() if out is None else self.results(out))
    stage("results", tables)
    write_json(path, {k: round(before.get(k, 0.0) + timings.get(k, 0.0), 1)
                      for k in dict.fromkeys([*before, *timings])})
    return results

  def heldout(self) -> pd.DataFrame:
    """Held-out paraphrase answer NLL of every CPT run at its evaluations (metrics.jsonl)."""
    from factflip.fileio import iter_json_records
    rows = []
    for size, seed in self.cells():
      for p in self.c.ratios:
        path = os.path.join(self.run_dir(size, seed, f"cpt_{_ptag(p)}"), "metrics.jsonl")
        for _, _, r in iter_json_records(path):
          loss = r.get("heldout_answer_nll", r.get("eval_loss"))
          if loss is not None:
            rows.append({"size": size, "seed": seed, "p": p, "step": r["step"], "loss": loss})
    return pd.DataFrame(rows, columns=["size", "seed", "p", "step", "loss"])

  def run_and_report(self, dry_run: bool = False) -> dict[str, Any] | None:
    """All stages, then plots, report/index.html and the terminal summary (with `dry_run`,
    only the plan)."""
    from factflip.studies.report import write_report
    t0 = time.time()
    tables = self.run(dry_run)
    if tables is None:
      return None
    base = {f"{s}/seed{k}": read_json(os.path.join(self.base_dir(s, k), "base.json"))["accuracy"]
            for s, k in self.cells()}
    timings = read_json(os.path.join(self.wd, "results", "timings.json"))
    head = write_report(self.wd, tables, self.heldout(), base, timings)
    self.log(f"\nfactflip poisoning study done in {time.time() - t0:.0f} s")
    self.log(f"  base accuracy (greedy, targets): {base}")
    self.log("  final flip rate by p (training prompt; mean over sizes and seeds): "
             + ", ".join(f"{p}: {_rate(v)}" for p, v in head["final_flip_rate"].items()))
    for size, rates in head.get("final_flip_rate_by_size", {}).items():
      self.log(f"    {size}: " + ", ".join(f"{p}: {_rate(v)}" for p, v in rates.items()))
    self.log("  final ambiguity rate by p: "
             + ", ".join(f"{p}: {_rate(v)}" for p, v in head["final_ambiguity_rate"].items()))
    self.log("  flip rate by prompt kind at the largest p: "
             + ", ".join(f"{k}: {_rate(v)}" for k, v in
                         head["final_flip_rate_by_kind_at_max_p"].items()))
    if "best_reversal" in head:
      b = head["best_reversal"]
      self.log(f"  best patching reversal: {_rate(b['reversal_rate'])} ({b['site']} window "
               f"{b['window']} from layer {b['layer']} at {b['position']}, p = {b['p']})")
    self.log(f"  report: {os.path.join(self.wd, 'report', 'index.html')}")
    return head
