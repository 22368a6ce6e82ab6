"""A full resid_pre patching sweep (all layers x all positions) three ways, in one run, same
model, prompts and metric: factflip's `act_patch` (one compiled program, prefix reuse, logits
only where the metric reads), a per-cell loop of jitted factflip forwards, and the
TransformerLens way (a per-cell loop of eager PyTorch forwards of the same HF model with a
forward hook that overwrites the residual stream).

  python benchmarks/patching.py [--layers=12 --d_model=128 --seq=32 --vocab=4096 --iters=3]

Prints a markdown block for benchmarks/RESULTS.md.
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

from factflip import Transformer, load_model, save_hf
from factflip.models.config import ModelConfig
from factflip.models.transformer import forward
from factflip.probes import capture, replace
from factflip.probes.patching import act_patch, sweep_cost


def metric(logits_BxPxV):
  return logits_BxPxV[:, -1, 5] - logits_BxPxV[:, -1, 9]


def best_of(fn, iters):
  fn()
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn()
    ts.append(time.perf_counter() - t)
  return min(ts), out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--iters", type=int, default=3)
  args = ap.parse_args()
  import torch
  import transformers
  from flax import nnx
  torch.set_num_threads(os.cpu_count())

  L, D, T = args.layers, args.d_model, args.seq
  cfg = ModelConfig(family="llama", vocab_size=args.vocab, d_model=D, n_layers=L, n_heads=4,
                    n_kv_heads=2, head_dim=D // 4, d_ff=4 * D, max_seq_len=256,
                    tie_embeddings=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  r = np.random.default_rng(0)
  clean = r.integers(3, args.vocab, (1, T)).astype(np.int32)
  corrupted = clean.copy()
  corrupted[0, 3:6] = r.integers(3, args.vocab, 3)

  # (1) factflip act_patch
  t_ours, ours = best_of(lambda: act_patch(model, corrupted, clean, metric), args.iters)

  # (2) per-cell loop of jitted factflip forwards (one compiled forward, L*T calls)
  caps = capture(model, clean, ["resid_pre"])["resid_pre"]
  params = model.params()
  fwd = jax.jit(lambda p, tok, iv: metric(forward(p, cfg, tok, interventions=(iv,)).logits))

  ivs = [[replace("resid_pre", caps, layers=jnp.asarray([layer]), positions=jnp.asarray([t]))
          for t in range(T)] for layer in range(L)]  # built once, outside the timing

  def loop_jax():
    out = [[fwd(params, corrupted, ivs[layer][t]) for t in range(T)] for layer in range(L)]
    return np.asarray(jax.device_get(out))[..., 0]
  t_loop, loop = best_of(loop_jax, args.iters)

  # (3) TransformerLens-style: eager PyTorch, forward pre-hook overwriting the residual
  with tempfile.TemporaryDirectory() as d:
    save_hf(model, d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    assert load_model(d).cfg.n_layers == L
  tc, tk = torch.tensor(clean, dtype=torch.long), torch.tensor(corrupted, dtype=torch.long)
  with torch.no_grad():
    clean_res = hf(tc, output_hidden_states=True).hidden_states  # [L+1] of [1, T, D]

  def loop_torch():
    out = np.zeros((L, T))
    for layer in range(L):
      for t in range(T):
        def hook(module, inputs, kwargs, layer=layer, t=t):
          h = inputs[0] if inputs else kwargs["hidden_states"]
          h = h.clone()
          h[:, t] = clean_res[layer][:, t]
          if inputs:
            return (h, *inputs[1:]), kwargs
          kwargs["hidden_states"] = h
          return inputs, kwargs
        handle = hf.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
          lg = hf(tk).logits
        handle.remove()
        out[layer, t] = float(lg[0, -1, 5] - lg[0, -1, 9])
    return out
  t_tl, tl = best_of(loop_torch, args.iters)

  # matmul FLOPs (attention scores over T = 32 tokens are < 2% and left out): per token and
  # block q, o D² each, k, v D²/2 each (2 KV heads of 4), MLP 3 x D x 4D
  cost = sweep_cost(model, corrupted, clean, metric)
  block_flops = 2 * (3 * D * D + 12 * D * D)       # per token
  unembed_flops = 2 * D * args.vocab              # per token
  full_fwd_flops = T * (L * block_flops + unembed_flops)
  ours_flops = (cost["block_tokens"] * block_flops
                + cost["unembed_share"] * L * T * T * unembed_flops)
  share = ours_flops / (L * T * full_fwd_flops)
  memory = {c: sweep_cost(model, corrupted, clean, metric, chunk=c)["temp_bytes"]
            for c in (64, 256, 1024, None)}
  print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {datetime.date.today()}")
  print(f"model: Llama-shaped, {L} layers, d_model {D}, 4 heads (2 KV), vocab {args.vocab}, "
        f"{cfg.num_params():,} params; prompt {T} tokens; full resid_pre sweep = {L * T} cells")
  print(f"max |ours - loop| = {np.abs(ours[0] - loop).max():.2e}; "
        f"max |ours - TransformerLens-style| = {np.abs(ours[0] - tl).max():.2e}")
  print("| implementation | s / sweep | ours faster by |")
  print("|---|---|---|")
  print(f"| factflip act_patch (one program) | {t_ours:.3f} | 1.00x |")
  print(f"| per-cell loop of jitted factflip forwards | {t_loop:.3f} | {t_loop / t_ours:.1f}x |")
  print(f"| per-cell loop, eager PyTorch + hook (TransformerLens way) | {t_tl:.3f} | "
        f"{t_tl / t_ours:.1f}x |")
  print(f"FLOPs the sweep performs: {share:.1%} of L x T full forwards ({ours_flops / 1e9:.1f} "
        f"GFLOP, {ours_flops / t_ours / 1e9:.0f} GFLOP/s): blocks below the patched layer and "
        f"positions before the patch skipped, unembedding at the last position only; "
        f"{cost['packed_tokens']} packed tokens per layer for {L}x{T} cells")
  print("peak temporary memory by chunk (packed tokens per step): "
        + ", ".join(f"{c}: {m / 2**20:.1f} MiB" for c, m in memory.items()))


if __name__ == "__main__":
  main()
