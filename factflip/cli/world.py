"""Build the embedded fact world and its tokenizer; print its statistics.

usage: factflip world [--workdir=DIR --seed=S --vocab_size=N]

Generates the fact world (people, relations, documents in three languages and styles)
into DIR/world and trains its tokenizer into DIR/tokenizer (the study does this as
its first stage; this command is for looking at one).

  factflip world --workdir=/tmp/world --seed=3
"""

from __future__ import annotations

import os
import time

from factflip.cli.flags import FLAGS

READS = {"workdir": "Where world/ and tokenizer/ are written.",
         "seed": "The world's seed (its people, facts and documents).",
         "vocab_size": "The tokenizer's vocabulary size."}


def build(workdir: str, seed: int, vocab_size: int) -> dict:
  """Write the world of `seed` and its tokenizer under `workdir`; print and return its stats."""
  from factflip.data.tokenizer import train_tokenizer
  from factflip.data.world import WorldConfig, build_world, world_stats, write_world

  t = time.time()
  world = build_world(WorldConfig(seed=seed))
  write_world(world, os.path.join(workdir, "world"))
  tok = train_tokenizer(world.texts(), os.path.join(workdir, "tokenizer"), vocab_size=vocab_size)
  stats = world_stats(world)
  print(f"fact world (seed {seed}): {stats['facts']} fact items, {stats['documents']} documents, "
        f"{stats['mentions']} mentions; tokenizer {len(tok)} tokens; {time.time() - t:.1f} s")
  for key in ("by_relation", "by_exposure_tier", "by_language", "by_style"):
    print(f"  {key[3:]:<14}" + ", ".join(f"{k} {v}" for k, v in stats[key].items()))
  print(f"wrote {os.path.join(workdir, 'world')} and {os.path.join(workdir, 'tokenizer')}")
  return stats


def main() -> None:
  build(FLAGS.workdir, FLAGS.seed, FLAGS.vocab_size)
