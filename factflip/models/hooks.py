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
  z           attention's per-head outputs before the output projection, [B, T, heads, d_head]
              (TransformerLens `attn.hook_z`: what Gemma Scope's attention SAEs read)
  mlp_post    the MLP's hidden activation, act(gate) * up, [B, T, d_ff] (TransformerLens
              `mlp.hook_post`: what transcoders and MLP-neuron probes read)
The first five are [B, T, d_model]; an intervention's position mask broadcasts over whatever
trailing axes a site has.

The scan reads an intervention through four members only: `site`, `layer_mask` [L], `values`
(leading axis L, sliced per layer) and `apply(h, on, values_l)`. Any pytree with them is an
intervention: `Intervention` replaces or adds values; `factflip.sae.steering.SAEEdit` encodes
the site with an SAE, edits latents and decodes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import struct

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "z", "mlp_post")
STREAM_SITES = SITES[:5]          # the [B, T, d_model] sites
MODES = ("replace", "add")

# TransformerLens hook names (after `blocks.{l}.`) of our sites
TL_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
            "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out",
            "resid_post": "hook_resid_post", "z": "attn.hook_z", "mlp_post": "mlp.hook_post"}
_FROM_TL = {v: k for k, v in TL_HOOKS.items()}
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(v) for v in TL_HOOKS.values())
                      + r")$")


def parse_hook_name(name: str) -> tuple[str, int | None]:
  """'blocks.3.hook_resid_pre' -> ('resid_pre', 3); 'blocks.2.attn.hook_z' -> ('z', 2);
  'mlp_out' -> ('mlp_out', None)."""
  if name in SITES:
    return name, None
  m = _TL_NAME.match(name)
  if not m:
    raise ValueError(f"unknown hook site {name!r}; expected one of {SITES} or a TransformerLens "
                     "name like 'blocks.3.hook_resid_pre' or 'blocks.3.attn.hook_z'")
  return _FROM_TL[m.group(2)], int(m.group(1))


def hook_name(site: str, layer: int) -> str:
  """The TransformerLens name of `site` at `layer`: ('z', 2) -> 'blocks.2.attn.hook_z'."""
  return f"blocks.{int(layer)}.{TL_HOOKS[check_site(site)]}"


def site_shape(cfg, site: str) -> tuple[int, ...]:
  """A site's per-token feature shape for a ModelConfig: (d_model,), z (heads, head_dim),
  mlp_post (d_ff,)."""
  check_site(site)
  return {"z": (cfg.n_heads, cfg.head_dim), "mlp_post": (cfg.d_ff,)}.get(site, (cfg.d_model,))


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
    m = jnp.logical_and(on, jnp.broadcast_to(self.pos_mask, h_BxTxD.shape[:2]))
    m = m.reshape(m.shape + (1,) * (h_BxTxD.ndim - 2))     # over d_model, or heads x d_head
    v = values_l.astype(h_BxTxD.dtype)
    if self.mode == "replace":
      return jnp.where(m, v, h_BxTxD)
    return h_BxTxD + jnp.where(m, v, jnp.zeros((), h_BxTxD.dtype))
