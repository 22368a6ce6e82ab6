"""The `factflip` command (absl flags).

  factflip run [--workdir=DIR --config=FILE.py[:variant] --dry_run]
                                       the main job: the poisoning study (see below)
  factflip help                        this text
  factflip presets                     the model size ladder with parameter counts
  factflip generate --model=DIR --prompt=TEXT [--max_new_tokens=N --temperature=T --seed=S]
  factflip convert --model=DIR --out=DIR --to=hf|factflip
  factflip world [--workdir=DIR --seed=S --vocab_size=N]
                                       build the fact world (DIR/world) and its tokenizer
                                       (DIR/tokenizer); print its statistics
  factflip facts --facts=PATH [--format=NAME --lenient --out=FILE.jsonl]
                                       load a dataset (any supported format, auto-detected),
                                       report counts and bad records, optionally write our JSONL
  factflip train --config=configs/pretrain_tiny.py[:variant] --workdir=DIR [--config.KEY=VALUE]
                                       train (or resume) a run; multi-host: see launch/README.md
  factflip export --workdir=DIR [--step=N] --out=DIR [--to=hf|factflip]
                                       a training checkpoint as an HF (or factflip) model

`run` is paper A's poisoning study (configs/studies/poisoning.py; `--config=FILE.py[:variant]`
and `--config.KEY=VALUE` as for train): world, pretraining, continual pretraining per poisoning
ratio, probes on every checkpoint, results tables, plots and report/index.html in --workdir.
Each stage records the fingerprint of the config keys it read; running again reuses the stages
whose fingerprint is unchanged, resumes a stopped one and redoes (atomically) exactly the
stages whose keys changed and everything downstream. It prints that plan first; --dry_run
prints only the plan.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/default", "Where `run` writes its outputs.")
flags.DEFINE_string("model", None, "Model directory (HF or factflip) for generate/convert.")
flags.DEFINE_string("out", None, "Output directory for convert.")
flags.DEFINE_enum("to", "hf", ["hf", "factflip"], "Target format for convert.")
flags.DEFINE_multi_string("prompt", [], "Prompt text for generate (repeatable).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter (1 = off).")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling and init, and the world's seed.")
flags.DEFINE_integer("vocab_size", 1024, "Tokenizer size for `world`.")
flags.DEFINE_string("facts", None, "A dataset file or folder for `facts`.")
flags.DEFINE_string("format", None, "Dataset format for `facts` (default: auto-detect).")
flags.DEFINE_bool("lenient", False, "`facts`: skip and count bad records instead of failing.")

flags.DEFINE_bool("dry_run", False, "`run`: print which stages would be reused, computed or "
                  "redone (and which config keys changed), then stop.")
flags.DEFINE_integer("step", -1, "`export`: the checkpoint step (-1 = the latest).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "`train`: call jax.distributed.initialize (auto: when a coordinator is given or "
                  "the environment is a multi-process SLURM or TPU-pod job).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host job.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host job.")
config_flags.DEFINE_config_file("config", None, "`train`: a config file (configs/*.py[:variant]);"
                                " override keys with --config.KEY=VALUE.", lock_config=True)

COMMANDS = ("run", "presets", "generate", "convert", "world", "facts", "train", "export")


def _presets() -> None:
  from factflip.models import get_preset, presets

  print(f"{'preset':<18}{'family':<9}{'params':>16}  L    D     H  G   F")
  for name, n in presets().items():
    c = get_preset(name)
    print(f"{name:<18}{c.family:<9}{n:>16,}  {c.n_layers:<4} {c.d_model:<5} {c.n_heads:<2} "
          f"{c.n_kv_heads:<3}{c.d_ff}")


def _study_config_path() -> str:
  """The default study config: ./configs/studies/poisoning.py, else the one next to the
  package (an editable install of the repository)."""
  here = os.path.join("configs", "studies", "poisoning.py")
  repo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), here)
  for path in (here, repo):
    if os.path.exists(path):
      return path
  raise app.UsageError("no configs/studies/poisoning.py here or next to the package: pass "
                       "--config=PATH/poisoning.py")


def _run(workdir: str, config=None, source: str | None = None, dry_run: bool = False
         ) -> dict | None:
  """The poisoning study (configs/studies/poisoning.py or --config): every stage, resumable."""
  from factflip.configfile import ConfigError, load_config_file
  from factflip.studies.poisoning import Study, StudyError

  if config is None:
    source = _study_config_path()
    config = load_config_file(source)
  print(f"factflip run: {source} -> {os.path.abspath(workdir)}", flush=True)
  try:
    summary = Study(config, workdir, source=source).run_and_report(dry_run)
  except (StudyError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return summary


def _generate() -> None:
  import jax

  from factflip import load_model, load_tokenizer
  from factflip.models import generate_text

  if not FLAGS.model or not FLAGS.prompt:
    raise app.UsageError("generate needs --model=DIR and at least one --prompt=TEXT")
  model = load_model(FLAGS.model)
  tok = load_tokenizer(FLAGS.model)
  outs = generate_text(model, tok, FLAGS.prompt, FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       key=jax.random.key(FLAGS.seed))
  for p, o in zip(FLAGS.prompt, outs):
    print(f"{p!r} -> {o!r}")


def _convert() -> None:
  from factflip import load_model, save_hf, save_model

  if not FLAGS.model or not FLAGS.out:
    raise app.UsageError("convert needs --model=DIR --out=DIR")
  model = load_model(FLAGS.model)
  (save_hf if FLAGS.to == "hf" else save_model)(model, FLAGS.out)
  print(f"wrote {FLAGS.to} model to {FLAGS.out}")


def _world(workdir: str, seed: int, vocab_size: int) -> dict:
  from factflip.data.tokenizer import train_tokenizer
  from factflip.data.world import WorldConfig, build_world, world_stats, write_world

  t = time.time()
  world = build_world(WorldConfig(seed=seed))
  write_world(world, os.path.join(workdir, "world"))
  tok = train_tokenizer(world.texts(), os.path.join(workdir, "tokenizer"), vocab_size=vocab_size)
  stats = world_stats(world)
  print(f"fact world (seed {seed}): {stats['facts']} fact items, {stats['documents']} documents, "
        f"{stats['mentions']} mentions; tokenizer {len(tok)} tokens; {time.time() - t:.1f} s")
  for key in ("by_relation", "by_exposure_tier", "by_language", "by_style"):
    print(f"  {key[3:]:<14}" + ", ".join(f"{k} {v}" for k, v in stats[key].items()))
  print(f"wrote {os.path.join(workdir, 'world')} and {os.path.join(workdir, 'tokenizer')}")
  return stats


def _facts(path: str | None, fmt: str | None, lenient: bool, out: str | None):
  from factflip.data.facts import write_facts_jsonl
  from factflip.data.loaders import load_facts

  if not path:
    raise app.UsageError("facts needs --facts=PATH (a dataset file or folder)")
  items = load_facts(path, fmt, lenient=lenient)
  print(items.summary())
  for e in items.skipped[:20]:
    print(f"  skipped: {e}")
  if len(items.skipped) > 20:
    print(f"  ... and {len(items.skipped) - 20} more")
  if out:
    write_facts_jsonl(out, items)
    print(f"wrote {len(items)} items to {out}")
  return items


def _train() -> None:
  from factflip.distributed import initialize

  if FLAGS.config is None:
    raise app.UsageError("train needs --config=configs/FILE.py[:variant] and --workdir=DIR")
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
             FLAGS.process_id)
  from factflip.configfile import ConfigError
  from factflip.train.loop import train

  source = flags.FLAGS["config"].config_filename
  try:
    result = train(FLAGS.config, FLAGS.workdir, source=source)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.preempted:
    print(f"stopped by SIGTERM at step {result.step} (checkpoint saved); run the same command "
          "again to resume")


def _export() -> None:
  from factflip import save_hf, save_model
  from factflip.train.checkpoint import load_trained

  if not FLAGS.out:
    raise app.UsageError("export needs --workdir=DIR (a training run) and --out=DIR")
  model, step = load_trained(FLAGS.workdir, FLAGS.step)
  (save_hf if FLAGS.to == "hf" else save_model)(model, FLAGS.out)
  print(f"wrote step {step} of {FLAGS.workdir} as a {FLAGS.to} model to {FLAGS.out}")


def _main(argv) -> None:
  from absl import logging
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; -v=0 shows it again
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2 or argv[1] == "help":
    print(__doc__)
    return
  if argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: factflip {{{'|'.join(COMMANDS)}}} [--flags]")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}")
  cmd = argv[1]
  if cmd == "presets":
    _presets()
  elif cmd == "run":
    given = FLAGS.config is not None
    _run(FLAGS.workdir, FLAGS.config if given else None,
         flags.FLAGS["config"].config_filename if given else None, FLAGS.dry_run)
  elif cmd == "generate":
    _generate()
  elif cmd == "world":
    _world(FLAGS.workdir, FLAGS.seed, FLAGS.vocab_size)
  elif cmd == "facts":
    from factflip.fileio import DataError

    try:
      _facts(FLAGS.facts, FLAGS.format, FLAGS.lenient, FLAGS.out)
    except DataError as e:
      print(f"error: {e}\n(--lenient skips and counts bad records instead)", file=sys.stderr)
      sys.exit(2)
  elif cmd == "train":
    _train()
  elif cmd == "export":
    _export()
  else:
    _convert()


def main() -> None:
  app.run(_main, argv=sys.argv)


if __name__ == "__main__":
  main()
