"""The keys every study config has, and the checks every study's config goes through.

Owns: `common_config` (what a study is, its models, seeds and facts, how probed models are
loaded), `check_schema` (a config's study name and keys), `validate_common` (the common keys'
checks), `merge` (values read back onto a config: `Study.open`), `mutable` (a stage's editable
copy of a config subtree) and `size_label` (a model size's name in paths and tables).
Must not: know any study's own keys (each study's `config.py` adds and checks them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from factflip.configfile import ConfigError
from factflip.gguf_io import is_gguf
from factflip.models.config import presets
from factflip.models.store import CONFIG_NAME
from factflip.train import config as train_config


def common_config():
  """The keys every study config has: what it is, its models, seeds and facts, and how probed
  models are loaded (a study's `base_config` starts from this and adds its own)."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.study = ""                     # the registered study this config is for
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
  return name.removesuffix(".gguf")
