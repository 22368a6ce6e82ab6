"""Per-example gradients: `probes.gradients.per_example_grads` (vmapped in chunks, one compiled
program) against a loop of jitted single-example gradients, and against PyTorch's
`torch.func.vmap(torch.func.grad(...))` on the same HF model, side by side in one run, and
against the floor: one batched gradient of the summed example losses (what any per-example
method must at least compute).

The model is a random HF Llama (tied embeddings) saved with `save_pretrained` and loaded by
factflip with `load_model(dir)`; both sides compute every example's gradient of its mean
answer-token NLL over all parameters, on the same padded batch (N examples of T tokens, the
last `answer` real tokens of each trained). Correctness: the per-example gradient norms and the
N x N cosine matrices agree across the two frameworks (parameter layouts differ, these do not).
Each side: a first call (compiles / warms), then the best of --iters.

  python benchmarks/per_example_grads.py [--n=64 --t=32 --chunk=16 --d_model=128 --layers=6]

Prints a markdown block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import platform
import tempfile
import time

import numpy as np


def batch(n, t, vocab, seed=0):
  rng = np.random.default_rng(seed)
  inp = rng.integers(3, vocab, (n, t)).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, n)
  mask = np.zeros((n, t), np.int32)
  seg = np.zeros((n, t), np.int32)
  for i, L in enumerate(lengths):
    seg[i, :L] = 1
    mask[i, L - 4:L - 1] = 1                 # the answer's targets
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": mask, "segment_ids": seg,
          "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1))}


def best(fn, iters):
  t = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return out, first, min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=64)
  ap.add_argument("--t", type=int, default=32)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--iters", type=int, default=2)
  a = ap.parse_args()
  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from factflip import load_model
  from factflip.probes import gradients as GR
  from factflip.train.objectives import token_logprobs

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model,
                                 intermediate_size=4 * a.d_model, num_hidden_layers=a.layers,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, tie_word_embeddings=True)
  tm = transformers.LlamaForCausalLM(cfg).eval()
  d = tempfile.mkdtemp()
  tm.save_pretrained(d)
  model = load_model(d)
  params, mcfg = model.params(), model.cfg
  b = batch(a.n, a.t, a.vocab)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  ours = lambda: np.asarray(GR.per_example_grads(params, mcfg, b, chunk=a.chunk))
  G, ours_first, ours_s = best(ours, a.iters)

  def loss(p, one):
    nll = -token_logprobs(p, mcfg, one)[0]
    m = one["loss_mask"][0].astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)
  single = jax.jit(lambda p, one: jnp.concatenate(
      [x.reshape(-1) for x in jax.tree.leaves(jax.grad(loss)(p, one))]))
  rows = [{k: jnp.asarray(v[i:i + 1]) for k, v in b.items()} for i in range(a.n)]

  def loop():
    return np.stack([np.asarray(single(params, r)) for r in rows])
  G_loop, loop_first, loop_s = best(loop, a.iters)

  # the floor: ONE gradient of the batch's summed example losses (not per example) — no
  # per-example method can take less compute than this
  bj = {k: jnp.asarray(v) for k, v in b.items()}

  def batch_loss(p, rows):
    nll = -token_logprobs(p, mcfg, rows)
    m = rows["loss_mask"].astype(jnp.float32)
    return ((nll * m).sum(1) / jnp.maximum(m.sum(1), 1.0)).sum()
  summed = jax.jit(jax.grad(batch_loss))
  _, floor_first, floor_s = best(lambda: jax.block_until_ready(summed(params, bj)), a.iters)

  names = [n for n, _ in tm.named_parameters()]
  tparams = {n: p.detach() for n, p in tm.named_parameters()}
  inp, tgt = torch.tensor(b["inputs"], dtype=torch.long), torch.tensor(b["targets"],
                                                                       dtype=torch.long)
  att, lm = torch.tensor(b["segment_ids"]), torch.tensor(b["loss_mask"], dtype=torch.float32)

  def tloss(p, x, y, am, m):
    del am                 # right padding: causal attention keeps it out of every real token
    out = torch.func.functional_call(tm, p, (x[None],))
    logp = torch.log_softmax(out.logits[0].float(), -1).gather(-1, y[:, None])[:, 0]
    return -(logp * m).sum() / m.sum().clamp(min=1.0)
  per = torch.func.vmap(torch.func.grad(tloss), in_dims=(None, 0, 0, 0, 0), chunk_size=a.chunk)

  def torch_run():
    with torch.no_grad():
      g = per(tparams, inp, tgt, att, lm)
    return torch.cat([g[n].reshape(a.n, -1) for n in names], 1).numpy()
  threads = torch.get_num_threads()
  G_torch, torch_first, torch_s = best(torch_run, a.iters)

  norms = np.linalg.norm(G, axis=1)
  ok_loop = np.abs(G - G_loop).max() / np.abs(G).max()
  ok_norm = np.abs(norms - np.linalg.norm(G_torch, axis=1)).max() / norms.max()
  ok_cos = np.abs(GR.cosine_matrix(G) - GR.cosine_matrix(G_torch)).max()
  st = GR.conflict_stats(GR.cosine_matrix(G))
  print(f"\n{datetime.date.today()}, {platform.machine()}, jax {jax.__version__} "
        f"({jax.local_device_count()} device), torch {torch.__version__} ({threads} threads), "
        f"transformers {transformers.__version__}. Random HF Llama d_model {a.d_model}, "
        f"{a.layers} layers, vocab {a.vocab}, tied ({n_params:,} params); {a.n} examples x "
        f"{a.t} tokens, gradient of each example's mean answer NLL over all parameters; "
        f"chunk {a.chunk}. Max relative difference ours vs loop {ok_loop:.1e}; per-example "
        f"gradient norms ours vs torch {ok_norm:.1e}; cosine matrices {ok_cos:.1e}; conflict "
        f"ratio {st['conflict_ratio']:.3f}, mean cos {st['mean_cos']:.3f}.\n")
  print("| impl | s (best) | first call s | examples/s | ours faster by |")
  print("|---|---|---|---|---|")
  print(f"| factflip per_example_grads (lax.map of vmap chunks) | {ours_s:.3f} | "
        f"{ours_first:.2f} | {a.n / ours_s:.1f} | 1.00x |")
  print(f"| loop of a jitted single-example grad | {loop_s:.3f} | {loop_first:.2f} | "
        f"{a.n / loop_s:.1f} | {loop_s / ours_s:.2f}x |")
  print(f"| torch.func.vmap(grad), chunk_size {a.chunk} | {torch_s:.3f} | {torch_first:.2f} | "
        f"{a.n / torch_s:.1f} | {torch_s / ours_s:.2f}x |")
  print(f"| floor: one batched gradient of the summed losses (not per example) | {floor_s:.3f} "
        f"| {floor_first:.2f} | {a.n / floor_s:.1f} | {floor_s / ours_s:.2f}x |")
  print(f"\nThe loop takes {loop_s / floor_s:.1f}x the floor: the most any per-example method "
        "could gain over it on this machine.")


if __name__ == "__main__":
  main()
