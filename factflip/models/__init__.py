"""The model family: config + presets, the scanned NNX decoder and its attention contexts
(`attention`: how the new tokens see keys), HF conversion, generation."""

from factflip.models import attention
from factflip.models.attention import Context
from factflip.models.config import ModelConfig, RopeScaling, get_preset, presets
from factflip.models.generate import Generation, generate, generate_text
from factflip.models.hf import config_from_hf, config_to_hf, load_hf, read_hf_config, save_hf
from factflip.models.hooks import SITES, Intervention
from factflip.models.store import load_model, save_model
from factflip.models.transformer import (
                                         Output,
                                         Transformer,
                                         embed,
                                         forward,
                                         init_cache,
                                         init_params,
                                         unembed,
)

__all__ = [
    "SITES", "Context", "Generation", "Intervention", "ModelConfig", "Output", "RopeScaling",
    "Transformer", "attention", "config_from_hf", "config_to_hf", "embed", "forward", "generate",
    "generate_text", "get_preset", "init_cache", "init_params", "load_hf", "load_model", "presets",
    "read_hf_config", "save_hf", "save_model", "unembed",
]
