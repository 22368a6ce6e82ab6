"""Sparse autoencoders (SAELens-compatible): the SAE pytree and its math (`core`), files
(`formats`)."""

from factflip.sae.core import (ARCHITECTURES, NORMALIZATIONS, SAE, NormState, SAEConfig, decode,
                               encode, encode_with_state, forward, init_sae, make_sae, reconstruct)
from factflip.sae.formats import detect_format, load_sae, save_sae

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "SAE", "NormState", "SAEConfig", "decode",
           "detect_format", "encode", "encode_with_state", "forward", "init_sae", "load_sae",
           "make_sae", "reconstruct", "save_sae"]
