"""Probes: read and intervene on a model's internals — hook sites and interventions, fact
preference (ΔLL, states, flips) with its logit lens, and activation patching sweeps."""

from factflip.models.hooks import SITES, Intervention, parse_hook_name
from factflip.probes.interventions import (add, capture, layer_mask, position_mask, replace,
                                           residual_stream)
from factflip.probes.patching import (act_patch, attribution_patch, normalised_recovery,
                                      position_groups)
from factflip.probes.fact_preference import (abruptness, ambiguity_rate, first_flip, flip_rate,
                                        preference, score, states)

__all__ = ["SITES", "Intervention", "abruptness", "act_patch", "add",
           "attribution_patch", "ambiguity_rate", "capture",
           "first_flip", "flip_rate", "layer_mask", "normalised_recovery", "parse_hook_name",
           "position_groups", "position_mask", "preference", "replace", "residual_stream",
           "score", "states"]
