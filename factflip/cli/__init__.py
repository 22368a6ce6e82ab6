"""The `factflip` command: a table of subcommands, each with its own flags and help.

  factflip                 the command table (also `factflip --help`, `factflip help`)
  factflip CMD --help      what CMD does, its launch lines and only its own flags
  factflip CMD [--flags]   run it; a flag another command owns is a usage error

One module per subcommand (`factflip/cli/<command>.py`: its help is its docstring, `READS` the
flags it reads, `main()` what it does); every flag is declared once (`cli.flags`). Bad input
is reported one way for every command: a usage error as one `error:` line (exit 1); a bad
config, file, record or model file (ConfigError, DataError, GGUFError: each names the file,
line or key) as one `error: FILE:LINE: ...` line (exit 2), never a traceback.
"""

from __future__ import annotations

import os
import sys

from absl import app

from factflip.cli import (
  convert,
  export,
  facts,
  generate,
  lm_eval,
  presets,
  run,
  train,
  train_sae,
  world,
)
from factflip.cli import eval as eval_cmd
from factflip.cli.command import Command
from factflip.cli.flags import FLAGS, OUR_FLAGS

HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")
COMMANDS = {name: Command.of(name, module) for name, module in (
    ("run", run), ("presets", presets), ("generate", generate), ("convert", convert),
    ("world", world), ("facts", facts), ("train", train), ("train-sae", train_sae),
    ("export", export), ("eval", eval_cmd), ("lm-eval", lm_eval))}


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


def dispatch(argv) -> None:
  """Run the command `argv` names (flags parsed): its flags checked, the compilation cache on
  where it reads --compilation_cache."""
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
    lm_eval.run(argv[2:])
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
      argv.insert(2, f"--config={run.default_config()}")
    except app.UsageError as e:
      print(f"factflip run: {e}", file=sys.stderr)
      sys.exit(1)
  bad = config_error(argv)
  if bad:
    print(f"error: {bad}", file=sys.stderr)
    sys.exit(2)
  sys.argv = argv           # ml_collections reads --config.KEY overrides from sys.argv
  app.run(_entry, argv=argv)


def config_error(argv: list[str]) -> str | None:
  """What loading --config=FILE.py[:VARIANT] raises, as one line (a missing file, a bad
  variant), or None: checked before absl parses the flag, which would print the config's
  traceback instead (the second load, absl's, reuses the modules the first imported)."""
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
  """`dispatch` with bad input reported one way for every command (the module docstring)."""
  from factflip.configfile import ConfigError
  from factflip.fileio import DataError
  from factflip.gguf_io import GGUFError
  try:
    dispatch(argv)
  except app.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (ConfigError, DataError, GGUFError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
