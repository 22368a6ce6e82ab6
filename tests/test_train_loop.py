"""The training loop: metrics, exact resume, resharded restore, SIGTERM, incomplete checkpoints,
bad configs, base models, exports and the other data kinds."""

import json
import os
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import params_of, smoke

from factflip.train import config as config_lib
from factflip.train.checkpoint import Checkpointer, load_trained, valid_steps
from factflip.train.loop import resolve, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The corrupted-checkpoint test leaves Orbax read coroutines of the broken step unawaited.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
PRETRAIN = os.path.join(ROOT, "configs", "pretrain_tiny.py")


def test_files_metrics_and_tensorboard(full_run):
  wd, r = full_run
  assert r.step == 8 and sorted(r.losses) == list(range(1, 9))
  assert r.losses[8] < r.losses[1] - 0.1  # it learns
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert [x["step"] for x in rows] == list(range(1, 9))
  for x in rows:
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(x)
    assert x["tokens_per_s"] > 0 and np.isfinite(x["loss"])
  assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(3e-3, rel=1e-6)  # warmup 2
  assert [x["loss"] for x in rows] == [r.losses[s] for s in range(1, 9)]
  assert "heldout_answer_nll" in rows[3] and "heldout_answer_nll" in rows[7]
  assert rows[7]["heldout_answer_nll"] < rows[3]["heldout_answer_nll"] + 0.5
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["steps"] == 8 and cfg["data"]["shards"] == 1 and cfg["optim"]["total_steps"] == 8
  assert valid_steps(os.path.join(wd, "checkpoints")) == [0, 2, 4, 6, 8]
  # TensorBoard: the same losses as event-file scalars.
  from tensorboardX.proto import event_pb2
  tb = os.path.join(wd, "tensorboard")
  (name,) = os.listdir(tb)
  data = open(os.path.join(tb, name), "rb").read()
  seen, i = {}, 0
  while i < len(data):
    n = int.from_bytes(data[i:i + 8], "little")
    ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    for v in ev.summary.value:
      if v.tag == "loss":
        seen[ev.step] = v.simple_value
  assert sorted(seen) == list(range(1, 9))
  np.testing.assert_allclose([seen[s] for s in range(1, 9)], [r.losses[s] for s in range(1, 9)],
                             rtol=1e-6)


def test_checkpoint_readable_with_plain_orbax(full_run):
  wd, _ = full_run
  raw = ocp.StandardCheckpointer().restore(os.path.join(wd, "checkpoints", "8", "state"))
  assert int(raw["step"]) == 8 and set(raw) == {"step", "params", "opt_state"}
  _, params = params_of(wd, 8)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), raw["params"],
               params)
  data = json.loads(open(os.path.join(wd, "checkpoints", "8", "data",
                                      "process_0-of-1.json")).read())
  assert data["shard_ids"] == [0] and len(data["streams"][""]) == 1


def test_exact_resume(full_run, world_dirs, tmp_path):
  ref_wd, ref = full_run
  wd = str(tmp_path / "resumed")
  first = train(smoke(world_dirs), wd, stop_after=3, quiet=True)  # stops off the interval
  assert first.step == 3 and valid_steps(os.path.join(wd, "checkpoints"))[-1] == 3
  second = train(smoke(world_dirs), wd, quiet=True)
  assert second.start_step == 3 and second.step == 8
  losses = {**first.losses, **second.losses}
  assert [losses[s] for s in range(1, 9)] == [ref.losses[s] for s in range(1, 9)]  # bitwise
  _, a = params_of(ref_wd)
  _, b = params_of(wd)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert [x["step"] for x in rows] == list(range(1, 9))


def test_resharded_restore(world_dirs, tmp_path):
  """Saved as fsdp=8 on 8 devices; restored as tensor=2 x fsdp=4 and on one device."""
  from factflip.sharding import make_mesh
  from factflip.train.optim import make_optimizer
  from factflip.train.step import abstract_state

  assert jax.device_count() == 8
  wd = str(tmp_path / "fsdp8")
  c = smoke(world_dirs, mesh__fsdp=8, steps=4, eval_every=0, checkpoint__keep=2)
  r = train(c, wd, quiet=True)
  saved = os.path.join(wd, "checkpoints")
  assert valid_steps(saved) == [2, 4]  # keep=2: older steps deleted
  _, ref = params_of(wd, 4)
  tx = make_optimizer(config_lib.optim_config(resolve(c, wd)))
  for mesh in (make_mesh(data=1, fsdp=4, tensor=2), None):
    step, state = Checkpointer(saved, 2).restore(abstract_state(r.model_config, tx, mesh))
    assert step == 4 and int(state.step) == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params, ref)
    wq = state.params["layers"]["wq"]
    if mesh is not None:
      assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    else:
      assert len(wq.sharding.device_set) == 1
  # and training continues on another mesh from the fsdp=8 checkpoint, close to the original
  cont = train(smoke(world_dirs, mesh__fsdp=4, mesh__tensor=2, steps=6, eval_every=0), wd,
               quiet=True)
  assert cont.start_step == 4 and np.isfinite(cont.losses[6])


