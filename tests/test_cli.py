"""The `factflip` command: the main job's outputs and usage errors."""

import json
import os
import sys

import pytest
from absl import app

from factflip import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_is_the_study_and_reports_a_wrong_config(smoke_study, tmp_path, capsys):
  """`factflip run` drives configs/studies/poisoning.py; a failing base gate exits with the
  reason (on a copy of the session's smoke study: its base is reused, the gate is not)."""
  import shutil

  from factflip.configfile import load_config_file
  wd = str(tmp_path / "wd")
  shutil.copytree(smoke_study[0], wd)
  c = load_config_file(cli.run.default_config(), "smoke")
  assert list(c.ratios) == [0.0, 1.0]
  c.min_base_accuracy = 0.99
  with pytest.raises(SystemExit) as e:
    cli.run.run(wd, c, "smoke")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "target facts on the training prompt format" in err and "min_base_accuracy" in err


@pytest.fixture
def parse(monkeypatch):
  """Parses argv into the global absl FLAGS as `factflip` would (and unparses afterwards)."""
  def parse(*args):
    argv = ["factflip", *args]
    monkeypatch.setattr(sys, "argv", argv)
    return cli.FLAGS(argv)
  yield parse
  cli.FLAGS.unparse_flags()


def test_usage_errors(parse):
  with pytest.raises(app.UsageError, match=r"unknown command 'frobnicate'; usage: factflip "
                     r"\{run\|presets\|generate"):
    cli.dispatch(parse("frobnicate"))
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    cli.dispatch(parse("run", "extra"))


@pytest.mark.parametrize("args,match", [
    (("run", "--temperature=3"), (r"^factflip run does not take --temperature; its flags: "
                                  r"--config, --workdir, --dry_run, --distributed, "
                                  r"--coordinator_address, --num_processes, --process_id, "
                                  r"--compilation_cache \(factflip run --help\)$")),
    (("generate", "--model=m", "--prompt=p", "--workdir=w"),
     r"generate does not take --workdir; its flags: --model, --prompt, --max_new_tokens"),
    (("presets", "--seed=1"), r"presets does not take --seed; its flags: none"),
    (("train", "--config=configs/pretrain_tiny.py"), (r"train needs --workdir; its flags: "
                                                      r"--config, --workdir, --distributed")),
    (("export", "--workdir=w"), r"export needs --out"),
    (("generate", "--model=m"), r"generate needs --prompt"),
    (("facts",), r"facts needs --facts"),
])
def test_a_flag_of_another_command_or_a_missing_one_is_a_usage_error(parse, args, match):
  if args[0] == "train":
    args = (args[0], args[1].replace("configs/", f"{ROOT}/configs/"))
  with pytest.raises(app.UsageError, match=match):
    cli.dispatch(parse(*args))


def test_a_config_override_for_a_command_without_config_is_refused_before_parsing(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["factflip", "world", "--config.steps=3"])
  assert e.value.code == 1
  assert capsys.readouterr().err == ("error: factflip world does not take --config.KEY; its "
                                     "flags: --workdir, --seed, --vocab_size (factflip world "
                                     "--help)\n")


