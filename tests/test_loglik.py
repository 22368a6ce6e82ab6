"""The one teacher-forced scorer (`evals.loglik`): packed shared contexts equal HF
transformers' log-prob sums, lens and Min-K%++ statistics equal direct computations, and text
requests are tokenised and windowed exactly as lm-evaluation-harness's HF backend does."""

import types

import numpy as np
import pytest

from factflip import load_model, load_tokenizer
from factflip.evals import loglik as LL


@pytest.fixture(scope="module")
def lm(hf_lm):
  d, torch_model = hf_lm
  return load_model(d), load_tokenizer(d), torch_model


def torch_logp(torch_model, ids):
  """log-softmax [len(ids), V] (float64) of the HF model over one unpadded sequence."""
  import torch
  with torch.no_grad():
    logits = torch_model(torch.tensor([list(ids)])).logits[0]
  return torch.log_softmax(logits.double(), -1).numpy()


def torch_pair(torch_model, ctx, cont):
  """(Σ log p, greedy, per-token log p, mean and variance of log p) of cont after ctx."""
  lp = torch_logp(torch_model, list(ctx) + list(cont)[:-1])
  rows = lp[len(ctx) - 1:]
  tok = rows[np.arange(len(cont)), list(cont)]
  p = np.exp(rows)
  mu = (p * rows).sum(-1)
  var = (p * rows ** 2).sum(-1) - mu ** 2
  return tok.sum(), bool((rows.argmax(-1) == np.asarray(cont)).all()), tok, mu, var


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
@pytest.fixture(scope="module")
def lm_eval_shim(lm):
  """lm-eval's HFLM tokenisation methods (tok_encode, _encode_pair, loglikelihood's empty
  context rule) bound to our tokenizer without loading a torch model."""
  pytest.importorskip("lm_eval")
  from lm_eval.api.model import TemplateLM
  from lm_eval.models.huggingface import HFLM
  _, tok, _ = lm

  class Shim:
    backend = "causal"
    add_bos_token = None
    custom_prefix_token_id = None
    tokenizer = tok
    tok_encode = HFLM.tok_encode
    prefix_token_id = HFLM.prefix_token_id
    _encode_pair = TemplateLM._encode_pair
    loglikelihood = TemplateLM.loglikelihood

    def _loglikelihood_tokens(self, reqs, **kw):
      return [(tuple(c), tuple(x)) for _, c, x in reqs]
  return Shim()


REQUESTS = [("Alice Smith was born in", " Paris"), ("Question: where? Answer: ", "Rome"),
            ("", "Hello world"), ("<|bos|>Bob lives in", " Oslo"), ("abc  ", "d e"),
            ("The city\n", "\nof Lima"), ("x", "")]


def test_requests_are_tokenised_as_lm_eval_does(lm, lm_eval_shim):
  _, tok, _ = lm
  enc = LL.Encoder(tok)
  want = lm_eval_shim.loglikelihood([types.SimpleNamespace(args=r) for r in REQUESTS],
                                    disable_tqdm=True)
  assert [LL.encode_pair(enc, *r) for r in REQUESTS] == want
  assert want[2][0] == (tok.bos_token_id,) and want[3][0][0] == tok.bos_token_id
  assert want[3][0].count(tok.bos_token_id) == 1            # no second BOS added


def test_loglikelihood_of_text_requests_matches_hf(lm, lm_eval_shim):
  model, tok, tm = lm
  reqs = REQUESTS[:-1]
  s = LL.loglikelihood(model, tok, reqs)
  pairs = lm_eval_shim.loglikelihood([types.SimpleNamespace(args=r) for r in reqs],
                                     disable_tqdm=True)
  want = [torch_pair(tm, c, x) for c, x in pairs]
  np.testing.assert_allclose(s.logprob, [w[0] for w in want], atol=1e-4, rtol=1e-5)
  assert s.greedy.tolist() == [w[1] for w in want]
  with pytest.raises(ValueError, match=r"request 6: continuation '' tokenises to nothing"):
    LL.loglikelihood(model, tok, REQUESTS)
  with pytest.raises(ValueError, match=r"request 0: \('a',\); expected a \(context, "):
    LL.loglikelihood(model, tok, [("a",)])


