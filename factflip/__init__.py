"""factflip: how language models gain, lose and overwrite facts while they keep training."""

from factflip.data.loaders import load_facts
from factflip.data.tokenizer import load_tokenizer
from factflip.models import (ModelConfig, Transformer, generate, get_preset, load_model, presets,
                             save_hf, save_model)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "generate", "get_preset", "load_facts", "load_model",
           "load_tokenizer", "presets", "save_hf", "save_model"]
