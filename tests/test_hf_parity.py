"""Parity with HF transformers (PyTorch, float32) per family: logits, every layer's hidden
state, padded batches, sequences past the sliding window, and exact round trips."""

import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILIES, torch_forward

from factflip import load_model, save_hf
from factflip.models.transformer import norm
from factflip.probes import residual_stream

TOL = 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_hf(family, hf_dirs, batch):
  path, hf_model = hf_dirs[family]
  tokens, mask = batch
  model = load_model(path)
  ref_logits, ref_hidden = torch_forward(hf_model, tokens, mask)

  logits = np.asarray(model(tokens, mask))
  assert logits.shape == ref_logits.shape
  assert np.abs(logits - ref_logits)[mask].max() <= TOL

  stream = np.asarray(residual_stream(model, tokens, mask))  # [L + 1, B, T, D]
  L = model.cfg.n_layers
  assert stream.shape == (L + 1, *tokens.shape, model.cfg.d_model)
  for layer in range(L):  # HF's hidden_states[l] = input of block l
    assert np.abs(stream[layer] - ref_hidden[layer])[mask].max() <= TOL, layer
  # HF's last hidden state is after the final norm; ours is before it.
  params = model.params()
  final = np.asarray(norm(stream[L], params["final_norm"], params.get("final_norm_bias"),
                          model.cfg))
  assert np.abs(final - ref_hidden[L])[mask].max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_ours_hf_ours_is_exact(family, hf_dirs, batch, tmp_path):
  path, hf_model = hf_dirs[family]
  tokens, mask = batch
  model = load_model(path)
  save_hf(model, str(tmp_path))
  again = load_model(str(tmp_path))
  for a, b in zip(jax_leaves(model.params()), jax_leaves(again.params())):
    np.testing.assert_array_equal(a, b)
  # transformers reads our export as the same model.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(  # the same kernels: bit-exact
      str(tmp_path), attn_implementation=hf_model.config._attn_implementation).eval()
  assert type(reloaded) is type(hf_model)
  with torch.no_grad():
    t, m = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask.astype(np.int64))
    np.testing.assert_array_equal(reloaded(t, attention_mask=m).logits.numpy(),
                                  hf_model(t, attention_mask=m).logits.numpy())


def test_bfloat16_load_tracks_float32(hf_dirs, batch):
  path, _ = hf_dirs["llama"]
  tokens, mask = batch
  f32 = np.asarray(load_model(path)(tokens, mask))
  bf16_model = load_model(path, dtype="bfloat16")
  assert bf16_model.params()["embed"].dtype == np.dtype("bfloat16")
  bf16 = np.asarray(bf16_model(tokens, mask))
  assert bf16.dtype == np.float32
  err = np.abs(bf16 - f32)[mask].max()
  assert 0 < err < 0.1 * np.abs(f32).max()


def test_sharded_safetensors_index_loads_identically(hf_dirs, batch, tmp_path):
  path, _ = hf_dirs["qwen3"]
  tokens, mask = batch
  model = load_model(path)
  files = save_hf(model, str(tmp_path), max_shard_bytes=40_000)
  assert any(f.endswith("model.safetensors.index.json") for f in files) and len(files) > 3
  np.testing.assert_array_equal(np.asarray(load_model(str(tmp_path))(tokens, mask)),
                                np.asarray(model(tokens, mask)))


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]
