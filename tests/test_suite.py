"""The four-study suite: one world and base shared by the studies (linked, reused by
fingerprint), a study added to a finished suite runs alone, the suite's findings table and
report, and its config errors."""

import json
import os

import pandas as pd
import pytest
from conftest import factflip_run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "suite.py")


def _run(wd, *flags):
  return factflip_run(f"{CONFIG}:smoke", wd, "--config.pretrain.steps=40",
                      "--config.pretrain.checkpoint.every=40", *flags)


def test_suite_shares_the_base_and_adds_a_study_alone(tmp_path):
  wd = str(tmp_path / "suite")
  log = _run(wd, "--config.studies=('unlearning',)")
  shared = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "pretrain")
  ul = os.path.join(wd, "unlearning")
  assert os.path.islink(os.path.join(ul, "world"))
  assert os.path.realpath(os.path.join(ul, "runs", "tiny-0.5m", "seed0", "pretrain")) == \
      os.path.realpath(shared)
  assert "suite: 1/" in log and "ETA" in log
  f = pd.read_csv(os.path.join(wd, "results", "findings.csv"))
  assert list(f.columns) == ["study", "finding", "measured", "reproduced"]
  assert set(f.study) == {"unlearning"} and len(f) == 4
  with open(os.path.join(ul, "report", "summary.json")) as fh:
    checks = json.load(fh)["checks"]
  row = f[f.finding.str.startswith("every method lowers")].iloc[0]
  assert bool(row.reproduced) == checks["every_method_lowers_forget"]
  assert "forget ROUGE-L base" in row.measured
  with open(os.path.join(wd, "report", "index.html")) as fh:
    page = fh.read()
  assert "paper's finding" in page and "unlearning/report/index.html" in page
  stamp = os.path.getmtime(os.path.join(shared, "DONE"))

  log = _run(wd, "--config.studies=('unlearning','poisoning')")
  assert "shared | plan: 2 reuse" in log and "unlearning | plan: 16 reuse" in log
  assert "poisoning | plan: 5 new" in log
  assert os.path.getmtime(os.path.join(shared, "DONE")) == stamp     # not pretrained again
  assert os.path.islink(os.path.join(wd, "poisoning", "runs", "tiny-0.5m", "seed0",
                                     "pretrain"))
  f = pd.read_csv(os.path.join(wd, "results", "findings.csv"))
  assert list(dict.fromkeys(f.study)) == ["unlearning", "poisoning"]
  # flips and ambiguity always; the reversal row when some target flipped (patching has work)
  assert (f.study == "unlearning").sum() == 4 and 2 <= (f.study == "poisoning").sum() <= 3
  with open(os.path.join(wd, "results", "timings.json")) as fh:
    assert set(json.load(fh)) == {"shared", "unlearning", "poisoning"}


@pytest.mark.parametrize("values,match", [
    ({"studies": ("poisoning", "unlearn")}, r"config\.studies: .*expected distinct studies"),
    ({"studies": ("unlearning",), "unlearning.epochs": 0}, r"unlearning: config\.epochs: 0"),
])
def test_bad_suite_configs_name_the_study_and_key(tmp_path, values, match):
  from conftest import set_keys

  from factflip.configfile import ConfigError, load_config_file
  from factflip.studies.suite import Study
  c = set_keys(load_config_file(CONFIG, "smoke"), values)
  with pytest.raises(ConfigError, match=match):
    Study(c, str(tmp_path))
  with pytest.raises(ValueError, match="hf= is not a suite variant"):
    load_config_file(CONFIG, "hf=/m,facts=/f")
