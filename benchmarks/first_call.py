"""First-call latency of a patching sweep in a fresh process: with the persistent compilation
cache off, with it cold (empty directory), and warm (the directory the cold run filled), side by
side in one run. Each measurement is its own `python` process (the in-memory caches start empty),
on the model of benchmarks/patching.py (12 layers, d_model 128, 32 tokens, vocab 4,096).
Then shape buckets: one sweep per prompt length in `--lengths` (a notebook sweeping prompts one
after another), cache off, with act_patch's buckets on and off, each in its own process.

  python benchmarks/first_call.py [--layers=12 --d_model=128 --seq=32 --vocab=4096
                                   --lengths=25-32]

Prints a markdown block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, numpy as np
from factflip import compile_cache
compile_cache.enable(sys.argv[1])
if len(sys.argv) > 6:    # the tests: write every program, however fast it compiled
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(sys.argv[6]))
events = {"hits": 0, "misses": 0}
def on(name, **kw):
  for k in events:
    if name.endswith("cache_" + k):
      events[k] += 1
jax.monitoring.register_event_listener(on)
from flax import nnx
from factflip.models.config import ModelConfig
from factflip.models.transformer import Transformer
from factflip.probes.patching import act_patch
L, D, T, V = (int(x) for x in sys.argv[2:6])
cfg = ModelConfig(family="llama", vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2,
                  head_dim=D // 4, d_ff=4 * D, max_seq_len=256, tie_embeddings=True)
m = Transformer(cfg, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
clean = rng.integers(0, V, (8, T))
corrupt = clean.copy()
corrupt[:, T // 4] = 7
metric = lambda l: l[:, -1, 5] - l[:, -1, 9]
t = time.perf_counter()
out = act_patch(m, corrupt, clean, metric)
first = time.perf_counter() - t
t = time.perf_counter()
act_patch(m, corrupt, clean, metric)
steady = time.perf_counter() - t
print(json.dumps({"first_s": first, "steady_s": steady, "process_s": time.perf_counter() - t0,
                  **events, "checksum": float(np.sum(out))}))
"""


LENGTHS = r"""
import json, sys, time
import jax, numpy as np
from flax import nnx
from factflip.models.config import ModelConfig
from factflip.models.transformer import Transformer
from factflip.probes.patching import _sweep, act_patch
L, D, V = (int(x) for x in sys.argv[1:4])
lengths = [int(x) for x in sys.argv[4].split(",")]
buckets = sys.argv[5] == "1"
cfg = ModelConfig(family="llama", vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2,
                  head_dim=D // 4, d_ff=4 * D, max_seq_len=256, tie_embeddings=True)
m = Transformer(cfg, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
metric = lambda l: l[:, -1, 5] - l[:, -1, 9]
prompts = []
for T in lengths:
  clean = rng.integers(0, V, (8, T))
  corrupt = clean.copy()
  corrupt[:, T // 4] = 7
  prompts.append((corrupt, clean))
outs, t = [], time.perf_counter()
for corrupt, clean in prompts:
  outs.append(act_patch(m, corrupt, clean, metric, buckets=buckets))
total = time.perf_counter() - t
t = time.perf_counter()
for corrupt, clean in prompts:
  act_patch(m, corrupt, clean, metric, buckets=buckets)
again = time.perf_counter() - t
print(json.dumps({"total_s": total, "again_s": again, "programs": _sweep._cache_size(),
                  "values": [o.tolist() for o in outs]}))
"""


def run_lengths(buckets: bool, args) -> dict:
  out = subprocess.run([sys.executable, "-c", LENGTHS, str(args.layers), str(args.d_model),
                        str(args.vocab), args.lengths, "1" if buckets else "0"],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(cache: str, args) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, cache, str(args.layers), str(args.d_model),
                        str(args.seq), str(args.vocab)], capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--lengths", default="25-32", help="prompt lengths, a-b or a,b,c")
  args = ap.parse_args()
  if "-" in args.lengths:
    a, b = (int(x) for x in args.lengths.split("-"))
    args.lengths = ",".join(str(n) for n in range(a, b + 1))
  with tempfile.TemporaryDirectory() as d:
    rows = {"off": run("off", args), "cold": run(d, args), "warm": run(d, args)}
  assert len({r["checksum"] for r in rows.values()}) == 1, "a cached program computed otherwise"
  print(f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        f"`python benchmarks/first_call.py --layers={args.layers} --d_model={args.d_model} "
        f"--seq={args.seq} --vocab={args.vocab}`\n")
  print("| cache | first act_patch s | steady s | process s (import → second call) | "
        "cache hits | misses |")
  print("|---|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['first_s']:.2f} | {r['steady_s']:.3f} | {r['process_s']:.1f} | "
          f"{r['hits']} | {r['misses']} |")
  print(f"\nwarm vs off, first call: {rows['off']['first_s'] / rows['warm']['first_s']:.1f}x "
        "faster; the same sweep values in all three.")

  exact, bucketed = run_lengths(False, args), run_lengths(True, args)
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(exact["values"], bucketed["values"]))
  n = len(args.lengths.split(","))
  print(f"\nOne sweep per prompt length {args.lengths} ({n} prompts of 8 rows), fresh process, "
        "persistent cache off:\n")
  print("| act_patch | compiled sweeps | first pass s | second pass s (all compiled) |")
  print("|---|---|---|---|")
  for name, r in (("buckets=False (exact shapes)", exact), ("buckets=True (default)", bucketed)):
    print(f"| {name} | {r['programs']} | {r['total_s']:.2f} | {r['again_s']:.2f} |")
  print(f"\nfirst pass: {exact['total_s'] / bucketed['total_s']:.2f}x faster with buckets; "
        f"second pass (the padding's cost): {exact['again_s'] / bucketed['again_s']:.2f}x; "
        f"largest difference between the two: {diff:.2e}.")


if __name__ == "__main__":
  main()
