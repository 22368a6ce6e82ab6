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


def test_eta_weights_the_remaining_stages_by_their_kind():
  from factflip.studies.suite import eta_seconds
  done = [("world", 2.0), ("pretrain", 60.0), ("cpt", 10.0), ("cpt", 14.0)]
  # two cpt stages at their mean (12 s), a probes stage at the mean of all four (21.5 s)
  assert eta_seconds(done, ["cpt", "cpt", "probes"]) == pytest.approx(2 * 12.0 + 21.5)
  assert eta_seconds(done, []) == 0.0 and eta_seconds([], ["cpt"]) == 0.0


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
  assert list(f.columns) == ["study", "finding", "protocol", "measured", "reproduced"]
  assert set(f.study) == {"unlearning"} and len(f) == 4
  assert f.protocol.str.startswith("the base aligned first (align.epochs = 1").all()
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
  assert "shared | plan: 2 reuse" in log and "unlearning | plan: 17 reuse" in log
  assert "poisoning | plan: 5 new" in log
  assert os.path.getmtime(os.path.join(shared, "DONE")) == stamp     # not pretrained again
  assert os.path.islink(os.path.join(wd, "poisoning", "runs", "tiny-0.5m", "seed0",
                                     "pretrain"))
  f = pd.read_csv(os.path.join(wd, "results", "findings.csv"))
  assert list(dict.fromkeys(f.study)) == ["unlearning", "poisoning"]
  # flips and ambiguity always; the reversal row when some target flipped (patching has work)
  assert (f.study == "unlearning").sum() == 4 and 2 <= (f.study == "poisoning").sum() <= 5
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
  with pytest.raises(ValueError, match="hf=DIR goes with at least one study's facts"):
    load_config_file(CONFIG, "hf=/m")
  with pytest.raises(ValueError, match="facts= names no study; each study takes its own"):
    load_config_file(CONFIG, "hf=/m,facts=/f")


def test_hf_variant_runs_the_studies_named_with_facts_on_the_model(hf_lm, small_world,
                                                                   tmp_path):
  """On real models each study named with a facts file runs on the model directory with its
  own fact draw: no shared world or pretraining in the plan, the others left out."""
  from test_study import counterfact_file

  from factflip.configfile import load_config_file
  from factflip.data.facts import write_facts_jsonl
  from factflip.data.world import with_train_question
  from factflip.studies.suite import Study
  facts = counterfact_file(small_world, tmp_path / "counterfact.json", 40)
  unseen = str(tmp_path / "unseen.jsonl")      # paper D's spillover questions
  write_facts_jsonl(unseen, [with_train_question(f) for f in small_world.facts
                             if f.meta.get("exposure_tier") == "none"][:6])
  c = load_config_file(CONFIG, f"smoke,hf={hf_lm[0]},poisoning={facts},unlearning={facts}")
  c.unlearning.eval.unseen = unseen
  assert c.studies == ("poisoning", "unlearning") and c.sizes == (hf_lm[0],)
  assert c.poisoning.facts == facts and c.poisoning.probe.devices == -1   # A's own hf= keys
  logs = []
  suite = Study(c, str(tmp_path / "wd"), log=logs.append)
  assert suite.run_and_report(dry_run=True) is None
  assert logs[0] == "shared | plan: nothing"
  plans = {line.split(" | ")[0]: line for line in logs if "| plan:" in line}
  assert set(plans) == {"shared", "poisoning", "unlearning"}
  assert plans["poisoning"].endswith("plan: 6 new")   # fact draw, cpt + probe per p, results
  assert plans["unlearning"].endswith("plan: 17 new")  # its own draw, sets, 6 runs, evals...
  assert "base " + os.path.basename(hf_lm[0]) in "\n".join(logs)
  assert not os.path.exists(tmp_path / "wd" / "poisoning" / "world")
