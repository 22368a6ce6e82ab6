"""Tokenizers: load an HF tokenizer from a local directory; train one for the fact world.

Owns: `load_tokenizer`, `train_tokenizer` (which saves in the same HF layout, so a trained and
a downloaded tokenizer load the same way) and `TokenIds`, the
remembering text -> ids wrapper the pipeline and the probes use.
Must not: download anything; the hub is never contacted.
"""

from __future__ import annotations

import functools
import os


def load_tokenizer(path: str):
  """The HF fast tokenizer saved in `path` (tokenizer.json, plus tokenizer_config.json and
  special_tokens_map.json when present). Never contacts the hub."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory; expected an HF tokenizer directory "
                            "containing tokenizer.json")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"{path}: no tokenizer.json; expected an HF fast tokenizer saved with "
                            "save_pretrained (factflip does not convert slow/sentencepiece-only "
                            "tokenizers)")
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  if os.path.exists(os.path.join(path, "tokenizer_config.json")):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  return PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


def model_tokenizer(path: str):
  """The tokenizer of a model: `path` itself when it holds tokenizer.json (an HF or exported
  model directory), else for a training workdir or one of its checkpoints
  (WORKDIR/checkpoints/<step>) the run's `data.tokenizer_dir` from its config.json."""
  import json
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return load_tokenizer(path)
  run = path
  if os.path.basename(os.path.dirname(path)) == "checkpoints":
    run = os.path.dirname(os.path.dirname(path))
  cfg = os.path.join(run, "config.json")
  tok = ""
  if os.path.exists(os.path.join(run, "model.json")) and os.path.exists(cfg):
    with open(cfg, encoding="utf-8") as f:
      tok = json.load(f).get("data", {}).get("tokenizer_dir", "")
  if not tok:
    raise FileNotFoundError(f"{path}: no tokenizer.json, and not a training workdir whose "
                            "config.json names data.tokenizer_dir; pass the tokenizer's "
                            "directory")
  return load_tokenizer(tok)


BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts, out_dir: str, vocab_size: int = 2048, min_frequency: int = 2):
  """Train a byte-level BPE tokenizer (GPT-2 style: a leading space belongs to the next word, no
  unknown tokens) on `texts` and save it in HF format to `out_dir`, so `load_tokenizer(out_dir)`
  reads it like any hub tokenizer. Special tokens: <|bos|> (0), <|eos|> (1), <|pad|> (2); like
  Llama's, encoding adds BOS (`add_special_tokens=False` does not). Deterministic in `texts`.
  The directory appears complete or not at all (built in a temporary directory, then renamed)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  from factflip.fileio import atomic_directory

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[BOS, EOS, PAD],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  bos = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, model_max_length=1 << 30)
  with atomic_directory(out_dir) as tmp:
    fast.save_pretrained(tmp)
  return load_tokenizer(out_dir)


class TokenIds:
  """text -> token ids without special tokens, remembered (studies and probes render the same
  sentences again and again). Also carries the tokenizer's BOS id (or None)."""

  def __init__(self, tokenizer, cache_size: int = 1 << 18):
    self.backend = tokenizer.backend_tokenizer
    self.ids = functools.lru_cache(maxsize=cache_size)(self._ids)
    self.bos = tokenizer.bos_token_id

  def _ids(self, text: str) -> tuple[int, ...]:
    return tuple(self.backend.encode(text, add_special_tokens=False).ids)

  def __call__(self, text: str) -> tuple[int, ...]:
    return self.ids(text)
