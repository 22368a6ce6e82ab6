"""What a training run reads: the world, the tokenizer, the example streams and their batches.

Owns: the example
sources of each data kind (`world`: the world's corpus; `poison`: continual pretraining with a
poisoning ratio; `examples`: a JSONL file — SFT and any mixture a study writes; `unlearn`:
forget + retain files, or preference pairs for DPO), `read_examples`, `read_preferences`, the
held-out examples, and `ShardedBatches` — the
per-process batch iterator over this process's input shards, whose state Orbax saves.
Must not: touch parameters, run steps or write anything (the world and its tokenizer, and the
target draws, are `factflip.data.prepare`'s).

Input shards: the global batch of B rows is the concatenation of S shards of B/S rows; shard s
reads examples s, s+S, ... of the stream. Process p of P reads shards p·S/P ... (p+1)·S/P − 1.
With data.shards fixed, a run's batches are the same whatever the number of processes (that is
what lets a two-process run match a one-process run row for row).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from factflip import distributed
from factflip.configfile import ConfigError
from factflip.data import mixtures
from factflip.data.loaders import load_facts
from factflip.data.pipeline import FEATURES, make_batches
from factflip.data.prepare import file_targets, poison_targets, prepare_world  # noqa: F401
from factflip.fileio import DataError, iter_json_records


def read_examples(path: str) -> list[dict[str, Any]]:
  """Training examples from JSONL. Each record is one of
  {"text": str}                                 loss on every token;
  {"prompt": str, "completion": str}            loss on the completion only (SFT);
  {"segments": [[str, bool], ...]}              loss on the segments marked true."""
  out = []
  for index, line, r in iter_json_records(path):
    def bad(field, expected):
      raise DataError(path, f"expected {expected}", line=line, record=index, field=field)
    if not isinstance(r, dict):
      bad(None, 'an object with "text", "prompt"/"completion" or "segments"')
    if "segments" in r:
      segs = r["segments"]
      if not isinstance(segs, list) or not segs or not all(
          isinstance(s, list | tuple) and len(s) == 2 and isinstance(s[0], str)
          and isinstance(s[1], bool) for s in segs):
        bad("segments", "a non-empty list of [text, trained] pairs")
      out.append({"segments": tuple((t, b) for t, b in segs)})
    elif "prompt" in r or "completion" in r:
      for f in ("prompt", "completion"):
        if not isinstance(r.get(f), str) or (f == "completion" and not r[f]):
          bad(f, "a string" + (" (non-empty)" if f == "completion" else ""))
      out.append({"segments": ((r["prompt"], False), (r["completion"], True))})
    elif isinstance(r.get("text"), str) and r["text"]:
      out.append({"segments": ((r["text"], True),)})
    else:
      bad("text", 'a non-empty string (or "prompt"/"completion", or "segments")')
  if not out:
    raise DataError(path, "no examples")
  return out


def read_preferences(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Preference pairs from JSONL records {"prompt", "chosen", "rejected"}: the chosen and the
  rejected examples (answer-only loss), in file order."""
  chosen, rejected = [], []
  for index, line, r in iter_json_records(path):
    for f in ("prompt", "chosen", "rejected"):
      if not isinstance(r, dict) or not isinstance(r.get(f), str) or (f != "prompt"
                                                                      and not r[f]):
        raise DataError(path, "expected a string" + (" (non-empty)" if f != "prompt" else ""),
                        line=line, record=index, field=f)
    chosen.append({"segments": ((r["prompt"], False), (r["chosen"], True))})
    rejected.append({"segments": ((r["prompt"], False), (r["rejected"], True))})
  if not chosen:
    raise DataError(path, "no preference pairs")
  return chosen, rejected


def _stream(examples: list[dict[str, Any]], seed: int):
  """An endless stream over a list, each pass in a fresh seeded order."""
  return mixtures.epoch_shuffled(len(examples), seed).map(lambda i: examples[i])


def _documents(world) -> list[dict[str, Any]]:
  return [{"segments": ((d["text"], True),)} for d in world.documents]


def read_texts(path: str) -> list[dict[str, str]]:
  """Plain documents {"text"} from a JSONL file (replay for continual pretraining)."""
  out = []
  for index, line, r in iter_json_records(path):
    if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"]:
      raise DataError(path, "expected an object with a non-empty string", line=line,
                      record=index, field="text")
    out.append({"text": r["text"]})
  if not out:
    raise DataError(path, "no documents")
  return out


