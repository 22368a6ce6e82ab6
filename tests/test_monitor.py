"""The factual-integrity monitor (factflip/train/monitor.py): values, alerts, resume, stop rules
and bad rules, on CPT of the training loop's shared run; and the callback interface it runs
through (factflip/train/callbacks.py)."""

import json
import os

import numpy as np
import pytest
from conftest import smoke

from factflip.train.callbacks import AtEvals, Callback
from factflip.train.checkpoint import load_trained, valid_steps
from factflip.train.loop import train


@pytest.fixture(scope="module")
def watch_files(world_dirs, tmp_path_factory):
  """12 facts of the world to watch and 12 others as controls."""
  from factflip.data.facts import write_facts_jsonl
  from factflip.data.loaders import load_facts

  facts = [f for f in load_facts(os.path.join(world_dirs[0], "facts.jsonl"))
           if f.counterfactual][:24]
  d = tmp_path_factory.mktemp("watch")
  write_facts_jsonl(str(d / "watch.jsonl"), facts[:12])
  write_facts_jsonl(str(d / "controls.jsonl"), facts[12:])
  return str(d / "watch.jsonl"), str(d / "controls.jsonl")


def monitored(world_dirs, watch_files, base, **over):
  """CPT of the full run with the monitor every 2 steps."""
  keys = dict(model__init_from=base, monitor__every=2, monitor__watch=watch_files[0],
              monitor__controls=watch_files[1], monitor__kinds=["prompt", "question"],
              monitor__rules=["dll_drop:0.3", "lens_sign:-2@prompt", "flip:0"], steps=6,
              checkpoint__every=2, eval_every=0)
  return smoke(world_dirs, **dict(keys, **over))


def test_monitor_values_alerts_and_resume(full_run, world_dirs, watch_files, tmp_path):
  """The monitor's ΔLL on the live parameters equals the probe's on the saved checkpoint (and
  its lens); its alerts are the rules applied to those values; a stopped and resumed run
  writes the same alerts as one that ran through."""
  from factflip.data.loaders import load_facts
  from factflip.probes.fact_preference import preference
  from factflip.train.monitor import read_alerts

  wd = str(tmp_path / "mon")
  r = train(monitored(world_dirs, watch_files, full_run[0]), wd, quiet=True)
  assert r.step == 6 and r.stopped_by is None
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  mon = {x["step"]: x for x in rows if "monitor/dll_watch" in x}
  assert sorted(mon) == [0, 2, 4, 6]
  facts = {s: load_facts(p) for s, p in zip(("watch", "control"), watch_files)}
  tok = None
  dll = {}
  for step in (0, 2, 4, 6):
    model, _ = load_trained(wd, step)
    if tok is None:
      from factflip.data.tokenizer import load_tokenizer
      tok = load_tokenizer(world_dirs[1])
    for s, items in facts.items():
      tab = preference(model, tok, items, kinds=("prompt", "question"), lens=True)
      dll[step, s] = tab
      assert mon[step][f"monitor/dll_{s}"] == pytest.approx(float(tab["dll"].mean()), abs=1e-4)
  # every alert is the rule on the checkpoint's values, at the first step where it holds
  alerts = read_alerts(os.path.join(wd, "alerts.jsonl"))
  expect = set()
  for s in ("watch", "control"):
    ref = dll[0, s]
    fired: set = set()
    for step in (2, 4, 6):
      now = dll[step, s]
      for n in range(len(now["dll"])):
        key = (now["item"][n], now["kind"][n], now["variant"][n])
        tests = {"dll_drop:0.3": ref["dll"][n] - now["dll"][n] > 0.3,
                 "flip:0": ref["dll"][n] > 0 and now["dll"][n] < 0,
                 "lens_sign:-2@prompt": key[1] == "prompt" and ref["dll_layers"][n, -2] > 0
                 and now["dll_layers"][n, -2] < 0}
        for rule, hold in tests.items():
          margin = {"dll_drop:0.3": abs(ref["dll"][n] - now["dll"][n] - 0.3)}.get(rule, 1.0)
          if hold and (rule, s) + key not in fired and margin > 1e-3:
            fired.add((rule, s) + key)
            expect.add((step, rule, s) + key)
  got = {(a["step"], a["rule"], a["set"], a["item"], a["kind"], a["variant"]) for a in alerts}
  assert got == expect and len(got) > 0
  assert {a["rule"] for a in alerts} >= {"dll_drop:0.3"}
  assert mon[6]["monitor/alerts_watch"] == sum(a["set"] == "watch" for a in alerts)
  # stopped after 3 steps and resumed: the same alerts and values
  wd2 = str(tmp_path / "mon2")
  train(monitored(world_dirs, watch_files, full_run[0]), wd2, quiet=True, stop_after=3)
  train(monitored(world_dirs, watch_files, full_run[0]), wd2, quiet=True)
  assert read_alerts(os.path.join(wd2, "alerts.jsonl")) == alerts


