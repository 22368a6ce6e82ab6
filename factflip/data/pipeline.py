"""Pipeline: text examples -> fixed-shape token batches, with grain.

Owns: `BatchConfig`, `tokenize_example`, `make_batches` (shard per host, shuffle, tokenise, split
overlong examples, pack or pad to a fixed length, batch), `pad_examples` (a list of examples as
one padded batch, in order: what probes read) and the batch layout below.
Must not: decide what the data is (mixtures.py) or touch devices (the trainer puts batches on the
mesh).

Batch layout (numpy int32, shape [per-host batch, seq_len]):
  inputs       token ids fed to the model
  targets      the next token of each input (inputs and targets are shifted per example before
               packing, so no target crosses an example boundary)
  loss_mask    1 where the target is trained (segments marked trained; the EOS after a trained
               segment), 0 elsewhere and on padding
  segment_ids  1, 2, ... per packed example in a row; 0 on padding
  positions    position of each token within its example (restarts at 0 per segment)
Examples start with the tokenizer's BOS (if it has one) and end with its EOS.

Determinism: the stream is a function of (source, tokenizer, config, shard) only. The iterator's
`get_state()` is a small JSON-able dict; `set_state` on a fresh iterator resumes with the very
next batch. Host sharding: host h of H reads examples h, h + H, h + 2H, ... of the global stream,
so shards are disjoint and together cover it; each host packs and batches its own examples
(per-host batch = batch_size / H).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from factflip.data.mixtures import INFINITE
from factflip.data.tokenizer import TokenIds

FEATURES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """seq_len: tokens per row. batch_size: rows per step across all hosts. packing: "pack"
  (first-fit packing of whole examples into rows; an example longer than seq_len is split into
  seq_len pieces) or "pad" (one example per row). shuffle: shuffle a finite source each epoch.
  num_epochs: passes over a finite source (None = forever). packing_bins: open rows first-fit
  chooses among (default: the per-host batch size)."""
  seq_len: int = 128
  batch_size: int = 32
  packing: str = "pack"
  shuffle: bool = True
  num_epochs: int | None = None
  packing_bins: int | None = None
  seed: int = 0

  def validate(self, shard_count: int) -> None:
    if self.packing not in ("pack", "pad"):
      raise ValueError(f"BatchConfig.packing: {self.packing!r}; expected 'pack' or 'pad'")
    if self.seq_len < 2:
      raise ValueError(f"BatchConfig.seq_len: {self.seq_len}; expected >= 2")
    if self.batch_size % shard_count:
      raise ValueError(f"BatchConfig.batch_size: {self.batch_size} rows do not divide over "
                       f"{shard_count} hosts")


class Tokenize:
  """Example -> {inputs, targets, loss_mask} (unpadded int32, length = tokens - 1)."""

  def __init__(self, tokenizer, cache_size: int = 1 << 18):
    self.ids = TokenIds(tokenizer, cache_size)
    self.bos = self.ids.bos
    self.eos = tokenizer.eos_token_id
    if self.eos is None:
      raise ValueError("tokenizer has no EOS token; factflip ends every example with EOS")

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = [] if self.bos is None else [self.bos]
    mask = [0] * len(ids)
    trained = False
    for text, trained in example["segments"]:
      t = self.ids(text)
      ids.extend(t)
      mask += [int(trained)] * len(t)
    ids.append(self.eos)
    mask.append(int(trained))
    ids_T = np.asarray(ids, dtype=np.int32)
    return {"inputs": ids_T[:-1], "targets": ids_T[1:],
            "loss_mask": np.asarray(mask[1:], dtype=np.int32)}


def tokenize_example(example: dict[str, Any], tokenizer) -> dict[str, np.ndarray]:
  return Tokenize(tokenizer)(example)


class _Split(grain.experimental.FlatMapTransform):
  """Cut a tokenised example into pieces of at most seq_len (nothing is dropped)."""

  def __init__(self, seq_len: int, max_pieces: int):
    self.seq_len, self.max_fan_out = seq_len, max_pieces

  def flat_map(self, element):
    n = len(element["inputs"])
    if n <= self.seq_len:
      return [element]
    if n > self.seq_len * self.max_fan_out:
      raise ValueError(f"an example of {n} tokens is longer than {self.max_fan_out} rows of "
                       f"{self.seq_len}; raise BatchConfig.seq_len")
    return [{k: v[i:i + self.seq_len] for k, v in element.items()}
            for i in range(0, n, self.seq_len)]


def _pad(element: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  n = len(element["inputs"])
  out = {}
  for k in ("inputs", "targets", "loss_mask"):
    row = np.zeros(seq_len, np.int32)
    row[:n] = element[k]
    out[k] = row
  out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return out


def _rename_packed(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"inputs": element["inputs"], "targets": element["targets"],
          "loss_mask": element["loss_mask"], "segment_ids": element["inputs_segment_ids"],
          "positions": element["inputs_positions"]}


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


def pad_examples(examples: Sequence[dict[str, Any]], tokenizer, seq_len: int
                 ) -> dict[str, np.ndarray]:
  """The examples as one padded batch [len(examples), seq_len] in their order (one per row);
  an error naming the example when one is longer than seq_len (nothing is cut)."""
  rows = []
  for i, e in enumerate(examples):
    t = tokenize_example(e, tokenizer)
    if len(t["inputs"]) > seq_len:
      raise ValueError(f"example {i}: {len(t['inputs'])} tokens, longer than seq_len {seq_len}")
    rows.append(_pad(t, seq_len))
  if not rows:
    raise ValueError("pad_examples: no examples")
  return _stack(rows)


def make_batches(source: grain.MapDataset | Sequence[dict[str, Any]], tokenizer,
                 cfg: BatchConfig, *, shard_index: int | None = None,
                 shard_count: int | None = None, max_pieces: int = 64) -> grain.IterDataset:
  """The batch stream of `source` (a MapDataset of examples, infinite or finite, or a list).

  A finite source is shuffled per epoch (if cfg.shuffle) and repeated cfg.num_epochs times;
  an infinite one (the mixtures' streams) is used as is. shard_index/shard_count default to
  jax.process_index()/process_count(). Iterate with `iter(...)`; the iterator has get_state() /
  set_state(). With num_epochs set, the last incomplete batch is dropped."""
  if shard_index is None or shard_count is None:
    import jax
    shard_index, shard_count = jax.process_index(), jax.process_count()
  cfg.validate(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(list(source))
  if len(ds) < INFINITE:  # finite (mixture streams and repeat() are at least this long)
    if len(ds) == 0:
      raise ValueError("make_batches: the source has no examples")
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
  ds = ds[shard_index::shard_count]
  per_host = cfg.batch_size // shard_count
  it = ds.map(Tokenize(tokenizer)).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if cfg.packing == "pad":
    it = grain.experimental.FlatMapIterDataset(it, _Split(cfg.seq_len, max_pieces))
    it = it.map(lambda e: _pad(e, cfg.seq_len))
  else:
    it = grain.experimental.FlatMapIterDataset(it, _Split(cfg.seq_len, max_pieces))
    length = {k: cfg.seq_len for k in ("inputs", "targets", "loss_mask")}
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=length, num_packing_bins=cfg.packing_bins or per_host,
        seed=cfg.seed, shuffle_bins=True)
    it = it.map(_rename_packed)
  return it.batch(per_host, drop_remainder=True, batch_fn=_stack)
