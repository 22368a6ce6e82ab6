"""Direct logit attribution: what each layer and each attention head writes toward one answer
over another, read through the final norm.

Owns: `final_norm_stack` (a stack of residual-stream components as the final norm scales them,
TransformerLens' `apply_ln_to_stack` at the last layer, times the norm's weight, which
TransformerLens folds into W_U), `answer_directions` (W_U columns, or their difference),
`head_results` (each head's write, z · W_O per head: TransformerLens' `hook_result`), and
`logit_attribution` (the whole decomposition of the true-minus-counterfactual logit
difference in one compiled program).
Must not: run sweeps or choose items.

With RMSNorm the final norm is linear once its scale s = rms(resid_final) is fixed: logits =
(Σ_c x_c / s · w) · W_U, so the components' attributions sum exactly to the logit (difference),
before any final soft-cap (Gemma 2's; its attribution is of the pre-cap logits, as
TransformerLens'). Components: the embedding, every layer's attn_out and mlp_out; the heads
split attn_out (models without post-attention norms: Gemma 2's norm is not linear in the heads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention
from factflip.models.transformer import Transformer, forward, normalized, rms_scale
from factflip.sharding import to_host

F32 = jnp.float32


def final_norm_stack(params, cfg, stack_NxxD: jax.Array, scale_x1: jax.Array) -> jax.Array:
  """Components [N, ..., D] (each centred, for LayerNorm) divided by the final norm's scale
  [..., 1] (`rms_scale` of the final residual) and multiplied by its weight: each component's
  share of the unembedding's input (LayerNorm's bias is no component's: `final_bias`)."""
  w = params["final_norm"].astype(F32)
  w = w + cfg.norm_offset if cfg.norm_offset else w
  return normalized(stack_NxxD, scale_x1, cfg) * w


def unembedding(params, cfg) -> jax.Array:
  """W_U [D, V] (the tied embedding's transpose where tied)."""
  return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def answer_directions(params, cfg, tokens, incorrect=None) -> jax.Array:
  """W_U[:, tokens] (− W_U[:, incorrect]): [..., D] per token id of `tokens` [...]."""
  w_DxV = unembedding(params, cfg).astype(F32)
  d = jnp.take(w_DxV, jnp.asarray(tokens, jnp.int32), axis=1)
  if incorrect is not None:
    d = d - jnp.take(w_DxV, jnp.asarray(incorrect, jnp.int32), axis=1)
  return jnp.moveaxis(d, 0, -1)


def head_results(params, cfg, z_LxBxTxHxK: jax.Array) -> jax.Array:
  """Each head's write into the residual stream, z_h · W_O[h], from every layer's z: [L, B, T,
  H, D]."""
  if cfg.post_norms:
    raise ValueError(f"{cfg.family}: the post-attention norm is applied to the heads' sum, so "
                     "a head's write into the residual stream is not defined on its own")
  L, H, K = cfg.n_layers, cfg.n_heads, cfg.head_dim
  wo_LxHxKxD = params["layers"]["wo"].reshape(L, H, K, cfg.d_model).astype(F32)
  return jnp.einsum("lbthk,lhkd->lbthd", z_LxBxTxHxK.astype(F32), wo_LxHxKxD)


@functools.partial(jax.jit, static_argnames=("cfg", "heads"))
def _attribution(params, cfg, tokens_BxT, mask_BxT, read_B, answers_Bx2, *, heads):
  sites = ("resid_pre", "attn_out", "mlp_out") + (("z",) if heads else ())
  out = forward(params, cfg, tokens_BxT, attention.causal(mask_BxT), capture=sites,
                return_logits=False)
  B = tokens_BxT.shape[0]
  rows = jnp.arange(B)

  def at_read(x_LxBxTx):                           # [L, B, ...] at each row's read position
    return x_LxBxTx[:, rows, read_B]

  final_BxD = out.residual[rows, read_B]
  scale_Bx1 = rms_scale(final_BxD, cfg)
  d_BxD = answer_directions(params, cfg, answers_Bx2[:, 0], answers_Bx2[:, 1])

  def attr(stack_NxBxD):
    return (final_norm_stack(params, cfg, stack_NxBxD, scale_Bx1) * d_BxD).sum(-1)   # [N, B]

  caps = out.captures
  res = {"embed": attr(at_read(caps["resid_pre"])[:1])[0],
         "attn": attr(at_read(caps["attn_out"])).T, "mlp": attr(at_read(caps["mlp_out"])).T,
         "total": attr(final_BxD[None])[0]}
  if "final_norm_bias" in params:                   # LayerNorm: its bias writes a constant
    res["final_bias"] = d_BxD @ params["final_norm_bias"].astype(F32)
    res["total"] = res["total"] + res["final_bias"]
  if heads:
    r_LxBxHxD = at_read(head_results(params, cfg, caps["z"]))
    L, _, H, D = r_LxBxHxD.shape
    res["heads"] = attr(r_LxBxHxD.transpose(0, 2, 1, 3).reshape(L * H, B, D)).reshape(
        L, H, B).transpose(2, 0, 1)
  return res


def logit_attribution(model: Transformer, tokens, answers, mask=None, read_positions=None,
                      heads: bool = True) -> dict[str, np.ndarray]:
  """Direct logit attribution of logit(answer a) − logit(answer b) at each row's read position
  (default the last; left-pad with `mask`), answers int [B, 2] = (a, b) token ids, e.g. (true,
  counterfactual). Returns float32 arrays: "embed" [B], "attn" [B, L], "mlp" [B, L], "heads"
  [B, L, H] (heads=True; not for models with post-attention norms), "final_bias" [B] (LayerNorm
  models: the final norm's bias) and "total" [B], the logit difference itself (before any final
  soft-cap), which embed + attn + mlp (+ final_bias) sum to."""
  cfg = model.cfg
  tokens = np.atleast_2d(np.asarray(tokens, np.int32))
  B, T = tokens.shape
  answers = np.asarray(answers, np.int32).reshape(B, 2)
  read = (np.full(B, T - 1, np.int32) if read_positions is None
          else np.asarray(read_positions, np.int32) % T)
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  return to_host(_attribution(model.params(), cfg, tokens, mask, read, answers,
                              heads=bool(heads)))
