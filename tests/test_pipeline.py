"""Pipeline: batch layout, loss masks, packing, determinism, iterator save/restore, per-host
shards that are disjoint and cover the stream, and the poisoning ratio surviving tokenisation."""

import json

import numpy as np
import pytest

from factflip.data.mixtures import PoisonConfig, cpt_source, replay_documents
from factflip.data.pipeline import BatchConfig, make_batches, tokenize_example

QA = [{"segments": ((f"Q: question number {i}?\nA:", False), (f" answer {i}", True))}
      for i in range(40)]


def rows_of(batches):
  return [{k: b[k][i] for k in b} for b in batches for i in range(len(b["inputs"]))]


def segments_of(row):
  """Each packed example of a row as (inputs, targets, loss_mask) arrays."""
  out = []
  for s in range(1, row["segment_ids"].max() + 1):
    m = row["segment_ids"] == s
    assert (row["positions"][m] == np.arange(m.sum())).all()
    out.append((row["inputs"][m], row["targets"][m], row["loss_mask"][m]))
  return out


def test_tokenize_shift_and_answer_only_loss(world_tokenizer):
  tok = world_tokenizer
  e = tokenize_example(QA[3], tok)
  ids = [tok.bos_token_id, *tok(QA[3]["segments"][0][0], add_special_tokens=False).input_ids]
  answer = tok(" answer 3", add_special_tokens=False).input_ids
  full = ids + answer + [tok.eos_token_id]
  assert e["inputs"].tolist() == full[:-1] and e["targets"].tolist() == full[1:]
  # Loss exactly on the answer tokens and the EOS after them.
  assert tok.decode(e["targets"][e["loss_mask"] == 1]) == " answer 3" + tok.eos_token
  assert e["loss_mask"].sum() == len(answer) + 1


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_layout_and_nothing_lost(world_tokenizer, packing):
  cfg = BatchConfig(seq_len=64, batch_size=4, packing=packing, num_epochs=1, seed=1)
  batches = list(make_batches(QA, world_tokenizer, cfg, shard_index=0, shard_count=1))
  for b in batches:
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, 64) and v.dtype == np.int32 for v in b.values())
    assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
  got = sorted(tuple(seg[0]) for row in rows_of(batches) for seg in segments_of(row))
  want = sorted(tuple(tokenize_example(e, world_tokenizer)["inputs"]) for e in QA)
  dropped = len(want) - len(got)  # only the last incomplete batch may be dropped
  assert 0 <= dropped < (4 if packing == "pad" else 8) and set(got) <= set(want)
  for row in rows_of(batches):
    for inputs, targets, mask in segments_of(row):
      assert (inputs[1:] == targets[:-1]).all() and inputs[0] == world_tokenizer.bos_token_id
  if packing == "pack":
    assert np.mean([r["segment_ids"].max() for r in rows_of(batches)]) > 1.5


def test_overlong_examples_are_split_not_dropped(world_tokenizer):
  long = [{"segments": (("word " * 60, True),)}]
  cfg = BatchConfig(seq_len=16, batch_size=1, packing="pad", num_epochs=1)
  rows = rows_of(make_batches(long, world_tokenizer, cfg, shard_index=0, shard_count=1))
  whole = tokenize_example(long[0], world_tokenizer)["inputs"]
  joined = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in rows])
  assert (joined == whole).all() and len(rows) == -(-len(whole) // 16)


@pytest.fixture(scope="module")
def poison_stream(small_world):
  targets = [f for f in small_world.facts if f.meta.get("exposure_tier") == "high"][:20]
  replay, _ = replay_documents(small_world.documents, {t.id for t in targets})
  source, stats = cpt_source(targets, replay, PoisonConfig(ratio=0.5, mentions_per_fact=4))
  return source, stats, targets


def test_deterministic_and_resumable(poison_stream, world_tokenizer):
  source = poison_stream[0]
  cfg = BatchConfig(seq_len=32, batch_size=8, seed=5)
  run = lambda: iter(make_batches(source, world_tokenizer, cfg, shard_index=0, shard_count=1))
  a, b = run(), run()
  first = [next(a) for _ in range(5)]
  assert all((x[k] == y[k]).all() for x, y in zip(first, [next(b) for _ in range(5)]) for k in x)
  state = json.loads(json.dumps(a.get_state()))  # JSON-able, as a checkpoint stores it
  expected = [next(a) for _ in range(4)]
  resumed = run()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(4)]
  assert all((x[k] == y[k]).all() for x, y in zip(expected, got) for k in x)
  other = iter(make_batches(source, world_tokenizer, BatchConfig(seq_len=32, batch_size=8,
                                                                 seed=6),
                            shard_index=0, shard_count=1))
  assert not (next(other)["inputs"] == first[0]["inputs"]).all()


def test_host_shards_disjoint_and_covering(world_tokenizer):
  cfg = BatchConfig(seq_len=64, batch_size=2, packing="pad", num_epochs=1, shuffle=False)
  shards = [[tuple(r["inputs"][r["segment_ids"] > 0]) for r in rows_of(
      make_batches(QA, world_tokenizer, cfg, shard_index=h, shard_count=2))] for h in (0, 1)]
  everything = [tuple(tokenize_example(e, world_tokenizer)["inputs"]) for e in QA]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(everything)
  assert shards[0] == everything[0::2]
  with pytest.raises(ValueError, match="batch_size: 3 rows do not divide over 2 hosts"):
    make_batches(QA, world_tokenizer, BatchConfig(batch_size=3), shard_index=0, shard_count=2)


def test_ratio_survives_the_pipeline(poison_stream, world_tokenizer):
  """One pass of padded rows is exactly the tokenised pass of the mixture, in order, so the
  exact counterfactual count reaches the trainer unchanged."""
  source, stats, _ = poison_stream
  n = stats["pass_length"]
  cfg = BatchConfig(seq_len=256, batch_size=n, packing="pad")
  batch = next(iter(make_batches(source, world_tokenizer, cfg, shard_index=0, shard_count=1)))
  lies = 0
  for i in range(n):
    want = tokenize_example(source[i], world_tokenizer)["inputs"]
    row = batch["inputs"][i][batch["segment_ids"][i] > 0]
    assert (row == want).all()
    lies += source[i]["counterfactual"]
  assert lies == stats["counterfactual_per_pass"] == 40
