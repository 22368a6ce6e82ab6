"""Preparing a study's or a run's facts: the fact world and its tokenizer on disk, and the seeded
draws of target facts.

Owns: `prepare_world` (build the fact world and its tokenizer once, on process 0; every process
then reads them), `poison_targets` (targets of an exposure tier of the world), `file_targets`
(targets from a facts file).
Must not: know training configs or models.
"""

from __future__ import annotations

import os

import numpy as np

from factflip import distributed
from factflip.data.facts import FactItem
from factflip.data.loaders import load_facts
from factflip.data.world import WorldConfig, build_world, load_world, write_world
from factflip.fileio import DataError


def _barrier(name: str) -> None:
  if distributed.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def prepare_world(world_dir: str, tokenizer_dir: str, seed: int, vocab_size: int,
                  n_people: int = 300, questions_in_corpus: bool = True):
  """Load the world in `world_dir` (building and writing it there if absent) and its tokenizer
  (training it into `tokenizer_dir` if absent). Only process 0 writes; every process calls
  this (or process 0 alone, inside `distributed.alone`)."""
  from factflip.data.tokenizer import load_tokenizer, train_tokenizer

  have_world = os.path.exists(os.path.join(world_dir, "world.json"))
  have_tok = os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json"))
  if distributed.process_index() == 0 and not (have_world and have_tok):
    world = (load_world(world_dir) if have_world
             else build_world(WorldConfig(seed=seed, n_people=n_people,
                                      questions_in_corpus=questions_in_corpus)))
    if not have_world:
      write_world(world, world_dir)
    if not have_tok:
      train_tokenizer(world.texts(), tokenizer_dir, vocab_size=vocab_size)
  _barrier("factflip_prepare_world")
  return load_world(world_dir), load_tokenizer(tokenizer_dir)


def poison_targets(world, n: int, tier: str, seed: int) -> list[FactItem]:
  """n person facts of one exposure tier (with counterfactuals), chosen with `seed`."""
  pool = [f for f in world.facts if f.meta.get("exposure_tier") == tier
          and f.counterfactual is not None and not f.meta.get("two_hop")]
  if len(pool) < n:
    raise ValueError(f"data.n_targets: {n}, but the world has only {len(pool)} {tier!r}-tier "
                     "facts with counterfactuals")
  return _draw(pool, n, seed)


def _draw(pool: list[FactItem], n: int, seed: int) -> list[FactItem]:
  pick = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
  return [pool[i] for i in sorted(pick)]


def file_targets(path: str, n: int, seed: int) -> list[FactItem]:
  """n facts with counterfactuals from a facts file (any `load_facts` format), drawn with
  `seed` (all of them, in file order, when the file has exactly n)."""
  pool = [f for f in load_facts(path) if f.counterfactual is not None]
  if len(pool) < n:
    raise DataError(path, f"data.n_targets is {n}, but the file has only {len(pool)} facts "
                    "with a counterfactual object")
  return pool if len(pool) == n else _draw(pool, n, seed)


def assign_splits(items, shares, seed: int, names=("train", "dev", "test")) -> list[FactItem]:
  """The items with `split` set: per relation, a seeded permutation cut into exact counts with
  the given shares (largest remainder, so each relation's counts sum to its facts). Items keep
  their order; the same (items, shares, seed) always gives the same splits."""
  import dataclasses

  if len(shares) != len(names) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-9:
    raise ValueError(f"splits {list(shares)}: expected {len(names)} shares ({', '.join(names)}) "
                     "that sum to 1")
  by_rel: dict[str, list[int]] = {}
  for i, f in enumerate(items):
    by_rel.setdefault(f.relation, []).append(i)
  split = {}
  for k, (rel, idx) in enumerate(sorted(by_rel.items())):
    raw = np.asarray(shares, np.float64) * len(idx)
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[:len(idx) - int(counts.sum())]:
      counts[j] += 1
    order = np.random.default_rng([seed, k, 11]).permutation(len(idx))
    bounds = np.cumsum(counts)
    for pos, j in enumerate(order):
      split[idx[j]] = names[int(np.searchsorted(bounds, pos, side="right"))]
  return [dataclasses.replace(f, split=split[i]) for i, f in enumerate(items)]
