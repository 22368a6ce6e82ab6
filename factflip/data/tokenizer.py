"""Tokenizers: load an HF tokenizer from a local directory or a GGUF file; train one for the
fact world.

Owns: `load_tokenizer` (GGUF files: the vocabulary, merges, special tokens and chat template of
their metadata, built by transformers' own GGUF converters, so the ids are those of
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`; torch is not needed), `train_tokenizer`
(which saves in the same HF layout, so a trained and a downloaded tokenizer load the same way)
and `TokenIds`, the remembering text -> ids wrapper the pipeline and the probes use.
Must not: download anything; the hub is never contacted.
"""

from __future__ import annotations

import functools
import os

from factflip.fileio import atomic_directory
from factflip.gguf_io import GGUFError, is_gguf, open_gguf


def load_tokenizer(path: str):
  """The HF fast tokenizer saved in `path` (tokenizer.json, plus tokenizer_config.json and
  special_tokens_map.json when present), or the tokenizer of a GGUF file. Never contacts the
  hub."""
  if is_gguf(path):
    return gguf_tokenizer(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: not a directory; expected an HF tokenizer directory "
                            "containing tokenizer.json, or a GGUF file")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"{path}: no tokenizer.json; expected an HF fast tokenizer saved with "
                            "save_pretrained (factflip does not convert slow/sentencepiece-only "
                            "tokenizers)")
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  if os.path.exists(os.path.join(path, "tokenizer_config.json")):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  return PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))


# The GGUF special-token keys, as transformers' own GGUF tokenizer reads them (gguf_tokenizer
# should follow transformers.integrations.gguf.gguf_tokenizer_mapping.get_gguf_tokenizer, which
# reads the file with torch; keep the two in step).
_GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                 "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def gguf_tokenizer(path: str):
  """The tokenizer a GGUF file's metadata describes (gpt2-style BPE or SentencePiece), with its
  special tokens, BOS/EOS flags and chat template. transformers' converter builds the backend
  from the fields (as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does, which needs
  torch to read the file; here ggml's `gguf` reader reads it)."""
  import transformers
  from transformers import PreTrainedTokenizerFast

  try:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      GGUF_TOKENIZER_MAPPING,
      convert_gguf_tokenizer,
    )
  except ImportError as e:   # 4.x's converters need torch to read the file and set no BOS rule
    raise ImportError(f"{path}: a GGUF file's tokenizer needs transformers >= 5 (installed: "
                      f"{transformers.__version__})") from e

  f = open_gguf(path)
  groups = {group: {name: f.get(f"tokenizer.{key}") for key, name in keys.items()
                    if f"tokenizer.{key}" in f}
            for group, keys in GGUF_TOKENIZER_MAPPING.items()
            if group in ("tokenizer", "tokenizer_config")}
  fields, config = groups["tokenizer"], groups["tokenizer_config"]
  if not fields.get("tokens"):
    raise GGUFError(f"{f.path}: no tokenizer.ggml.tokens; this GGUF file carries no tokenizer")
  if fields.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)   # llama.cpp adds BOS to SentencePiece vocabularies
  for name, key in _GGUF_SPECIAL.items():
    token_id = f.get(f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= token_id < len(fields["tokens"]):
      raise GGUFError(f"{f.path}: tokenizer.ggml.{key} is {token_id}, outside the "
                      f"{len(fields['tokens'])}-token vocabulary")
    config[name] = fields["tokens"][token_id] if token_id is not None else None
  try:
    backend, extra = convert_gguf_tokenizer(f.require("general.architecture"), fields)
  except (ValueError, KeyError, NotImplementedError) as e:
    raise GGUFError(f"{f.path}: cannot build its tokenizer (tokenizer.ggml.model = "
                    f"{fields.get('tokenizer_type')!r}): {e}") from e
  return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def has_tokenizer(path: str) -> bool:
  """Whether `load_tokenizer(path)` can read a tokenizer there (a GGUF file with a vocabulary,
  or a directory with tokenizer.json)."""
  if is_gguf(path):
    return "tokenizer.ggml.tokens" in open_gguf(path)
  return os.path.exists(os.path.join(path, "tokenizer.json"))


def model_tokenizer(path: str):
  """The tokenizer of a model: `path` itself when it holds tokenizer.json (an HF or exported
  model directory) or is a GGUF file, else for a training workdir or one of its checkpoints
  (WORKDIR/checkpoints/<step>) the run's `data.tokenizer_dir` from its config.json."""
  import json
  path = os.path.abspath(path)
  if has_tokenizer(path):
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
