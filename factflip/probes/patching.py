"""Activation patching sweeps as one compiled, vectorised program.

Owns: `act_patch` (the generic layers × positions sweep: same-model clean→corrupted patching
and cross-model patching, e.g. the base checkpoint's activations into the poisoned one),
`attribution_patch` (its first-order estimate from one backward), `position_groups` and
`normalised_recovery`.
Must not: choose items or write tables (studies do), or define sites (`factflip.models.hooks`).

Semantics (TransformerLens' `get_act_patch_*`): cell (ℓ, c) runs `model` on the corrupted
tokens with `site` at layers ℓ .. ℓ+window−1 and the positions of cell c replaced by
`source_model`'s activation at the same site, layer and positions on the clean tokens, and
reports `metric(logits)`. For `resid_pre` with window 1 and one position per cell this is
exactly `get_act_patch_resid_pre`.

What is not recomputed: a patch at layer ℓ cannot change layers below ℓ, so every cell starts
from the corrupted run's resid_pre[ℓ] (captured once) and runs only blocks ℓ..L−1; the cells of
one layer are a `vmap` over position masks (in chunks of `chunk` cells, `lax.map`), and the
unembedding runs only at `logit_positions`. Blocks run per sweep: T·L(L+1)/2 instead of T·L².
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models.hooks import Intervention, check_site, parse_hook_name
from factflip.models.transformer import Transformer, forward, unembed

Metric = Callable[[jax.Array], jax.Array]  # logits [B, P, V] -> [B]


def position_groups(seq_len: int, positions=None) -> np.ndarray:
  """Cell position masks, bool [C, T] or [C, B, T]: None = every position its own cell; a list
  of ints = those positions, one cell each; a bool array [C, T] / [C, B, T] = given groups (e.g.
  each item's subject tokens, the last token, all tokens)."""
  if positions is None:
    return np.eye(seq_len, dtype=bool)
  arr = np.asarray(positions)
  if arr.dtype == bool:
    if arr.shape[-1] != seq_len or arr.ndim not in (2, 3):
      raise ValueError(f"position groups have shape {arr.shape}; expected [cells, {seq_len}] "
                       f"or [cells, batch, {seq_len}]")
    return arr
  if arr.ndim != 1 or (arr.size and (arr.max() >= seq_len or arr.min() < -seq_len)):
    raise ValueError(f"positions {arr.tolist()} out of range for {seq_len} tokens")
  return np.eye(seq_len, dtype=bool)[arr % seq_len]


@functools.partial(jax.jit, static_argnames=("cfg", "src_cfg", "site", "layers", "window",
                                             "metric", "logit_positions", "chunk"))
def _sweep(params, cfg, src_params, src_cfg, corrupted_BxT, clean_BxT, mask_BxT, clean_mask_BxT,
           cells_CxBxT, *, site, layers, window, metric, logit_positions, chunk):
  L = cfg.n_layers
  clean_LxBxTxD = forward(src_params, src_cfg, clean_BxT, clean_mask_BxT, capture=(site,),
                          return_logits=False).captures[site]
  corrupt_LxBxTxD = forward(params, cfg, corrupted_BxT, mask_BxT, capture=("resid_pre",),
                            return_logits=False).captures["resid_pre"]
  pos = jnp.asarray(logit_positions, jnp.int32)
  out = []
  for layer in layers:
    n = L - layer
    on_N = jnp.arange(n) < window
    values = clean_LxBxTxD[layer:]

    def cell(pos_BxT, layer=layer, on_N=on_N, values=values, n=n):
      iv = Intervention(on_N, pos_BxT, values, site=site, mode="replace")
      h_BxTxD = forward(params, cfg, corrupted_BxT, mask_BxT, interventions=(iv,),
                        return_logits=False, resid_BxTxD=corrupt_LxBxTxD[layer],
                        start_layer=layer).residual
      logits_BxPxV = unembed(params, cfg, jnp.take(h_BxTxD, pos, axis=1))
      return metric(logits_BxPxV)
    out.append(jax.vmap(cell)(cells_CxBxT) if chunk is None
               else jax.lax.map(cell, cells_CxBxT, batch_size=chunk))   # [C, B]
  return jnp.stack(out, axis=0)                                     # [layers, C, B]


def act_patch(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
              site: str = "resid_pre", source_model: Transformer | None = None,
              layers: Sequence[int] | None = None, positions=None, window: int = 1,
              mask=None, clean_mask=None, logit_positions: Sequence[int] = (-1,),
              chunk: int | None = 64) -> np.ndarray:
  """The patching sweep: float32 [batch, layers, cells].

  model: the model that runs (the corrupted / poisoned run). source_model: supplies the clean
  activations (default `model`; another checkpoint of the same architecture for cross-model
  patching). site: resid_pre | attn_out | mlp_out | resid_mid | resid_post (or a
  TransformerLens name). layers: the first patched layer of each row (default all). window:
  patch layers ℓ..ℓ+window−1 (clipped at the last layer). positions: see `position_groups`.
  metric: maps logits [batch, len(logit_positions), vocab] to [batch] (the default
  logit_positions=(-1,) means `logits[:, -1]` is the last token's, as a TransformerLens metric
  reads it). chunk: cells evaluated together (a memory budget: activations of chunk × batch
  sequences at a time; None = all cells of a layer at once). The compiled sweep is cached per
  (shapes, site, layers, window, metric, logit_positions, chunk): pass the same metric function
  object to reuse it."""
  site, named_layer = parse_hook_name(site)
  check_site(site)
  source_model = source_model or model
  cfg, src_cfg = model.cfg, source_model.cfg
  if (src_cfg.n_layers, src_cfg.d_model) != (cfg.n_layers, cfg.d_model):
    raise ValueError(f"source model has {src_cfg.n_layers} layers x d_model {src_cfg.d_model}; "
                     f"the patched model {cfg.n_layers} x {cfg.d_model}: activations do not fit")
  if src_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"mismatched vocabularies: source model {src_cfg.vocab_size} tokens, "
                     f"patched model {cfg.vocab_size}; both must read the same token ids")
  corrupted = np.asarray(corrupted_tokens, np.int32)
  clean = np.asarray(clean_tokens, np.int32)
  if corrupted.ndim == 1:
    corrupted, clean = corrupted[None], clean[None]
  if corrupted.shape != clean.shape:
    raise ValueError(f"corrupted tokens {corrupted.shape} and clean tokens {clean.shape} differ "
                     "in shape (patching copies position t to position t)")
  B, T = corrupted.shape
  if T > cfg.max_seq_len:
    raise ValueError(f"prompts of {T} tokens are longer than the model's context of "
                     f"{cfg.max_seq_len}")
  if layers is None:
    layers = [named_layer] if named_layer is not None else range(cfg.n_layers)
  layers = tuple(int(x) % cfg.n_layers for x in layers)
  cells = position_groups(T, positions)
  cells_CxBxT = np.broadcast_to(cells[:, None] if cells.ndim == 2 else cells,
                                (cells.shape[0], B, T))
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  clean_mask = mask if clean_mask is None else np.asarray(clean_mask, bool)
  res = _sweep(model.params(), cfg, source_model.params(), src_cfg, corrupted, clean, mask,
               clean_mask, jnp.asarray(cells_CxBxT), site=site, layers=layers,
               window=max(int(window), 1), metric=metric,
               logit_positions=tuple(int(p) for p in logit_positions),
               chunk=None if chunk is None else int(chunk))
  return np.asarray(res).transpose(2, 0, 1)


