"""Training throughput: factflip's jitted train step vs an HF PyTorch training step (same tiny
Llama config, weights, batch and AdamW with global-norm clipping), in one run; achieved model
FLOP/s vs the measured float32 matmul peak; and the cost of async Orbax checkpoints at a dense
study interval.

  python benchmarks/train_step.py [--presets=tiny-2m,tiny-8m,tiny-30m --batch=16 --seq=128]
      [--iters=8 --hf_presets=tiny-2m,tiny-8m --ckpt_every=10,25 --remat=none,full
       --vocab=1024 --logits_chunk=0,512 --compute=float32,bfloat16 --kernels]
  python benchmarks/train_step.py --presets=SmolLM2-135M-Instruct.Q4_1.gguf \
      --hf_presets=SmolLM2-135M-Instruct.Q4_1.gguf --batch=8 --seq=64 --ckpt_preset=none

A "preset" may also be a model path (HF or factflip directory, .gguf file): its architecture
(random weights of that shape on both sides; a step's time does not depend on the values).
Every (remat, logits_chunk, compute dtype) triple is a row; bfloat16 compute keeps float32
parameters on both sides (factflip's model.dtype, torch.autocast on the HF step); "grad temp
MB" is the compiled loss gradient's temporaries at peak (XLA's buffer assignment), the memory
`model.logits_chunk` saves.

Prints markdown blocks for benchmarks/RESULTS.md.
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

from factflip import get_preset
from factflip.train import objectives
from factflip.train.checkpoint import Checkpointer
from factflip.train.optim import OptimConfig, make_optimizer
from factflip.train.step import init_state, make_train_step

OPT = OptimConfig(name="adamw", lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.1,
                  b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)


def model_flops(cfg, B, T):
  """6·N·tokens (non-embedding matmul parameters + the unembedding) + attention (fwd 4·B·H·T²·K
  per layer, ×3 for forward + backward)."""
  D, H, G, K, F, V, L = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                         cfg.vocab_size, cfg.n_layers)
  n_matmul = L * (D * H * K + 2 * D * G * K + H * K * D + 3 * D * F) + D * V
  return 6 * n_matmul * B * T + 3 * 4 * B * H * T * T * K * L


def batch_of(cfg, B, T, seed=0):
  inp = np.random.default_rng(seed).integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": np.ones((B, T), np.int32),
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def median_seconds(fn, iters, warmup=2):
  """Median wall time of `fn()` over `iters` calls after `warmup` untimed ones (fn blocks until
  its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def time_ours(cfg, batch, iters):
  tx = make_optimizer(OPT)
  state = init_state(cfg, tx, jax.random.key(0))
  step = make_train_step(cfg, tx, objectives.lm_objective())
  b = jax.device_put(batch)

  def one():
    nonlocal state
    state, m = step(state, b)
    jax.block_until_ready(m)
  return median_seconds(one, iters), state, step, b


def config_of(name: str, **over):
  """A preset by name, or the architecture of a model path (directory or .gguf)."""
  from factflip import presets
  if name in presets():
    return get_preset(name, **over)
  from factflip.models.store import model_config
  return model_config(name).replace(**over)


def time_hf(cfg, batch, iters):
  import torch
  import transformers
  from flax import nnx

  from factflip import Transformer, save_hf
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as d:
    save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
  model.train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  other = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": other, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95),
                          eps=1e-8)
  inp = torch.tensor(batch["inputs"], dtype=torch.long)
  tgt = torch.tensor(batch["targets"], dtype=torch.long)

  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

  def step():
    with autocast:
      logits = model(inp).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)
  return median_seconds(step, iters)


def matmul_peak(iters):
  a = jnp.asarray(np.random.RandomState(1).randn(2048, 2048).astype(np.float32))
  mm = jax.jit(lambda x: x @ x)
  return 2 * 2048 ** 3 / median_seconds(lambda: mm(a).block_until_ready(), iters, 1) / 1e9


