"""Probes: read and intervene on a model's internals (hook sites, residual stream; the
preference, lens and patching sweeps build on these)."""

from factflip.models.hooks import SITES, Intervention, parse_hook_name
from factflip.probes.interventions import (add, capture, layer_mask, position_mask, replace,
                                           residual_stream)

__all__ = ["SITES", "Intervention", "add", "capture", "layer_mask", "parse_hook_name",
           "position_mask", "replace", "residual_stream"]
