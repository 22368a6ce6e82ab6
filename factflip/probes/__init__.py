"""Probes: read and intervene on a model's internals — hook sites and interventions, the
TransformerLens-style activation cache, fact preference (ΔLL, states, flips) with its logit and
tuned lens, activation and per-head patching sweeps, attention knockout, direct logit
attribution, causal tracing, and SliCK knowledge categories."""

from factflip.models.hooks import SITES, Intervention, parse_hook_name
from factflip.probes.attribution import logit_attribution
from factflip.probes.cache import ActivationCache, run_with_cache
from factflip.probes.causal_trace import answer_prob, causal_trace, subject_noise_scale
from factflip.probes.fact_preference import (
                                           abruptness,
                                           ambiguity_rate,
                                           first_flip,
                                           flip_rate,
                                           preference,
                                           score,
                                           states,
)
from factflip.probes.head_patching import head_patch, knockout, knockout_sweep
from factflip.probes.interventions import (
                                           add,
                                           capture,
                                           layer_mask,
                                           position_mask,
                                           replace,
                                           residual_stream,
)
from factflip.probes.packing import pack_cells, position_groups
from factflip.probes.patching import (
                                           act_patch,
                                           answer_logit_diff,
                                           attribution_patch,
                                           normalised_recovery,
                                           reversal_rate,
                                           sweep_cost,
                                           sweep_table,
)
from factflip.probes.slick import SliCKConfig, categorise, category, category_shares
from factflip.probes.tuned_lens import (
                                           TunedLens,
                                           lens_kl,
                                           load_tuned_lens,
                                           save_tuned_lens,
                                           train_tuned_lens,
                                           tuned_lens_logits,
)

__all__ = ["SITES", "ActivationCache", "Intervention", "SliCKConfig", "TunedLens", "abruptness",
           "act_patch", "add", "ambiguity_rate", "answer_logit_diff", "answer_prob",
           "attribution_patch", "capture", "categorise", "category", "category_shares",
           "causal_trace", "first_flip", "flip_rate", "head_patch", "knockout", "knockout_sweep",
           "layer_mask", "lens_kl", "load_tuned_lens", "logit_attribution", "normalised_recovery",
           "pack_cells", "parse_hook_name", "position_groups", "position_mask", "preference",
           "replace", "residual_stream", "reversal_rate", "run_with_cache", "save_tuned_lens",
           "score", "states", "subject_noise_scale", "sweep_cost", "sweep_table",
           "train_tuned_lens", "tuned_lens_logits"]
