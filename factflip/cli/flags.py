"""Every flag of the `factflip` command, declared once: its type, default, metavar and what it
is. A command says which of them it reads (its module's `FLAGS`, with what each means for it);
the others are refused (`factflip.cli.main`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag: absl's DEFINE_<kind>, its default, the metavar its help shows, what it is."""
  name: str
  kind: str
  default: Any
  metavar: str
  doc: str
  extra: tuple = ()


_TABLE = (
    Flag("workdir", "string", "workdir/default", "DIR", "The command's working directory."),
    Flag("model", "string", None, "DIR", "A model directory (HF or factflip)."),
    Flag("out", "string", None, "PATH", "Where the command writes its output."),
    Flag("to", "enum", "hf", "", "The format to write a model in.", (("hf", "factflip"),)),
    Flag("prompt", "multi_string", [], "TEXT", "A prompt (repeatable)."),
    Flag("max_new_tokens", "integer", 32, "N", "Tokens to generate."),
    Flag("temperature", "float", 0.0, "T", "Sampling temperature; 0 = greedy."),
    Flag("top_k", "integer", 0, "K", "Top-k filter (0 = off)."),
    Flag("top_p", "float", 1.0, "P", "Top-p filter (1 = off)."),
    Flag("seed", "integer", 0, "S", "A PRNG seed."),
    Flag("vocab_size", "integer", 1024, "N", "Tokenizer size."),
    Flag("facts", "string", None, "PATH", "A dataset file or folder."),
    Flag("format", "string", None, "NAME", "The dataset format (default: auto-detect)."),
    Flag("lenient", "bool", False, "", "Skip and count bad records instead of failing."),
    Flag("dry_run", "bool", False, "", "Print the plan, then stop."),
    Flag("metrics", "list", ["preference", "qa"], "M1,M2", "Comma-separated eval metrics."),
    Flag("k_shot", "integer", 0, "K", "QA exemplars per question from the dev split."),
    Flag("batch_size", "integer", 32, "N", "Rows per compiled batch."),
    Flag("step", "integer", -1, "N", "A checkpoint step (-1 = the latest)."),
    Flag("distributed", "enum", "auto", "", "Call jax.distributed.initialize (auto: when a "
         "coordinator is given or the environment is a multi-process SLURM or TPU-pod job).",
         (("auto", "on", "off"),)),
    Flag("coordinator_address", "string", None, "HOST:PORT",
         "host:port of process 0 (multi-host)."),
    Flag("num_processes", "integer", None, "N", "Processes in a multi-host job."),
    Flag("process_id", "integer", None, "I", "This process's index in a multi-host job."),
    Flag("compilation_cache", "string", None, "DIR|off",
         "Where compiled programs are kept across processes, or off."),
    Flag("config", "config_file", None, "FILE.py[:variant]", "A config file (FILE.py[:variant]); "
         "override its keys with --config.KEY=VALUE."),
)
SPECS = {f.name: f for f in _TABLE}
OUR_FLAGS = tuple(SPECS)

for _f in _TABLE:
  if _f.kind == "config_file":
    config_flags.DEFINE_config_file(_f.name, _f.default, _f.doc, lock_config=True)
  elif _f.kind == "enum":
    flags.DEFINE_enum(_f.name, _f.default, list(_f.extra[0]), _f.doc)
  else:
    getattr(flags, f"DEFINE_{_f.kind}")(_f.name, _f.default, _f.doc)

# what the multi-host and compilation-cache flags mean, for every command that reads them
MULTIHOST = {
    "distributed": "Call jax.distributed.initialize: auto when --coordinator_address is given "
                   "or the environment is a multi-process SLURM or TPU-pod job; on or off.",
    "coordinator_address": "host:port of process 0 in a multi-host job.",
    "num_processes": "The number of processes in a multi-host job.",
    "process_id": "This process's index in a multi-host job.",
}
CACHE = {
    "compilation_cache": "The persistent compilation cache: compiled programs are kept in this "
                         "directory and loaded by later processes (default "
                         "$FACTFLIP_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else "
                         "~/.cache/factflip/xla); off turns it off.",
}


def initialize_distributed() -> None:
  """jax.distributed.initialize as the multi-host flags say (`distributed.initialize`)."""
  from factflip.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
             FLAGS.process_id)


def config_source() -> str | None:
  """The --config file's path (as the config's error messages name it)."""
  return FLAGS["config"].config_filename
