"""Training a tokenizer for the fact world and loading it like any HF tokenizer."""

import json
import os

import pytest

from factflip import load_tokenizer
from factflip.data.tokenizer import BOS, EOS, PAD, train_tokenizer


def test_trained_tokenizer_round_trip(small_world, world_tokenizer, tmp_path):
  tok = world_tokenizer
  path = tok.name_or_path
  assert sorted(os.listdir(path)) == ["tokenizer.json", "tokenizer_config.json"]
  assert len(tok) == 512
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
  again = load_tokenizer(path)
  for text in small_world.texts()[:50] + ["Ünïcode ✓ never seen: qzxj"]:
    ids = again(text).input_ids
    assert ids == tok(text).input_ids
    assert ids[0] == 0  # BOS added, like Llama's tokenizer
    assert again.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert again(text, add_special_tokens=False).input_ids == ids[1:]
  # A leading space belongs to the next word, so prompt + " " + answer splits at the answer.
  f = small_world.facts[0]
  whole = tok(f.prompt + " " + f.answer, add_special_tokens=False).input_ids
  parts = (tok(f.prompt, add_special_tokens=False).input_ids
           + tok(" " + f.answer, add_special_tokens=False).input_ids)
  assert whole == parts


def test_deterministic_and_atomic(small_world, world_tokenizer, tmp_path):
  texts = small_world.texts()
  out = train_tokenizer(texts, str(tmp_path / "tok"), vocab_size=512)
  with open(os.path.join(out.name_or_path, "tokenizer.json")) as f, \
      open(os.path.join(world_tokenizer.name_or_path, "tokenizer.json")) as g:
    assert json.load(f)["model"] == json.load(g)["model"]
  # Retraining over an existing directory replaces it whole; no temporary directory is left.
  train_tokenizer(texts[:200], str(tmp_path / "tok"), vocab_size=300)
  assert len(load_tokenizer(str(tmp_path / "tok"))) == 300
  assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    load_tokenizer(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(str(tmp_path))
