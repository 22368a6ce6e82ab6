"""Paper A's probe stage on one CPT run (16 checkpoints: preference + logit lens of targets,
controls and two-hop items, and cross-model patching), as the study runs it now vs as it ran
before scorer version 3 (each checkpoint: the prompts tokenised and laid out again, the true
and the counterfactual answers scored by two calls, the prompt run twice), side by side in one
process, alternating, each timed warm (its programs compiled by a first pass).

  factflip run --workdir=/tmp/pois          # the default poisoning study, once
  python benchmarks/probe_stage.py /tmp/pois [--p=1.0 --repeats=2]

Prints a markdown block for benchmarks/RESULTS.md, with the largest difference between the
two paths' ΔLL and lens columns and whether every state (τ) is the same.
"""

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import jax
import numpy as np
import pandas as pd

from factflip.data.tokenizer import TokenIds
from factflip.evals.checkpoints import table_path, table_steps
from factflip.evals.loglik import score_pairs
from factflip.evals.requests import answer_ids
from factflip.probes.fact_preference import prompt_rows, states
from factflip.studies.poisoning import Study


def two_call_preference(model, tok, items, kinds, batch_size):
  """`fact_preference.preference(lens=True)` as scorer version 2 computed it."""
  rows = prompt_rows(items, kinds)
  enc = TokenIds(tok)
  out = {}
  for key in ("true", "cf"):
    pairs = [answer_ids(enc, r["prompt"], r[key], f"pair {i}") for i, r in enumerate(rows)]
    s = score_pairs(model, pairs, batch_size, lens=True)
    out[key] = s
  df = pd.DataFrame({k: [r[k] for r in rows] for k in rows[0]})
  lens = (out["true"].lens - out["cf"].lens).T
  df["logp_true"], df["logp_cf"] = out["true"].logprob, out["cf"].logprob
  df["dll"], df["correct"] = df.logp_true - df.logp_cf, out["true"].greedy
  for layer in range(lens.shape[1]):
    df[f"dll_l{layer}"] = lens[:, layer]
  return df


def old_stage(st, out, size, seed, p):
  """build_probe's work with the two-call preference (same checkpoints, tables, patching)."""
  from factflip.evals.checkpoints import CheckpointProbe, probe_checkpoints
  from factflip.probes.fact_patching import patch_items
  tok = st.tokenizer(size)
  targets, controls, two_hop = st.targets(size, seed), st.controls(size, seed), st.two_hop(
      size, seed)
  subject = {t.id: t.subject for t in targets}
  rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(targets, kinds=("prompt",))]
  base = st.load(st.base_path(size, seed))
  kinds, bs = tuple(st.c.probe.kinds), st.c.probe.batch_size

  def prefs(model, step):
    df = two_call_preference(model, tok, targets + controls, kinds, bs)
    if two_hop:
      df = pd.concat([df, two_call_preference(model, tok, two_hop, ("prompt", "question"), bs)])
    return df

  def patch(model, step):
    return pd.DataFrame(patch_items(model, base, tok, rows, sites=tuple(st.c.probe.patch_sites),
                                    windows=tuple(st.c.probe.patch_windows),
                                    groups=tuple(st.c.probe.patch_groups)))
  every = st.c.probe.patch_every
  return probe_checkpoints(st.checkpoints(size, seed, p), out,
                           [CheckpointProbe("step", prefs),
                            CheckpointProbe("patch", patch, lambda i, s: s > 0 and i % every == 0)],
                           st.load, lambda *a: None)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("--p", type=float, default=1.0)
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  st = Study.open(a.workdir, log=lambda *x: None)
  size, seed = next(iter(st.sizes)), int(st.c.seeds[0])
  tmp = tempfile.mkdtemp()
  times = {"v2: two calls per checkpoint": [], "now: one call, layout kept": []}
  fns = dict(zip(times, (lambda o: old_stage(st, o, size, seed, a.p),
                         lambda o: st.build_probe(o, size, seed, a.p))))
  try:
    for r in range(a.repeats + 1):          # pass 0 compiles
      for name, fn in fns.items():
        out = os.path.join(tmp, f"{len(name)}_{r}")
        os.makedirs(out)
        t = time.perf_counter()
        fn(out)
        if r:
          times[name].append(time.perf_counter() - t)
    old, new = (os.path.join(tmp, f"{len(n)}_1") for n in times)
    diff, same_states, n_rows = 0.0, True, 0
    for step in table_steps(new, "step"):
      x = pd.read_csv(table_path(old, "step", step), keep_default_na=False)
      y = pd.read_csv(table_path(new, "step", step), keep_default_na=False)
      x = x.drop(columns="set", errors="ignore").reset_index(drop=True)
      cols = [c for c in x if c == "dll" or c.startswith("dll_l")]
      diff = max(diff, float(np.abs(x[cols].values - y[cols].values).max()))
      same_states &= bool((states(x.dll.values, st.c.tau) == states(y.dll.values, st.c.tau)).all())
      same_states &= bool((x.correct.values == y.correct.values).all())
      n_rows += len(y)
    steps = len(table_steps(new, "step"))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"### Probe stage, {datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}\n")
  print(f"`python benchmarks/probe_stage.py {a.workdir} --p={a.p} --repeats={a.repeats}`: "
        f"{size} seed {seed} p {a.p}, {steps} checkpoints ({n_rows} preference rows in all, "
        f"patching at every {st.c.probe.patch_every}. of them but step 0), warm, median of "
        f"{a.repeats} alternating passes.\n")
  print("| probe stage | seconds | speed-up |")
  print("|---|---|---|")
  base = np.median(next(iter(times.values())))
  for name, ts in times.items():
    print(f"| {name} | {np.median(ts):.2f} | {base / np.median(ts):.2f}x |")
  print(f"\nLargest |Δ| of ΔLL and lens columns between the two: {diff:.2e} nats; every state "
        f"at τ = {st.c.tau} and every greedy answer {'the same' if same_states else 'NOT same'}.")


if __name__ == "__main__":
  main()
