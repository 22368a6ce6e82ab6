"""The `factflip` command: a table of subcommands, each with its own flags and help.

  factflip                 the command table (also `factflip --help`, `factflip help`)
  factflip CMD --help      what CMD does, its launch lines and only its own flags
  factflip CMD [--flags]   run it; a flag another command owns is a usage error

The flags are absl flags (one FLAGS registry); each command declares which of them it reads,
with the help text that flag has for it, and `main` refuses any other of ours that was given.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
import time
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/default", "The command's working directory.")
flags.DEFINE_string("model", None, "A model directory (HF or factflip).")
flags.DEFINE_string("out", None, "Where the command writes its output.")
flags.DEFINE_enum("to", "hf", ["hf", "factflip"], "The format to write a model in.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k filter (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p filter (1 = off).")
flags.DEFINE_integer("seed", 0, "A PRNG seed.")
flags.DEFINE_integer("vocab_size", 1024, "Tokenizer size.")
flags.DEFINE_string("facts", None, "A dataset file or folder.")
flags.DEFINE_string("format", None, "The dataset format (default: auto-detect).")
flags.DEFINE_bool("lenient", False, "Skip and count bad records instead of failing.")
flags.DEFINE_bool("dry_run", False, "Print the plan, then stop.")
flags.DEFINE_list("metrics", ["preference", "qa"], "Comma-separated eval metrics.")
flags.DEFINE_integer("k_shot", 0, "QA exemplars per question from the dev split.")
flags.DEFINE_integer("batch_size", 32, "Rows per compiled batch.")
flags.DEFINE_integer("step", -1, "A checkpoint step (-1 = the latest).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize (auto: when a coordinator is given or the "
                  "environment is a multi-process SLURM or TPU-pod job).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host job.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host job.")
flags.DEFINE_string("compilation_cache", None, "Where compiled programs are kept across "
                    "processes, or off.")
config_flags.DEFINE_config_file("config", None, "A config file (FILE.py[:variant]); override "
                                "its keys with --config.KEY=VALUE.", lock_config=True)

HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")
METAVARS = {"workdir": "DIR", "model": "DIR", "out": "PATH", "prompt": "TEXT", "seed": "S",
            "max_new_tokens": "N", "temperature": "T", "top_k": "K", "top_p": "P",
            "vocab_size": "N", "facts": "PATH", "metrics": "M1,M2", "k_shot": "K",
            "batch_size": "N", "format": "NAME", "step": "N",
            "coordinator_address": "HOST:PORT", "num_processes": "N", "process_id": "I",
            "compilation_cache": "DIR|off",
            "config": "FILE.py[:variant]"}


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: its launch line(s), a one-line summary for the table, what it does, the
  flags it reads (name -> what that flag means for it) and the function that runs it."""
  name: str
  usage: str
  summary: str
  doc: str
  flags: dict[str, str]
  fn: Callable[[], object]
  required: tuple[str, ...] = ()

  def flag_list(self) -> str:
    return (", ".join(f"--{n}" for n in self.flags) or "none") + f" (factflip {self.name} --help)"

  def refusal(self, flag: str) -> str:
    return f"factflip {self.name} does not take --{flag}; its flags: {self.flag_list()}"

  def help(self) -> str:
    lines = [f"usage: {self.usage}", "", self.summary, "", textwrap.dedent(self.doc).strip()]
    if self.flags:
      lines += ["", "flags:"]
      for name, text in self.flags.items():
        f = FLAGS[name]
        enum = getattr(f.parser, "enum_values", None)
        value = ("" if f.flag_type() == "bool" else "=" + ("|".join(enum) if enum else
                 METAVARS.get(name, f.flag_type().upper())))
        extra = ("  (required)" if name in self.required else
                 "" if f.default in (None, []) else f"  (default: {f.default_as_str})")
        lines.append(f"  --{name}{value}{extra}")
        lines += ["      " + t for t in textwrap.wrap(text, 86)]
    return "\n".join(lines)


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
  """The study a config names (default: configs/studies/poisoning.py): every stage, resumable.
  In a multi-process job only process 0 prints (the others print only an error)."""
  import jax

  from factflip.configfile import ConfigError, load_config_file
  from factflip.distributed import HostError
  from factflip.studies.platform import Stopped, StudyError, study_class

  if config is None:
    source = _study_config_path()
    config = load_config_file(source)
  main = jax.process_index() == 0
  log = print if main else (lambda line: None)
  log(f"factflip run: {source} -> {os.path.abspath(workdir)}"
      + (f" ({jax.process_count()} processes, {jax.device_count()} devices)"
         if jax.process_count() > 1 else ""))
  try:
    study = study_class(config.get("study", ""), source)
    summary = study(config, workdir, log=log, source=source).run_and_report(dry_run)
  except Stopped as e:     # exit 0, as `factflip train` does: a requeued job resumes
    log(str(e))
    sys.exit(0)
  except (StudyError, ConfigError, HostError) as e:
    print(f"error: {e}" if main else f"error (process {jax.process_index()}): {e}",
          file=sys.stderr)
    sys.exit(2)
  return summary