def grad_temp_mb(cfg, batch) -> float:
  """Peak temporaries of the compiled loss gradient, MB."""
  from factflip.models.transformer import init_params
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  grad = jax.jit(jax.grad(lambda p, b: objectives.lm(p, cfg, b)[0]))
  return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes / 1e6


def kernel_table(cfg, N, iters, rounds=3):
  """The preset's forward matmul shapes [N, in] x [in, out] (and their weight-gradient
  transposes [in, N] x [N, out]) timed with XLA (jit) and with torch on the same threads,
  alternated `rounds` times, the best of each: how fast each library's kernels are at the
  shapes the step runs, which bounds the step ratio whatever the graph around them does."""
  import torch
  torch.set_num_threads(os.cpu_count())
  D, H, G, K, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                      cfg.vocab_size)
  shapes = sorted({(D, H * K), (D, G * K), (H * K, D), (D, F), (F, D), (D, V)})
  mm = jax.jit(lambda a, b: a @ b)
  wg = jax.jit(lambda a, c: a.T @ c)
  rows = []
  for i, o in shapes:
    r = np.random.RandomState(0)
    a, b, c = (r.randn(N, i).astype(np.float32), r.randn(i, o).astype(np.float32),
               r.randn(N, o).astype(np.float32))
    ja, jb, jc = jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
    calls = {"jf": lambda: mm(ja, jb).block_until_ready(), "tf": lambda: ta @ tb,  # noqa: B023
             "jw": lambda: wg(ja, jc).block_until_ready(), "tw": lambda: ta.T @ tc}  # noqa: B023
    best = {k: np.inf for k in calls}    # each call runs within this iteration of `shapes`
    for _ in range(rounds):
      for k, f in calls.items():
        best[k] = min(best[k], median_seconds(f, iters, 1))
    gf = 2 * N * i * o / 1e9
    rows.append((f"[{N}, {i}] x [{i}, {o}]", gf / best["jf"], gf / best["tf"],
                 gf / best["jw"], gf / best["tw"]))
  return rows


class _NoData:
  def get_state(self):
    return b"{}"


def save_costs(state, n=4):
  """Per async save of `state`: seconds the training thread is blocked in save() (device->host
  copy, directory set-up) and seconds the background write takes after it (median of n)."""
  block, background = [], []
  with tempfile.TemporaryDirectory() as d:
    ck = Checkpointer(d, every=1, keep=0, async_save=True)
    for i in range(1, n + 1):
      t = time.perf_counter()
      ck.save(i, state, _NoData())
      t1 = time.perf_counter()
      ck.wait()
      block.append(t1 - t)
      background.append(time.perf_counter() - t1)
    ck.close()
  return float(np.median(block)), float(np.median(background))


