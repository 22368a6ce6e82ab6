"""The one teacher-forced scorer (`evals.loglik`): packed shared contexts equal HF
transformers' log-prob sums, lens and Min-K%++ statistics equal direct computations, memory is
bounded per call (text requests on it: test_requests.py)."""


import numpy as np
import pytest
from conftest import torch_logp, torch_pair

from factflip.evals import loglik as LL
from factflip.evals import requests as RQ


@pytest.fixture(scope="module")
def lm(hf_lm_pair):
  return hf_lm_pair


def _pairs(vocab):
  r = np.random.default_rng(0)

  def toks(n):
    return tuple(int(t) for t in r.integers(3, vocab, n))
  shared, one = toks(9), toks(5)
  return [(shared, toks(3)), (shared, toks(1)), (shared, toks(6)),   # a shared context
          (one, toks(1)), (one, toks(1)), (one, toks(1)),            # one-token choices
          (toks(20), toks(4)), (shared, toks(2)), (toks(2), toks(30)),
          (one, toks(1))]


def test_pairs_match_hf_packed_or_not(lm):
  """Σ log p and greedy of every pair (shared contexts packed into one row, duplicates,
  batches of 2 rows) equal the HF model's over each pair alone (1e-4, float32)."""
  model, _, tm = lm
  pairs = _pairs(model.cfg.vocab_size)
  pairs.append(pairs[4])                                   # a duplicate
  # a pair the model answers greedily: its own argmax continuation
  ctx = pairs[6][0]
  cont = []
  for _ in range(3):
    cont.append(int(torch_logp(tm, list(ctx) + cont)[-1].argmax()))
  pairs.append((ctx, tuple(cont)))
  s = LL.score_pairs(model, pairs, batch_size=2, stats=True)
  want = [torch_pair(tm, c, x) for c, x in pairs]
  np.testing.assert_allclose(s.logprob, [w[0] for w in want], atol=1e-4, rtol=1e-5)
  assert s.greedy.tolist() == [w[1] for w in want] and s.greedy[-1]
  for got, w in zip(zip(s.token_logp, s.token_mu, s.token_var), want):
    for g, x in zip(got, w[2:]):
      np.testing.assert_allclose(g, x, atol=1e-4, rtol=1e-4)
  alone = [LL.score_pairs(model, [p]).logprob[0] for p in pairs[:3]]
  np.testing.assert_allclose(s.logprob[:3], alone, atol=1e-5)


def test_continuations_share_a_row_only_where_it_pays():
  """Choices shorter than their context share its row (up to SHARE_GROWTH x the context);
  rolling windows after one BOS token each get a row of their own (packed, they would make one
  row whose attention grows with the square of all of them)."""
  ctx = tuple(range(10))
  mc = [(ctx, (20 + i, 21, 22)) for i in range(30)]                  # 30 choices of 3 tokens
  windows = [((1,), tuple(range(100 + i, 300 + i))) for i in range(8)]
  rows = LL._rows(mc + windows, cap=1 << 13)
  mc_rows = [r for r in rows if r[0] == ctx]
  assert [len(r[1]) for r in mc_rows] == [15, 15]                       # 10 + 15 x 2 = 40
  assert all(n <= LL.SHARE_GROWTH * len(ctx) for _, _, n in mc_rows)
  assert sorted(n for c, _, n in rows if c == (1,)) == [200] * 8       # one row per window


def test_lens_of_packed_rows_equals_lens_of_single_rows(lm):
  model, _, _ = lm
  pairs = _pairs(model.cfg.vocab_size)[:6]
  s = LL.score_pairs(model, pairs, lens=True)
  assert s.lens.shape == (model.cfg.n_layers + 1, len(pairs))
  np.testing.assert_allclose(s.lens[-1], s.logprob, atol=1e-6)
  for i, p in enumerate(pairs):
    np.testing.assert_allclose(s.lens[:, i], LL.score_pairs(model, [p], lens=True).lens[:, 0],
                               atol=1e-5)


def test_bad_pairs_name_the_pair(lm):
  model, _, _ = lm
  with pytest.raises(ValueError, match="q7: the continuation tokenises to nothing"):
    LL.score_pairs(model, [((1, 2), ())], names=["q7"])
  with pytest.raises(ValueError, match="pair 1: empty context"):
    LL.score_pairs(model, [((1,), (2,)), ((), (2,))])
  with pytest.raises(ValueError, match=r"pair 0: context \+ continuation is 50 tokens, longer "
                     r"than the model's context of 48"):
    LL.score_pairs(model, [((3,) * 45, (4,) * 5)])


# ---- lm-evaluation-harness's tokenisation, through its own code ------------------------------
def test_memory_is_bounded_by_tokens_per_call_whatever_the_context_and_vocabulary():
  """A model whose context (1,024) and vocabulary (32,768) are large next to the batch: rolling
  scores with stats of 20 documents of ~1,000 tokens at batch_size 64 run in calls of at most
  MAX_TOKENS padded tokens, each compiled call's temporaries under 1 GB (the whole [rows,
  slots, vocabulary] logits of one 32-row call would be 4.3 GB; measured 0.4 GB), and the
  scores equal those of one document per call."""
  import flax

  from factflip.models import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=32768, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=16, d_ff=64, max_seq_len=1024)
  model = Transformer(cfg, rngs=flax.nnx.Rngs(0))
  rng = np.random.RandomState(0)
  docs = [rng.randint(3, cfg.vocab_size, 990 + i).tolist() for i in range(20)]
  pairs, _ = zip(*[(p, i) for i, d in enumerate(docs) for p in RQ.rolling_windows(d, 1, 1024)])
  layout = LL.layout_pairs(cfg, pairs, batch_size=64)
  assert [arrays[0].shape for arrays, *_ in layout.batches] == [(16, 1024), (16, 1024)]
  for arrays, packed, R, _ in layout.batches:
    compiled = LL._score_rows.lower(model.params(), cfg, *arrays, None, lens=False,
                                    packed=packed, stats=True, n_req=R).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30
  together = RQ.rolling_scores(model, docs, 1, batch_size=64, stats=True)
  alone = RQ.rolling_scores(model, docs, 1, batch_size=1, stats=True)
  np.testing.assert_allclose(together.logprob, alone.logprob, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate(together.token_mu), np.concatenate(alone.token_mu),
                             rtol=1e-5)
  # E[log p^2] - mu^2 in float32 with mu^2 ~ 108: rounding of ~1e-4 either way
  np.testing.assert_allclose(np.concatenate(together.token_var), np.concatenate(alone.token_var),
                             atol=5e-4)