def normalised_recovery(patched, corrupted, clean):
  """(metric_patched − metric_corrupted) / (metric_clean − metric_corrupted), broadcast over
  the patched sweep (SCIENCE.md A); NaN where clean equals corrupted."""
  patched = np.asarray(patched, np.float64)

  def lift(x):  # [B] -> [B, 1, 1] against a [B, layers, cells] sweep
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape + (1,) * (patched.ndim - x.ndim))
  denom = lift(clean) - lift(corrupted)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denom != 0, (patched - lift(corrupted)) / denom, np.nan)


@functools.partial(jax.jit, static_argnames=("cfg", "src_cfg", "site", "metric",
                                             "logit_positions"))
def _attribution(params, cfg, src_params, src_cfg, corrupted_BxT, clean_BxT, mask_BxT,
                 clean_mask_BxT, *, site, metric, logit_positions):
  clean_LxBxTxD = forward(src_params, src_cfg, clean_BxT, clean_mask_BxT, capture=(site,),
                          return_logits=False).captures[site]
  pos = jnp.asarray(logit_positions, jnp.int32)

  def run(delta_LxBxTxD):  # an all-zero "add" at every layer and position: its gradient is
    iv = Intervention(jnp.ones((cfg.n_layers,), bool), jnp.ones((1,), bool), delta_LxBxTxD,
                      site=site, mode="add")             # d metric / d activation
    out = forward(params, cfg, corrupted_BxT, mask_BxT, interventions=(iv,), capture=(site,),
                  return_logits=False)
    m_B = metric(unembed(params, cfg, jnp.take(out.residual, pos, axis=1)))
    return m_B.sum(), out.captures[site]
  zeros = jnp.zeros_like(clean_LxBxTxD)
  grad_LxBxTxD, corrupt_LxBxTxD = jax.grad(run, has_aux=True)(zeros)
  return ((clean_LxBxTxD - corrupt_LxBxTxD) * grad_LxBxTxD).sum(-1)   # [L, B, T]


def attribution_patch(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
                      site: str = "resid_pre", source_model: Transformer | None = None,
                      mask=None, clean_mask=None, logit_positions: Sequence[int] = (-1,)
                      ) -> np.ndarray:
  """Attribution patching (Nanda 2023): the first-order estimate of every act_patch cell from
  one forward and one backward, (clean − corrupted activation) · ∂metric/∂activation at the
  corrupted run, summed over d_model: float32 [batch, layers, positions]. Same arguments and
  result layout as `act_patch` with one position per cell and window 1."""
  site, _ = parse_hook_name(site)
  source_model = source_model or model
  if source_model.cfg.vocab_size != model.cfg.vocab_size or (
      source_model.cfg.d_model != model.cfg.d_model):
    raise ValueError("mismatched vocabularies or widths between the source and patched model")
  corrupted = np.atleast_2d(np.asarray(corrupted_tokens, np.int32))
  clean = np.atleast_2d(np.asarray(clean_tokens, np.int32))
  if corrupted.shape != clean.shape:
    raise ValueError(f"corrupted tokens {corrupted.shape} and clean tokens {clean.shape} differ "
                     "in shape (patching copies position t to position t)")
  mask = np.ones(corrupted.shape, bool) if mask is None else np.asarray(mask, bool)
  clean_mask = mask if clean_mask is None else np.asarray(clean_mask, bool)
  res = _attribution(model.params(), model.cfg, source_model.params(), source_model.cfg,
                     corrupted, clean, mask, clean_mask, site=check_site(site), metric=metric,
                     logit_positions=tuple(int(p) for p in logit_positions))
  return np.asarray(res).transpose(1, 0, 2)
