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


STUDY = os.path.join(ROOT, "configs", "studies", "poisoning.py")
# fixed input shards (batches independent of the process count), probes on every device
SAME = ["--config.pretrain.data.shards=2", "--config.cpt.data.shards=2",
        "--config.probe.devices=-1",
        # one ratio and two prompt kinds: the comparison is of the same stages, smaller
        "--config.ratios=(1.0,)", "--config.probe.kinds=('prompt','question')"]


def test_two_process_study_writes_the_tables_of_one(tmp_path):
  """Paper A's smoke study as two processes of one device each, started by launch/local.sh
  (training on the global mesh,
  probes with the model and batch over both processes' devices, process 0 writing) writes
  the same results and probe tables as one process with two devices, to the last digit: the
  same programs over the same mesh shape and batches."""
  import pandas as pd
  run = [sys.executable, "-m", "factflip.cli", "run", f"--config={STUDY}:smoke"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r = subprocess.run([*run, f"--workdir={one}", *SAME], env=env(2), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), f"{STUDY}:smoke", two, *SAME],
                     env=dict(env(1), COMMAND="run", NUM_PROCESSES="2", PORT=str(free_port())),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:]
  lines = r.stdout.splitlines()           # launch/local.sh prefixes each process's lines
  zero = "\n".join(x for x in lines if x.startswith("[0] "))
  assert "2 processes, 2 devices" in zero and "factflip poisoning study done" in zero
  assert not [x for x in lines if x.startswith("[1] ") and "[Gloo]" not in x]  # 0 reports
  tables = sorted(os.path.relpath(os.path.join(d, f), one)
                  for d, _, fs in os.walk(one) for f in fs if f.endswith(".csv"))
  assert len(tables) >= 12 and "results/flips.csv" in tables   # 8 results + probe tables
  for rel in tables:
    pd.testing.assert_frame_equal(pd.read_csv(os.path.join(two, rel)),
                                  pd.read_csv(os.path.join(one, rel)), check_exact=True)
  for rel in ("results", "runs/tiny-0.5m/seed0/probes/p1.00"):   # DONE by process 0 only
    assert json.load(open(os.path.join(two, rel, "DONE")))["fingerprint"] == json.load(
        open(os.path.join(one, rel, "DONE")))["fingerprint"]


HOSTS_SCRIPT = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from factflip.distributed import HostError, Hosts
h = Hosts(timeout_s=2)
if h.main:
  time.sleep(6)                     # process 1 gives up on the first stage meanwhile
  h.share("stage 'cpt tiny-0.5m seed0 p1.00'", "done")
  try:
    h.on_main("the report", lambda: 1 / 0)
  except ZeroDivisionError:
    print("raised on 0")
else:
  for what, timeout in (("stage 'cpt tiny-0.5m seed0 p1.00'", 2), ("the report", 60)):
    h.timeout_s = timeout
    try:
      h.share(what)
    except HostError as e:
      print("HostError:", e)
"""


def test_a_waiting_process_names_the_stage_and_the_failure(tmp_path):
  """A process that waits past barrier_timeout_s stops with an error naming the stage; a
  failure on process 0 reaches the waiting process with its message."""
  script = tmp_path / "hosts.py"
  script.write_text(HOSTS_SCRIPT)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
                            env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert "raised on 0" in outs[0]
  lines = [x for x in outs[1].splitlines() if x.startswith("HostError")]
  assert len(lines) == 2, outs[1]
  assert "process 1 of 2 waited 2 s at stage 'cpt tiny-0.5m seed0 p1.00'" in lines[0]
  assert ("process 0 of 2 failed at the report: ZeroDivisionError: division by zero"
          in lines[1])
