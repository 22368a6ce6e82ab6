"""The training config: its schema (every key, its default and meaning), validation, and the
typed configs it resolves into.

Owns: `base_config()` (the full schema as an ml_collections ConfigDict; config files in configs/
start from it and change values), `validate` (unknown keys, bad values, a mesh that does not
divide the devices, a batch that does not divide the data shards: all before any compile), and
`optim_config` / `batch_config` / `model_overrides`.
Must not: build models, read data or start devices.

Every number a run uses is here and is written, resolved, to `workdir/config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from factflip.configfile import ConfigError
from factflip.data.pipeline import BatchConfig
from factflip.models.config import REMAT_POLICIES
from factflip.train import monitor
from factflip.train.optim import OptimConfig, make_optimizer

DATA_KINDS = ("world", "poison", "examples", "unlearn")
OBJECTIVES = ("lm", "sft", "gradient_ascent", "npo", "dpo")


def base_config() -> ml_collections.ConfigDict:
  """Every key a training run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0                  # parameter init and data order
  c.steps = 600               # optimizer steps in the run (the schedule's length by default)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny-2m"  # `factflip presets`; ignored when init_from is set
  c.model.init_from = ""      # start from: a factflip/HF model dir or a training workdir
  c.model.init_step = -1      # which checkpoint of a training workdir (-1 = the latest)
  c.model.param_dtype = "float32"   # master weights
  c.model.dtype = "float32"         # compute dtype ("bfloat16" for mixed precision)
  c.model.remat = "none"            # none | full | dots | dots_no_batch (per-layer remat)
  c.model.logits_chunk = 0          # positions per chunk of the loss's unembedding (0 = all at
  #                                   once; e.g. 1024 with a 128k vocabulary: memory, not speed)

  c.data = ml_collections.ConfigDict()
  c.data.kind = "world"       # world | poison | examples | unlearn
  c.data.world_dir = ""       # "" = WORKDIR/world, built there (with the tokenizer) if missing
  c.data.tokenizer_dir = ""   # "" = WORKDIR/tokenizer (or the world's)
  c.data.world_seed = 0       # when the world is built here
  c.data.world_people = 300   # people in a world built here (5 person facts each)
  c.data.world_questions = True   # a world built here asks and answers questions in its forum
  #                             posts (False: statements only, the QA format is new to SFT)
  c.data.vocab_size = 1024    # when the tokenizer is trained here
  c.data.path = ""            # examples: a JSONL of {"text"} or {"prompt", "completion"}
  c.data.retain_path = ""     # unlearn: retain examples (data.path holds the forget set)
  c.data.eval_path = ""       # held-out examples ("" = the world's held-out paraphrases)
  c.data.eval_batches = 4     # held-out batches per evaluation
  c.data.seq_len = 128
  c.data.batch_size = 32      # rows per optimizer step, all hosts together
  c.data.packing = "pack"     # pack | pad
  c.data.shards = 0           # input shards (0 = one per process); fix it to make the batches
  #                             independent of the number of hosts
  # poison (continual pretraining with a poisoning ratio, SCIENCE.md A)
  c.data.ratio = 0.5          # p: share of target mentions stating the counterfactual
  c.data.n_targets = 60       # target facts (person facts of the chosen exposure tier)
  c.data.target_tier = "high"
  c.data.mentions_per_fact = 8
  c.data.replay_weight = 0.5
  c.data.language = "en"
  c.data.facts_path = ""      # poison: target facts from this facts file (any `load_facts`
  #                             format) instead of the world; n_targets drawn with the seed
  c.data.replay_path = ""     # poison: replay documents, a JSONL of {"text"} ("" = the
  #                             world's corpus without the targets' sentences)

  c.optim = ml_collections.ConfigDict(dataclasses.asdict(OptimConfig()))
  c.optim.total_steps = -1    # -1 = steps

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "lm"     # lm | sft | gradient_ascent | npo | dpo (sft: the forget set's
  #                             relabelled answers learnt, e.g. counterfactual or refusal tuning)
  c.objective.retain_weight = 1.0
  c.objective.npo_beta = 0.1
  c.objective.dpo_beta = 0.1  # dpo: data.path holds {"prompt", "chosen", "rejected"} records
  c.accum_steps = 1           # micro-batches per step (gradient accumulation)

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100    # steps between checkpoints (studies: dense)
  c.checkpoint.keep = 0       # newest checkpoints kept (0 = all)
  c.checkpoint.keep_period = 0  # also keep every k-th step (0 = off)
  c.checkpoint.async_save = True

  c.log_every = 10            # steps between metrics.jsonl rows / progress lines
  c.eval_every = 100          # steps between held-out evaluations (0 = off)

  # the factual-integrity monitor (factflip/train/monitor.py: rules, alerts.jsonl)
  c.monitor = ml_collections.ConfigDict()
  c.monitor.every = 0         # steps between observations of the watch list (0 = off)
  c.monitor.watch = ""        # facts file to watch (any `factflip facts` format)
  c.monitor.controls = ""     # facts the training should leave alone (their alerts are false
  #                             alarms)
  c.monitor.kinds = ("prompt", "paraphrase", "question")   # prompts scored per fact
  c.monitor.rules = ("dll_drop:2.0", "lens_sign:-2", "flip:0.5")   # NAME:ARG[@KIND][!]
  #                             (tuples: --config.monitor.rules='("flip:0.5!",)' overrides)
  c.monitor.batch_size = 256  # rows per compiled scoring call
  return c


