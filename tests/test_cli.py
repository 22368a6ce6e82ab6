"""The `factflip` command: the main job's outputs and usage errors."""

import json

import pytest
from absl import app

from factflip import cli


def test_run_writes_a_consistent_summary(tmp_path):
  summary = cli._run(str(tmp_path), "tiny-0.5m", seed=1)
  on_disk = json.loads((tmp_path / "model_core.json").read_text())
  assert on_disk == summary
  assert summary["max_abs_logit_diff_after_hf_round_trip"] == 0.0
  assert summary["identity_patch_exact"] is True
  assert summary["residual_stream_shape"] == [5, 4, 64, 64]
  assert len(summary["greedy_tokens"]) == 2 and len(summary["greedy_tokens"][0]) == 16
  assert (tmp_path / "model_hf" / "model.safetensors").exists()


def test_usage_errors():
  with pytest.raises(app.UsageError, match="usage: factflip"):
    cli._main(["factflip", "train"])
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
