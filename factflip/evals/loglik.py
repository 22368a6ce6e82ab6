"""Log-likelihood requests: the one teacher-forced scorer of factflip.

Owns: `answer_logprob` (Σ log p of target tokens and greedy agreement from the logits that
predict them), `score_pairs` (that scorer for many (context ids, continuation ids) pairs:
shared contexts scored once, power-of-two buckets, one compiled program per bucket, logits
only where they are read; optionally the logit / tuned lens at every layer and per-token
statistics for membership inference). Text requests on top of it: `evals.requests`.
Must not: know facts, prompts, text or metrics (probes and `evals.*` build the pairs).

Definitions:
- loglikelihood(context, continuation) = (Σ_t log p(c_t | context, c_<t), is_greedy), where
  is_greedy = every c_t is the argmax of its distribution (teacher forced); log-softmax in
  float32 whatever the parameters' dtype.
How pairs are computed: identical pairs once; pairs that share a context are packed into one
row — the context once, then every continuation but its last token, each attending to the
context and to its own earlier tokens only (positions restart after the context), so k
choices of a multiple-choice question cost one context, and one-token continuations cost
nothing beyond it. A continuation shares only when that pays (`_rows`: no longer than its
context, the row at most SHARE_GROWTH times the context): rolling windows after one BOS token
each get their own row. Rows without sharing run the plain causal forward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention
from factflip.models.config import ModelConfig
from factflip.models.transformer import Transformer, forward, unembed
from factflip.sharding import to_host


def answer_logprob(logits_BxAxV: jax.Array, target_BxA: jax.Array, amask_BxA: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """From the logits at the A positions that predict the answer tokens `target_BxA` (amask 0
  on padding): Σ log p(answer) [B] (log-softmax in float32) and greedy [B] (every answer
  token is the argmax given the ones before it)."""
  logp_BxA, hit_BxA, _ = _token_logprob(logits_BxAxV, target_BxA)
  hit_BxA = hit_BxA | (amask_BxA == 0)
  return (logp_BxA * amask_BxA).sum(-1), hit_BxA.all(-1)


def _token_logprob(logits_BxAxV, target_BxA):
  """log p of each target [B, A], whether it is the argmax [B, A], and every log p [B, A, V]."""
  logp_BxAxV = jax.nn.log_softmax(logits_BxAxV.astype(jnp.float32), axis=-1)
  logp_BxA = jnp.take_along_axis(logp_BxAxV, target_BxA[..., None], axis=-1)[..., 0]
  return logp_BxA, logits_BxAxV.argmax(-1) == target_BxA, logp_BxAxV


# Memory bounds of the scorer, whatever the model's context and vocabulary: a compiled call
# holds at most MAX_TOKENS padded tokens (rows x length; a single row longer than that runs
# alone), and its [positions, vocabulary] logits exist LOGIT_ELEMENTS floats at a time.
MAX_TOKENS = 1 << 14
LOGIT_ELEMENTS = 1 << 25
SHARE_GROWTH = 4       # a row shared by continuations of one context: at most 4x its length


def _read_slots(params, cfg: ModelConfig, h_BxAxD, target_BxA, stats: bool):
  """At each read slot: log p of its target, whether the target is the argmax, and with
  `stats` the mean and variance of log p under the whole next-token distribution — {name:
  [B, A]}. The slots are unembedded in chunks of LOGIT_ELEMENTS // V (`lax.map`), so the
  [B, A, V] logits never exist whole."""
  B, A, D = h_BxAxD.shape

  def read(h_NxD, t_N):
    logp_N, hit_N, logp_NxV = _token_logprob(unembed(params, cfg, h_NxD), t_N)
    out = {"logp": logp_N, "hit": hit_N}
    if stats:
      p_NxV = jnp.exp(logp_NxV)
      out["mu"] = (p_NxV * logp_NxV).sum(-1)
      out["var"] = jnp.maximum((p_NxV * logp_NxV ** 2).sum(-1) - out["mu"] ** 2, 0.0)
    return out

  N, C = B * A, max(1, LOGIT_ELEMENTS // cfg.vocab_size)
  if C >= N:
    out = read(h_BxAxD.reshape(N, D), target_BxA.reshape(N))
  else:
    n = -(-N // C)
    h_nxCxD = jnp.pad(h_BxAxD.reshape(N, D), ((0, n * C - N), (0, 0))).reshape(n, C, D)
    t_nxC = jnp.pad(target_BxA.reshape(N), (0, n * C - N)).reshape(n, C)
    out = jax.tree.map(lambda x: x.reshape(n * C)[:N],
                       jax.lax.map(lambda xs: read(*xs), (h_nxCxD, t_nxC)))
  return jax.tree.map(lambda x: x.reshape(B, A), out)


class Scores(NamedTuple):
  """Per pair: `logprob` float64 [N] (Σ log p of the continuation), `greedy` bool [N]; with
  lens, `lens` float64 [L + 1, N] (layer 0 = embeddings, L = the output); with stats, per
  continuation token: `token_logp`, and the mean `token_mu` and variance `token_var` of log p
  under the full next-token distribution (Min-K%++), each a list of N float64 arrays."""
  logprob: np.ndarray
  greedy: np.ndarray
  lens: np.ndarray | None = None
  token_logp: list[np.ndarray] | None = None
  token_mu: list[np.ndarray] | None = None
  token_var: list[np.ndarray] | None = None


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _exact(n: int, minimum: int = 16) -> int:
  """`_bucket`'s signature without the bucketing: the size itself (`minimum` unused)."""
  return max(n, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "lens", "packed", "stats", "n_req"))
