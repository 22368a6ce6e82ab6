"""factflip model directories, presets, tokenizers and text generation end to end."""

import jax
import numpy as np
import pytest
from flax import nnx

from factflip import (
  Transformer,
  get_preset,
  load_model,
  load_tokenizer,
  presets,
  save_hf,
  save_model,
)
from factflip.models import generate_text


def test_presets_ladder_and_real_shapes():
  counts = presets()
  for name, lo, hi in [("tiny-0.5m", 0.4e6, 0.6e6), ("tiny-2m", 1.7e6, 2.3e6),
                       ("tiny-8m", 7e6, 9e6), ("tiny-30m", 26e6, 34e6)]:
    assert lo <= counts[name] <= hi, name
  # published parameter counts of the real models
  assert counts["llama-3.2-1b"] == 1_235_814_400
  assert counts["llama-3.1-8b"] == 8_030_261_248
  assert counts["qwen2.5-0.5b"] == 494_032_768
  assert counts["gemma-2-2b"] == 2_614_341_888
  assert counts["mistral-7b-v0.3"] == 7_248_023_552
  assert list(counts.values()) == sorted(counts.values())
  with pytest.raises(KeyError, match="unknown model preset"):
    get_preset("gpt-5")


def test_native_round_trip_is_exact(tmp_path, batch):
  tokens, mask = batch
  cfg = get_preset("tiny-0.5m", vocab_size=101, remat="full")
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  save_model(model, str(tmp_path / "m"))
  again = load_model(str(tmp_path / "m"))
  assert again.cfg == cfg
  for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(again(tokens, mask)), np.asarray(model(tokens, mask)))


def test_bfloat16_compute_with_float32_params(batch):
  tokens, mask = batch
  cfg = get_preset("tiny-0.5m", vocab_size=101)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  mixed = Transformer(cfg.replace(dtype="bfloat16"), params=model.params())
  ref, out = np.asarray(model(tokens, mask)), np.asarray(mixed(tokens, mask))
  assert out.dtype == np.float32 and 0 < np.abs(out - ref).max() < 0.05


def word_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(97)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(str(tmp_path))
  return fast


def test_tokenizer_and_generate_text_through_an_hf_export(hf_dirs, tmp_path):
  word_tokenizer(tmp_path / "tok")
  tok = load_tokenizer(str(tmp_path / "tok"))
  assert tok.encode("w1 w2 w96") == [5, 6, 100]
  model = load_model(hf_dirs["mistral"][0])
  save_hf(model, str(tmp_path / "export"), tokenizer=tok)
  tok2 = load_tokenizer(str(tmp_path / "export"))
  model2 = load_model(str(tmp_path / "export"))
  texts = ["w1 w2 w3", "w50"]
  out = generate_text(model2, tok2, texts, 6, stop_tokens=())
  assert out == generate_text(model, tok, texts, 6, stop_tokens=())
  assert all(len(o.split()) == 6 and all(w.startswith("w") or w.startswith("<") for w in o.split())
             for o in out)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_gradients(policy, batch):
  from factflip.models import attention, forward

  tokens, mask = batch
  cfg = get_preset("tiny-0.5m", vocab_size=101)
  params = Transformer(cfg, rngs=nnx.Rngs(0)).params()

  def loss(p, c):
    logits = forward(p, c, tokens, attention.causal(mask)).logits
    return -jax.nn.log_softmax(logits)[..., 0].mean()

  g_ref = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
  g = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=policy))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert float(np.abs(np.asarray(g_ref["layers"]["wq"])).max()) > 0
