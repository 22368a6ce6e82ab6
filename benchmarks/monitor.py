"""The factual-integrity monitor's cost during continual pretraining: the same CPT run (paper A's
p = 1 run of a poisoning study workdir: its resolved config, base model, targets and controls)
with the monitor off and on at several intervals, side by side in one process, alternating
(off, k1, k2, ..., off, k1, ...) so the VM's drift hits every variant alike; and one
observation timed directly against one training step.

  factflip run --workdir=/tmp/pois          # the default poisoning study, once
  python benchmarks/monitor.py /tmp/pois [--every=8,4,2 --steps=40 --repeats=2]

Step time = wall time of steps 11 .. steps from metrics.jsonl rows (tokens / tokens_per_s),
checkpoints and held-out evaluations off. Prints a markdown block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np

from factflip.train.config import base_config
from factflip.train.loop import train


def steady_seconds(workdir: str, skip: int) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(x) for x in f]
  rows = [r for r in rows if r["step"] > skip and "tokens_per_s" in r]
  by_step = {r["step"]: r for r in rows}
  # each row's tokens_per_s covers the steps since the previous row
  steps = sorted(by_step)
  total = sum((b - a) * TOKENS / by_step[b]["tokens_per_s"]
              for a, b in zip([skip] + steps[:-1], steps))
  return total / (steps[-1] - skip)


def main():
  global TOKENS
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("--every", default="8,4,2")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  (run,) = glob.glob(os.path.join(a.workdir, "runs", "*", "seed0", "cpt_p1.00"))
  c = base_config()   # keys added since that run was made keep their defaults
  with open(os.path.join(run, "config.json")) as f:
    c.update(ml_collections.ConfigDict(json.load(f)))
  c.monitor.watch = os.path.join(run, "watch", "targets.jsonl")
  c.monitor.controls = os.path.join(run, "watch", "controls.jsonl")
  c.steps, c.log_every, c.eval_every = a.steps, 1, 0
  c.checkpoint.every, c.checkpoint.async_save = 10 ** 6, True
  TOKENS = c.data.batch_size * c.data.seq_len
  variants = [0] + [int(k) for k in a.every.split(",")]
  skip = 10
  times = {k: [] for k in variants}
  tmp = tempfile.mkdtemp()
  try:
    for r in range(a.repeats):
      for k in variants:
        c.monitor.every = k
        wd = os.path.join(tmp, f"k{k}_{r}")
        train(c, wd, quiet=True)
        times[k].append(steady_seconds(wd, skip))
    # one observation against one step, directly (the monitor of the last run, warm)
    from factflip.data.tokenizer import load_tokenizer
    from factflip.train.checkpoint import load_trained
    from factflip.train.monitor import Monitor
    model, _ = load_trained(wd)
    c.monitor.every = 1
    tok = load_tokenizer(c.data.tokenizer_dir)
    mon = Monitor(c, tok, model.cfg, os.path.join(tmp, "direct"))
    # the same watch list without the lens rules: the output alone is scored
    c.monitor.rules = tuple(r for r in c.monitor.rules if not r.startswith("lens_sign"))
    mon_out = Monitor(c, tok, model.cfg, os.path.join(tmp, "direct_out"))
    params = model.params()
    obs, obs_out = [], []
    for m, ts in ((mon, obs), (mon_out, obs_out)) * 2:
      m.values(params)
      for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(m.values(params))
        ts.append(time.perf_counter() - t)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  base = np.median(times[0])
  print(f"### Monitor overhead, {datetime.date.today()}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}\n")
  print(f"`python benchmarks/monitor.py {a.workdir} --every={a.every} --steps={a.steps} "
        f"--repeats={a.repeats}`: {run}'s CPT ({c.data.batch_size} x {c.data.seq_len} tokens "
        f"per step), watch list {len(mon.rows)} prompts ({mon.layout.keys.size} answer pairs), "
        f"median over {a.repeats} alternating runs of the steady step time (steps "
        f"{skip + 1}-{a.steps}).\n")
  print("| monitor | step time (ms) | overhead |")
  print("|---|---|---|")
  for k in variants:
    m = np.median(times[k])
    print(f"| {'off' if k == 0 else f'every {k} steps'} | {m * 1e3:.1f} | "
          f"{'—' if k == 0 else f'{(m / base - 1) * 100:+.1f}%'} |")
  print(f"\nOne observation (ΔLL + logit lens of every watched prompt, on the live parameters): "
        f"{np.median(obs) * 1e3:.1f} ms median of 10 = {np.median(obs) / base:.2f} training "
        f"steps; without lens rules (the output only): {np.median(obs_out) * 1e3:.1f} ms = "
        f"{np.median(obs_out) / base:.2f} steps ({np.median(obs) / np.median(obs_out):.2f}x "
        f"cheaper), alternated with it.")


if __name__ == "__main__":
  main()
