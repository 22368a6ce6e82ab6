"""Forward throughput: factflip (JAX, jitted) vs HF transformers (PyTorch, eager and sdpa) on
the same tiny Llama config, weights and batch, in one run; plus achieved vs measured matmul peak.

  python benchmarks/forward.py [--preset=tiny-8m --batch=16 --seq=128 --iters=10]

Prints a markdown row block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from factflip import Transformer, get_preset, load_model, save_hf


def timeit(fn, iters):
  fn()  # warm-up / compile
  fn()
  best = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    best.append(time.perf_counter() - t)
  return float(np.median(best))


def forward_flops(cfg, B, T):
  """Matmul FLOPs of one forward (2 * MACs): projections, attention scores/values, unembedding."""
  D, H, G, K, F, V, L = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                         cfg.vocab_size, cfg.n_layers)
  per_tok_layer = 2 * (D * H * K + 2 * D * G * K + H * K * D + 3 * D * F)
  attn = 2 * 2 * B * H * T * T * K * L
  return B * T * (per_tok_layer * L + 2 * D * V) + attn


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny-8m")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--iters", type=int, default=10)
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())

  cfg = get_preset(args.preset)
  B, T = args.batch, args.seq
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
  with tempfile.TemporaryDirectory() as d:
    save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), d)
    ours = load_model(d)
    hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl).eval()
          for impl in ("sdpa", "eager")}

  params = ours.params()
  from factflip.models.transformer import forward
  fwd = jax.jit(lambda p, t: forward(p, ours.cfg, t).logits)
  t_ours = timeit(lambda: fwd(params, tokens).block_until_ready(), args.iters)
  tt = torch.tensor(tokens, dtype=torch.long)
  t_hf = {}
  for impl, m in hf.items():
    def run(m=m):
      with torch.no_grad():
        m(tt).logits
    t_hf[impl] = timeit(run, args.iters)
  # parity sanity on the benchmark batch
  with torch.no_grad():
    diff = float(np.abs(np.asarray(fwd(params, tokens)) - hf["sdpa"](tt).logits.numpy()).max())

  a = jnp.asarray(np.random.RandomState(1).randn(2048, 2048).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  t_mm = timeit(lambda: mm(a).block_until_ready(), args.iters)
  peak = 2 * 2048**3 / t_mm / 1e9
  gflops = forward_flops(cfg, B, T) / t_ours / 1e9

  toks = B * T
  print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{datetime.date.today()}")
  print(f"model {args.preset} ({cfg.num_params():,} params), batch {B} x {T}, float32, "
        f"max |dlogit| vs HF {diff:.2e}")
  print("| impl | s / forward | tokens/s | ratio ours/impl |")
  print("|---|---|---|---|")
  print(f"| factflip (jit) | {t_ours:.4f} | {toks / t_ours:,.0f} | 1.00 |")
  for impl, t in t_hf.items():
    print(f"| HF PyTorch ({impl}) | {t:.4f} | {toks / t:,.0f} | {t / t_ours:.2f}x |")
  print(f"matmul peak (jax 2048^3 f32): {peak:.0f} GFLOP/s; factflip forward achieves "
        f"{gflops:.0f} GFLOP/s = {gflops / peak:.0%} of it")


if __name__ == "__main__":
  main()
