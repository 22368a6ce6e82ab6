"""The `factflip` command: the main job's outputs and usage errors."""

import json

import pytest
from absl import app

from factflip import cli


def test_run_is_the_study_and_reports_a_wrong_config(tmp_path, capsys):
  """`factflip run` drives configs/studies/poisoning.py; a failing base gate exits with the
  reason (the full smoke study runs in test_study.py)."""
  from factflip.train.loop import load_config_file
  c = load_config_file(cli._study_config_path(), "smoke")
  assert list(c.ratios) == [0.0, 1.0]
  c.min_base_accuracy = 0.99
  with pytest.raises(SystemExit) as e:
    cli._run(str(tmp_path), c, "smoke")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "target facts on the training prompt format" in err and "min_base_accuracy" in err


def test_usage_errors():
  with pytest.raises(app.UsageError, match="usage: factflip"):
    cli._main(["factflip", "frobnicate"])
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    cli._main(["factflip", "run", "extra"])


def test_world_command_writes_world_and_tokenizer(tmp_path):
  from factflip import load_tokenizer
  from factflip.data.world import load_world

  stats = cli._world(str(tmp_path), seed=3, vocab_size=600)
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
    cli._facts(str(bad), None, False, None)
  out = tmp_path / "clean.jsonl"
  items = cli._facts(str(bad), None, True, str(out))
  assert len(items) == 1 and len(items.skipped) == 1
  assert "skipped 1 bad records" in capsys.readouterr().out
  assert [it.id for it in load_facts(str(out))] == ["a"]
  with pytest.raises(app.UsageError, match="facts needs --facts"):
    cli._facts(None, None, False, None)


def test_train_and_export_commands(small_world, world_tokenizer, tmp_path):
  """`factflip train` with --config.KEY overrides, its errors, and `factflip export`."""
  import os
  import subprocess
  import sys

  from factflip.data.world import write_world

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  write_world(small_world, str(tmp_path / "world"))
  wd = tmp_path / "run"
  base = [sys.executable, "-m", "factflip.cli", "train",
          f"--config={root}/configs/pretrain_tiny.py:smoke", f"--workdir={wd}",
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


def test_help_and_lazy_subpackages(capsys):
  cli._main(["factflip"])
  cli._main(["factflip", "help"])
  out = capsys.readouterr().out
  assert out.count("factflip presets") == 2 and "--dry_run" in out
  import factflip
  assert factflip.probes.flip_rate is not None and factflip.studies.stages.Stage
  with pytest.raises(AttributeError, match="no attribute 'frob'"):
    factflip.frob