def loop_with_saves(state, step, b, every, n_steps, rounds=3):
  """s/step of a loop saving every `every` steps vs the same loop without saves, alternated
  `rounds` times (min of each): the direct measurement, noisy on a shared 2-core machine."""
  def run(save_every):
    nonlocal state
    with tempfile.TemporaryDirectory() as d:
      ck = Checkpointer(d, every=save_every or 1, keep=0, async_save=True)
      t = time.perf_counter()
      for i in range(1, n_steps + 1):
        state, m = step(state, b)
        if save_every and i % save_every == 0:
          ck.save(i, state, _NoData())
      jax.block_until_ready(m)
      dt = time.perf_counter() - t
      ck.wait()
      ck.close()
    return dt / n_steps
  base, with_ck = [], []
  for _ in range(rounds):
    base.append(run(0))
    with_ck.append(run(every))
  return min(base), min(with_ck), state


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--presets", default="tiny-2m,tiny-8m,tiny-30m")
  ap.add_argument("--hf_presets", default="tiny-2m,tiny-8m")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--iters", type=int, default=8)
  ap.add_argument("--ckpt_every", default="10,25")
  ap.add_argument("--ckpt_preset", default="tiny-8m")
  ap.add_argument("--remat", default="none",
                  help="comma-separated model.remat policies, each timed (the first is the row "
                       "compared with HF)")
  ap.add_argument("--vocab", type=int, default=0, help="vocab_size (0 = the preset's)")
  ap.add_argument("--kernels", action="store_true",
                  help="also time the presets' matmul shapes with XLA and with torch")
  ap.add_argument("--logits_chunk", default="0",
                  help="comma-separated model.logits_chunk values, each timed")
  ap.add_argument("--compute", default="float32",
                  help="comma-separated compute dtypes (float32, bfloat16), each timed")
  args = ap.parse_args()
  import torch
  import transformers

  B, T = args.batch, args.seq
  print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{datetime.date.today()}; batch {B} x {T}, float32, AdamW + clip 1.0")
  peak = matmul_peak(args.iters)
  print(f"matmul peak (jax 2048^3 f32): {peak:.0f} GFLOP/s")
  print("| preset | remat | logits_chunk | compute | params | factflip s/step | tokens/s | "
        "HF PyTorch s/step | tokens/s | ours/HF | model GFLOP/s | of peak | grad temp MB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  kept = {}
  vocab = {"vocab_size": args.vocab} if args.vocab else {}
  for name in args.presets.split(","):
    t_hf = {}
    variants = [(r, int(c), d) for r in args.remat.split(",")
                for c in args.logits_chunk.split(",") for d in args.compute.split(",")]
    for remat, chunk, dtype in variants:
      cfg = config_of(name, remat=remat, logits_chunk=chunk, dtype=dtype, **vocab)
      batch = batch_of(cfg, B, T)
      t_ours, state, step, b = time_ours(cfg, batch, args.iters)
      if (remat, chunk, dtype) == variants[0]:
        kept[name] = (state, step, b)
      gf = model_flops(cfg, B, T) / t_ours / 1e9
      if name in args.hf_presets.split(","):
        t_hf[dtype] = t_hf.get(dtype) or time_hf(cfg, batch, args.iters)
        hf = f"{t_hf[dtype]:.4f} | {B * T / t_hf[dtype]:,.0f} | {t_hf[dtype] / t_ours:.2f}x"
      else:
        hf = "- | - | -"
      label = os.path.basename(name.rstrip("/"))
      print(f"| {label} | {remat} | {chunk} | {dtype} | {cfg.num_params():,} | {t_ours:.4f} | "
            f"{B * T / t_ours:,.0f} | {hf} | {gf:.0f} | {gf / peak:.0%} | "
            f"{grad_temp_mb(cfg, batch):.0f} |")
    if name != args.ckpt_preset:
      kept.pop(name)
  if args.kernels:
    print("\n| preset | matmul | XLA GFLOP/s | torch GFLOP/s | XLA/torch | weight-grad XLA | "
          "weight-grad torch | XLA/torch |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
      for shape, jf, tf, jw, tw in kernel_table(config_of(name, **vocab), B * T, args.iters):
        print(f"| {name} | {shape} | {jf:.0f} | {tf:.0f} | {jf / tf:.2f}x | {jw:.0f} | {tw:.0f} "
              f"| {jw / tw:.2f}x |")
  if args.ckpt_preset in kept:
    state, step, b = kept[args.ckpt_preset]
    block, background = save_costs(state)
    print(f"\nasync checkpoint cost ({args.ckpt_preset}, full train state incl. AdamW moments, "
          f"local disk): per save {block:.3f} s blocking + {background:.3f} s background write")
    print("| save every | s/step without | s/step with (measured) | overhead measured | "
          "bound: (blocking + background) / interval |")
    print("|---|---|---|---|---|")
    for every in map(int, args.ckpt_every.split(",")):
      base, with_ck, state = loop_with_saves(state, step, b, every, n_steps=2 * every)
      bound = (block + background) / (every * base)
      print(f"| {every} steps | {base:.4f} | {with_ck:.4f} | {with_ck / base - 1:+.1%} | "
            f"{bound:.1%} |")


if __name__ == "__main__":
  main()