@pytest.mark.parametrize("args,code,err", [
    (["run", "--config=configs/studies/poisoning.py:nonsense", "--workdir=W"], 2,
     "error: configs/studies/poisoning.py: bad variant 'nonsense'; expected smoke, cpu, "
     "replay_reading, scale=A+B, seeds=0+1, hf=DIR[+DIR] or facts=FILE, joined by commas\n"),
    (["run", "--config=configs/studies/nope.py", "--workdir=W"], 2,
     "error: configs/studies/nope.py: no such config file (--config=FILE.py[:VARIANT])\n"),
    (["eval", "--model=M", "--facts=BAD", "--out=W"], 2,
     "error: BAD:2: not valid JSON (Expecting ',' delimiter, column 1)\n"),
])
def test_bad_input_is_one_error_line_and_exit_2_for_every_command(args, code, err, tmp_path,
                                                                   monkeypatch, capsys):
  """A bad config variant, a missing config file or a malformed facts file: one `error:`
  line naming the file (and line), exit status 2, no traceback."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "prompt": "x"\n')
  monkeypatch.chdir(ROOT)
  swap = {"W": str(tmp_path / "wd"), "M": str(tmp_path / "model"), "BAD": str(bad)}
  args = [f"{k}={swap.get(v, v)}" if v else k for k, _, v in (a.partition("=") for a in args)]
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(["factflip", *args])
  finally:
    cli.FLAGS.unparse_flags()
  assert e.value.code == code
  assert capsys.readouterr().err == err.replace("BAD", str(bad))


def test_run_takes_config_overrides_without_a_config_file(monkeypatch, tmp_path):
  """`factflip run --config.KEY=VALUE` overrides the default study config (main() puts the
  default --config in front); the override reaches the study."""
  seen = {}
  monkeypatch.setattr(cli.run, "run", lambda *a: seen.update(args=a))
  monkeypatch.chdir(ROOT)
  try:
    with pytest.raises(SystemExit) as e:
      cli.main(["factflip", "run", "--config.cpt.steps=7", f"--workdir={tmp_path}", "--dry_run"])
  finally:
    cli.FLAGS.unparse_flags()
  assert e.value.code in (0, None)
  workdir, config, source, dry_run = seen["args"]
  assert (workdir, source, dry_run) == (str(tmp_path), "configs/studies/poisoning.py", True)
  assert config.cpt.steps == 7 and config.study == "poisoning"


def test_world_command_writes_world_and_tokenizer(tmp_path):
  from factflip import load_tokenizer
  from factflip.data.world import load_world

  stats = cli.world.build(str(tmp_path), seed=3, vocab_size=600)
  world = load_world(str(tmp_path / "world"))
  assert stats["facts"] == len(world.facts) == 2190 and world.config.seed == 3
  tok = load_tokenizer(str(tmp_path / "tokenizer"))
  assert len(tok) == 600
  assert tok.decode(tok(world.documents[0]["text"]).input_ids,
                    skip_special_tokens=True) == world.documents[0]["text"]


def test_facts_command_strict_lenient_and_convert(tmp_path, capsys):
  from factflip import load_facts

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "answers": ["Paris"], "prompt": "X lives in"}\n'
                 '{"id": "b", "answers": [""], "prompt": "Y lives in"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: record 1: field 'answers\[0\]': empty"):
    cli.facts.load(str(bad), None, False, None)
  out = tmp_path / "clean.jsonl"
  items = cli.facts.load(str(bad), None, True, str(out))
  assert len(items) == 1 and len(items.skipped) == 1
  assert "skipped 1 bad records" in capsys.readouterr().out
  assert [it.id for it in load_facts(str(out))] == ["a"]
  with pytest.raises(app.UsageError, match="facts needs --facts"):
    cli.facts.load(None, None, False, None)


def test_train_and_export_commands(small_world, world_tokenizer, tmp_path):
  """`factflip train` with --config.KEY overrides, its errors, and `factflip export`."""
  import subprocess

  from factflip.data.world import write_world

  write_world(small_world, str(tmp_path / "world"))
  wd = tmp_path / "run"
  base = [sys.executable, "-m", "factflip.cli", "train",
          f"--config={ROOT}/configs/pretrain_tiny.py:smoke", f"--workdir={wd}",
          f"--config.data.world_dir={tmp_path / 'world'}",
          f"--config.data.tokenizer_dir={world_tokenizer.name_or_path}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")

  def run(*args):
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=300, env=env)
  r = run("--config.steps=3", "--config.data.seq_len=32", "--config.eval_every=0")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step 3/3" in r.stdout and "ETA" in r.stdout
  assert json.loads((wd / "config.json").read_text())["steps"] == 3
  assert len((wd / "metrics.jsonl").read_text().splitlines()) == 3
  r = run("--config.optim.lr_rate=0.1")  # not a key: absl/ml_collections refuse it
  assert r.returncode != 0 and "lr_rate" in r.stderr
  r = run("--config.mesh.fsdp=3")
  assert r.returncode == 2
  assert "pretrain_tiny.py:smoke: config.mesh: {'data': 1, 'fsdp': 3, 'tensor': 1}" in r.stderr
  out = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "factflip.cli", "export", f"--workdir={wd}",
                      f"--out={out}"], capture_output=True, text=True, timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"wrote step 3 of {wd} as a hf model" in r.stdout
  assert json.loads((out / "config.json").read_text())["vocab_size"] == len(world_tokenizer)


@pytest.mark.parametrize("argv", [[], ["--help"], ["help"], ["-h"]])
def test_help_is_the_command_table_and_exits_0(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["factflip", *argv])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: factflip COMMAND [--flags]")
  assert [line.split()[1] for line in out.splitlines() if line.startswith("  factflip ")] == [
      *cli.COMMANDS, "help"]


@pytest.mark.parametrize("argv", [["run", "--help"], ["help", "run"], ["run", "-h"]])
def test_command_help_is_its_doc_and_only_its_flags(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["factflip", *argv])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: factflip run [--config=FILE.py[:variant]")
  assert "report/index.html" in out and "factflip run --config=configs/studies/poisoning.py:smoke" in out
  flag_lines = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
  assert flag_lines == ["--config=FILE.py[:variant]", "--workdir=DIR", "--dry_run",
                        "--distributed=auto|on|off", "--coordinator_address=HOST:PORT",
                        "--num_processes=N", "--process_id=I", "--compilation_cache=DIR|off"]
  assert "The study's directory: runs/, results/" in out     # --workdir's meaning for run


def test_workdir_out_config_seed_mean_what_each_command_does_with_them():
  texts = {(n, f): t for n, c in cli.COMMANDS.items() for f, t in c.flags.items()}
  for flag in ("workdir", "out", "config", "seed"):
    owners = [n for (n, f) in texts if f == flag]
    assert owners and len({texts[n, flag] for n in owners}) == len(owners), flag
  assert cli.COMMANDS["train"].required == ("config", "workdir")


def test_every_flag_defined_is_checked_against_the_commands():
  """Every flag is declared in cli.flags (no command defines its own) and read by a command."""
  defined = {f.name for f in cli.FLAGS.flags_by_module_dict()["factflip.cli.flags"]}
  assert defined == set(cli.OUR_FLAGS)
  assert set().union(*(c.flags for c in cli.COMMANDS.values())) == set(cli.OUR_FLAGS)


def test_lazy_subpackages():
  import factflip
  assert factflip.probes.flip_rate is not None and factflip.studies.stages.Stage
  assert factflip.evals.loglik.score_pairs is not None
  with pytest.raises(AttributeError, match="no attribute 'frob'"):
    factflip.frob
