"""Fact preference and the logit lens: equal to direct log-prob sums; state and flip metrics."""

import jax
import numpy as np
import pytest
from flax import nnx

from factflip import Transformer, get_preset
from factflip.evals.loglik import answer_logprob
from factflip.probes import fact_preference as P


@pytest.fixture(scope="module")
def model_and_items(small_world, world_tokenizer):
  cfg = get_preset("tiny-0.5m", vocab_size=len(world_tokenizer), max_seq_len=128)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  items = [f for f in small_world.facts if f.translations and f.neighbours][:6]
  return model, world_tokenizer, items


def direct_logprob(model, tok, prompt, answer, greedy=False):
  p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
  a_ids = tok(" " + answer, add_special_tokens=False).input_ids
  ids = np.asarray([p_ids + a_ids], np.int32)
  logp = np.asarray(jax.nn.log_softmax(model(ids)[0], axis=-1))
  if greedy:   # greedy decoding reproduces the answer: each answer token is the argmax
    return all(logp[len(p_ids) - 1 + j].argmax() == a for j, a in enumerate(a_ids))
  return sum(logp[len(p_ids) - 1 + j, a] for j, a in enumerate(a_ids))


def test_preference_equals_direct_sums_and_lens_ends_at_the_output(model_and_items):
  model, tok, items = model_and_items
  table = P.preference(model, tok, items, batch_size=8, lens=True)
  kinds = set(table["kind"])
  assert kinds == {"prompt", "paraphrase", "question", "language", "neighbour"}
  n = len(table["item"])
  assert all(len(v) == n for v in table.values()) and table["dll_layers"].shape == (n, 5)
  for i in range(0, n, 3):
    want_t = direct_logprob(model, tok, table["prompt"][i], table["true"][i])
    want_c = direct_logprob(model, tok, table["prompt"][i], table["cf"][i])
    assert table["logp_true"][i] == pytest.approx(want_t, abs=1e-4)
    assert table["logp_cf"][i] == pytest.approx(want_c, abs=1e-4)
    assert table["correct"][i] == direct_logprob(model, tok, table["prompt"][i],
                                                 table["true"][i], greedy=True)
  np.testing.assert_allclose(table["dll"], table["logp_true"] - table["logp_cf"], rtol=1e-6)
  np.testing.assert_allclose(table["dll_layers"][:, -1], table["dll"], atol=1e-4)
  assert np.abs(table["dll_layers"][:, 0] - table["dll"]).max() > 1e-3  # layers differ
  # neighbours compare their own answer with the item's counterfactual
  nb = np.flatnonzero(table["kind"] == "neighbour")[0]
  it = next(x for x in items if x.id == table["item"][nb])
  neighbour = it.neighbours[int(table["variant"][nb])]
  assert table["cf"][nb] == it.counterfactual and table["true"][nb] == neighbour.answers[0]
  assert table["prompt"][nb] == neighbour.prompt


def test_bad_inputs(model_and_items):
  model, tok, _ = model_and_items
  with pytest.raises(ValueError, match="tokenises to nothing"):
    P.score(model, tok, ["The capital is"], [""])
  with pytest.raises(ValueError, match="longer than the model's context of 128"):
    P.score(model, tok, ["word " * 300], ["Paris"])
  with pytest.raises(ValueError, match="unknown prompt kinds"):
    P.prompt_rows([], kinds=["prompts"])


def test_states_flips_and_abruptness():
  ref = np.array([2.0, 1.0, 0.7, -1.0, 0.2])          # correct: items 0, 1, 2
  ckpts = np.array([[2.0, 1.0, 0.7, -1.0, 0.2],        # step 0
                    [1.0, -0.6, 0.4, -1.0, 0.2],       # step 10: item 1 flips, 2 ambiguous
                    [-2.0, -0.8, -0.1, 1.0, 0.2]])     # step 20: item 0 flips
  np.testing.assert_array_equal(P.states(ckpts[1]), [1, -1, 0, -1, 0])
  np.testing.assert_allclose(P.flip_rate(ref, ckpts), [0, 1 / 3, 2 / 3])
  np.testing.assert_allclose(P.ambiguity_rate(ckpts), [0.2, 0.4, 0.4])
  np.testing.assert_array_equal(P.flipped(ref, ckpts[2]), [True, True, False, False, False])
  np.testing.assert_allclose(P.state_share(ckpts, P.CORRECT), [0.6, 0.2, 0.2])
  np.testing.assert_allclose(P.state_share(ckpts, P.COUNTERFACTUAL), [0.2, 0.4, 0.4])
  np.testing.assert_array_equal(P.first_flip(ref, ckpts, [0, 10, 20]), [20, 10, -1, -1, -1])
  assert P.abruptness([0, 0.1, 0.7, 0.8]) == pytest.approx(0.6 / 0.8)
  assert np.isnan(P.abruptness([0.2, 0.2]))
  assert P.flip_rate(ref, ckpts, tau=0.0)[1] == pytest.approx(1 / 4)  # τ = 0: item 4 counts


