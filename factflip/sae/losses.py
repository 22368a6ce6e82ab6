"""SAE training objectives as SAELens 6.x trains them, and the jitted optimizer step.

Owns: `LossConfig` (coefficients and their warm-up, JumpReLU's bandwidth, TopK's auxiliary loss,
the dead-latent window), `losses` (the named loss terms of a batch), `batch_metrics` (explained
variance, L0), and `make_train_step` (loss, gradient clipping, Adam, dead-latent counters,
SAELens's firing counts; one jitted function).
Must not: read data or models, write anything (`sae.train`), or tell architectures apart by name
(their activations in training, loss terms and projections are `sae.architectures`' table).

Per batch x [N, d_in]: h = the pre-activations (`core.hidden_pre`), f = the architecture's
training activation of h, x̂ = decode(f), and

  mse_loss = mean_n Σ_d (x̂ − x)²

plus the architecture's own terms (`sae.architectures`: standard's l1_loss, topk's
auxiliary_reconstruction_loss, jumprelu's l0_loss). The optimizer is Adam (eps 1e-8) after
clipping the gradient's global norm to `grad_clip` (SAELens: 1.0), with a linear learning-rate
warm-up and decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from factflip.sae.architectures import ARCHITECTURES, Forward
from factflip.sae.core import SAE, SAEConfig, activation, decode, hidden_pre


@dataclasses.dataclass(frozen=True)
class LossConfig:
  l1_coefficient: float = 1.0
  lp_norm: float = 1.0
  l1_warm_up_steps: int = 0
  l0_coefficient: float = 1.0
  l0_warm_up_steps: int = 0
  jumprelu_bandwidth: float = 0.05
  aux_loss_coefficient: float = 1.0
  dead_feature_window: int = 1000
  feature_sampling_window: int = 2000   # steps per firing-count window (sparsity.safetensors)


# ---- losses ----------------------------------------------------------------------------------
def losses(params: dict[str, jax.Array], cfg: SAEConfig, lc: LossConfig, x_NxD, dead_S, t
           ) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
  """(total loss, {name: term}, (f, x̂)) of a batch x [N, d_in] (dead_S: bool [d_sae], the
  dead latents before this step; t: the step)."""
  arch = ARCHITECTURES[cfg.architecture]
  extra = {name: params[name] for name in arch.extra_params}
  sae = SAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], extra, cfg)
  h_NxS, state = hidden_pre(sae, x_NxD)
  if arch.train_activation is None:
    f_NxS = activation(sae, h_NxS)
  else:
    f_NxS = arch.train_activation(h_NxS, extra, cfg, lc)
  x_hat_NxD = decode(sae, f_NxS, state)
  terms = {"mse_loss": ((x_hat_NxD - x_NxD) ** 2).sum(-1).mean()}
  terms.update(arch.loss(Forward(x_NxD, h_NxS, f_NxS, x_hat_NxD, params, dead_S, t), cfg, lc))
  return sum(terms.values()), terms, (f_NxS, x_hat_NxD)


def batch_metrics(x_NxD, x_hat_NxD, f_NxS) -> dict[str, jax.Array]:
  """explained_variance = 1 − Σ_n ‖x − x̂‖² / Σ_n ‖x − mean_n x‖² (SAELens's trainer log), and
  l0 = mean_n #(f ≠ 0)."""
  resid = ((x_NxD - x_hat_NxD) ** 2).sum(-1).mean()
  total = ((x_NxD - x_NxD.mean(0)) ** 2).sum(-1).mean()
  return {"explained_variance": 1.0 - resid / total,
          "l0": (f_NxS != 0).sum(-1).astype(jnp.float32).mean()}


# ---- the step --------------------------------------------------------------------------------
def make_optimizer(lr: float, steps: int, *, beta1: float = 0.9, beta2: float = 0.999,
                   warm_up_steps: int = 0, decay_steps: int = 0, lr_end: float = 0.0,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """Clip by global norm, then Adam with SAELens's schedule: linear warm-up from lr /
  warm_up_steps, constant, linear decay to lr_end over the last decay_steps."""
  parts, bounds = [], []
  if warm_up_steps > 0:
    parts.append(optax.linear_schedule(lr / warm_up_steps, lr, max(warm_up_steps - 1, 1)))
    bounds.append(warm_up_steps)
  parts.append(optax.constant_schedule(lr))
  if decay_steps > 0:
    bounds.append(steps - decay_steps)
    parts.append(optax.linear_schedule(lr, lr_end, decay_steps))
  schedule = parts[0] if len(parts) == 1 else optax.join_schedules(parts, bounds)
  return optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(),
                     optax.adam(schedule, b1=beta1, b2=beta2, eps=1e-8))


def init_state(sae: SAE, tx: optax.GradientTransformation) -> dict[str, Any]:
  """The training state of `sae`: parameters (the architecture's own in float32, as SAELens
  keeps JumpReLU's threshold), Adam's state, steps since each latent fired, the tokens each
  latent fired on in the current sampling window and the window's tokens, the step."""
  params = {k: jnp.asarray(v, jnp.float32) if k in sae.extra else v
            for k, v in sae.params().items()}
  return {"params": params, "opt_state": tx.init(params),
          "since_fired": jnp.zeros((sae.cfg.d_sae,), jnp.int32),
          "window_fired": jnp.zeros((sae.cfg.d_sae,), jnp.int32),
          "window_tokens": jnp.int32(0), "step": jnp.int32(0)}


def log_feature_sparsity(state: dict[str, Any]) -> jax.Array:
  """log10(share of the window's tokens each latent fired on + 1e-10), float32 [d_sae]: what
  SAELens's trainer saves as sparsity.safetensors (its `log_feature_sparsity`)."""
  share = state["window_fired"] / jnp.maximum(state["window_tokens"], 1)
  return jnp.log10(share.astype(jnp.float32) + 1e-10)


def make_train_step(cfg: SAEConfig, lc: LossConfig, tx: optax.GradientTransformation,
                    donate: bool = True):
  """jit(state, x [N, d_in]) -> (state, metrics): one SAELens training step. Its firing counts
  restart, as SAELens's `maybe_reset_sparsity` does, before each step whose number of steps done
  is a positive multiple of `feature_sampling_window`."""

  project = ARCHITECTURES[cfg.architecture].project

  def train_step(state, x_NxD):
    params = state["params"]
    if project is not None:                            # jumprelu: θ >= 0, before the step
      params = project(params)
    dead_S = state["since_fired"] > lc.dead_feature_window
    (loss, (terms, (f_NxS, x_hat_NxD))), grads = jax.value_and_grad(
        lambda p: _with_aux(losses(p, cfg, lc, x_NxD, dead_S, state["step"])),
        has_aux=True)(params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    fired_NxS = f_NxS != 0
    since = jnp.where(fired_NxS.any(0), 0, state["since_fired"] + 1)
    reset = (state["step"] > 0) & (state["step"] % lc.feature_sampling_window == 0)
    window_fired = jnp.where(reset, 0, state["window_fired"]) + fired_NxS.sum(0, jnp.int32)
    window_tokens = jnp.where(reset, 0, state["window_tokens"]) + x_NxD.shape[0]
    metrics = {"loss": loss, **terms, **batch_metrics(x_NxD, x_hat_NxD, f_NxS),
               "dead_share": dead_S.mean(), "grad_norm": optax.global_norm(grads)}
    return {**state, "params": new_params, "opt_state": opt_state, "since_fired": since,
            "window_fired": window_fired, "window_tokens": window_tokens,
            "step": state["step"] + 1}, metrics   # other entries (the run's scale) pass through

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def _with_aux(out):
  total, terms, rest = out
  return total, (terms, rest)
