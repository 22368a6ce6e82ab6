"""SAE interventions as data: steering along decoder directions, clamping latents, splicing the
reconstruction in; grids of them as one compiled program.

Owns: `steer` (h ← h + Σ α_i · W_dec[j_i], an `add` Intervention), `latent_vectors` (the
residual change that moves one latent by a given amount of its own units, through the SAE's
decoder: mean over activations of decode(f + d·e_j) − decode(f)), `SAEEdit` (an intervention
that encodes the site, edits latents and decodes: clamp with the SAE error term kept,
h ← h + decode(f′) − decode(f), or splice, h ← decode(f′)), `clamp`, `splice`, `sae_site` (the
site and layer an SAE reads, from its hook name) and `run_grid` (a stacked grid of interventions
through one jitted vmap).
Must not: define the SAE math (`sae.core`) or the sites (`models.hooks`).

Every edit is a pytree whose latent indices and values are array leaves, so a grid of latents ×
α is `jax.vmap` over them: one program, not a Python loop of forwards. Layers come from the SAE's
TransformerLens hook name (e.g. "blocks.3.hook_resid_post" → resid_post at layer 3) unless given.
Positions are a boolean mask ([T] or [B, T]) or None (every position).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from factflip.models import attention, transformer
from factflip.models.hooks import Intervention, check_site, parse_hook_name
from factflip.sae.core import SAE, decode, encode_with_state, with_head_width


def sae_site(sae: SAE, layer: int | None = None) -> tuple[str, int]:
  """(site, layer) the SAE reads: its hook name's, or `layer` at that site."""
  if not sae.cfg.hook_name:
    raise ValueError("the SAE has no hook_name (load_sae(path, hook_name=...) names the site, "
                     "e.g. 'blocks.3.hook_resid_post')")
  site, named = parse_hook_name(sae.cfg.hook_name)
  if layer is None and named is None:
    raise ValueError(f"hook name {sae.cfg.hook_name!r} names no layer; pass layer=")
  return site, int(named if layer is None else layer)



def latent_vectors(sae, h_PxD, latents_J, amounts_J) -> np.ndarray:
  """[J, D]: per latent j, the mean over the prompts' activations h (flattened, [P, D]) of
  decode(f + amounts[j]·e_j) − decode(f), f = encode(h): the residual change that moves latent j
  by amounts[j] (its own units)."""
  latents = np.asarray(latents_J, np.int64).reshape(-1)
  amounts = np.asarray(amounts_J, np.float32).reshape(-1)
  if latents.shape != amounts.shape:
    raise ValueError(f"{len(latents)} latents and {len(amounts)} amounts; expected one each")
  h = np.asarray(h_PxD, np.float32)
  if sae.cfg.reshape_activations == "hook_z":
    h = h.reshape(len(h), -1, sae.cfg.d_head)
  if not len(latents):
    return np.zeros((0, int(np.prod(h.shape[1:]))), np.float32)
  f_PxS, state = encode_with_state(sae, jnp.asarray(h))
  moves_JxS = jnp.zeros((len(latents), f_PxS.shape[-1]), f_PxS.dtype).at[
      jnp.arange(len(latents)), jnp.asarray(latents)].set(jnp.asarray(amounts))
  diff = decode(sae, f_PxS[None] + moves_JxS[:, None], state) - decode(sae, f_PxS, state)[None]
  return np.asarray(diff, np.float64).reshape(len(latents), len(h), -1).mean(1).astype(
      np.float32)

def _layer_mask(n_layers: int, layer: int) -> jax.Array:
  if not 0 <= layer < n_layers:
    raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model")
  return jnp.arange(n_layers) == layer


def _positions(positions) -> jax.Array:
  if positions is None:
    return jnp.ones((1,), bool)
  pos = jnp.asarray(positions)
  if pos.dtype != bool:
    raise ValueError("positions: a boolean mask [T] or [B, T] (True where the edit applies)")
  return pos


def _check_latents(sae: SAE, latents) -> jax.Array:
  latents = jnp.asarray(latents, jnp.int32).reshape(-1)
  if not isinstance(latents, jax.core.Tracer) and latents.size and (
      int(latents.min()) < 0 or int(latents.max()) >= sae.cfg.d_sae):
    raise ValueError(f"latents {np.asarray(latents).tolist()} out of range for d_sae "
                     f"{sae.cfg.d_sae}")
  return latents


def _paired(sae: SAE, latents, values, what: str) -> tuple[jax.Array, jax.Array]:
  """Latent indices (checked) and one float per latent (`what`: their name in errors)."""
  latents = _check_latents(sae, latents)
  values = jnp.asarray(values, jnp.float32).reshape(-1)
  if values.shape != latents.shape:
    raise ValueError(f"{latents.shape[0]} latents and {values.shape[0]} {what}; expected one "
                     f"per latent")
  return latents, values