def test_tuned_lens_in_preference(model_and_items):
  """lens=TunedLens: the identity lens is the logit lens; a trained-looking lens gives each
  layer's ΔLL through its translator (checked against tuned_lens_logits), the output unchanged."""
  from factflip.probes.tuned_lens import TunedLens, tuned_lens_logits
  model, tok, items = model_and_items
  logit = P.preference(model, tok, items[:2], kinds=("prompt",), lens=True)
  ident = P.preference(model, tok, items[:2], kinds=("prompt",), lens=TunedLens.identity(model))
  np.testing.assert_allclose(ident["dll_layers"], logit["dll_layers"], atol=1e-5)
  r = np.random.default_rng(0)
  L, D = model.cfg.n_layers, model.cfg.d_model
  lens = TunedLens(weight=jax.numpy.asarray(0.05 * r.standard_normal((L, D, D)), "float32"),
                   bias=jax.numpy.asarray(0.5 * r.standard_normal((L, D)), "float32"),
                   vocab_size=model.cfg.vocab_size)
  tuned = P.preference(model, tok, items[:2], kinds=("prompt",), lens=lens)
  np.testing.assert_allclose(tuned["dll_layers"][:, -1], logit["dll_layers"][:, -1], atol=1e-5)
  assert np.abs(tuned["dll_layers"][:, :-1] - logit["dll_layers"][:, :-1]).max() > 1e-2

  def lens_logprob(prompt, answer):           # Σ log p(answer) per layer through the lens
    p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    a_ids = tok(" " + answer, add_special_tokens=False).input_ids
    lg = tuned_lens_logits(model, lens, np.asarray([p_ids + a_ids], np.int32))
    logp = np.asarray(jax.nn.log_softmax(lg[:, 0], axis=-1))      # [L + 1, T, V]
    return sum(logp[:, len(p_ids) - 1 + j, a] for j, a in enumerate(a_ids))
  want = lens_logprob(tuned["prompt"][0], tuned["true"][0]) - lens_logprob(
      tuned["prompt"][0], tuned["cf"][0])
  np.testing.assert_allclose(tuned["dll_layers"][0], want, atol=1e-3)


def test_greedy_correct_is_the_argmax_of_every_answer_token(model_and_items):
  """`correct` (closed-book accuracy): true exactly when each answer token is the argmax given
  the ones before it — answers made of the model's own greedy tokens are correct, and changing
  any one of their tokens (first or last) makes them incorrect."""
  model, _, _ = model_and_items
  r = np.random.default_rng(0)
  B, T, A = 4, 16, 3
  tokens = r.integers(3, model.cfg.vocab_size, (B, T)).astype(np.int32)
  where = np.tile(np.arange(T - 1 - A, T - 1), (B, 1)).astype(np.int32)
  logits = np.asarray(model(tokens))
  greedy = logits[np.arange(B)[:, None], where].argmax(-1).astype(np.int32)   # [B, A]
  amask = np.ones((B, A), np.float32)
  amask[3, 0] = 0.0                                      # row 3: a 2-token answer
  target = greedy.copy()
  target[1, 0] = (target[1, 0] + 1) % model.cfg.vocab_size   # row 1: wrong first token
  target[2, -1] = (target[2, -1] + 1) % model.cfg.vocab_size  # row 2: wrong last token
  target[3, 0] = (target[3, 0] + 1) % model.cfg.vocab_size    # row 3: masked, so it still counts
  _, hit = answer_logprob(logits[np.arange(B)[:, None], where], target, amask)
  np.testing.assert_array_equal(np.asarray(hit), [True, False, False, True])


def test_a_kept_layout_scores_each_model_with_its_own_parameters(model_and_items):
  """The probe stage's next checkpoint reuses the tokenised layout: values are that model's."""
  model, tok, items = model_and_items
  other = Transformer(model.cfg, rngs=nnx.Rngs(11))
  P._layout.cache_clear()
  first = P.preference(model, tok, items[:3], kinds=("prompt", "question"), batch_size=8)
  second = P.preference(other, tok, items[:3], kinds=("prompt", "question"), batch_size=8)
  assert P._layout.cache_info().hits == 1
  for i in range(len(second["item"])):
    for table, m in ((first, model), (second, other)):
      want = (direct_logprob(m, tok, table["prompt"][i], table["true"][i])
              - direct_logprob(m, tok, table["prompt"][i], table["cf"][i]))
      assert table["dll"][i] == pytest.approx(want, abs=1e-4)
  assert np.abs(first["dll"] - second["dll"]).max() > 1e-2
