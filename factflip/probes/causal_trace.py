"""ROME-style causal tracing (Meng et al. 2022): which hidden states carry a fact.

Owns: `causal_trace` (corrupt the subject by Gaussian noise on its token embeddings, then
restore one site's clean hidden state per (token, layer) or window of layers and read the
probability of the answer) and `subject_noise_scale`.
Must not: run its own sweep machinery (it is `act_patch` with the clean run as the source and
the noised run as the corrupted one) or choose items (studies do).

Definitions (ROME, section 2.1; SCIENCE.md A):
  p_clean      P(answer | prompt) at the last position, no noise;
  p_corrupted  the same with noise ν ~ N(0, σ²) added to every subject token's embedding,
               σ = 3 × the standard deviation of subject-token embeddings (averaged over
               `samples` draws from an explicit PRNG key);
  p_restored   the corrupted run with `site` at one (token, layer) cell, or a window of layers
               centred on the layer, set back to its clean value;
  total effect = p_clean − p_corrupted;  indirect effect = p_restored − p_corrupted.
ROME's hidden state of layer ℓ is our resid_post[ℓ] (the default site); its "embed" row is
resid_pre[0]. ROME restores MLP and attention outputs over a window of 10 layers: pass
site="mlp_out" / "attn_out" with window=10.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention
from factflip.models.transformer import Transformer, embed, forward, unembed
from factflip.probes.patching import act_patch


def answer_prob(logits_BxPxV: jax.Array, target_B: jax.Array) -> jax.Array:
  """P(target token) at the last read position: the causal-tracing metric."""
  return jnp.take_along_axis(jax.nn.softmax(logits_BxPxV[:, -1], axis=-1),
                             target_B[:, None], axis=-1)[:, 0]


def subject_noise_scale(model: Transformer, tokens_BxT, subject_mask_BxT,
                        factor: float = 3.0) -> float:
  """factor × the standard deviation of the embeddings (every dimension) of the subject tokens
  given — ROME's noise level. Pass many prompts' subjects for a dataset-wide level."""
  m = np.asarray(subject_mask_BxT, bool)
  if not m.any():
    raise ValueError("subject mask selects no tokens: nothing to measure the noise level on")
  e_BxTxD = np.asarray(embed(model.params(), model.cfg, jnp.asarray(tokens_BxT, jnp.int32)))
  return float(factor * e_BxTxD[m].astype(np.float64).std())


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prob(params, cfg, tokens_BxT, mask_BxT, noise_BxTxD, target_B):
  """P(target) at the last position of a (possibly embedding-noised) run: [B]."""
  x_BxTxD = embed(params, cfg, tokens_BxT)
  if noise_BxTxD is not None:
    x_BxTxD = x_BxTxD + noise_BxTxD.astype(x_BxTxD.dtype)
  h_BxTxD = forward(params, cfg, tokens_BxT, attention.causal(mask_BxT), resid_BxTxD=x_BxTxD,
                    return_logits=False).residual
  return answer_prob(unembed(params, cfg, h_BxTxD[:, -1:]), target_B)


def causal_trace(model: Transformer, tokens, subject_mask, target_ids, key: jax.Array, *,
                 mask=None, samples: int = 10, noise_scale: float | None = None,
                 site: str = "resid_post", layers: Sequence[int] | None = None,
                 positions=None, window: int = 1, chunk: int | None = 2048) -> dict:
  """Causal tracing of prompts `tokens` [B, T] (left-padded with `mask` when lengths differ)
  whose subject tokens are `subject_mask` [B, T] and whose answer's first token is
  `target_ids` [B].

  key: the PRNG key of the noise (explicit: the same key gives the same trace). samples:
  noise draws averaged (ROME: 10). noise_scale: σ of the noise (default
  `subject_noise_scale` of these prompts, 3× the subject embeddings' std). site, layers,
  positions (default every token), window (centred on the layer, as ROME): the restored
  cells, as in `act_patch`.

  Returns numpy arrays: p_clean [B], p_corrupted [B], total_effect [B], p_restored
  [B, layers, cells], indirect_effect [B, layers, cells], and noise_scale (float)."""
  tokens = np.atleast_2d(np.asarray(tokens, np.int32))
  B, T = tokens.shape
  subject = np.atleast_2d(np.asarray(subject_mask, bool))
  if subject.shape != (B, T):
    raise ValueError(f"subject mask has shape {subject.shape}; expected {(B, T)} like the tokens")
  if not subject.any(axis=1).all():
    rows = np.flatnonzero(~subject.any(axis=1)).tolist()
    raise ValueError(f"rows {rows} have no subject tokens to corrupt")
  target = np.asarray(target_ids, np.int32).reshape(B)
  if target.min() < 0 or target.max() >= model.cfg.vocab_size:
    raise ValueError(f"target ids {target.tolist()} outside the vocabulary of "
                     f"{model.cfg.vocab_size}")
  if samples < 1:
    raise ValueError(f"samples={samples}: need at least one noise draw")
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  sigma = (subject_noise_scale(model, tokens, subject & mask) if noise_scale is None
           else float(noise_scale))

  # every prompt `samples` times, each with its own draw on the subject tokens
  tok_NxT = np.repeat(tokens, samples, axis=0)
  mask_NxT = np.repeat(mask, samples, axis=0)
  tgt_N = np.repeat(target, samples)
  z_NxTxD = jax.random.normal(key, (B * samples, T, model.cfg.d_model), jnp.float32)
  noise_NxTxD = sigma * z_NxTxD * jnp.asarray(np.repeat(subject, samples, axis=0))[..., None]

  params = model.params()
  p_clean = np.asarray(_prob(params, model.cfg, tokens, mask, None, target))
  p_corr = np.asarray(_prob(params, model.cfg, tok_NxT, mask_NxT, noise_NxTxD, tgt_N)
                      ).reshape(B, samples)
  restored = act_patch(model, tok_NxT, tok_NxT, answer_prob, site=site, layers=layers,
                       positions=positions, window=window, mask=mask_NxT,
                       metric_aux=jnp.asarray(tgt_N), noise=noise_NxTxD, chunk=chunk,
                       centred=True)
  p_restored = restored.reshape(B, samples, *restored.shape[1:]).mean(axis=1)
  p_corrupted = p_corr.mean(axis=1)
  return {"p_clean": p_clean, "p_corrupted": p_corrupted, "total_effect": p_clean - p_corrupted,
          "p_restored": p_restored,
          "indirect_effect": p_restored - p_corrupted[:, None, None],
          "noise_scale": sigma}
