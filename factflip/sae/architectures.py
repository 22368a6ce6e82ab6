"""What differs between SAE architectures, as one table: a new architecture is one entry.

Owns: `Architecture` (per architecture: its own parameters and their start, its nonlinearity at
inference and in training, its loss terms beyond the MSE, whether it ranks by decoder norm, the
config fields it reads, the projection after a step), `ARCHITECTURES` (the table, by the name
SAELens writes), the straight-through `jumprelu` / `step` and the coefficient warm-up.
Must not: import the rest of `factflip.sae` (core, losses, formats and train read this table),
compare architecture names anywhere else, read or write files.

SAELens 6.x's math (h: the pre-activations of `core.hidden_pre`, θ: the thresholds; a parity
test holds each to 1e-5):

    standard:  f = relu(h)
               l1_loss = l1_coefficient(t) · mean_n ‖f ⊙ ‖W_dec‖_row‖_p   (p = lp_norm)
    topk:      f = relu of the k largest h per token, 0 elsewhere (h · ‖W_dec[j]‖ first when
               `rescale_acts_by_decoder_norm`, and f / ‖W_dec[j]‖ again before decoding); a
               value tied with the k-th largest is kept too (measure zero for real inputs)
               auxiliary_reconstruction_loss = aux_loss_coefficient · min(n_dead / k_aux, 1) ·
               mean_n Σ_d (ê − (x − x̂))², ê = top-k_aux(h over dead latents) @ W_dec (no b_dec;
               / ‖W_dec‖ first when rescaling), k_aux = d_in // 2, dead = no firing for more
               than dead_feature_window steps
    jumprelu:  f = relu(h) · [h > θ]
               l0_loss = l0_coefficient(t) · mean_n Σ_j H(h_j − θ_j), H's gradient to θ the
               rectangle-kernel estimate with `bandwidth` (none to h: DeepMind's JumpReLU); in
               training f's gradient to θ is that estimate too, and θ is projected to θ >= 0
               before each step

Coefficients warm up linearly: c(t) = c · min(t / warm_up_steps, 1), as SAELens's scheduler
gives the forward of step t. The hooks take the SAE's config (`core.SAEConfig`) and the loss
config (`losses.LossConfig`) as plain objects: this module imports neither.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from factflip.kernels import at_least_kth


class Param(NamedTuple):
  """An architecture's own parameter: its shape for a config, the constant it starts at
  (`core.init_sae`'s default) and the training config key (`sae.<key>`) that sets that start."""
  shape: Callable[[Any], tuple[int, ...]]
  init: float
  train_key: str = ""


class Forward(NamedTuple):
  """What an architecture's loss terms read of a batch's forward pass: inputs x [N, d_in],
  pre-activations h [N, d_sae], latents f, reconstruction x̂, the parameters by SAELens's names,
  the dead latents before the step (bool [d_sae]) and the step t."""
  x_NxD: jax.Array
  h_NxS: jax.Array
  f_NxS: jax.Array
  x_hat_NxD: jax.Array
  params: dict[str, jax.Array]
  dead_S: jax.Array
  t: Any


def no_terms(fw: Forward, cfg, lc) -> dict[str, jax.Array]:
  """An architecture trained on the MSE alone."""
  return {}


def no_check(cfg) -> tuple[str, str] | None:
  """An architecture that asks nothing of the config beyond the common fields."""
  return None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One SAE architecture: every way it differs from the others.

  - name: as SAELens writes it (cfg.json's `architecture`).
  - activation(h, extra, cfg) -> f: the encode nonlinearity, a pure jnp function of the
    pre-activations, the architecture's own parameters by name and the SAE config.
  - train_activation(h, extra, cfg, lc) -> f: the one training differentiates (None:
    `activation`); lc is the loss config.
  - loss(fw, cfg, lc) -> {name: term}: the loss terms beyond `mse_loss` (`Forward`).
  - extra_params: its own parameters beyond W_enc, b_enc, W_dec, b_dec, by name (`Param`).
  - check(cfg) -> None or (field, expected): what `SAEConfig.validate` asks of it beyond the
    common fields.
  - rescales_by_decoder_norm: it honours `rescale_acts_by_decoder_norm` (h · ‖W_dec‖ before the
    activation, f / ‖W_dec‖ before decoding).
  - cfg_fields: the SAEConfig fields it reads beyond the common ones: written to cfg.json, read
    back, and set from the training config's `sae.<field>`; required: those a SAELens 6.x
    cfg.json must carry.
  - project(params) -> params: applied before each training step and to the SAE a run writes
    (None: nothing)."""
  name: str
  activation: Callable[..., jax.Array]
  train_activation: Callable[..., jax.Array] | None = None
  loss: Callable[..., dict[str, jax.Array]] = no_terms
  extra_params: dict[str, Param] = dataclasses.field(default_factory=dict)
  check: Callable[[Any], tuple[str, str] | None] = no_check
  rescales_by_decoder_norm: bool = False
  cfg_fields: tuple[str, ...] = ()
  required: tuple[str, ...] = ()
  project: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None


def coefficient(value: float, warm_up_steps: int, t):
  """SAELens's CoefficientScheduler as seen by the forward of step t (0-based)."""
  if warm_up_steps <= 0:
    return jnp.float32(value)
  return value * jnp.minimum(jnp.asarray(t, jnp.float32) / warm_up_steps, 1.0)


# ---- standard ----------------------------------------------------------------------------------
def _relu(h, extra, cfg):
  return jax.nn.relu(h)


def _lp_sparsity(fw: Forward, cfg, lc) -> dict[str, jax.Array]:
  W_dec_norm_S = jnp.linalg.norm(fw.params["W_dec"], axis=-1)
  weighted = jnp.abs(fw.f_NxS * W_dec_norm_S) ** lc.lp_norm
  sparsity_N = weighted.sum(-1) ** (1.0 / lc.lp_norm)
  return {"l1_loss": (coefficient(lc.l1_coefficient, lc.l1_warm_up_steps, fw.t)
                      * sparsity_N).mean()}


# ---- TopK --------------------------------------------------------------------------------------
def _topk(h, extra, cfg):
  # top k (an exact bisection on the values, not a sort), then relu of the selected values
  return jnp.where(at_least_kth(jax.lax.stop_gradient(h), cfg.k), jax.nn.relu(h), 0.0)


def _k_in_range(cfg):
  if not 1 <= cfg.k <= cfg.d_sae:
    return "k", f"an integer in [1, d_sae={cfg.d_sae}] for a topk SAE"
  return None


def _topk_aux(fw: Forward, cfg, lc) -> dict[str, jax.Array]:
  """TopK's auxiliary loss. The k_aux latents are chosen by an exact bisection on the
  pre-activations (`kernels.at_least_kth`, no sort; the choice carries no gradient), the rest is
  dense: on CPU the dense products beat gathering k rows per token (measured:
  benchmarks/RESULTS.md)."""
  if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
    raise ValueError("TopK training does not support normalize_activations="
                     f"{cfg.normalize_activations!r} (as SAELens's auxiliary loss)")
  # the top k_aux dead latents' raw pre-activations reconstruct the residual; skipped (a
  # conditional, not a masked zero) while no latent is dead, as SAELens skips it
  k_aux = min(cfg.d_in // 2, cfg.d_sae)
  dead_S = fw.dead_S
  n_dead = dead_S.sum()
  residual_NxD = jax.lax.stop_gradient(fw.x_NxD - fw.x_hat_NxD)

  def aux_loss(h_NxS, W_dec):
    masked_NxS = jax.lax.stop_gradient(jnp.where(dead_S, h_NxS, -jnp.inf))
    aux_NxS = jnp.where(at_least_kth(masked_NxS, k_aux) & dead_S, h_NxS, 0.0)
    if cfg.rescale_acts_by_decoder_norm:
      aux_NxS = aux_NxS * (1.0 / jnp.linalg.norm(W_dec, axis=-1))
    aux = ((aux_NxS @ W_dec - residual_NxD) ** 2).sum(-1).mean()
    return lc.aux_loss_coefficient * jnp.minimum(n_dead / (cfg.d_in // 2), 1.0) * aux
  return {"auxiliary_reconstruction_loss": jax.lax.cond(
      n_dead > 0, aux_loss, lambda h, w: jnp.zeros((), h.dtype), fw.h_NxS, fw.params["W_dec"])}


# ---- JumpReLU with SAELens's straight-through estimators ---------------------------------------
def _rect(u):
  return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(h, theta, bandwidth: float):
  """h · [h > θ]; gradient to h through the gate, to θ by the rectangle kernel."""
  return h * (h > theta).astype(h.dtype)


def _jumprelu_fwd(h, theta, bandwidth):
  return jumprelu(h, theta, bandwidth), (h, theta)


def _jumprelu_bwd(bandwidth, res, g):
  h, theta = res
  ste = (theta / bandwidth) * _rect((h - theta) / bandwidth) * g
  return (h > theta).astype(g.dtype) * g, -ste.reshape(-1, theta.shape[-1]).sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(h, theta, bandwidth: float):
  """[h > θ]; no gradient to h, to θ by the rectangle kernel."""
  return (h > theta).astype(h.dtype)


def _step_fwd(h, theta, bandwidth):
  return step(h, theta, bandwidth), (h, theta)


def _step_bwd(bandwidth, res, g):
  h, theta = res
  ste = (1.0 / bandwidth) * _rect((h - theta) / bandwidth) * g
  return jnp.zeros_like(h), -ste.reshape(-1, theta.shape[-1]).sum(0)


step.defvjp(_step_fwd, _step_bwd)


def _gated_relu(h, extra, cfg):
  return jax.nn.relu(h) * (h > extra["threshold"]).astype(h.dtype)


def _jumprelu_ste(h, extra, cfg, lc):
  return jumprelu(h, extra["threshold"].astype(h.dtype), lc.jumprelu_bandwidth)


def _l0(fw: Forward, cfg, lc) -> dict[str, jax.Array]:
  h_NxS = fw.h_NxS
  l0_N = step(h_NxS, fw.params["threshold"].astype(h_NxS.dtype), lc.jumprelu_bandwidth).sum(-1)
  return {"l0_loss": (coefficient(lc.l0_coefficient, lc.l0_warm_up_steps, fw.t) * l0_N).mean()}


def _nonnegative_threshold(params):
  return dict(params, threshold=jnp.maximum(params["threshold"], 0.0))


# ---- the table ---------------------------------------------------------------------------------
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("standard", _relu, loss=_lp_sparsity),
    Architecture("topk", _topk, loss=_topk_aux, check=_k_in_range,
                 rescales_by_decoder_norm=True, cfg_fields=("k", "rescale_acts_by_decoder_norm"),
                 required=("k",)),
    Architecture("jumprelu", _gated_relu, train_activation=_jumprelu_ste, loss=_l0,
                 extra_params={"threshold": Param(lambda cfg: (cfg.d_sae,), 0.01,
                                                  "jumprelu_init_threshold")},
                 project=_nonnegative_threshold),
)}
