"""factflip: how language models gain, lose and overwrite facts while they keep training.

The subpackages (`factflip.models`, `.data`, `.probes`, `.evals`, `.train`, `.studies`,
`.sharding`, `.fileio`) are attributes after `import factflip` and are imported on first use, so
importing the package stays fast."""

import importlib

from factflip.data.loaders import load_facts
from factflip.data.tokenizer import load_tokenizer
from factflip.models import (
  ModelConfig,
  Transformer,
  generate,
  get_preset,
  load_model,
  presets,
  save_hf,
  save_model,
)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "generate", "get_preset", "load_facts", "load_model",
           "load_tokenizer", "presets", "save_hf", "save_model"]

_SUBPACKAGES = ("compile_cache", "data", "distributed", "evals", "fileio", "models", "probes",
                "sae", "sharding", "studies", "train")


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"factflip.{name}")
  raise AttributeError(f"module 'factflip' has no attribute {name!r}")