def test_sigterm_saves_at_the_next_step_and_resumes(world_dirs, tmp_path, full_run):
  wd = str(tmp_path / "preempted")

  def kill_at_4(step, params):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
  r = train(smoke(world_dirs, checkpoint__every=100), wd, callbacks=[kill_at_4], quiet=True)
  assert r.preempted and r.step == 4
  assert valid_steps(os.path.join(wd, "checkpoints")) == [0, 4]  # off the interval of 100
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
  again = train(smoke(world_dirs, checkpoint__every=100), wd, quiet=True)
  assert again.start_step == 4 and again.step == 8
  assert again.losses[8] == full_run[1].losses[8]


def test_incomplete_checkpoints_are_ignored(world_dirs, tmp_path, capsys):
  wd = str(tmp_path / "trunc")
  train(smoke(world_dirs, steps=4), wd, quiet=True)
  ck = os.path.join(wd, "checkpoints")
  # a save cut off mid-write: a step directory without the commit marker
  shutil.copytree(os.path.join(ck, "4"), os.path.join(ck, "6"))
  os.remove(os.path.join(ck, "6", "commit_success.txt"))
  # a committed step whose array data is gone (a disk that lost files)
  shutil.copytree(os.path.join(ck, "4"), os.path.join(ck, "5"))
  shutil.rmtree(os.path.join(ck, "5", "state", "ocdbt.process_0"))
  capsys.readouterr()
  r = train(smoke(world_dirs, steps=8), wd, quiet=True)
  err = capsys.readouterr().out
  assert "checkpoints/6: incomplete checkpoint" in err
  assert "checkpoints/5: cannot be restored" in err
  assert r.start_step == 4 and r.step == 8
  # both were set aside (not deleted), and step 6 was saved again by the resumed run
  assert os.path.isdir(os.path.join(ck, "6.incomplete"))
  assert os.path.isdir(os.path.join(ck, "5.unreadable"))
  assert valid_steps(ck) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("change,key,message", [
    ({"optim__lr_rate": 1e-3}, "optim.lr_rate", "unknown key"),
    ({"mesh__fsdp": 3}, "mesh", "multiplies to 3, not the 8 devices"),
    ({"mesh__fsdp": 3, "mesh__data": -1}, "mesh", "does not divide the 8 devices"),
    ({"mesh__fsdp": 8, "data__batch_size": 12}, "data.batch_size", "do not divide over the 8"),
    ({"data__batch_size": 6, "accum_steps": 4}, "data.batch_size", "accum_steps=4"),
    ({"optim__schedule": "linear"}, "optim.schedule", "expected constant, cosine or wsd"),
    ({"data__kind": "books"}, "data.kind", "expected one of"),
    ({"steps": 0}, "steps", "expected > 0"),
    ({"model__logits_chunk": -8}, "model.logits_chunk", "-8; expected 0"),
    ({"objective__name": "npo"}, "objective.name", "data.kind 'unlearn'"),
    ({"data__facts_path": "f.json"}, "data.facts_path", "only data.kind 'poison' reads it"),
    ({"data__kind": "poison", "data__facts_path": "f.json"}, "data.replay_path",
     r"with data.facts_path and replay_weight 0.5"),
])
def test_bad_config_fails_before_anything_runs(world_dirs, tmp_path, change, key, message):
  c = smoke(world_dirs)
  c.unlock()  # a config file may add keys; validation must catch the unknown ones
  for k, v in change.items():
    node = c
    *path, last = k.split("__")
    for p in path:
      node = node[p]
    node[last] = v
  wd = str(tmp_path / "bad")
  t = time.perf_counter()
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    train(c, wd, source="cfg.py")
  assert e.value.key == key and str(e.value).startswith(f"cfg.py: config.{key}: ")
  assert time.perf_counter() - t < 1.0 and not os.path.exists(wd)  # nothing compiled or written