def test_monitor_stop_rule_and_bad_rules(full_run, world_dirs, watch_files, tmp_path):
  """A '!' rule stops training where it fires (checkpoint saved) and the run stays stopped;
  bad rules fail before anything runs."""
  from factflip.configfile import ConfigError
  from factflip.train.monitor import read_alerts

  wd = str(tmp_path / "stop")
  c = monitored(world_dirs, watch_files, full_run[0], monitor__rules=["dll_drop:0.1!"])
  r = train(c, wd, quiet=True)
  first = min(a["step"] for a in read_alerts(os.path.join(wd, "alerts.jsonl")))
  assert r.stopped_by.startswith("dll_drop:0.1! (") and r.step == first < 6
  assert valid_steps(os.path.join(wd, "checkpoints"))[-1] == first
  again = train(c, wd, quiet=True)
  assert again.step == first and again.stopped_by == r.stopped_by
  # no lens rule: the monitor scores the output only, with the probe's values
  from factflip.data.loaders import load_facts
  from factflip.data.tokenizer import load_tokenizer
  from factflip.probes.fact_preference import preference
  with np.load(os.path.join(wd, "monitor", "reference.npz")) as z:
    ref_LxN = z["dll_LxN"]
  model, _ = load_trained(wd, first)
  tab = preference(model, load_tokenizer(world_dirs[1]), load_facts(watch_files[0]),
                   kinds=("prompt", "question"))
  row = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))
         if json.loads(x)["step"] == first and "monitor/dll_watch" in x][0]
  assert ref_LxN.shape[0] == 1
  assert row["monitor/dll_watch"] == pytest.approx(float(tab["dll"].mean()), abs=1e-4)
  # resumed with a lens rule, that reference cannot serve it
  with pytest.raises(ConfigError, match=r"monitor\.rules: .*reference\.npz holds the output"):
    train(monitored(world_dirs, watch_files, full_run[0], monitor__rules=["lens_sign:-2"]),
          wd, quiet=True)
  for rules, message in [(["drop:1"], "expected NAME:ARG"), (["lens_sign:x"], "not an integer"),
                         (["flip:0.5@promt"], "prompt kinds"), (["dll_drop:-1"], ">= 0 nats")]:
    with pytest.raises(ConfigError, match=message):
      train(monitored(world_dirs, watch_files, full_run[0], monitor__rules=rules),
            str(tmp_path / "bad"), quiet=True)
  with pytest.raises(ConfigError, match=r"monitor\.watch: .*none\.jsonl: no such file"):
    train(monitored(world_dirs, watch_files, full_run[0],
                    monitor__watch=str(tmp_path / "none.jsonl")), str(tmp_path / "bad3"),
          quiet=True)
  with pytest.raises(ConfigError, match="lens_sign:9.*outside"):
    train(monitored(world_dirs, watch_files, full_run[0], monitor__rules=["lens_sign:9"]),
          str(tmp_path / "bad2"), quiet=True)


def test_at_evals_is_due_at_every_evaluation_and_the_last_step():
  cb = AtEvals(lambda step, params: {"x": float(step)}, every=4)
  assert [s for s in range(1, 11) if cb.due(s, 10)] == [4, 8, 10]
  assert cb.observe(4, None) == {"x": 4.0} and not AtEvals(cb.fn, 0).due(10, 10)


def test_a_callback_that_stops_ends_the_run_with_a_checkpoint(full_run, world_dirs, tmp_path):
  """Any Callback reaches the loop as the monitor does: logged at its start and when due, and
  its `stop` ends the run at that step with a checkpoint."""
  class StopAt3(Callback):
    def start(self, step, params):
      return {"probe/start": float(step)}

    def due(self, step, last):
      return True

    def observe(self, step, params):
      self.stop = "a test stop" if step == 3 else None
      return {"probe/seen": float(step)}
  wd = str(tmp_path / "stopped")
  r = train(smoke(world_dirs, checkpoint__every=100), wd, callbacks=[StopAt3()], quiet=True)
  assert r.step == 3 and r.stopped_by == "a test stop"
  assert valid_steps(os.path.join(wd, "checkpoints")) == [0, 3]
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert rows[0]["step"] == 0 and rows[0]["probe/start"] == 0.0
  assert [r_.get("probe/seen") for r_ in rows[1:]] == [1.0, 2.0, 3.0]
