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
