"""Text requests on the teacher-forced scorer (`evals.loglik`): the probes' (prompt, answer)
tokenisation and requests tokenised exactly as lm-evaluation-harness's HF backend does.

Owns: `answer_ids`, `Encoder` (lm-eval's `tok_encode`, remembered), `encode_pair`,
`loglikelihood`, `rolling_windows`, `rolling_scores` (token sequences scored whole, window by
window), `loglikelihood_rolling`.
Must not: score by itself (`evals.loglik.score_pairs`) or know facts and metrics.

Definitions:
- Tokenisation (lm-eval 0.4 `TemplateLM._encode_pair`, causal models): trailing whitespace of
  the context moves to the start of the continuation; whole = encode(context + continuation),
  context_ids = encode(context), continuation_ids = whole[len(context_ids):]; `encode` is the
  tokenizer's own `encode` with its default special tokens (a Llama-style tokenizer adds BOS;
  a string already starting with the BOS text gets none added). An empty context scores the
  continuation (encoded without special tokens) after the prefix token (BOS, else EOS); when
  the continuation already starts with it, its first token is the context. Inputs longer than
  the model's context are cut from the left, as lm-eval does (`truncate=True`), or are an
  error naming the request (`truncate=False`).
- Rolling log-likelihood (lm-eval `loglikelihood_rolling`): the document's tokens, after the
  prefix token, are split into disjoint prediction windows of at most max_len tokens, each
  conditioned on as many tokens before it as fit in max_len (`rolling_windows`, lm-eval's
  `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`); the sum over windows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from factflip.data.tokenizer import TokenIds
from factflip.evals.loglik import Scores, score_pairs
from factflip.models.transformer import Transformer


def answer_ids(enc: TokenIds, prompt: str, answer: str, where: str
               ) -> tuple[list[int], list[int]]:
  """The probes' tokenisation of a (prompt, answer) pair (ΔLL, patching, CounterFact scores):
  BOS (when the tokenizer has one) + the prompt's tokens, and the answer as its own segment
  with a leading space (ROME's tok(f" {target}")). `where` names the pair in the error when
  either tokenises to nothing."""
  if answer and not answer[:1].isspace():
    answer = " " + answer
  a_ids = list(enc(answer)) if answer.strip() else []
  if not a_ids:
    raise ValueError(f"{where}: answer {answer.strip()!r} tokenises to nothing")
  p_ids = ([] if enc.bos is None else [enc.bos]) + list(enc(prompt))
  if not p_ids:
    raise ValueError(f"{where}: prompt {prompt!r} tokenises to nothing and there is no BOS")
  return p_ids, a_ids


# lm-evaluation-harness's tokenisation (HF backend, causal models)
class Encoder:
  """`tokenizer.encode` with its default special tokens (lm-eval's `tok_encode`), remembered.
  `prefix` is the token an empty context is scored after: BOS, else EOS."""

  def __init__(self, tokenizer, cache_size: int = 1 << 16):
    self.tokenizer = tokenizer
    self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id)
    self._bos_text = tokenizer.decode([self.prefix]) if self.prefix is not None else None
    self.encode = functools.lru_cache(maxsize=cache_size)(self._encode)

  def _encode(self, text: str, special: bool | None = None) -> tuple[int, ...]:
    kw = {} if special is None else {"add_special_tokens": special}
    if special is None and self._bos_text and text.startswith(self._bos_text):
      kw = {"add_special_tokens": False}
    return tuple(self.tokenizer.encode(text, **kw))


def encode_pair(enc: Encoder, context: str, continuation: str
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(context ids, continuation ids) of a request, as lm-eval's HF backend makes them."""
  if context == "":
    cont = enc.encode(continuation, False)
    if enc.prefix is None:
      raise ValueError("an empty context needs a BOS or EOS token to condition on")
    if cont and cont[0] == enc.prefix:
      return cont[:1], cont[1:]
    return (enc.prefix,), cont
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole, ctx = enc.encode(context + continuation), enc.encode(context)
  return ctx, whole[len(ctx):]


def loglikelihood(model: Transformer, tokenizer, requests: Sequence[tuple[str, str]],
                  batch_size: int = 64, truncate: bool = True, stats: bool = False
                  ) -> Scores:
  """Score (context, continuation) text requests (see the module docstring). `truncate`
  cuts inputs longer than the model's context from the left (lm-eval); False makes that an
  error naming the request."""
  enc = Encoder(tokenizer)
  L = model.cfg.max_seq_len
  pairs, names = [], []
  for i, req in enumerate(requests):
    if len(req) != 2 or not all(isinstance(s, str) for s in req):
      raise ValueError(f"request {i}: {req!r}; expected a (context, continuation) pair of "
                       "strings")
    ctx, cont = encode_pair(enc, *req)
    if not cont:
      raise ValueError(f"request {i}: continuation {req[1]!r} tokenises to nothing")
    if len(cont) > L:
      raise ValueError(f"request {i}: continuation is {len(cont)} tokens, longer than the "
                       f"model's context of {L}")
    if len(ctx) + len(cont) > L + 1:
      if not truncate:
        raise ValueError(f"request {i}: context is {len(ctx)} tokens + continuation "
                         f"{len(cont)}, longer than the model's context of {L} (truncate=True "
                         "cuts the context from the left, as lm-eval does)")
      ctx = ctx[len(ctx) + len(cont) - L - 1:]
    pairs.append((ctx, cont))
    names.append(f"request {i}")
  return score_pairs(model, pairs, batch_size, stats=stats, names=names)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int
                    ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Disjoint (context, prediction) windows covering `tokens` (lm-eval's
  `get_rolling_token_windows(context_len=1)` then `make_disjoint_window`): the first window
  predicts up to max_len tokens after `prefix`; each later one predicts up to max_len tokens
  with as much of the text before them as fits."""
  tokens = list(tokens)
  out, done = [], 0
  if not tokens:
    return out
  first = min(max_len, len(tokens))
  out.append(((prefix, *tokens[:first - 1]), tuple(tokens[:first])))
  done = first
  while done < len(tokens):
    n = min(len(tokens) - done, max_len)
    end = done + n
    ctx = tokens[max(end - max_len - 1, 0):end - 1]
    out.append((ctx, tokens[end - n:end]))
    done = end
  return [(tuple(c[:len(c) - (len(p) - 1)]), tuple(p)) for c, p in out]


def rolling_scores(model: Transformer, texts_ids: Sequence[Sequence[int]],
                   prefix: int | Sequence[int], batch_size: int = 64, max_len: int | None = None, stats: bool = False,
                   names: Sequence[str] | None = None) -> Scores:
  """Scores of whole token sequences, each predicted after `prefix` (one token, or one per
  sequence) in `rolling_windows` of `max_len` (default the model's context): Σ log p over its windows, `greedy` when every token
  is the argmax, and with `stats` per-token arrays covering the whole sequence."""
  max_len = max_len or model.cfg.max_seq_len
  prefixes = [prefix] * len(texts_ids) if isinstance(prefix, int) else list(prefix)
  pairs, owner = [], []
  for i, ids in enumerate(texts_ids):
    for w in rolling_windows(ids, prefixes[i], max_len):
      pairs.append(w)
      owner.append(i)
  names = names or [f"text {i}" for i in range(len(texts_ids))]
  s = score_pairs(model, pairs, batch_size, stats=stats, names=[names[i] for i in owner])
  owner = np.asarray(owner, np.int64)
  logprob = np.zeros(len(texts_ids))
  np.add.at(logprob, owner, s.logprob)
  greedy = np.ones(len(texts_ids), bool)
  np.logical_and.at(greedy, owner, s.greedy)
  out = Scores(logprob, greedy)
  if stats:
    ends = np.cumsum([len(ids) for ids in texts_ids], dtype=np.int64)  # windows in text order
    out = out._replace(**{
        name: np.split(np.concatenate(getattr(s, name) or [np.zeros(0)]), ends)[:-1]
        for name in ("token_logp", "token_mu", "token_var")})
  return out


def loglikelihood_rolling(model: Transformer, tokenizer, texts: Sequence[str],
                          batch_size: int = 64, max_len: int | None = None,
                          stats: bool = False) -> Scores:
  """Σ log p of each whole text (encoded with the tokenizer's special tokens, as lm-eval), in
  windows of `max_len` (default the model's context) tokens; `greedy` is whether every token
  is the argmax. With `stats`, the per-token arrays cover the whole text."""
  enc = Encoder(tokenizer)
  ids = [enc.encode(text) for text in texts]
  for i, toks in enumerate(ids):
    if not toks:
      raise ValueError(f"text {i}: tokenises to nothing")
  return rolling_scores(model, ids, enc.prefix, batch_size, max_len, stats)