def _run_cmd() -> None:
  from factflip.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
             FLAGS.process_id)
  _run(FLAGS.workdir, FLAGS.config, flags.FLAGS["config"].config_filename, FLAGS.dry_run)


def _generate() -> None:
  import jax

  from factflip import load_model, load_tokenizer
  from factflip.models import generate_text

  model = load_model(FLAGS.model)
  tok = load_tokenizer(FLAGS.model)
  outs = generate_text(model, tok, FLAGS.prompt, FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       key=jax.random.key(FLAGS.seed))
  for p, o in zip(FLAGS.prompt, outs):
    print(f"{p!r} -> {o!r}")


def _convert() -> None:
  from factflip import load_model, load_tokenizer, save_hf, save_model
  from factflip.data.tokenizer import has_tokenizer

  model = load_model(FLAGS.model)
  # a GGUF's or the directory's own tokenizer goes along
  tok = load_tokenizer(FLAGS.model) if has_tokenizer(FLAGS.model) else None
  if FLAGS.to == "hf":
    save_hf(model, FLAGS.out, tokenizer=tok)
  else:
    save_model(model, FLAGS.out)
    if tok is not None:
      tok.save_pretrained(FLAGS.out)
  print(f"wrote {FLAGS.to} model{' and tokenizer' if tok is not None else ''} to {FLAGS.out}")


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


def _facts_cmd() -> None:
  from factflip.fileio import DataError

  try:
    _facts(FLAGS.facts, FLAGS.format, FLAGS.lenient, FLAGS.out)
  except DataError as e:
    print(f"error: {e}\n(--lenient skips and counts bad records instead)", file=sys.stderr)
    sys.exit(2)


def _train() -> None:
  from factflip.distributed import initialize

  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
             FLAGS.process_id)
  from factflip.train.loop import train

  # a ConfigError is reported by _entry (one error line, exit 2), as for every command
  result = train(FLAGS.config, FLAGS.workdir, source=flags.FLAGS["config"].config_filename)
  if result.preempted:
    print(f"stopped by SIGTERM at step {result.step} (checkpoint saved); run the same command "
          "again to resume")


def _train_sae() -> None:
  from factflip.sae.train import train_sae

  result = train_sae(FLAGS.config, FLAGS.workdir, source=flags.FLAGS["config"].config_filename)
  last = result.evals[max(result.evals)] if result.evals else {}
  print(f"SAE at {result.sae_path}: explained variance "
        f"{result.metrics.get('explained_variance', float('nan')):.3f}, L0 "
        f"{result.metrics.get('l0', float('nan')):.1f}, CE loss recovered "
        f"{last.get('ce_recovered', float('nan')):.3f}")


def _eval() -> None:
  from factflip.evals.run import evaluate
  head = evaluate(FLAGS.model, FLAGS.facts, FLAGS.metrics, FLAGS.out,
                  step=FLAGS.step if FLAGS["step"].present else None,
                  batch_size=FLAGS.batch_size, k_shot=FLAGS.k_shot, seed=FLAGS.seed)
  for s, per in head["steps"].items():
    for m, summ in per.items():
      flat = {}
      for k, v in summ.items():       # one level of groups (per prompt kind, per MIA score)
        flat.update({f"{k}.{g}": x for g, x in v.items()} if isinstance(v, dict) else {k: v})
      shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in list(flat.items())[:8])
      print(f"step {s} {m}: {shown}")
  print(f"wrote {', '.join(f'{m}.csv' for m in head['metrics'])} and summary.json to "
        f"{FLAGS.out}")


