"""Tokenizers: load an HF tokenizer from a local directory.

Owns: `load_tokenizer` (and, in the data issue, training the fact-world tokenizer and saving it
in the same HF layout so both load the same way).
Must not: download anything; the hub is never contacted.
"""

from __future__ import annotations

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