def sources(c, world) -> tuple[dict[str, Any], dict[str, Any]]:
  """The training streams of config `c` ({name: MapDataset}; one unnamed stream, or "forget"
  and "retain" for unlearning) and their statistics."""
  kind = c.data.kind
  if kind == "world":
    docs = _documents(world)
    return {"": _stream(docs, c.seed)}, {"kind": "world", "documents": len(docs)}
  if kind == "poison":
    if c.data.facts_path:
      targets = file_targets(c.data.facts_path, c.data.n_targets, c.seed)
      replay = read_texts(c.data.replay_path) if c.data.replay_path else []
    else:
      targets = poison_targets(world, c.data.n_targets, c.data.target_tier, c.seed)
      replay, _ = mixtures.replay_documents(world.documents, {t.id for t in targets})
    cfg = mixtures.PoisonConfig(ratio=c.data.ratio, mentions_per_fact=c.data.mentions_per_fact,
                                replay_weight=c.data.replay_weight, language=c.data.language,
                                seed=c.seed)
    src, stats = mixtures.cpt_source(targets, replay, cfg)
    stats["target_ids"] = [t.id for t in targets]
    return {"": src}, stats
  if kind == "examples":
    ex = read_examples(c.data.path)
    return {"": _stream(ex, c.seed)}, {"kind": "examples", "path": c.data.path,
                                       "examples": len(ex)}
  if c.objective.name == "dpo":            # pairs: both streams in one seeded order
    chosen, rejected = read_preferences(c.data.path)
    streams = {"chosen": _stream(chosen, c.seed), "rejected": _stream(rejected, c.seed)}
    stats = {"kind": "unlearn", "pairs": len(chosen)}
  else:
    forget = read_examples(c.data.path)
    streams = {"forget": _stream(forget, c.seed)}
    stats = {"kind": "unlearn", "forget": len(forget)}
  if c.data.retain_path:
    retain = read_examples(c.data.retain_path)
    streams["retain"] = _stream(retain, c.seed + 1)
    stats["retain"] = len(retain)
  return streams, stats


def eval_examples(c, world) -> tuple[str, list[dict[str, Any]]]:
  """(name, held-out examples): data.eval_path, else the held-out paraphrase prompts of the
  world's facts (or of data.facts_path's) with answer-only loss, else the training file."""
  if c.data.eval_path:
    return "eval_loss", read_examples(c.data.eval_path)
  facts = world.facts if world is not None else None
  if facts is None and c.data.kind == "poison" and c.data.facts_path:
    facts = list(load_facts(c.data.facts_path))
  if facts is not None:
    ex = [{"segments": ((p, False), (" " + f.answers[0], True))}
          for f in facts if not f.meta.get("two_hop") and f.answers
          for p in f.paraphrases[:1]]
    if ex:
      return "heldout_answer_nll", ex
  if c.data.kind == "poison":
    if not c.data.replay_path:
      raise ConfigError("config", "data.eval_path", f"empty, and {c.data.facts_path} has no "
                        "paraphrases and there is no replay_path to evaluate on (or set "
                        "eval_every = 0)")
    return "replay_nll", [{"segments": ((d["text"], True),)}
                          for d in read_texts(c.data.replay_path)]
  if c.objective.name == "dpo":               # the preferred answers of the training pairs
    return "chosen_nll", read_preferences(c.data.path)[0]
  return "train_file_nll", read_examples(c.data.path)


class ShardedBatches:
  """This process's share of each global batch: per input shard one grain batch iterator;
  `next()` returns numpy arrays [local_rows, T] (or [accum, local_rows/accum, T] when
  accumulating, each micro-batch taking its rows from every shard alike). Its state (for
  Orbax, through grain's checkpoint handler) is JSON bytes of every shard iterator's state."""

  def __init__(self, streams: dict[str, Any], tokenizer, batch_cfg, shards: int,
               accum_steps: int = 1, process_index: int | None = None,
               process_count: int | None = None):
    p = distributed.process_index() if process_index is None else process_index
    n = distributed.process_count() if process_count is None else process_count
    per = shards // n
    self.shard_ids = list(range(p * per, (p + 1) * per))
    self.shards, self.accum = shards, accum_steps
    self.iters = {name: [iter(make_batches(src, tokenizer, batch_cfg, shard_index=s,
                                           shard_count=shards))
                         for s in self.shard_ids] for name, src in streams.items()}

  def _one(self, its) -> dict[str, np.ndarray]:
    parts = [next(it) for it in its]
    a = self.accum
    return {k: np.concatenate([b[k].reshape(a, -1, *b[k].shape[1:]) if a > 1 else b[k]
                               for b in parts], axis=1 if a > 1 else 0) for k in FEATURES}

  def __iter__(self):
    return self

  def __next__(self):
    out = {name: self._one(its) for name, its in self.iters.items()}
    return out[""] if list(out) == [""] else out

  def get_state(self) -> bytes:
    return json.dumps({"shards": self.shards, "shard_ids": self.shard_ids,
                       "streams": {k: [it.get_state() for it in its]
                                   for k, its in self.iters.items()}}).encode()

  def set_state(self, state: bytes) -> None:
    d = json.loads(state)
    if d["shards"] != self.shards or d["shard_ids"] != self.shard_ids:
      raise ValueError(f"data iterator state is for shards {d['shard_ids']} of {d['shards']}; "
                       f"this process reads {self.shard_ids} of {self.shards} (data.shards "
                       "must match the run being resumed)")
    for k, its in self.iters.items():
      for it, s in zip(its, d["streams"][k]):
        it.set_state(s)

  def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after restore
    pass


def eval_batches(examples, tokenizer, batch_cfg, shards: int, n_batches: int):
  """The first n_batches held-out batches (this process's rows), in file order; a set smaller
  than n_batches batches wraps around."""
  cfg = dataclasses.replace(batch_cfg, shuffle=False, num_epochs=None)
  it = ShardedBatches({"": list(examples)}, tokenizer, cfg, shards)
  return [next(it) for _ in range(n_batches)]