def test_long_contexts_are_cut_from_the_left_as_lm_eval_does(lm, lm_eval_shim):
  model, tok, tm = lm
  ctx = " ".join(["Alice Smith was born in Paris and lives in Rome."] * 6)
  c_ids, x_ids = lm_eval_shim._encode_pair(ctx, " Oslo")
  assert len(c_ids) + len(x_ids) > 49
  kept = (list(c_ids) + list(x_ids))[-49:]                # lm-eval: [-(max_length + 1):]
  want = torch_pair(tm, kept[:len(kept) - len(x_ids)], x_ids)[0]
  np.testing.assert_allclose(LL.loglikelihood(model, tok, [(ctx, " Oslo")]).logprob, [want],
                             atol=1e-4)
  with pytest.raises(ValueError, match=r"request 0: context is \d+ tokens \+ continuation 2?\d?, "
                     r"longer than the model's context of 48 \(truncate=True"):
    LL.loglikelihood(model, tok, [(ctx, " Oslo")], truncate=False)


@pytest.mark.parametrize("n,max_len", [(1, 48), (5, 48), (47, 48), (48, 48), (49, 48),
                                       (150, 48), (23, 10), (7, 1)])
def test_rolling_windows_are_lm_evals(n, max_len):
  pytest.importorskip("lm_eval")
  from lm_eval import utils
  toks = list(range(10, 10 + n))
  want = [tuple(map(tuple, w)) for w in map(utils.make_disjoint_window,
                                            utils.get_rolling_token_windows(toks, 0, max_len, 1))]
  assert LL.rolling_windows(toks, 0, max_len) == want
  assert [t for _, p in want for t in p] == toks


def test_rolling_loglikelihood_of_a_long_text(lm):
  """A text of over two context windows: Σ over lm-eval's windows of the HF model's log p;
  the per-token statistics cover every token once."""
  pytest.importorskip("lm_eval")
  from lm_eval import utils
  model, tok, tm = lm
  text = " ".join(["Alice Smith was born in Paris and lives in Rome."] * 12)
  ids = tok.encode(text)
  assert len(ids) > 2 * 48
  want = sum(torch_pair(tm, c, p)[0] for c, p in map(
      utils.make_disjoint_window, utils.get_rolling_token_windows(ids, tok.bos_token_id, 48, 1)))
  s = LL.loglikelihood_rolling(model, tok, [text, "Bob"], stats=True)
  np.testing.assert_allclose(s.logprob[0], want, atol=5e-4, rtol=1e-5)
  assert len(s.token_logp[0]) == len(ids) and len(s.token_mu[1]) == len(tok.encode("Bob"))
  np.testing.assert_allclose(s.token_logp[0].sum(), s.logprob[0], atol=1e-6)


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
  pairs, _ = zip(*[(p, i) for i, d in enumerate(docs) for p in LL.rolling_windows(d, 1, 1024)])
  layout = LL.layout_pairs(cfg, pairs, batch_size=64)
  assert [arrays[0].shape for arrays, *_ in layout.batches] == [(16, 1024), (16, 1024)]
  for arrays, packed, R, _ in layout.batches:
    compiled = LL._score_rows.lower(model.params(), cfg, *arrays, None, lens=False,
                                    packed=packed, stats=True, n_req=R).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30
  together = LL.rolling_scores(model, docs, 1, batch_size=64, stats=True)
  alone = LL.rolling_scores(model, docs, 1, batch_size=1, stats=True)
  np.testing.assert_allclose(together.logprob, alone.logprob, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate(together.token_mu), np.concatenate(alone.token_mu),
                             rtol=1e-5)
  # E[log p^2] - mu^2 in float32 with mu^2 ~ 108: rounding of ~1e-4 either way
  np.testing.assert_allclose(np.concatenate(together.token_var), np.concatenate(alone.token_var),
                             atol=5e-4)
