"""KV-cache generation: greedy token-identical to HF generate; sampling semantics."""

import jax
import numpy as np
import pytest
import torch
from conftest import FAMILIES

from factflip import generate, load_model

PROMPTS = [[1, 17, 33, 8, 90, 45, 12], [1, 5, 77], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 3]]


def hf_greedy(hf_model, prompts, n):
  T = max(map(len, prompts))
  ids = np.zeros((len(prompts), T), np.int64)
  mask = np.zeros((len(prompts), T), np.int64)
  for i, p in enumerate(prompts):
    ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
  with torch.no_grad():
    out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  return out[:, T:].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate_for_20_tokens(family, hf_dirs):
  path, hf_model = hf_dirs[family]
  model = load_model(path)
  gen = generate(model, PROMPTS, 20, stop_tokens=())
  np.testing.assert_array_equal(gen.tokens, hf_greedy(hf_model, PROMPTS, 20))
  assert gen.lengths.tolist() == [20, 20, 20]


@pytest.fixture(scope="module")
def llama(hf_dirs):
  return load_model(hf_dirs["llama"][0])


def test_stop_tokens_end_rows_and_pad(llama):
  free = generate(llama, PROMPTS, 12, stop_tokens=())
  stop = int(free.tokens[0, 3])            # the token row 0 emits 4th becomes a stop token
  gen = generate(llama, PROMPTS, 12, stop_tokens=[stop], pad_id=0)
  first = int(np.argmax(free.tokens[0] == stop))
  assert gen.lengths[0] == first + 1
  np.testing.assert_array_equal(gen.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert (gen.tokens[0, first + 1:] == 0).all()


def test_sampling_is_keyed_and_filters_compose(llama):
  key = jax.random.key(7)
  greedy = generate(llama, PROMPTS, 10, stop_tokens=()).tokens
  a = generate(llama, PROMPTS, 10, temperature=1.0, key=key, stop_tokens=()).tokens
  b = generate(llama, PROMPTS, 10, temperature=1.0, key=key, stop_tokens=()).tokens
  c = generate(llama, PROMPTS, 10, temperature=1.0, key=jax.random.key(8), stop_tokens=()).tokens
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  # top-k 1 and a vanishing top-p both reduce sampling to greedy.
  k1 = generate(llama, PROMPTS, 10, temperature=2.0, top_k=1, key=key, stop_tokens=()).tokens
  p0 = generate(llama, PROMPTS, 10, temperature=2.0, top_p=1e-6, key=key, stop_tokens=()).tokens
  np.testing.assert_array_equal(k1, greedy)
  np.testing.assert_array_equal(p0, greedy)
  # top-k 5 keeps every sampled token among the 5 most likely at that step.
  k5 = generate(llama, PROMPTS[:1], 1, temperature=5.0, top_k=5, key=key, stop_tokens=()).tokens
  logits = np.asarray(llama([PROMPTS[0]]))[0, -1]
  assert int(k5[0, 0]) in np.argsort(-logits)[:5]


def test_fan_out_prefills_once_and_each_copy_is_its_own_continuation(llama):
  """A tuple of temperatures: row i·F + j continues prompt i at temperature j; greedy copies
  equal plain greedy decoding, sampled copies differ from each other, one key → one output,
  and a top-k 1 copy is greedy too."""
  key = jax.random.key(3)
  greedy = generate(llama, PROMPTS, 8, stop_tokens=()).tokens
  temps = (0.0, 1.0, 1.0, 0.0)
  a = generate(llama, PROMPTS, 8, temperature=temps, key=key, stop_tokens=())
  b = generate(llama, PROMPTS, 8, temperature=temps, key=key, stop_tokens=())
  assert a.tokens.shape == (len(PROMPTS) * 4, 8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  rows = a.tokens.reshape(len(PROMPTS), 4, 8)
  np.testing.assert_array_equal(rows[:, 0], greedy)
  np.testing.assert_array_equal(rows[:, 3], greedy)
  assert (rows[:, 1] != rows[:, 2]).any() and (rows[:, 1] != greedy).any()
  k1 = generate(llama, PROMPTS, 8, temperature=(0.0, 3.0), top_k=1, key=key, stop_tokens=())
  np.testing.assert_array_equal(k1.tokens.reshape(len(PROMPTS), 2, 8)[:, 1], greedy)
  with pytest.raises(ValueError, match="temperatures >= 0"):
    generate(llama, PROMPTS, 4, temperature=(0.0, -1.0), key=key)


def test_prompt_lengths_in_one_bucket_reuse_the_compiled_program(llama):
  from factflip.models.generate import _generate

  generate(llama, [[1, 2, 3]], 5, stop_tokens=())
  before = _generate._cache_size()
  generate(llama, [[1, 2, 3, 4, 5, 6, 7, 8]], 8, stop_tokens=())   # cache: 16 + 8 -> 24 slots
  assert _generate._cache_size() == before
  generate(llama, [[1] * 17], 5, stop_tokens=())                     # prompt bucket 24: new
  assert _generate._cache_size() == before + 1


def test_bad_generate_arguments(llama):
  with pytest.raises(ValueError, match="PRNG key"):
    generate(llama, PROMPTS, 4, temperature=0.7)
  with pytest.raises(ValueError, match="at least one token"):
    generate(llama, [[]], 4)
  with pytest.raises(ValueError, match="exceeds the model's context"):
    generate(llama, PROMPTS, 10_000)
  with pytest.raises(ValueError, match="top_p"):
    generate(llama, PROMPTS, 4, temperature=1.0, top_p=0.0, key=jax.random.key(0))