def _export() -> None:
  from factflip import save_hf, save_model
  from factflip.train.checkpoint import load_trained

  model, step = load_trained(FLAGS.workdir, FLAGS.step)
  (save_hf if FLAGS.to == "hf" else save_model)(model, FLAGS.out)
  print(f"wrote step {step} of {FLAGS.workdir} as a {FLAGS.to} model to {FLAGS.out}")


_MULTIHOST = {
    "distributed": "Call jax.distributed.initialize: auto when --coordinator_address is given "
                   "or the environment is a multi-process SLURM or TPU-pod job; on or off.",
    "coordinator_address": "host:port of process 0 in a multi-host job.",
    "num_processes": "The number of processes in a multi-host job.",
    "process_id": "This process's index in a multi-host job.",
}

_CACHE = {
    "compilation_cache": "The persistent compilation cache: compiled programs are kept in this "
                         "directory and loaded by later processes (default "
                         "$FACTFLIP_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else "
                         "~/.cache/factflip/xla); off turns it off.",
}

COMMANDS = {c.name: c for c in (
    Command(
        "run", "factflip run [--config=FILE.py[:variant] --config.KEY=VALUE --workdir=DIR "
               "--dry_run]",
        "Run a study end to end (default: paper A's poisoning study).",
        """\
        Runs the study its config names (`study = "poisoning"`, ...; the registry in
        factflip/studies/platform.py) into --workdir: for paper A the fact world, pretraining,
        continual pretraining per poisoning ratio, probes on every checkpoint, results tables
        (results/*.csv), plots and report/index.html. Each stage records the fingerprint of
        the config keys it read: running again reuses unchanged stages, resumes a stopped one
        and redoes (atomically) exactly the stages whose keys changed and everything
        downstream. The plan is printed before any work; --dry_run prints only the plan.
        On many hosts the same command runs on every process (TPU pod workers, SLURM tasks,
        or launch/local.sh with NUM_PROCESSES=N): training stages on the global mesh, paper
        A's probes over every process's devices, process 0 writing (launch/README.md).

          factflip run                                 # configs/studies/poisoning.py
          factflip run --config=configs/studies/poisoning.py:smoke --workdir=/tmp/smoke
          factflip run --config=configs/studies/poisoning.py:scale=ladder,seeds=0+1 \\
              --workdir=workdir/scaling --config.cpt.steps=200""",
        {"config": "The study config, FILE.py[:variant] (default configs/studies/poisoning.py); "
                   "override any key with --config.KEY=VALUE.",
         "workdir": "The study's directory: runs/, results/, report/, study.json. The same "
                    "directory again resumes or redoes what changed.",
         "dry_run": "Print which stages would be reused, computed or redone and which config "
                    "keys changed, then stop.",
         **_MULTIHOST, **_CACHE},
        _run_cmd),
    Command(
        "presets", "factflip presets", "The model size ladder with parameter counts.",
        "Prints every model preset (`--config.model.preset=NAME`, `scale=A+B`): family, "
        "parameters, layers, width, heads, KV heads, MLP width.", {}, _presets),
    Command(
        "generate", "factflip generate --model=DIR --prompt=TEXT [--prompt=TEXT ...] "
                    "[--max_new_tokens=N --temperature=T --top_k=K --top_p=P --seed=S]",
        "Continue prompts with a model (greedy or sampled).",
        """\
        Loads an HF or factflip model directory and its tokenizer and prints each prompt's
        continuation, all prompts in one batch.

          factflip export --workdir=workdir/default/runs/tiny-0.5m/seed0/pretrain --out=/tmp/base
          factflip generate --model=/tmp/base --prompt="Ada Lovelace was born in" \\
              --max_new_tokens=8""",
        {"model": "The model (HF or factflip directory with its tokenizer, or a .gguf file).",
         "prompt": "A prompt to continue (repeatable).",
         "max_new_tokens": "Tokens to generate per prompt.",
         "temperature": "Sampling temperature; 0 is greedy.",
         "top_k": "Sample among the k most likely tokens (0 = off).",
         "top_p": "Sample within the top-p probability mass (1 = off).",
         "seed": "The sampling PRNG seed.", **_CACHE},
        _generate, required=("model", "prompt")),
    Command(
        "convert", "factflip convert --model=DIR|FILE.gguf --out=DIR [--to=hf|factflip]",
        "Convert a model between the HF, GGUF and factflip formats.",
        """\
        Reads an HF (safetensors + config.json) or factflip model directory, or a GGUF file
        (dequantised to float32), and writes it as an HF or factflip directory, with the
        model's tokenizer when it has one; our models are our own, HF is the interchange
        format.

          factflip convert --model=/models/Qwen2.5-0.5B --out=/tmp/qwen-ff --to=factflip
          factflip convert --model=SmolLM2-135M-Instruct.Q4_1.gguf --out=/tmp/smollm2""",
        {"model": "The model to read: an HF or factflip directory, or a .gguf file.",
         "out": "The directory the converted model is written to.",
         "to": "The format to write."},
        _convert, required=("model", "out")),
    Command(
        "world", "factflip world [--workdir=DIR --seed=S --vocab_size=N]",
        "Build the embedded fact world and its tokenizer; print its statistics.",
        """\
        Generates the fact world (people, relations, documents in three languages and styles)
        into DIR/world and trains its tokenizer into DIR/tokenizer (the study does this as
        its first stage; this command is for looking at one).

          factflip world --workdir=/tmp/world --seed=3""",
        {"workdir": "Where world/ and tokenizer/ are written.",
         "seed": "The world's seed (its people, facts and documents).",
         "vocab_size": "The tokenizer's vocabulary size."},
        lambda: _world(FLAGS.workdir, FLAGS.seed, FLAGS.vocab_size)),
    Command(
        "facts", "factflip facts --facts=PATH [--format=NAME --lenient --out=FILE.jsonl]",
        "Load a facts dataset: counts, bad records, optionally our JSONL.",
        """\
        Reads any supported facts format (auto-detected: factflip JSONL, CounterFact's ROME or
        EasyEdit layout, {"items"}, ...; see factflip/data/loaders.py) and prints counts per
        relation; a bad record is an error naming file, line and field unless --lenient.

          factflip facts --facts=/data/counterfact.json --out=/tmp/counterfact.jsonl""",
        {"facts": "The dataset file or folder to read.",
         "format": "The dataset format (default: detected from the file).",
         "lenient": "Skip and count bad records instead of failing on the first.",
         "out": "Write the loaded facts here as factflip JSONL."},
        _facts_cmd, required=("facts",)),
    Command(
        "train", "factflip train --config=configs/pretrain_tiny.py[:variant] --workdir=DIR "
                 "[--config.KEY=VALUE]",
        "Train (or resume) one run; multi-host: see launch/README.md.",
        """\
        Pretraining, continual pretraining, SFT or unlearning as its config says
        (factflip/train/config.py lists every key). Checkpoints, metrics.jsonl and
        config.json go to --workdir; the same command again resumes from the latest
        checkpoint, SIGTERM saves one and stops. Started on every host of a pod or SLURM job
        it trains on the global mesh (launch/).

          factflip train --config=configs/pretrain_tiny.py:smoke --workdir=/tmp/run \\
              --config.steps=100 --config.optim.lr=3e-4""",
        {"config": "The training config, FILE.py[:variant]; override any key with "
                   "--config.KEY=VALUE.",
         "workdir": "The run's directory (checkpoints/, metrics.jsonl, config.json); an "
                    "existing run there is resumed.",
         **_MULTIHOST, **_CACHE},
        _train, required=("config", "workdir")),
    Command(
        "train-sae", "factflip train-sae --config=configs/sae.py --config.model=DIR "
                     "--workdir=DIR [--config.KEY=VALUE]",
        "Train (or resume) an SAE on a frozen model's activations at a hook site.",
        """\
        Streams the model's activations at --config.hook_name (a TransformerLens name, e.g.
        blocks.1.hook_resid_post or blocks.0.attn.hook_z) over the config's token data through
        a shuffle buffer and trains a standard, TopK or JumpReLU SAE as SAELens trains them
        (factflip/sae/train.py lists every key). metrics.jsonl logs the loss terms, explained
        variance, L0, the dead-latent share and the CE loss recovered; the SAE is written to
        WORKDIR/sae in SAELens's layout. The same command again resumes.

          factflip train-sae --config=configs/sae.py --config.model=/tmp/base \\
              --config.data.world_dir=workdir/default/world --workdir=/tmp/sae""",
        {"config": "The SAE config, FILE.py[:variant]; override any key with "
                   "--config.KEY=VALUE.",
         "workdir": "The run's directory (checkpoints/, metrics.jsonl, sae/); an existing run "
                    "there is resumed.", **_CACHE},
        _train_sae, required=("config", "workdir")),
    Command(
        "export", "factflip export --workdir=DIR [--step=N] --out=DIR [--to=hf|factflip]",
        "Write a training checkpoint as an HF (or factflip) model directory.",
        """\
        Loads the parameters of one checkpoint of a `factflip train` run and writes them, with
        the run's model config and tokenizer, as a model directory other tools open.

          factflip export --workdir=/tmp/run --out=/tmp/run-hf""",
        {"workdir": "The training run to read (a `factflip train` --workdir).",
         "step": "The checkpoint step to export (-1 = the latest).",
         "out": "The directory the model is written to.",
         "to": "The format to write."},
        _export, required=("workdir", "out")),
    Command(
        "eval", "factflip eval --model=DIR --facts=PATH --out=DIR [--metrics=qa,counterfact,"
                "rwku,mia,preference --step=N --k_shot=K]",
        "Evaluate a model, or every checkpoint of a run, on a facts dataset.",
        """\
        Scores the model on the items of any `load_facts` dataset each metric applies to
        (factflip/evals/run.py defines them): preference (ΔLL), qa (closed-book EM / F1 /
        abstention), counterfact (ROME's ES PS NS S and fluency), rwku (ROUGE-L recall per
        level), mia (RWKU's LOSS / zlib / Min-K% / Min-K%++ and AUC). --model may be a
        training workdir: every checkpoint is evaluated in series (or only --step). Writes
        <metric>.csv and summary.json into --out, replacing it whole.

          factflip eval --model=/tmp/run --facts=RWKU/Target --metrics=rwku,mia \\
              --out=/tmp/eval""",
        {"model": "An HF or factflip model directory, or a training workdir.",
         "facts": "The dataset file or folder (any load_facts format; an RWKU Target folder "
                  "for rwku and mia).",
         "out": "The directory written (replaced whole).",
         "metrics": "Which metrics: preference, qa, counterfact, rwku, mia.",
         "step": "With a training workdir: only this checkpoint (-1 = the latest).",
         "k_shot": "QA: exemplars per question from the dataset's dev split.",
         "batch_size": "Rows per compiled batch.",
         "seed": "QA: the seed of the exemplar draw.", **_CACHE},
        _eval, required=("model", "facts", "out")),
    Command(
        "lm-eval", "factflip lm-eval --model factflip --model_args pretrained=DIR[,dtype=...] "
                   "--tasks T [lm-eval arguments]",
        "lm-evaluation-harness's command line with factflip models (--model factflip).",
        """\
        Every argument goes to lm-eval's own `lm-eval run` command line, with the `factflip`
        model registered: pretrained= any HF or factflip model directory, training workdir or
        checkpoint step; also tokenizer=DIR, dtype=float32|bfloat16, batch_size, max_length,
        max_gen_toks, add_bos_token, seed (factflip/evals/lm_eval.py). Needs the lm_eval
        extra (pip install 'factflip[lm_eval]'). `factflip lm-eval --help`: lm-eval's help.

          factflip lm-eval --model factflip --model_args pretrained=/tmp/run-hf \\
              --tasks my_task --include_path tasks/ --output_path /tmp/lm-eval""",
        {}, lambda: None),
)}