def steer(sae: SAE, latents, alphas, n_layers: int, *, layer: int | None = None,
          positions=None) -> Intervention:
  """h ← h + Σ_i alphas[i] · W_dec[latents[i]] at the SAE's site (an `add` Intervention).
  `latents` and `alphas` are ints / floats or arrays of equal length (traceable: vmap over
  them for a grid)."""
  site, layer = sae_site(sae, layer)
  latents, alphas = _paired(sae, latents, alphas, "alphas")
  v_D = alphas @ jnp.take(sae.W_dec, latents, axis=0).astype(jnp.float32)
  if sae.cfg.reshape_activations == "hook_z":
    if not sae.cfg.d_head:
      raise ValueError("steering with a hook_z SAE needs its head width (cfg.d_head)")
    v_D = v_D.reshape(-1, sae.cfg.d_head)
  values = jnp.broadcast_to(v_D, (n_layers, 1, 1, *v_D.shape))
  return Intervention(_layer_mask(n_layers, layer), _positions(positions), values, site=site,
                      mode="add")


@struct.dataclass
class SAEEdit:
  """Encode the site with `sae`, set latents[i] to latent_values[i], decode: with `keep_error`
  h ← h + decode(f′) − decode(f) (the SAE's error term kept, so an empty edit is the identity);
  without, h ← decode(f′) (the reconstruction spliced in). Where layer_mask & pos_mask.

  Leaves: layer_mask [L], pos_mask, values [L] (unused: what the layer scan slices), sae, latents
  [n], latent_values [n]. Static: site, keep_error."""
  layer_mask: jax.Array
  pos_mask: jax.Array
  values: jax.Array
  sae: SAE
  latents: jax.Array
  latent_values: jax.Array
  site: str = struct.field(pytree_node=False, default="resid_post")
  keep_error: bool = struct.field(pytree_node=False, default=True)

  def __post_init__(self):
    check_site(self.site)

  def apply(self, h, on, values_l):
    del values_l
    sae = with_head_width(self.sae, h.shape[-1])
    f, state = encode_with_state(sae, h.astype(sae.W_enc.dtype))
    f_edit = f.at[..., self.latents].set(self.latent_values.astype(f.dtype))
    x_hat = decode(sae, f_edit, state)
    new = h + (x_hat - decode(sae, f, state)).astype(h.dtype) if self.keep_error else (
        x_hat.astype(h.dtype))
    m = jnp.logical_and(on, jnp.broadcast_to(self.pos_mask, h.shape[:2]))
    return jnp.where(m.reshape(m.shape + (1,) * (h.ndim - 2)), new, h)


def clamp(sae: SAE, latents, values, n_layers: int, *, layer: int | None = None,
          positions=None, keep_error: bool = True) -> SAEEdit:
  """Latents `latents` set to `values` (e.g. 0 to ablate, 5·max to amplify), the SAE's error
  term kept (`keep_error`)."""
  site, layer = sae_site(sae, layer)
  latents, values = _paired(sae, latents, values, "values")
  return SAEEdit(_layer_mask(n_layers, layer), _positions(positions), jnp.zeros((n_layers,)),
                 sae, latents, values, site=site, keep_error=keep_error)


def splice(sae: SAE, n_layers: int, *, layer: int | None = None, positions=None) -> SAEEdit:
  """The site replaced by the SAE's reconstruction (what "CE loss recovered" measures)."""
  return clamp(sae, jnp.zeros((0,), jnp.int32), jnp.zeros((0,)), n_layers, layer=layer,
               positions=positions, keep_error=False)


@functools.partial(jax.jit, static_argnames=("cfg", "read", "chunk"))
def _grid(params, cfg, tokens_BxT, mask_BxT, ivs, *, read, chunk):
  def one(iv):
    return read(transformer.forward(params, cfg, tokens_BxT, attention.causal(mask_BxT),
                                    interventions=(iv,)).logits)
  if chunk:
    return jax.lax.map(one, ivs, batch_size=chunk)
  return jax.vmap(one)(ivs)


def run_grid(model, tokens_BxT, mask_BxT, interventions, read: Callable, *,
             chunk: int | None = None):
  """`read(logits [B, T, V])` for every intervention of a stacked grid (each leaf with a
  leading grid axis, e.g. `jax.vmap(lambda j, a: steer(sae, j, a, L))(latents_G, alphas_G)`),
  in one compiled program: [G, ...]. `chunk` bounds memory (grid items per vmapped step).
  Pass the same `read` object across calls to reuse the compiled program."""
  mask = (jnp.ones(np.shape(tokens_BxT), bool) if mask_BxT is None
          else jnp.asarray(mask_BxT, bool))
  return _grid(model.params(), model.cfg, jnp.asarray(tokens_BxT, jnp.int32), mask,
               interventions, read=read, chunk=chunk)
