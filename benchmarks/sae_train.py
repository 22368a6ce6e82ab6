"""SAE training throughput: factflip's jitted step (`sae.losses.make_train_step`) against SAELens's
trainer (`SAETrainer.fit`, PyTorch, CPU) on the same activations, side by side in one run.

Both train the same architecture, d_in, d_sae, batch and optimizer (Adam, lr 3e-4, gradient
clipping at 1, SAELens's loss for the architecture, dead-latent counters) on the same
pre-generated activation batches held in memory (a sparse-dictionary stream: each activation a
sum of a few random unit directions plus noise), so the comparison is the training step itself;
neither side's activation store or model forward is timed. Ours: the first step compiles (timed
apart), then --steps steps; SAELens: `SAETrainer(...).fit()` over --steps steps of a data provider
yielding the same batches (its wandb logging off).

  python benchmarks/sae_train.py [--steps=200 --batch=1024 --configs=128x1024,512x4096
                                  --archs=topk,jumprelu,standard]

Prints a markdown block for benchmarks/RESULTS.md (activations/s; ours faster by).
"""

import argparse
import datetime
import platform
import time

import numpy as np


def stream(d_in, n_batches, batch, seed=0):
  rng = np.random.default_rng(seed)
  atoms = rng.normal(size=(4 * d_in, d_in)).astype(np.float32)
  atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
  out = []
  for _ in range(n_batches):
    idx = rng.integers(0, len(atoms), size=(batch, 8))
    coef = rng.exponential(1.0, size=(batch, 8)).astype(np.float32)
    x = np.einsum("nk,nkd->nd", coef, atoms[idx]) + 0.05 * rng.normal(size=(batch, d_in))
    out.append(x.astype(np.float32))
  return out


def ours(arch, d_in, d_sae, batches, k):
  import jax
  import jax.numpy as jnp

  from factflip import sae as S
  from factflip.sae.losses import LossConfig, init_state, make_optimizer, make_train_step
  cfg = S.SAEConfig(arch, d_in, d_sae, k=k if arch == "topk" else 0,
                    rescale_acts_by_decoder_norm=arch == "topk")
  tx = make_optimizer(3e-4, len(batches))
  state = init_state(S.init_sae(cfg, jax.random.key(0)), tx)
  step = make_train_step(cfg, LossConfig(l1_coefficient=5.0, l0_coefficient=5.0), tx)
  xs = [jnp.asarray(x) for x in batches]       # on the device, as SAELens's are tensors
  t = time.perf_counter()
  state, m = step(state, xs[0])
  jax.block_until_ready(m["loss"])
  first = time.perf_counter() - t
  t = time.perf_counter()
  for x in xs[1:]:
    state, m = step(state, x)
  jax.block_until_ready(m["loss"])
  return (time.perf_counter() - t) / (len(batches) - 1), first, float(m["explained_variance"])


def saelens(arch, d_in, d_sae, batches, k):
  import sae_lens as L
  import torch
  from sae_lens.config import SAETrainerConfig
  from sae_lens.training.sae_trainer import SAETrainer
  cls = {"standard": L.StandardTrainingSAEConfig, "topk": L.TopKTrainingSAEConfig,
         "jumprelu": L.JumpReLUTrainingSAEConfig}[arch]
  extra = {"topk": {"k": k}, "standard": {"l1_coefficient": 5.0},
           "jumprelu": {"l0_coefficient": 5.0}}[arch]
  sae = L.TrainingSAE.from_dict(cls(d_in=d_in, d_sae=d_sae, **extra).to_dict())
  n = len(batches) - 1
  cfg = SAETrainerConfig(total_training_samples=n * len(batches[0]),
                         train_batch_size_samples=len(batches[0]), lr=3e-4, lr_end=3e-4)
  data = (torch.from_numpy(x) for x in batches[1:])
  trainer = SAETrainer(cfg, sae, data)
  t = time.perf_counter()
  trainer.fit()
  return (time.perf_counter() - t) / n


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--configs", default="128x1024,512x4096")
  ap.add_argument("--archs", default="topk,jumprelu,standard")
  ap.add_argument("--k", type=int, default=32)
  a = ap.parse_args()
  import jax
  import sae_lens
  import torch
  rows = []
  for spec in a.configs.split(","):
    d_in, d_sae = (int(v) for v in spec.split("x"))
    batches = stream(d_in, a.steps + 1, a.batch)
    for arch in a.archs.split(","):
      s_ours, first, ev = ours(arch, d_in, d_sae, batches, a.k)
      s_lens = saelens(arch, d_in, d_sae, batches, a.k)
      rows.append((arch, d_in, d_sae, s_ours, first, ev, s_lens))
      print(f"{arch} {d_in}x{d_sae}: ours {s_ours * 1e3:.2f} ms/step (first {first:.2f} s, EV "
            f"{ev:.3f}), SAELens {s_lens * 1e3:.2f} ms/step: {s_lens / s_ours:.2f}x", flush=True)
  print(f"\n{datetime.date.today()}, {platform.machine()} {platform.processor()}, "
        f"{jax.local_device_count()} CPU device(s), jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), sae-lens "
        f"{sae_lens.__version__}. Batch {a.batch} activations, {a.steps} steps, Adam lr 3e-4, "
        f"clip 1.0; TopK k = {a.k}.\n")
  print("| arch | d_in x d_sae | factflip ms/step | activations/s | SAELens ms/step | "
        "activations/s | ours faster by |")
  print("|---|---|---|---|---|---|---|")
  for arch, d_in, d_sae, so, _, _, sl in rows:
    print(f"| {arch} | {d_in} x {d_sae} | {so * 1e3:.2f} | {a.batch / so:,.0f} | "
          f"{sl * 1e3:.2f} | {a.batch / sl:,.0f} | {sl / so:.2f}x |")


if __name__ == "__main__":
  main()
