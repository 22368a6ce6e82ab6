"""Per-head activation patching and attention knockout, each sweep one compiled program.

Owns: `head_patch` (TransformerLens' `get_act_patch_attn_head_*`: every (layer, head) cell, or
every (layer, position, head) cell, of a per-head site patched from the clean run into the
corrupted one), `knockout` (an attention-knockout intervention: queries may not attend to a
set of keys) and `knockout_sweep` (Geva et al. 2023, "Dissecting Recall of Factual
Associations": the knockout in a window of layers, swept over the layers).
Must not: define sites or how interventions apply (`factflip.models.hooks`), or choose items.

Semantics. Cell (ℓ, h) runs `model` on the corrupted tokens with head h of `site` at layer ℓ
(at every position, or at position t for the by-position sweep) replaced by `source_model`'s
value on the clean tokens, and reports `metric` at `logit_positions`, as `act_patch` does.
With site "z" that is `get_act_patch_attn_head_out_all_pos` / `_by_pos`, with "pattern"
`get_act_patch_attn_head_pattern_all_pos` / `_by_pos` (and, with by_src,
`get_act_patch_attn_head_pattern_dest_src_pos`: cell (ℓ, h, dest, src) replaces the one
pattern entry, the row is not renormalised), with "q", "k", "v" their `_q_` / `_k_` / `_v_`
counterparts (k and v cells are kv heads). Every cell runs the blocks from its layer up
(patching a head changes its layer's output at every position it writes): the cells are
grouped by layer, each group starts from the corrupted run's resid_pre at that layer (the
blocks below are skipped: `forward`'s first_layer), and a group's cells are a `vmap` in chunks
of `chunk` cells (`lax.map`), not the suffix packing of the residual-stream sweeps.

A knockout adds −1e30 to the scores of the blocked (query, key) pairs after the mask, so
their pattern weight is exactly 0 and the other keys share the softmax; layers, queries, keys
and heads are all data (arrays), so a sweep over windows of layers is a `vmap` over layer masks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention
from factflip.models.hooks import HEAD_SITES, Intervention, parse_hook_name
from factflip.models.transformer import Transformer, forward, unembed
from factflip.probes.interventions import head_mask, layer_mask
from factflip.probes.patching import Metric, _model_and_token_pair
from factflip.sharding import to_host

BLOCKED = -1e30      # added to a knocked-out score: exp underflows to 0 (no -inf arithmetic)


def _logits(params, cfg, residual_BxTxD, logit_positions):
  return unembed(params, cfg, jnp.take(residual_BxTxD, jnp.asarray(logit_positions), axis=1))


def _score(metric, logits_BxPxV, metric_aux):
  return metric(logits_BxPxV) if metric_aux is None else metric(logits_BxPxV, metric_aux)


@functools.partial(jax.jit, static_argnames=("cfg", "src_cfg", "site", "metric",
                                             "logit_positions", "chunk", "by_src"))
def _head_sweep(params, cfg, src_params, src_cfg, corrupted_BxT, clean_BxT, mask_BxT,
                clean_mask_BxT, layer_G, head_GxC, pos_GxCxT, src_GxC, metric_aux, *, site,
                metric, logit_positions, chunk, by_src):
  """[G, C, B]: group g's cells patch layer layer_G[g]; its cell c patches head head_GxC[g, c]
  of `site` at positions pos_GxCxT[g, c] with the clean run's value (by_src: only at key
  src_GxC[g, c], the rest of the row the corrupted run's). Each group starts from the
  corrupted run's resid_pre at its layer (`forward`'s first_layer): the blocks below it are
  skipped, not recomputed per cell."""
  clean_LxBxTx = forward(src_params, src_cfg, clean_BxT, attention.causal(clean_mask_BxT),
                         capture=(site,), return_logits=False).captures[site]
  ctx = attention.causal(mask_BxT)
  corrupted = forward(params, cfg, corrupted_BxT, ctx, return_logits=False,
                      capture=("resid_pre",) + ((site,) if by_src else ())).captures
  resid_LxBxTxD = corrupted["resid_pre"]
  L, heads = cfg.n_layers, clean_LxBxTx.shape[3]

  def group(xs):
    layer, head_C, pos_CxT, src_C = xs

    def cell(ys):
      head, pos_T, src = ys
      values = clean_LxBxTx
      if by_src:                       # [L, B, T, H, S]: the clean run's entry at key src only
        key_S = jnp.arange(values.shape[-1]) == src
        values = jnp.where(key_S, clean_LxBxTx, corrupted[site])
      iv = Intervention(jnp.arange(L) == layer, pos_T[None, :], values,
                        jnp.arange(heads) == head, site=site, mode="replace")
      out = forward(params, cfg, corrupted_BxT, ctx, interventions=(iv,), return_logits=False,
                    resid_BxTxD=resid_LxBxTxD[layer], first_layer=layer)
      return _score(metric, _logits(params, cfg, out.residual, logit_positions), metric_aux)

    return jax.lax.map(cell, (head_C, pos_CxT, src_C), batch_size=chunk)

  return jax.lax.map(group, (layer_G, head_GxC, pos_GxCxT, src_GxC))


def head_patch(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
               site: str = "z", by_pos: bool = False, by_src: bool = False,
               source_model: Transformer | None = None,
               layers: Sequence[int] | None = None, mask=None, clean_mask=None,
               logit_positions: Sequence[int] = (-1,), metric_aux=None, chunk: int = 16
               ) -> np.ndarray:
  """Per-head patching: float32 [batch, layers, heads] (by_pos: [batch, layers, seq, heads];
  by_src, at the pattern: [batch, layers, dest, src, heads], a cell per query and key position).

  site: a per-head site (`hooks.HEAD_SITES`: z, q, k, v, rot_q, rot_k, attn_scores,
  pattern; or a TransformerLens name such as 'blocks.3.attn.hook_z', which also picks the
  layer). The remaining arguments are `act_patch`'s (metric: logits [batch,
  len(logit_positions), vocab] -> [batch], or (logits, metric_aux) -> [batch]; mask /
  clean_mask: left padding). chunk: cells evaluated together (each one a forward pass of the
  whole batch), on the default device."""
  site, named_layer = parse_hook_name(site)
  if site not in HEAD_SITES:
    raise ValueError(f"site {site!r}: head_patch patches the per-head sites {HEAD_SITES}")
  source_model, corrupted, clean = _model_and_token_pair(model, source_model, corrupted_tokens,
                                                         clean_tokens)
  cfg = model.cfg
  B, T = corrupted.shape
  if layers is None:
    layers = [named_layer] if named_layer is not None else range(cfg.n_layers)
  layers = [int(x) % cfg.n_layers for x in layers]
  heads = cfg.n_kv_heads if site in ("k", "v", "rot_k") else cfg.n_heads
  logit_positions = tuple(int(p) for p in logit_positions)
  if not logit_positions or any(not -T <= p < T for p in logit_positions):
    raise ValueError(f"logit_positions {logit_positions} out of range for {T} tokens")
  if by_src and site != "pattern":
    raise ValueError(f"head_patch(by_src=True) patches single pattern entries; site is {site!r}")
  positions = [None] if not (by_pos or by_src) else list(range(T))
  sources = [-1] if not by_src else list(range(T))
  cells = [(t, s, h) for t in positions for s in sources for h in range(heads)]  # every layer's
  G = len(layers)
  head_GxC = np.tile(np.asarray([h for _, _, h in cells], np.int32), (G, 1))
  src_GxC = np.tile(np.asarray([s for _, s, _ in cells], np.int32), (G, 1))
  pos_CxT = np.stack([np.ones(T, bool) if t is None else np.arange(T) == t for t, _, _ in cells])
  pos_GxCxT = np.broadcast_to(pos_CxT, (G,) + pos_CxT.shape)
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  clean_mask = mask if clean_mask is None else np.asarray(clean_mask, bool)
  res_GxCxB = _head_sweep(model.params(), cfg, source_model.params(), source_model.cfg,
                          corrupted, clean, mask, clean_mask, np.asarray(layers, np.int32),
                          head_GxC, pos_GxCxT, src_GxC, metric_aux, site=site, metric=metric,
                          logit_positions=logit_positions, chunk=max(int(chunk), 1),
                          by_src=bool(by_src))
  res = to_host(res_GxCxB).reshape((G,) + (T,) * (by_pos or by_src) + (T,) * by_src
                                   + (heads, B))
  return np.moveaxis(res, -1, 0)


# ---- attention knockout -----------------------------------------------------------------------
def knockout(n_layers: int, layers, keys_BxS, queries_BxT=None, heads=None,
             n_heads: int | None = None) -> Intervention:
  """Block attention from `queries_BxT` (bool [B, T] or [T]; default every query) to
  `keys_BxS` (bool [B, S]: S the key slots, T without a cache) at `layers` (ints or a bool [L]
  mask) and `heads` (None: every head; a bool [H] mask, or head indices with `n_heads`): an
  `attn_scores` intervention adding BLOCKED to those scores, so the pattern gives them 0."""
  keys_BxS = jnp.asarray(keys_BxS, bool)
  if keys_BxS.ndim != 2:
    raise ValueError(f"keys_BxS has shape {keys_BxS.shape}; expected [batch, key slots]")
  values = jnp.where(keys_BxS, jnp.float32(BLOCKED), jnp.float32(0))[None, :, None, None, :]
  values = jnp.broadcast_to(values, (n_layers,) + values.shape[1:])   # [L, B, 1, 1, S]
  pos = jnp.ones((1,), bool) if queries_BxT is None else jnp.asarray(queries_BxT, bool)
  if heads is not None and n_heads is None:
    if jnp.asarray(heads).dtype != bool:
      raise ValueError("knockout: heads given as indices need n_heads=")
    n_heads = jnp.shape(heads)[0]
  return Intervention(layer_mask(n_layers, layers), pos, values, head_mask(n_heads, heads),
                      site="attn_scores", mode="add")


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _knockout_sweep(params, cfg, tokens_BxT, mask_BxT, keys_BxT, query_BxT, read_B,
                    targets_BxK, layers_NxL, *, chunk):
  """log p(targets_BxK) at positions read_B: [N + 1, B, K], row 0 without a knockout, row
  n + 1 with the knockout at the layers of layers_NxL[n]."""
  B = tokens_BxT.shape[0]
  ctx = attention.causal(mask_BxT)

  def logprob(residual_BxTxD):
    h_BxD = residual_BxTxD[jnp.arange(B), read_B]
    logp_BxV = jax.nn.log_softmax(unembed(params, cfg, h_BxD), axis=-1)
    return jnp.take_along_axis(logp_BxV, targets_BxK, axis=1)

  base_B = logprob(forward(params, cfg, tokens_BxT, ctx, return_logits=False).residual)

  def one(layer_mask_L):
    iv = knockout(cfg.n_layers, layer_mask_L, keys_BxT, query_BxT)
    return logprob(forward(params, cfg, tokens_BxT, ctx, interventions=(iv,),
                           return_logits=False).residual)

  knocked_NxB = jax.lax.map(one, layers_NxL, batch_size=chunk)
  return jnp.concatenate([base_B[None], knocked_NxB], axis=0)


def knockout_sweep(model: Transformer, tokens, keys, targets, window: int = 1, mask=None,
                   queries=None, read_positions=None, chunk: int = 8) -> dict[str, np.ndarray]:
  """Attention knockout in a window of `window` layers centred on each layer ℓ (clipped at the
  model's ends; Geva et al. use 9 of GPT-J's 28), from `queries` to `keys`.

  tokens: int [B, T] (left-padded with `mask` bool [B, T]). keys: bool [B, T], the blocked keys
  (e.g. the subject's tokens). queries: bool [B, T] (default: the last position only, the
  position that predicts the answer). targets: int [B], the token whose probability is read
  at read_positions (int [B], default the last position), or [B, K], K tokens per row (e.g. the
  true and the counterfactual answer). Returns {"layers": [L], "base": log p [B], "logprob":
  [B, L], "relative_change": [B, L]} (with [B, K] targets: [B, K], [B, L, K], [B, L, K]):
  p_knocked / p_base − 1, Geva et al.'s measure of how much the prediction relied on those
  edges at those layers."""
  cfg = model.cfg
  tokens = np.atleast_2d(np.asarray(tokens, np.int32))
  B, T = tokens.shape
  keys = np.asarray(keys, bool)
  if keys.shape != (B, T):
    raise ValueError(f"keys has shape {keys.shape}; expected {(B, T)}, one flag per token")
  if queries is None:
    queries = np.zeros((B, T), bool)
    queries[:, -1] = True
  queries = np.asarray(queries, bool)
  if queries.shape != (B, T):
    raise ValueError(f"queries has shape {queries.shape}; expected {(B, T)}")
  read = (np.full(B, T - 1, np.int32) if read_positions is None
          else np.asarray(read_positions, np.int32) % T)
  targets = np.asarray(targets, np.int32)
  if targets.ndim not in (1, 2) or targets.shape[0] != B:
    raise ValueError(f"targets has shape {targets.shape}; expected ({B},) or ({B}, K): token "
                     "ids per row")
  several = targets.ndim == 2
  targets_BxK = targets.reshape(B, -1)
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  L, w = cfg.n_layers, max(int(window), 1)
  windows = np.zeros((L, L), bool)
  for layer in range(L):
    first = max(layer - w // 2, 0)
    windows[layer, first:min(layer - w // 2 + w, L)] = True
  res = to_host(_knockout_sweep(model.params(), cfg, tokens, mask, keys, queries, read,
                                targets_BxK, windows, chunk=max(int(chunk), 1)))
  base_BxK, knocked_BxLxK = res[0], res[1:].transpose(1, 0, 2)
  change_BxLxK = np.exp(knocked_BxLxK - base_BxK[:, None]) - 1.0
  if not several:
    base_BxK, knocked_BxLxK, change_BxLxK = base_BxK[:, 0], knocked_BxLxK[..., 0], \
        change_BxLxK[..., 0]
  return {"layers": np.arange(L), "base": base_BxK, "logprob": knocked_BxLxK,
          "relative_change": change_BxLxK}
