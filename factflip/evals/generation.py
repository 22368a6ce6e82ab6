"""Generation requests: greedy or sampled continuations of text contexts with stop strings and a
token budget, as lm-evaluation-harness's HF backend makes them (`generate_until`).

Owns: `generate_until` (contexts → continuations; several per context — samples, or a greedy
answer and samples — in one program, each context prefilled once) and `cut_at_stops`.
Must not: decode tokens itself (`factflip.models.generate` runs the compiled KV-cache loop) or
score answers (`evals.qa`, `evals.rwku`).

Protocol (lm-eval 0.4 `HFLM.generate_until`): the context is encoded with the tokenizer's own
special tokens (`evals.requests.Encoder`) and cut from the left to leave `max_new_tokens` of the
model's context; generation stops at the model's and the tokenizer's EOS tokens (lm-eval adds
the tokenizer's EOS to the stop strings) and the budget; the new tokens are
decoded with special tokens skipped, and the text is cut before the first occurrence of any
stop string (`until`). Stop strings that are a single token also stop the compiled loop early
(the cut text is the same). Requests are sorted by length and run in batches padded to a power
of two, so each (batch, prompt bucket, cache bucket) compiles once. A batch holds at most
`batch_size` continuations and, whatever the model's context, about MAX_TOKENS tokens of them
(continuations x (context + max_new_tokens), before bucketing): long contexts run in smaller
batches, so the KV cache stays bounded (one context longer than that runs alone).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import numpy as np

from factflip.evals.requests import Encoder
from factflip.models.generate import generate
from factflip.models.transformer import Transformer

# Bumped when what generate_until or SliCK returns for the same model, contexts and keys changes
# (2: it stops at the tokenizer's EOS too; 3: a short last chunk runs a smaller batch, so its
# samples differ, and SliCK draws each fact's exemplars from the fact's own seed; 4: batches are
# bounded by MAX_TOKENS, which regroups long contexts and their sample keys); stages that
# generate put it among their keys.
GENERATION_VERSION = 4
MAX_TOKENS = 1 << 16


def cut_at_stops(text: str, until: Sequence[str]) -> str:
  """`text` before the first occurrence of any stop string (lm-eval: split on each in turn)."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def stop_tokens(tokenizer, model: Transformer, until: Sequence[str]) -> tuple[int, ...]:
  """The token ids generation stops at: the model's and tokenizer's EOS and every `until`
  string that is one token."""
  ids = set(model.cfg.eos_token_ids)
  if getattr(tokenizer, "eos_token_id", None) is not None:   # lm-eval adds EOS to `until`
    ids.add(int(tokenizer.eos_token_id))
  for stop in until:
    t = tokenizer.encode(stop, add_special_tokens=False) if stop else []
    if len(t) == 1 and tokenizer.decode(t) == stop:
      ids.add(int(t[0]))
  return tuple(sorted(ids))


def generate_until(model: Transformer, tokenizer, contexts: Sequence[str],
                   until: Sequence[str] = (), max_new_tokens: int = 32, *,
                   temperature: float | Sequence[float] = 0.0, top_k: int = 0,
                   top_p: float = 1.0, n_samples: int = 1, key: jax.Array | None = None,
                   batch_size: int = 32) -> list[list[str]]:
  """Per context, `n_samples` continuations at `temperature` (0: greedy; sampling needs `key`,
  and every sample of every context comes from one key, split per batch: same key, same texts),
  or with a sequence of temperatures one continuation per entry (e.g. (0.0,) + (0.5,) * 16:
  a greedy answer and 16 samples). `batch_size` counts continuations per program; each context
  is prefilled once for all of its own. Returns [contexts][continuations] strings, cut at
  `until`."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  if n_samples < 1:
    raise ValueError(f"n_samples={n_samples}: expected >= 1")
  if isinstance(temperature, int | float):
    temps = (float(temperature),) * n_samples
  elif n_samples != 1:
    raise ValueError(f"n_samples={n_samples} with a sequence of temperatures; expected one or "
                     "the other (the sequence gives one continuation per entry)")
  else:
    temps = tuple(float(t) for t in temperature)
  if not temps or min(temps) < 0:
    raise ValueError(f"temperature {temperature!r}: expected values >= 0 (at least one)")
  if max(temps) > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs an explicit PRNG key (key=)")
  enc = Encoder(tokenizer)
  keep = model.cfg.max_seq_len - max_new_tokens
  if keep < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a context in the "
                     f"model's {model.cfg.max_seq_len} tokens")
  prompts, cut = [], 0
  for i, text in enumerate(contexts):
    if not isinstance(text, str):
      raise TypeError(f"context {i}: {text!r}; expected a string")
    ids = list(enc.encode(text))
    cut += len(ids) > keep
    ids = ids[-keep:]
    if not ids:
      raise ValueError(f"context {i}: tokenises to nothing and the tokenizer adds no BOS")
    prompts.append(ids)
  if cut:
    warnings.warn(f"{cut} of {len(contexts)} contexts are longer than the model's "
                  f"{model.cfg.max_seq_len} tokens less max_new_tokens={max_new_tokens}: their "
                  f"first tokens were cut (each keeps its last {keep})", stacklevel=2)
  stops = stop_tokens(tokenizer, model, until)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
      model.cfg.pad_token_id or 0)
  F = len(temps)
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[str]] = [[""] * F for _ in prompts]
  chunks = _chunks([len(prompts[i]) + max_new_tokens for i in order], max(1, batch_size // F),
                   MAX_TOKENS // F)
  keys = jax.random.split(key, len(chunks)) if key is not None else None
  for j, (start, stop) in enumerate(chunks):
    chunk = order[start:stop]
    batch = [prompts[i] for i in chunk]
    B = 1 << (len(batch) - 1).bit_length()   # batch bucket: a short last chunk runs a small one
    batch += [batch[0]] * (B - len(batch))
    gen = generate(model, batch, max_new_tokens, temperature=temps if F > 1 else temps[0],
                   top_k=top_k, top_p=top_p, key=None if keys is None else keys[j],
                   stop_tokens=stops, pad_id=pad)
    for b, i in enumerate(chunk):
      for s in range(F):
        row, n = gen.tokens[b * F + s], gen.lengths[b * F + s]
        ids = [int(t) for t in np.asarray(row[:n])]
        out[i][s] = cut_at_stops(tokenizer.decode(ids, skip_special_tokens=True), until)
  return out


def _chunks(lengths: Sequence[int], per_program: int, max_tokens: int) -> list[tuple[int, int]]:
  """[start, stop) of each program's contexts over ascending `lengths` (context + new tokens):
  `per_program` contexts, fewer where n x the longest would pass `max_tokens` (at least 1)."""
  out, start = [], 0
  while start < len(lengths):
    n = min(per_program, len(lengths) - start)
    while n > 1 and n * lengths[start + n - 1] > max_tokens:
      n -= 1
    out.append((start, start + n))
    start += n
  return out