def _score_rows(params, cfg: ModelConfig, tokens_BxT, mask_BxT, pos_BxT, branch_BxT, where_BxA,
                target_BxA, req_BxA, tuned=None, *, lens: bool, packed: bool, stats: bool,
                n_req: int):
  """Per row: Σ log p per request slot [(L + 1,) B, R], greedy [B, R], and with `stats` the
  per-slot log p, mean and variance of log p [B, A]. Logits only at the A read positions."""
  if packed:     # a token sees earlier positions of the context (branch 0) and its own branch
    B = tokens_BxT.shape[0]
    see_BxTxT = ((pos_BxT[:, None, :] <= pos_BxT[:, :, None])
                 & ((branch_BxT[:, None, :] == 0) | (branch_BxT[:, None, :] == branch_BxT[
                     :, :, None])) & mask_BxT[:, None, :])
    zeros = jnp.zeros((cfg.n_layers, B, 0, cfg.n_kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    ctx = attention.with_prefix((zeros, zeros), see_BxTxT, pos_BxT)
  else:
    ctx = attention.causal(mask_BxT)
  out = forward(params, cfg, tokens_BxT, ctx, capture=("resid_pre",) if lens else (),
                return_logits=False)
  if lens:
    h_LxBxTxD = jnp.concatenate([out.captures["resid_pre"], out.residual[None]], axis=0)
  else:
    h_LxBxTxD = out.residual[None]
  h_LxBxAxD = jnp.take_along_axis(h_LxBxTxD, where_BxA[None, :, :, None], axis=2)
  if tuned is not None:
    L, B, A, D = h_LxBxAxD.shape
    t_LxBxAxD = tuned.translate(h_LxBxAxD[:-1].reshape(L - 1, B * A, D)).reshape(
        L - 1, B, A, D).astype(h_LxBxAxD.dtype)
    h_LxBxAxD = jnp.concatenate([t_LxBxAxD, h_LxBxAxD[-1:]], axis=0)
  onehot_BxAxR = (req_BxA[..., None] == jnp.arange(n_req)).astype(jnp.float32)  # -1: padding

  def per_layer(h_BxAxD):
    logp_BxA = _read_slots(params, cfg, h_BxAxD, target_BxA, False)["logp"]
    return jnp.einsum("ba,bar->br", logp_BxA, onehot_BxAxR)
  # the output layer once: its sums, greedy agreement and (with stats) the distribution's moments
  read = _read_slots(params, cfg, h_LxBxAxD[-1], target_BxA, stats)
  miss_BxA = (~read["hit"]).astype(jnp.float32)
  sums_BxR = jnp.einsum("ba,bar->br", read["logp"], onehot_BxAxR)
  res = {"sums": sums_BxR,
         "greedy": jnp.einsum("ba,bar->br", miss_BxA, onehot_BxAxR) == 0}
  if lens:
    res["sums"] = jnp.concatenate([jax.lax.map(per_layer, h_LxBxAxD[:-1]), sums_BxR[None]])
  if stats:
    res.update(mu=read["mu"], var=read["var"], logp=read["logp"])
  return res

def _rows(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], cap: int):
  """Pack unique pairs into rows: [(context, [pair index, ...], row length)]. A continuation
  shares its context's row when sharing pays: it is no longer than the context (it saves at
  least the tokens it adds), and the row (context + every continuation but its last token)
  stays within `cap` and SHARE_GROWTH times the context, because a row's attention grows with
  its square (k rolling windows of m tokens after one BOS token, packed into one row, cost
  (k·m)² attention against k·m² as k rows). Other continuations get a row of their own."""
  by_ctx: dict[tuple[int, ...], list[int]] = {}
  for i, (ctx, _) in enumerate(pairs):
    by_ctx.setdefault(ctx, []).append(i)
  rows = []
  for ctx, idx in by_ctx.items():
    row, n = [], len(ctx)
    limit = min(cap, SHARE_GROWTH * len(ctx))
    for i in sorted(idx, key=lambda i: len(pairs[i][1])):
      extra = len(pairs[i][1]) - 1
      if extra >= len(ctx):                    # longer than its context: alone
        rows.append((ctx, [i], len(ctx) + extra))
        continue
      if row and n + extra > limit:
        rows.append((ctx, row, n))
        row, n = [], len(ctx)
      row.append(i)
      n += extra
    if row:
      rows.append((ctx, row, n))
  return rows


class PairLayout(NamedTuple):
  """How `score_pairs` lays out pairs: `keys` [N] (each pair's unique index), `unique` (the
  unique (context, continuation) pairs) and `batches`: per compiled call, its arrays, its
  static arguments and where each unique pair's sums sit (row b, request slot k, first answer
  slot a0). Built once, it can be scored again on other parameters of the same model shape
  (`score_layout`: the training monitor scores its watch list this way)."""
  keys: np.ndarray
  unique: list[tuple[tuple[int, ...], tuple[int, ...]]]
  batches: list[tuple[tuple[np.ndarray, ...], bool, int, list[tuple[int, int, int, int]]]]


def _rows_that_fit(length: int, rows: int, max_tokens: int) -> int:
  """The rows of `length` tokens a call holds: `rows`, or the largest power of two whose
  rows x length stays within max_tokens (at least 1)."""
  fit = max(1, max_tokens // max(length, 1))
  return min(rows, 1 << (fit.bit_length() - 1))


def layout_pairs(cfg: ModelConfig, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                 batch_size: int = 64, names: Sequence[str] | None = None,
                 exact: bool = False, max_tokens: int = MAX_TOKENS) -> PairLayout:
  """Check the pairs (errors name them: `names`, default "pair i") and lay them out: identical
  pairs once, pairs sharing a context packed into one row, rows sorted by length into
  power-of-two buckets of `batch_size` rows (so different pair sets share compiled programs),
  fewer where rows x length would pass `max_tokens` (long rows: a power of two that fits).
  exact=True: each call's shapes are its own rows' (no padding to buckets), for a layout that
  is scored many times (its programs compile once anyway)."""
  keys, uniq = [], {}
  for i, (ctx, cont) in enumerate(pairs):
    where = names[i] if names is not None else f"pair {i}"
    ctx, cont = tuple(int(t) for t in ctx), tuple(int(t) for t in cont)
    if not ctx:
      raise ValueError(f"{where}: empty context; expected at least one token (e.g. BOS)")
    if not cont:
      raise ValueError(f"{where}: the continuation tokenises to nothing")
    if len(ctx) + len(cont) - 1 > cfg.max_seq_len:
      raise ValueError(f"{where}: context + continuation is {len(ctx) + len(cont)} tokens, "
                       f"longer than the model's context of {cfg.max_seq_len} (+ 1)")
    keys.append(uniq.setdefault((ctx, cont), len(uniq)))
  upairs = list(uniq)
  rows = _rows(upairs, cfg.max_seq_len)
  rows.sort(key=lambda r: r[2])
  B = batch_size if len(rows) > batch_size else _bucket(len(rows), minimum=1)
  bucket = _exact if exact else _bucket
  batches = []
  start = 0
  while start < len(rows):                 # rows ascend in length: a call ends where the next
    end = start + 1                        # row would not fit its (longer) bucket's budget
    while end < len(rows) and end - start < _rows_that_fit(bucket(rows[end][2]), B, max_tokens):
      end += 1
    chunk, start = rows[start:end], end
    slots = [n - len(c) + len(r) for c, r, n in chunk]      # Σ len(cont) per row
    T_, A = bucket(max(n for _, _, n in chunk)), bucket(max(slots), minimum=4)
    R = bucket(max(len(r) for _, r, _ in chunk), minimum=1)
    rows_B = len(chunk) if exact else _rows_that_fit(T_, B, max_tokens)
    tokens = np.zeros((rows_B, T_), np.int32)
    mask = np.zeros((rows_B, T_), bool)
    pos = np.zeros((rows_B, T_), np.int32)
    branch = np.zeros((rows_B, T_), np.int32)
    where = np.zeros((rows_B, A), np.int32)
    target = np.zeros((rows_B, A), np.int32)
    req = np.full((rows_B, A), -1, np.int32)
    place = []
    for b, (ctx, r, _) in enumerate(chunk):
      n = len(ctx)
      tokens[b, :n], mask[b, :n], pos[b, :n] = ctx, True, np.arange(n)
      t, a = n, 0                               # next input position, next answer slot
      for k, i in enumerate(r):
        cont = upairs[i][1]
        m = len(cont) - 1                       # inputs of this branch: cont[:-1]
        tokens[b, t:t + m], mask[b, t:t + m] = cont[:-1], True
        pos[b, t:t + m], branch[b, t:t + m] = np.arange(n, n + m), k + 1
        where[b, a] = n - 1                     # the first token is predicted by the context
        where[b, a + 1:a + 1 + m] = np.arange(t, t + m)
        target[b, a:a + m + 1], req[b, a:a + m + 1] = cont, k
        place.append((b, k, i, a))
        t, a = t + m, a + m + 1
    # packed: some row shares its context
    batches.append(((tokens, mask, pos, branch, where, target, req), R > 1, R, place))
  return PairLayout(np.asarray(keys, np.int64), upairs, batches)


def score_layout(params, cfg: ModelConfig, layout: PairLayout, lens=False,
                 stats: bool = False) -> Scores:
  """`score_pairs` on laid-out pairs with these parameters (lens: False, True or a TunedLens)."""
  tuned = None if isinstance(lens, bool) or lens is None else lens
  lens = lens is not False and lens is not None
  upairs = layout.unique
  n_out = cfg.n_layers + 1 if lens else 1
  logprob = np.zeros((n_out, len(upairs)))
  greedy = np.zeros(len(upairs), bool)
  tok = {k: [None] * len(upairs) for k in ("logp", "mu", "var")} if stats else None
  # every batch dispatched before the first is read: the host lays out results meanwhile
  pending = [_score_rows(params, cfg, *arrays, tuned, lens=lens, packed=packed, stats=stats,
                         n_req=R) for arrays, packed, R, _ in layout.batches]
  for (arrays, _, R, place), res in zip(layout.batches, pending):
    res = to_host(res)
    B = arrays[0].shape[0]
    sums = np.asarray(res["sums"], np.float64).reshape(n_out, B, R)
    for b, k, i, a0 in place:
      logprob[:, i] = sums[:, b, k]
      greedy[i] = res["greedy"][b, k]
      if stats:
        m = len(upairs[i][1])
        for name in tok:
          tok[name][i] = np.asarray(res[name][b, a0:a0 + m], np.float64)
  keys = layout.keys
  out = Scores(logprob[-1][keys], greedy[keys], logprob[:, keys] if lens else None)
  if stats:
    out = out._replace(**{f"token_{k}": [v[j] for j in keys] for k, v in tok.items()})
  return out


def score_pairs(model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                batch_size: int = 64, lens=False, stats: bool = False,
                names: Sequence[str] | None = None) -> Scores:
  """Σ log p(continuation | context) and greedy agreement for token-id pairs (context ≥ 1 token,
  continuation ≥ 1 token, len(context) + len(continuation) ≤ max_seq_len + 1: the last
  continuation token is never an input). `lens`: True for the logit lens, or a
  `probes.TunedLens`; `stats`: per-token log p, mean and variance (Min-K%++). `names` name
  the pairs in errors (default "pair i"). Rows are sorted by length into power-of-two buckets
  of `batch_size` rows, so each (batch, length, slots) bucket compiles once."""
  if not (isinstance(lens, bool) or lens is None):
    lens.check_fits(model.cfg, "score")
  return score_layout(model.params(), model.cfg,
                      layout_pairs(model.cfg, pairs, batch_size, names), lens, stats)
