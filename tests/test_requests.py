"""Text requests (`evals.requests`): tokenised and windowed exactly as lm-evaluation-harness's HF
backend does, and scored as HF transformers score them."""

import types

import numpy as np
import pytest
from conftest import torch_pair

from factflip.evals import requests as RQ


@pytest.fixture(scope="module")
def lm(hf_lm_pair):
  return hf_lm_pair


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
  enc = RQ.Encoder(tok)
  want = lm_eval_shim.loglikelihood([types.SimpleNamespace(args=r) for r in REQUESTS],
                                    disable_tqdm=True)
  assert [RQ.encode_pair(enc, *r) for r in REQUESTS] == want
  assert want[2][0] == (tok.bos_token_id,) and want[3][0][0] == tok.bos_token_id
  assert want[3][0].count(tok.bos_token_id) == 1            # no second BOS added


def test_loglikelihood_of_text_requests_matches_hf(lm, lm_eval_shim):
  model, tok, tm = lm
  reqs = REQUESTS[:-1]
  s = RQ.loglikelihood(model, tok, reqs)
  pairs = lm_eval_shim.loglikelihood([types.SimpleNamespace(args=r) for r in reqs],
                                     disable_tqdm=True)
  want = [torch_pair(tm, c, x) for c, x in pairs]
  np.testing.assert_allclose(s.logprob, [w[0] for w in want], atol=1e-4, rtol=1e-5)
  assert s.greedy.tolist() == [w[1] for w in want]
  with pytest.raises(ValueError, match=r"request 6: continuation '' tokenises to nothing"):
    RQ.loglikelihood(model, tok, REQUESTS)
  with pytest.raises(ValueError, match=r"request 0: \('a',\); expected a \(context, "):
    RQ.loglikelihood(model, tok, [("a",)])


def test_long_contexts_are_cut_from_the_left_as_lm_eval_does(lm, lm_eval_shim):
  model, tok, tm = lm
  ctx = " ".join(["Alice Smith was born in Paris and lives in Rome."] * 6)
  c_ids, x_ids = lm_eval_shim._encode_pair(ctx, " Oslo")
  assert len(c_ids) + len(x_ids) > 49
  kept = (list(c_ids) + list(x_ids))[-49:]                # lm-eval: [-(max_length + 1):]
  want = torch_pair(tm, kept[:len(kept) - len(x_ids)], x_ids)[0]
  np.testing.assert_allclose(RQ.loglikelihood(model, tok, [(ctx, " Oslo")]).logprob, [want],
                             atol=1e-4)
  with pytest.raises(ValueError, match=r"request 0: context is \d+ tokens \+ continuation 2?\d?, "
                     r"longer than the model's context of 48 \(truncate=True"):
    RQ.loglikelihood(model, tok, [(ctx, " Oslo")], truncate=False)


@pytest.mark.parametrize("n,max_len", [(1, 48), (5, 48), (47, 48), (48, 48), (49, 48),
                                       (150, 48), (23, 10), (7, 1)])
def test_rolling_windows_are_lm_evals(n, max_len):
  pytest.importorskip("lm_eval")
  from lm_eval import utils
  toks = list(range(10, 10 + n))
  want = [tuple(map(tuple, w)) for w in map(utils.make_disjoint_window,
                                            utils.get_rolling_token_windows(toks, 0, max_len, 1))]
  assert RQ.rolling_windows(toks, 0, max_len) == want
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
  s = RQ.loglikelihood_rolling(model, tok, [text, "Bob"], stats=True)
  np.testing.assert_allclose(s.logprob[0], want, atol=5e-4, rtol=1e-5)
  assert len(s.token_logp[0]) == len(ids) and len(s.token_mu[1]) == len(tok.encode("Bob"))
  np.testing.assert_allclose(s.token_logp[0].sum(), s.logprob[0], atol=1e-6)
