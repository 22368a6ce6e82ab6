"""Two processes on 127.0.0.1 (gloo collectives) train the same job as one process, through
the `factflip train` command, and match it."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from factflip.train.checkpoint import load_trained, valid_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def command(workdir, world, tokenizer, extra=()):
  return [sys.executable, "-m", "factflip.cli", "train",
          f"--config={ROOT}/configs/pretrain_tiny.py:smoke", f"--workdir={workdir}",
          f"--config.data.world_dir={world}", f"--config.data.tokenizer_dir={tokenizer}",
          "--config.data.shards=2", "--config.data.seq_len=32", "--config.steps=4",
          "--config.eval_every=2", "--config.checkpoint.every=2", *extra]


def env(devices: int):
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return e


@pytest.fixture(scope="module")
def world_dirs(small_world, world_tokenizer, tmp_path_factory):
  from factflip.data.world import write_world

  d = str(tmp_path_factory.mktemp("mh_world") / "world")
  write_world(small_world, d)
  return d, world_tokenizer.name_or_path


def test_two_processes_match_one(world_dirs, tmp_path):
  world, tok = world_dirs
  one = str(tmp_path / "one")
  r = subprocess.run(command(one, world, tok), env=env(4), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]

  two = str(tmp_path / "two")
  port = free_port()
  procs = [subprocess.Popen(
      command(two, world, tok, [f"--coordinator_address=127.0.0.1:{port}",
                                "--num_processes=2", f"--process_id={i}"]),
      env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "step 4/4" in outs[0][0] and "step 4/4" not in outs[1][0]  # only process 0 reports

  rows = {n: [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
          for n, d in (("one", one), ("two", two))}
  assert [x["step"] for x in rows["two"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([x["loss"] for x in rows["two"]], [x["loss"] for x in rows["one"]],
                             rtol=1e-5)
  np.testing.assert_allclose(rows["two"][3]["heldout_answer_nll"],
                             rows["one"][3]["heldout_answer_nll"], rtol=1e-5)
  assert valid_steps(os.path.join(two, "checkpoints")) == [0, 2, 4]
  for i in range(2):  # each process saved its own input-iterator state
    st = json.loads(open(os.path.join(two, "checkpoints", "4", "data",
                                      f"process_{i}-of-2.json")).read())
    assert st["shard_ids"] == [i]
  a, _ = load_trained(one)
  b, _ = load_trained(two)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                                       atol=1e-6), a.params(), b.params())
