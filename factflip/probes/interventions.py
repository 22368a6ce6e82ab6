"""Capture and intervene at hook sites: the base the probes stand on.

Owns: building `Intervention`s from friendly arguments (layers and positions as lists, masks or
None = all), capturing sites, and the residual stream.
Must not: define sites or how the scan applies interventions (`factflip.models.hooks`), or build
sweeps (`factflip.probes.patching`, later).

Typical use (cross-model patching is capture in one model, replace in another):

    caps = capture(base, tokens, ["resid_pre"])                    # {site: [L, B, T, D]}
    iv = replace("resid_pre", caps["resid_pre"], layers=[5], positions=[-1])
    logits = poisoned(tokens, interventions=[iv])
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models.hooks import (
  HEAD_SITES,
  Intervention,
  check_site,
  feature_axes,
  parse_hook_name,
)
from factflip.models.transformer import Transformer

Index = Sequence[int] | np.ndarray | jax.Array | None


def _axis_mask(n: int, index, name: str, of: str) -> jax.Array:
  """bool [n] True at `index`: ints (negative allowed) or a bool [n] mask; a jax array is taken
  as it is (possibly traced, in a vmapped sweep: no value checks)."""
  if isinstance(index, jax.Array):
    if index.dtype == bool:
      if index.shape != (n,):
        raise ValueError(f"{name} mask has shape {index.shape}; expected ({n},)")
      return index
    return jnp.zeros((n,), bool).at[index].set(True)
  idx = np.asarray(index)
  if idx.dtype == bool:
    if idx.shape != (n,):
      raise ValueError(f"{name} mask has shape {idx.shape}; expected ({n},)")
    return jnp.asarray(idx)
  if idx.size and (idx.max() >= n or idx.min() < -n):
    raise ValueError(f"{name}s {idx.tolist()} out of range for {of}")
  return jnp.zeros((n,), bool).at[idx].set(True)


def layer_mask(n_layers: int, layers: Index = None) -> jax.Array:
  """bool [L]: True at `layers` (ints, negative allowed) or everywhere when None."""
  if layers is None:
    return jnp.ones((n_layers,), bool)
  return _axis_mask(n_layers, layers, "layer", f"a {n_layers}-layer model")


def head_mask(n_heads: int, heads: Index = None) -> jax.Array | None:
  """bool [H] True at `heads` (ints, or a bool mask), or None (every head) when None."""
  return None if heads is None else _axis_mask(n_heads, heads, "head", f"{n_heads} heads")


def position_mask(seq_len: int, positions: Index = None) -> jax.Array:
  """bool [T] (or [B, T] if given as a 2-D mask): True at `positions`, everywhere when None."""
  if positions is None:
    return jnp.ones((seq_len,), bool)
  if isinstance(positions, jax.Array):  # possibly traced: no value checks
    if positions.dtype == bool:
      if positions.shape[-1] != seq_len:
        raise ValueError(f"position mask has {positions.shape[-1]} positions; expected {seq_len}")
      return positions
    return jnp.zeros((seq_len,), bool).at[positions].set(True)
  idx = np.asarray(positions)
  if idx.dtype == bool:
    if idx.shape[-1] != seq_len:
      raise ValueError(f"position mask has {idx.shape[-1]} positions; expected {seq_len}")
    return jnp.asarray(idx)
  if idx.size and (idx.max() >= seq_len or idx.min() < -seq_len):
    raise ValueError(f"positions {idx.tolist()} out of range for {seq_len} tokens")
  return jnp.zeros((seq_len,), bool).at[idx].set(True)


def _make(site: str, mode: str, values, layers: Index, positions: Index,
          n_layers: int | None, heads: Index = None) -> Intervention:
  site, layer_from_name = parse_hook_name(site)
  if layer_from_name is not None:
    if layers is not None:
      raise ValueError(f"hook name {site!r} already names layer {layer_from_name}; drop layers=")
    layers = [layer_from_name]
  values = jnp.asarray(values)
  L = n_layers or values.shape[0]
  if values.shape[0] != L:
    raise ValueError(f"values have leading axis {values.shape[0]}; expected the layer axis ({L})")
  n_feature = feature_axes(site)                   # per-head sites: [..., heads, d_head]
  t_axis = -1 - n_feature
  T = (values.shape[t_axis] if values.ndim >= 2 + n_feature and values.shape[t_axis] > 1
       else None)
  if T is None and positions is not None and jnp.asarray(positions).dtype != bool:
    raise ValueError("positions given as indices need values with a position axis; pass a "
                     "boolean position mask instead")
  pos = position_mask(T, positions) if T is not None else (
      jnp.asarray(positions) if positions is not None else jnp.ones((1,), bool))
  heads_n = values.shape[-2] if site in HEAD_SITES and values.ndim >= 3 else None
  if heads is not None and heads_n is None:
    raise ValueError(f"heads= at {site!r} needs values with a head axis ([L, B, T, heads, .])")
  return Intervention(layer_mask(L, layers), pos, values,
                      head_mask(heads_n, heads) if heads is not None else None,
                      site=check_site(site), mode=mode)


def replace(site: str, values, layers: Index = None, positions: Index = None,
            n_layers: int | None = None, heads: Index = None) -> Intervention:
  """Replace `site` by `values` ([L, B, T, D], e.g. a capture; [L, B, T, heads, d_head] at z)
  at the chosen layers/positions (and `heads`, at a per-head site: `hooks.HEAD_SITES`).

  `site` may be a TransformerLens name ('blocks.5.hook_resid_pre'), which also picks the layer.
  """
  return _make(site, "replace", values, layers, positions, n_layers, heads)


def add(site: str, values, layers: Index = None, positions: Index = None,
        n_layers: int | None = None, heads: Index = None) -> Intervention:
  """Add `values` to `site` at the chosen layers/positions (and heads). `values` is [L, ...]
  broadcastable per layer to [B, T, D]: a steering vector d [D] at layer 5 of 12 is
  `add("resid_post", jnp.zeros((12, 1, 1, D)).at[5, 0, 0].set(d), layers=[5])`."""
  return _make(site, "add", values, layers, positions, n_layers, heads)


def capture(model: Transformer, tokens_BxT, sites: Sequence[str], mask_BxT=None,
            interventions: Sequence[Intervention] = (),
            positions: Index = None) -> dict[str, jax.Array]:
  """Activations at `sites`, each [L, B, T, D] (or [L, B, P, D] at `positions`; the per-head
  sites [L, B, T, heads, d_head], attn_scores / pattern [L, B, T, heads, T], mlp_post
  [L, B, T, d_ff], the norms' scales [L, B, T, 1]: `hooks.site_shape`)."""
  idx = None if positions is None else jnp.asarray(positions, jnp.int32)
  out = model.forward(tokens_BxT, mask_BxT, capture=tuple(sites), capture_index=idx,
                      interventions=tuple(interventions), return_logits=False)
  return dict(out.captures)


def residual_stream(model: Transformer, tokens_BxT, mask_BxT=None) -> jax.Array:
  """[L + 1, B, T, D]: index 0 the embedding output (after any embedding scale), index l the
  output of block l - 1; the last entry is before the final norm."""
  out = model.forward(tokens_BxT, mask_BxT, capture=("resid_pre", "resid_post"),
                      return_logits=False)
  return jnp.concatenate([out.captures["resid_pre"][:1], out.captures["resid_post"]], axis=0)