def _lm_eval(args: list[str]) -> None:
  try:
    from factflip.evals.lm_eval import main as lm_eval_main
  except ImportError as e:
    print(f"error: factflip lm-eval needs lm-evaluation-harness ({e}); pip install "
          "'factflip[lm_eval]'", file=sys.stderr)
    sys.exit(1)
  from factflip import compile_cache
  compile_cache.enable()
  lm_eval_main(args)

# every flag defined above: given to a command that does not list it, it is a usage error
OUR_FLAGS = ("workdir", "model", "out", "to", "prompt", "max_new_tokens", "temperature",
             "top_k", "top_p", "seed", "vocab_size", "facts", "format", "lenient", "dry_run",
             "metrics", "k_shot", "batch_size",
             "step", "distributed", "coordinator_address", "num_processes", "process_id",
             "compilation_cache", "config")


def usage() -> str:
  """The command table."""
  width = max(len(n) for n in COMMANDS) + 2
  rows = [f"  factflip {n:<{width}}{c.summary}" for n, c in COMMANDS.items()]
  return "\n".join([
      "usage: factflip COMMAND [--flags]", "", "commands:", *rows,
      (f"  factflip {'help':<{width}}This table; `factflip help COMMAND` or "
       "`factflip COMMAND --help`: what a command does and its flags."), "",
      ("`factflip run` alone runs paper A's poisoning study on the embedded fact world "
       "(workdir/default).")])


