"""Training objectives: token log-probs, per-example sums and the losses the studies train with.

Owns: `token_logprobs` (teacher-forced log p(target) per token), `example_sums` (per packed
example), and the objectives `lm` (next-token loss over loss_mask: pretraining, CPT, and —
with answer-only masks from the pipeline — SFT and counterfactual tuning), `gradient_ascent` and
`npo` (unlearning, each with a retain term).
Must not: touch optimizers, shardings or files.

Every objective returns (sum, count, aux): the loss is sum / count, and summing `sum` and `count`
over micro-batches before dividing makes gradient accumulation equal the large-batch step.
Definitions (per SCIENCE.md D):
- lm:  Σ_tokens −log p(target)·mask / Σ mask.
- gradient_ascent: −lm(forget) + retain_weight · lm(retain), each term its own token mean.
- npo (Zhang et al. 2024): (2/β) · mean_examples log(1 + (π_θ(y|x) / π_ref(y|x))^β) on the
  forget set, log π = the example's summed answer log-prob, + retain_weight · lm(retain).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from factflip.models.config import ModelConfig
from factflip.models.transformer import forward


def token_logprobs(params, cfg: ModelConfig, batch: dict) -> jax.Array:
  """log p(targets | inputs) per token, float32 [B, T] (packed rows attend within segments)."""
  logits_BxTxV = forward(params, cfg, batch["inputs"], positions_BxT=batch["positions"],
                         segment_ids_BxT=batch["segment_ids"]).logits.astype(jnp.float32)
  logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
  return picked_BxT - logz_BxT


def example_sums(values_BxT: jax.Array, mask_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 max_segments: int) -> tuple[jax.Array, jax.Array]:
  """Per packed example (segment s = 1..max_segments of each row): Σ values·mask and Σ mask,
  each [B, max_segments]."""
  onehot_BxTxS = (segment_ids_BxT[..., None] == jnp.arange(1, max_segments + 1)).astype(
      jnp.float32) * mask_BxT[..., None].astype(jnp.float32)
  return (jnp.einsum("bt,bts->bs", values_BxT, onehot_BxTxS), onehot_BxTxS.sum(axis=1))


def lm(params, cfg: ModelConfig, batch: dict):
  """Next-token NLL over loss_mask; aux has per-token NLL for probes."""
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  nll_BxT = -token_logprobs(params, cfg, batch)
  return (nll_BxT * mask_BxT).sum(), mask_BxT.sum(), {"nll_BxT": nll_BxT}


def _retain_term(params, cfg, batch, weight):
  if "retain" not in batch or not weight:
    return 0.0
  s, n, _ = lm(params, cfg, batch["retain"])
  return weight * s / jnp.maximum(n, 1.0)


def gradient_ascent(params, cfg: ModelConfig, batch: dict, retain_weight: float = 1.0):
  """batch: {"forget": batch, "retain": batch (optional)}. Returned as (loss, 1, aux) because
  its two token means do not share a denominator."""
  s, n, _ = lm(params, cfg, batch["forget"])
  forget_nll = s / jnp.maximum(n, 1.0)
  loss = -forget_nll + _retain_term(params, cfg, batch, retain_weight)
  return loss, jnp.float32(1.0), {"forget_nll": forget_nll}


def npo(params, cfg: ModelConfig, batch: dict, ref_logp_BxS: jax.Array, beta: float = 0.1,
        retain_weight: float = 1.0, max_segments: int = 1):
  """ref_logp_BxS: the reference model's summed answer log-probs per forget example (computed
  once, before training, with `example_sums(token_logprobs(ref_params, ...))`)."""
  f = batch["forget"]
  logp_BxT = token_logprobs(params, cfg, f)
  logp_BxS, count_BxS = example_sums(logp_BxT, f["loss_mask"], f["segment_ids"], max_segments)
  present_BxS = (count_BxS > 0).astype(jnp.float32)
  ratio_BxS = beta * (logp_BxS - ref_logp_BxS)
  per_example = (2.0 / beta) * jax.nn.softplus(ratio_BxS) * present_BxS
  loss = per_example.sum() / jnp.maximum(present_BxS.sum(), 1.0)
  loss = loss + _retain_term(params, cfg, batch, retain_weight)
  return loss, jnp.float32(1.0), {"forget_logp_BxS": logp_BxS}
