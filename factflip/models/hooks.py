"""Hook sites and interventions: the data contract between the model and the probes.

Owns: the names of the sites a forward pass exposes per layer, the `Intervention` pytree that the
layer scan consumes, and TransformerLens-style hook-name parsing.
Must not: run models or build sweeps (that is `factflip.probes`).

An intervention is data, not a callback. Because masks and values are array leaves of a pytree,
a sweep over (layer, position) cells is a `jax.vmap` over interventions inside one compiled
program, and cross-model patching is "capture in model A, replace in model B".

Sites, per layer l (block l maps resid_pre[l] to resid_post[l] = resid_pre[l + 1]):
  resid_pre   block input (resid_pre[0] is the embedding output, after any embedding scale)
  attn_out    what the attention branch adds to the residual stream (after Gemma's post-norm)
  resid_mid   resid_pre + attn_out (the MLP branch's input residual)
  mlp_out     what the MLP branch adds to the residual stream (after Gemma's post-norm)
  resid_post  block output
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import struct

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
MODES = ("replace", "add")

# TransformerLens names -> ours (`blocks.{l}.hook_resid_pre`, `blocks.{l}.hook_attn_out`, ...).
_TL_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)$")


def parse_hook_name(name: str) -> tuple[str, int | None]:
  """'blocks.3.hook_resid_pre' -> ('resid_pre', 3); 'mlp_out' -> ('mlp_out', None)."""
  if name in SITES:
    return name, None
  m = _TL_NAME.match(name)
  if not m:
    raise ValueError(f"unknown hook site {name!r}; expected one of {SITES} or a TransformerLens "
                     "name like 'blocks.3.hook_resid_pre'")
  return m.group(2), int(m.group(1))


def check_site(site: str) -> str:
  if site not in SITES:
    raise ValueError(f"unknown hook site {site!r}; expected one of {SITES}")
  return site


@struct.dataclass
class Intervention:
  """Replace or add `values` at `site`, where layer_mask[l] & pos_mask[b, t].

  Leaves (vmappable):
    layer_mask: bool [L].
    pos_mask:   bool, broadcastable to [B, T].
    values:     [L, ...] with each layer's slice broadcastable to [B, T, D] (e.g. [L, B, T, D]
                from a capture, or [L, 1, 1, D] for a steering vector).
  Static: site (one of SITES) and mode ("replace" | "add").
  """

  layer_mask: jax.Array
  pos_mask: jax.Array
  values: jax.Array
  site: str = struct.field(pytree_node=False, default="resid_pre")
  mode: str = struct.field(pytree_node=False, default="replace")

  def __post_init__(self):
    check_site(self.site)
    if self.mode not in MODES:
      raise ValueError(f"Intervention.mode={self.mode!r}: expected one of {MODES}")

  def apply(self, h_BxTxD: jax.Array, on: jax.Array, values_l: jax.Array) -> jax.Array:
    """This intervention at one layer (`on` = layer_mask[l], `values_l` = values[l])."""
    m = jnp.logical_and(on, jnp.broadcast_to(self.pos_mask, h_BxTxD.shape[:2]))[..., None]
    v = values_l.astype(h_BxTxD.dtype)
    if self.mode == "replace":
      return jnp.where(m, v, h_BxTxD)
    return h_BxTxD + jnp.where(m, v, jnp.zeros((), h_BxTxD.dtype))
