"""Data pipeline throughput vs what the trainer consumes, in one run.

  python benchmarks/data_pipeline.py [--preset=tiny-2m --batch=64 --seq=64 --seconds=5]

Builds the default fact world and its tokenizer, then measures (a) the continual-pretraining
poisoning stream (p = 0.5, half replay) and (b) an SFT mixture, each through tokenise -> pack ->
batch, in examples/s and tokens/s; and (c) a jitted forward+backward step (LM loss over the
batch; no optimizer update, so it is a lower bound on the trainer's time per step) of the preset
at the same batch shape. The ratio pipeline/trainer must be >= 10 so data never stalls training.
Prints a markdown block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from factflip import get_preset
from factflip.data.mixtures import PoisonConfig, cpt_source, replay_documents
from factflip.data.pipeline import BatchConfig, make_batches
from factflip.data.sft_mixtures import SFTConfig, sft_mixture
from factflip.data.tokenizer import train_tokenizer
from factflip.data.world import WorldConfig, build_world
from factflip.models import attention
from factflip.models.transformer import forward, init_params


def measure(stream, seconds):
  next(stream)
  n = examples = tokens = 0
  t = time.perf_counter()
  while time.perf_counter() - t < seconds:
    b = next(stream)
    n += 1
    seg = b["segment_ids"]
    examples += int(seg.max(axis=1).sum())
    tokens += int((seg > 0).sum())
  dt = time.perf_counter() - t
  return n / dt, examples / dt, tokens / dt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny-2m")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--seconds", type=float, default=5.0)
  args = ap.parse_args()

  t = time.perf_counter()
  world = build_world(WorldConfig())
  t_world = time.perf_counter() - t
  t = time.perf_counter()
  tok = train_tokenizer(world.texts(), tempfile.mkdtemp() + "/tok", vocab_size=1024)
  t_tok = time.perf_counter() - t
  known = [f for f in world.facts if f.meta.get("exposure_tier") == "high"]
  targets = known[: len(known) // 4]
  replay, _ = replay_documents(world.documents, {f.id for f in targets})
  cfg = BatchConfig(seq_len=args.seq, batch_size=args.batch)
  cpt, _ = cpt_source(targets, replay, PoisonConfig(ratio=0.5, mentions_per_fact=8))
  rows = {"cpt poisoning stream (pack)": measure(
      iter(make_batches(cpt, tok, cfg, shard_index=0, shard_count=1)), args.seconds)}
  tiers = {"high": "HighlyKnown", "none": "Unknown"}
  sft, _ = sft_mixture(world.facts, SFTConfig(size=500, unknown_share=0.2),
                       lambda f: tiers.get(f.meta.get("exposure_tier")))
  rows["sft mixture (pack)"] = measure(
      iter(make_batches(sft, tok, cfg, shard_index=0, shard_count=1)), args.seconds)

  mcfg = get_preset(args.preset, vocab_size=len(tok))
  params = init_params(mcfg, jax.random.key(0))
  b = next(iter(make_batches(cpt, tok, cfg, shard_index=0, shard_count=1)))

  @jax.jit
  def step(params, inputs, targets, mask, positions):
    def loss(p):
      logits = forward(p, mcfg, inputs, attention.causal(mask > 0, positions)).logits
      lp = jax.nn.log_softmax(logits.astype(jnp.float32))
      nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
      return (nll * mask).sum() / mask.sum()
    return jax.value_and_grad(loss)(params)

  args_ = [jnp.asarray(b[k]) for k in ("inputs", "targets", "loss_mask", "positions")]
  args_[2] = args_[2].astype(jnp.float32)
  jax.block_until_ready(step(params, *args_))
  times = []
  for _ in range(10):
    t = time.perf_counter()
    jax.block_until_ready(step(params, *args_))
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  fill = float((b["segment_ids"] > 0).mean())
  trainer_rows = args.batch / step_s
  trainer_tokens = trainer_rows * args.seq * fill
  trainer_examples = trainer_rows * float(b["segment_ids"].max(axis=1).mean())

  print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, "
        f"jax {jax.__version__}; world built in {t_world:.2f} s ({len(world.facts)} facts, "
        f"{len(world.documents)} documents), tokenizer (1024) trained in {t_tok:.2f} s.\n")
  print(f"`python benchmarks/data_pipeline.py --preset {args.preset} --batch {args.batch} "
        f"--seq {args.seq}`\n")
  print("| stream | batches/s | examples/s | tokens/s | x trainer (examples/s) |")
  print("|---|---|---|---|---|")
  for name, (bps, eps, tps) in rows.items():
    print(f"| {name} | {bps:,.1f} | {eps:,.0f} | {tps:,.0f} | {eps / trainer_examples:.1f}x |")
  print(f"| trainer: {args.preset} fwd+bwd, {step_s * 1e3:.1f} ms/step | {1 / step_s:.1f} | "
        f"{trainer_examples:,.0f} | {trainer_tokens:,.0f} | 1.0x |")


if __name__ == "__main__":
  main()