def _is_override(arg: str) -> bool:
  return arg.lstrip("-").startswith("config.")


def _own_flags(cmd: Command) -> None:
  """Refuses flags of ours that `cmd` does not read, and a missing required one."""
  foreign = [n for n in OUR_FLAGS if FLAGS[n].present and n not in cmd.flags]
  if foreign:
    raise app.UsageError(cmd.refusal(foreign[0]))
  missing = [n for n in cmd.required if not FLAGS[n].present]
  if missing:
    raise app.UsageError(f"factflip {cmd.name} needs --{missing[0]}; its flags: "
                         f"{cmd.flag_list()}")


def _main(argv) -> None:
  from absl import logging
  if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; -v=0 shows it again
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2 or argv[1] == "help":
    print(usage())
    return
  if argv[1] not in COMMANDS:
    raise app.UsageError(f"unknown command {argv[1]!r}; usage: factflip "
                         f"{{{'|'.join(COMMANDS)}}} [--flags] (factflip help)")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}")
  cmd = COMMANDS[argv[1]]
  _own_flags(cmd)
  if "compilation_cache" in cmd.flags:
    from factflip import compile_cache
    compile_cache.enable(FLAGS.compilation_cache)
  cmd.fn()


def help_text(argv: list[str]) -> str | None:
  """What `factflip ... --help` / `factflip help [CMD]` prints, or None when argv asks for
  no help. An unknown command's help is the table."""
  name = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
  if len(argv) == 1:
    target = None
  elif name == "help":
    target = argv[2] if len(argv) > 2 else None
  elif any(a in HELP_FLAGS for a in argv[1:]):
    target = name
  else:
    return None
  return COMMANDS[target].help() if target in COMMANDS else usage()


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) > 1 and argv[1] == "lm-eval":       # lm-eval parses its own arguments
    _lm_eval(argv[2:])
    return
  text = help_text(argv)
  if text is not None:
    print(text)
    sys.exit(0)
  cmd = COMMANDS.get(argv[1]) if len(argv) > 1 else None
  if cmd and "config" not in cmd.flags and any(_is_override(a) for a in argv):
    print(f"error: {cmd.refusal('config.KEY')}", file=sys.stderr)   # absl cannot parse it
    sys.exit(1)
  if (len(argv) > 1 and argv[1] == "run"
      and not any(a.split("=")[0] in ("--config", "-config") for a in argv)):
    try:
      argv.insert(2, f"--config={_study_config_path()}")
    except app.UsageError as e:
      print(f"factflip run: {e}", file=sys.stderr)
      sys.exit(1)
  bad = _config_error(argv)
  if bad:
    print(f"error: {bad}", file=sys.stderr)
    sys.exit(2)
  sys.argv = argv           # ml_collections reads --config.KEY overrides from sys.argv
  app.run(_entry, argv=argv)


def _config_error(argv: list[str]) -> str | None:
  """What loading --config=FILE.py[:VARIANT] raises, as one line (a missing file, a bad
  variant), or None: checked before absl parses the flag, which would print the config's
  traceback instead."""
  from factflip.configfile import load_config_file

  value = next((a.split("=", 1)[1] for a in argv[1:]
                if a.startswith(("--config=", "-config="))), None)
  if value is None:
    return None
  path, _, variant = value.partition(":")
  if not os.path.isfile(path):
    return f"{path}: no such config file (--config=FILE.py[:VARIANT])"
  try:
    load_config_file(path, variant or None)
  except ValueError as e:          # ConfigError, a bad variant
    return str(e)
  return None


def _entry(argv) -> None:
  """`_main` with bad input reported one way for every command: a usage error as one line
  (exit 1); a bad file, record, key or model file (ConfigError, DataError, GGUFError: each
  names the file, line or key) as one `error:` line (exit 2), not a traceback."""
  from factflip.configfile import ConfigError
  from factflip.fileio import DataError
  from factflip.gguf_io import GGUFError
  try:
    _main(argv)
  except app.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (ConfigError, DataError, GGUFError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
