"""Sparse autoencoders (SAELens-compatible): the SAE pytree and its math (`core`), what differs
between architectures (`architectures`: one table), files (`formats`), interventions
(`steering`: steer, clamp, splice, grids in one program)."""

from factflip.sae.architectures import ARCHITECTURES, Architecture
from factflip.sae.core import (
                               NORMALIZATIONS,
                               SAE,
                               NormState,
                               SAEConfig,
                               decode,
                               encode,
                               encode_with_state,
                               forward,
                               init_sae,
                               make_sae,
                               reconstruct,
)
from factflip.sae.formats import detect_format, load_sae, save_sae
from factflip.sae.steering import SAEEdit, clamp, run_grid, sae_site, splice, steer

__all__ = [
                               "ARCHITECTURES",
                               "NORMALIZATIONS",
                               "SAE",
                               "Architecture",
                               "NormState",
                               "SAEConfig",
                               "SAEEdit",
                               "clamp",
                               "decode",
                               "detect_format",
                               "encode",
                               "encode_with_state",
                               "forward",
                               "init_sae",
                               "load_sae",
                               "make_sae",
                               "reconstruct",
                               "run_grid",
                               "sae_site",
                               "save_sae",
                               "splice",
                               "steer",
]