def _walk(d: Any, prefix: str = ""):
  for k in d.keys():
    v = d[k]
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict | dict):
      yield from _walk(v, key + ".")
    else:
      yield key, v


def validate(config: ml_collections.ConfigDict, *, source: str = "config", n_devices: int,
             n_processes: int = 1) -> None:
  """Raise ConfigError for the first problem found; touches no device."""
  schema = dict(_walk(base_config()))
  given = dict(_walk(config))
  for key, value in given.items():
    if key not in schema:
      near = [k for k in schema if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]
              or k.startswith(key.rsplit(".", 1)[0] + ".")]
      raise ConfigError(source, key, "unknown key" + (
          f"; keys nearby: {', '.join(sorted(near)[:8])}" if near else ""))
    want = schema[key]
    if isinstance(want, bool) != isinstance(value, bool) or (
        isinstance(want, int | float) and not isinstance(value, int | float)) or (
        isinstance(want, str) and not isinstance(value, str)):
      raise ConfigError(source, key, f"{value!r} ({type(value).__name__}); expected "
                        f"{type(want).__name__} like the default {want!r}")
    if isinstance(want, int) and not isinstance(want, bool) and isinstance(value, float):
      raise ConfigError(source, key, f"{value!r}; expected an integer")

  def need(ok: bool, key: str, message: str):
    if not ok:
      raise ConfigError(source, key, message)

  c = config
  need(c.steps > 0, "steps", f"{c.steps}; expected > 0")
  need(c.data.kind in DATA_KINDS, "data.kind", f"{c.data.kind!r}; expected one of {DATA_KINDS}")
  need(c.objective.name in OBJECTIVES, "objective.name",
       f"{c.objective.name!r}; expected one of {OBJECTIVES}")
  need((c.objective.name == "lm") == (c.data.kind != "unlearn"), "objective.name",
       f"{c.objective.name!r} with data.kind {c.data.kind!r}: the unlearning objectives "
       "(sft, gradient_ascent, npo, dpo) train on data.kind 'unlearn', and only they do")
  need(c.objective.name != "dpo" or c.data.packing == "pad", "data.packing",
       f"{c.data.packing!r} with objective dpo; expected 'pad' (one example per row, so a "
       "pair's chosen and rejected rows line up)")
  need(c.data.kind not in ("examples", "unlearn") or bool(c.data.path), "data.path",
       f"empty; data.kind {c.data.kind!r} reads its examples from a JSONL file")
  need(not (c.data.facts_path or c.data.replay_path) or c.data.kind == "poison",
       "data.facts_path" if c.data.facts_path else "data.replay_path",
       f"set with data.kind {c.data.kind!r}; only data.kind 'poison' reads it")
  need(not c.data.facts_path or c.data.replay_weight == 0 or bool(c.data.replay_path),
       "data.replay_path", f"empty; with data.facts_path and replay_weight "
       f"{c.data.replay_weight} the replay documents come from a JSONL of {{\"text\"}}")
  need(0.0 <= c.data.ratio <= 1.0, "data.ratio", f"{c.data.ratio}; expected a share in [0, 1]")
  need(0.0 <= c.data.replay_weight < 1.0, "data.replay_weight",
       f"{c.data.replay_weight}; expected [0, 1)")
  need(c.data.packing in ("pack", "pad"), "data.packing",
       f"{c.data.packing!r}; expected 'pack' or 'pad'")
  need(c.data.seq_len >= 2, "data.seq_len", f"{c.data.seq_len}; expected >= 2")
  need(c.accum_steps >= 1, "accum_steps", f"{c.accum_steps}; expected >= 1")
  need(c.checkpoint.every >= 1, "checkpoint.every", f"{c.checkpoint.every}; expected >= 1")
  need(c.log_every >= 1, "log_every", f"{c.log_every}; expected >= 1")
  for k in ("param_dtype", "dtype"):
    need(c.model[k] in ("float32", "bfloat16"), f"model.{k}",
         f"{c.model[k]!r}; expected float32 or bfloat16")
  monitor.validate(c, source, need)
  need(c.model.remat in REMAT_POLICIES, "model.remat",
       f"{c.model.remat!r}; expected one of {REMAT_POLICIES}")
  need(isinstance(c.model.logits_chunk, int) and c.model.logits_chunk >= 0,
       "model.logits_chunk", f"{c.model.logits_chunk!r}; expected 0 (all positions at once) "
       "or a positive int")
  try:
    make_optimizer(optim_config(c))
  except ValueError as e:  # "OptimConfig.<field>: ..."
    field = str(e).split(":")[0].rsplit(".", 1)[-1]
    raise ConfigError(source, f"optim.{field}", str(e).split(": ", 1)[-1]) from None

  # mesh: sizes multiply to the device count (one may be -1)
  sizes = {a: c.mesh[a] for a in ("data", "fsdp", "tensor")}
  need(all(s == -1 or s >= 1 for s in sizes.values()) and list(sizes.values()).count(-1) <= 1,
       "mesh", f"{sizes}: sizes must be >= 1, with at most one -1 (= the remaining devices)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    need(n_devices % known == 0, "mesh",
         f"{sizes} does not divide the {n_devices} devices (the fixed sizes multiply to {known})")
    sizes = {a: (n_devices // known if s == -1 else s) for a, s in sizes.items()}
  need(math.prod(sizes.values()) == n_devices, "mesh",
       f"{sizes} multiplies to {math.prod(sizes.values())}, not the {n_devices} devices")

  # batch: rows divide over the batch-sharded mesh axes, the micro-batches and the input shards
  batch_shards = sizes["data"] * sizes["fsdp"]
  b = c.data.batch_size
  need(b % c.accum_steps == 0, "data.batch_size",
       f"{b} rows do not divide into accum_steps={c.accum_steps} micro-batches")
  need((b // c.accum_steps) % batch_shards == 0, "data.batch_size",
       f"{b} rows ({b // c.accum_steps} per micro-batch) do not divide over the "
       f"{batch_shards} batch shards of the mesh (data={sizes['data']} x fsdp={sizes['fsdp']})")
  shards = c.data.shards or n_processes
  need(shards % n_processes == 0, "data.shards",
       f"{shards} input shards do not divide over {n_processes} processes")
  need(b % shards == 0 and (b // shards) % c.accum_steps == 0, "data.batch_size",
       f"{b} rows do not divide over {shards} input shards x accum_steps={c.accum_steps}")


def uses_world(c) -> bool:
  """Whether the run reads the fact world (and, unless given, its tokenizer)."""
  return c.data.kind == "world" or (c.data.kind == "poison" and not c.data.facts_path)


def total_steps(c) -> int:
  return c.steps if c.optim.total_steps < 0 else c.optim.total_steps


def optim_config(c) -> OptimConfig:
  d = {k: c.optim[k] for k in c.optim.keys()}
  d["total_steps"] = total_steps(c)
  return OptimConfig(**d)


def batch_config(c, shards: int, seed_offset: int = 0) -> BatchConfig:
  """One input shard's BatchConfig: batch_size is that shard's rows per step."""
  return BatchConfig(seq_len=c.data.seq_len, batch_size=c.data.batch_size // shards,
                     packing=c.data.packing, seed=c.seed + seed_offset)


def model_overrides(c) -> dict[str, Any]:
  return {"param_dtype": c.model.param_dtype, "dtype": c.model.dtype, "remat": c.model.remat,
          "logits_chunk": c.model.logits_chunk}