def test_cpt_from_a_pretrained_workdir_and_export(full_run, world_dirs, tmp_path):
  """Continual pretraining with poisoning from the pretraining run; the result exported to HF."""
  base_wd, _ = full_run
  wd = str(tmp_path / "cpt")
  c = smoke(world_dirs, steps=3, eval_every=0)
  c.model.init_from = base_wd
  c.data.kind, c.data.ratio, c.data.n_targets, c.data.mentions_per_fact = "poison", 0.5, 4, 2
  c.data.world_dir = c.data.tokenizer_dir = ""  # inherited from the base run
  r = train(c, wd, quiet=True)
  assert r.step == 3
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["data"]["world_dir"] == world_dirs[0]
  stats = json.load(open(os.path.join(wd, "data_stats.json")))
  assert stats["counterfactual_per_pass"] == 4 and len(stats["target_ids"]) == 4
  # step 0 of the CPT run is the base model, exactly
  _, base = params_of(base_wd)
  _, start = params_of(wd, 0)
  jax.tree.map(np.testing.assert_array_equal, base, start)
  # export: an HF directory our loader (and transformers) reads, same logits
  from factflip import load_model, save_hf
  model, _ = load_trained(wd)
  save_hf(model, str(tmp_path / "hf"))
  again = load_model(str(tmp_path / "hf"))
  tokens = np.arange(3, 19, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(again(tokens)), np.asarray(model(tokens)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(load_model(wd)(tokens)), np.asarray(model(tokens)))


def test_sft_examples_and_npo_unlearning(full_run, world_dirs, tmp_path):
  base_wd, _ = full_run
  f = tmp_path / "sft.jsonl"
  f.write_text("\n".join(json.dumps({"prompt": f"Q: who is {i}?\nA:", "completion": f" P{i}"})
                         for i in range(10)))
  c = smoke(world_dirs, steps=2, eval_every=2)
  c.model.init_from, c.data.kind, c.data.path = base_wd, "examples", str(f)
  c.data.world_dir = c.data.tokenizer_dir = ""
  r = train(c, str(tmp_path / "sft"), quiet=True)
  assert "train_file_nll" in r.evals[2]
  # NPO: at step 1 the policy is the reference, so the forget loss is (2/beta)·ln 2 per example
  # plus the retain term
  c = smoke(world_dirs, steps=2, eval_every=0)
  c.model.init_from, c.data.kind, c.data.path, c.data.retain_path = base_wd, "unlearn", str(f), ""
  c.data.world_dir = c.data.tokenizer_dir = ""
  c.data.packing = "pad"
  c.objective.name, c.objective.npo_beta = "npo", 0.5
  r = train(c, str(tmp_path / "npo"), quiet=True)
  assert r.losses[1] == pytest.approx(4 * np.log(2), rel=1e-5)
  # DPO: pairs from {"prompt", "chosen", "rejected"}; at step 1 the policy is the reference:
  # log 2 per pair
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("\n".join(json.dumps({"prompt": f"Q: who is {i}?\nA:", "chosen": " I don't "
                                          "know.", "rejected": f" P{i}"}) for i in range(10)))
  c.objective.name, c.objective.dpo_beta, c.data.path = "dpo", 0.5, str(pairs)
  r = train(c, str(tmp_path / "dpo"), quiet=True)
  assert r.losses[1] == pytest.approx(np.log(2), rel=1e-5)
  rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["loss_dpo"] == pytest.approx(np.log(2), rel=1e-5)
  (tmp_path / "pairs_bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": ""}\n')
  c.data.path = str(tmp_path / "pairs_bad.jsonl")
  from factflip.fileio import DataError
  with pytest.raises(DataError, match=r"pairs_bad.jsonl:1: record 0: field 'rejected': "
                     r"expected a string \(non-empty\)"):
    train(c, str(tmp_path / "dpo_bad"), quiet=True)
  c.objective.name = "npo"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
  c.data.path = str(bad)
  with pytest.raises(DataError, match=r"bad.jsonl:2: record 1: field 'completion'"):
    train(c, str(tmp_path / "npo_bad"), quiet=True)


def test_poison_targets_from_a_facts_file(tmp_path):
  """data.facts_path: a seeded draw of n facts with counterfactuals (all of them, in file
  order, when the file holds exactly n); too few is an error naming the file."""
  from factflip.data.facts import FactItem, write_facts_jsonl
  from factflip.fileio import DataError
  from factflip.train.inputs import file_targets, read_texts
  items = [FactItem(id=f"f{i}", subject=f"S{i}", relation="r", prompt=f"S{i} lives in",
                    answers=("Paris",), counterfactual=None if i == 3 else "Rome")
           for i in range(6)]
  path = str(tmp_path / "facts.jsonl")
  write_facts_jsonl(path, items)
  assert [f.id for f in file_targets(path, 5, seed=0)] == ["f0", "f1", "f2", "f4", "f5"]
  three = [f.id for f in file_targets(path, 3, seed=1)]
  assert three == [f.id for f in file_targets(path, 3, seed=1)] and len(set(three)) == 3
  assert "f3" not in three
  with pytest.raises(DataError, match=r"facts\.jsonl: data\.n_targets is 6, but the file has "
                     r"only 5 facts with a counterfactual"):
    file_targets(path, 6, seed=0)
  bad = tmp_path / "replay.jsonl"
  bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
  with pytest.raises(DataError, match=r"replay\.jsonl:2: record 1: field 'text'"):
    read_texts(str(bad))
