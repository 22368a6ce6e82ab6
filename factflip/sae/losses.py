"""SAE training objectives as SAELens 6.x trains them, and the jitted optimizer step.

Owns: `LossConfig` (coefficients and their warm-up, JumpReLU's bandwidth, TopK's auxiliary loss,
the dead-latent window), `jumprelu` / `step` with SAELens's straight-through gradients, `losses`
(the named loss terms of a batch), `batch_metrics` (explained variance, L0), and
`make_train_step` (loss, gradient clipping, Adam, dead-latent counters; one jitted function).
Must not: read data or models, or write anything (`sae.train`).

Per batch x [N, d_in], with f, h = the latents and pre-activations and x̂ = decode(f):
  mse_loss = mean_n Σ_d (x̂ − x)²
  standard: l1_loss = l1_coefficient(t) · mean_n ‖f ⊙ ‖W_dec‖_row‖_p   (p = lp_norm)
  topk:     auxiliary_reconstruction_loss = aux_loss_coefficient · min(n_dead / k_aux, 1) ·
            mean_n Σ_d (ê − (x − x̂))², ê = top-k_aux(h over dead latents) @ W_dec (no b_dec;
            / ‖W_dec‖ first when rescaling), k_aux = d_in // 2, dead = no firing for more than
            dead_feature_window steps
  jumprelu: l0_loss = l0_coefficient(t) · mean_n Σ_j H(h_j − θ_j), H's gradient to θ the
            rectangle-kernel estimate with `bandwidth` (none to h: DeepMind's JumpReLU); the
            threshold projected to θ >= 0 before each step
Coefficients warm up linearly: c(t) = c · min(t / warm_up_steps, 1), as SAELens's scheduler
gives the forward of step t. The optimizer is Adam (eps 1e-8) after clipping the gradient's
global norm to `grad_clip` (SAELens: 1.0), with a linear learning-rate warm-up and decay.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

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


# ---- JumpReLU with SAELens's straight-through estimators -----------------------------------------
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


# ---- losses ----------------------------------------------------------------------------------
def coefficient(value: float, warm_up_steps: int, t):
  """SAELens's CoefficientScheduler as seen by the forward of step t (0-based)."""
  if warm_up_steps <= 0:
    return jnp.float32(value)
  return value * jnp.minimum(jnp.asarray(t, jnp.float32) / warm_up_steps, 1.0)


def losses(params: dict[str, jax.Array], cfg: SAEConfig, lc: LossConfig, x_NxD, dead_S, t
           ) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
  """(total loss, {name: term}, (f, x̂)) of a batch x [N, d_in] (dead_S: bool [d_sae], the
  dead latents before this step; t: the step)."""
  if cfg.architecture == "topk":
    return _topk_losses(params, cfg, lc, x_NxD, dead_S)
  sae = SAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"],
            params.get("threshold"), cfg)
  h_NxS, state = hidden_pre(sae, x_NxD)
  if cfg.architecture == "jumprelu":
    f_NxS = jumprelu(h_NxS, params["threshold"].astype(h_NxS.dtype), lc.jumprelu_bandwidth)
  else:
    f_NxS = activation(sae, h_NxS)
  x_hat_NxD = decode(sae, f_NxS, state)
  terms = {"mse_loss": ((x_hat_NxD - x_NxD) ** 2).sum(-1).mean()}
  W_dec_norm_S = jnp.linalg.norm(params["W_dec"], axis=-1)
  if cfg.architecture == "standard":
    weighted = jnp.abs(f_NxS * W_dec_norm_S) ** lc.lp_norm
    sparsity_N = weighted.sum(-1) ** (1.0 / lc.lp_norm)
    terms["l1_loss"] = (coefficient(lc.l1_coefficient, lc.l1_warm_up_steps, t)
                        * sparsity_N).mean()
  else:
    l0_N = step(h_NxS, params["threshold"].astype(h_NxS.dtype), lc.jumprelu_bandwidth).sum(-1)
    terms["l0_loss"] = (coefficient(lc.l0_coefficient, lc.l0_warm_up_steps, t) * l0_N).mean()
  return sum(terms.values()), terms, (f_NxS, x_hat_NxD)


def _topk_losses(params, cfg: SAEConfig, lc: LossConfig, x_NxD, dead_S):
  """TopK's MSE and auxiliary loss. The k (and k_aux) latents are chosen by an exact bisection
  on the pre-activations (`kernels.at_least_kth`, no sort; the choice carries no gradient), the
  rest is dense: on CPU the dense products beat gathering k rows per token (measured:
  benchmarks/RESULTS.md)."""
  if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
    raise ValueError("TopK training does not support normalize_activations="
                     f"{cfg.normalize_activations!r} (as SAELens's auxiliary loss)")
  from factflip.kernels import at_least_kth
  sae = SAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], None, cfg)
  h_NxS, state = hidden_pre(sae, x_NxD)
  f_NxS = activation(sae, h_NxS)
  x_hat_NxD = decode(sae, f_NxS, state)
  terms = {"mse_loss": ((x_hat_NxD - x_NxD) ** 2).sum(-1).mean()}
  # auxiliary: the top k_aux dead latents' raw pre-activations reconstruct the residual;
  # skipped (a conditional, not a masked zero) while no latent is dead, as SAELens skips it
  k_aux = min(cfg.d_in // 2, cfg.d_sae)
  n_dead = dead_S.sum()
  residual_NxD = jax.lax.stop_gradient(x_NxD - x_hat_NxD)

  def aux_loss(h_NxS, W_dec):
    masked_NxS = jax.lax.stop_gradient(jnp.where(dead_S, h_NxS, -jnp.inf))
    aux_NxS = jnp.where(at_least_kth(masked_NxS, k_aux) & dead_S, h_NxS, 0.0)
    if cfg.rescale_acts_by_decoder_norm:
      aux_NxS = aux_NxS * (1.0 / jnp.linalg.norm(W_dec, axis=-1))
    aux = ((aux_NxS @ W_dec - residual_NxD) ** 2).sum(-1).mean()
    return lc.aux_loss_coefficient * jnp.minimum(n_dead / (cfg.d_in // 2), 1.0) * aux
  terms["auxiliary_reconstruction_loss"] = jax.lax.cond(
      n_dead > 0, aux_loss, lambda h, w: jnp.zeros((), h.dtype), h_NxS, params["W_dec"])
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
  params = {k: jnp.asarray(v, jnp.float32) if k == "threshold" else v
            for k, v in sae.params().items()}
  return {"params": params, "opt_state": tx.init(params),
          "since_fired": jnp.zeros((sae.cfg.d_sae,), jnp.int32), "step": jnp.int32(0)}


def make_train_step(cfg: SAEConfig, lc: LossConfig, tx: optax.GradientTransformation,
                    donate: bool = True):
  """jit(state, x [N, d_in]) -> (state, metrics): one SAELens training step."""

  def train_step(state, x_NxD):
    params = state["params"]
    if "threshold" in params:                          # θ >= 0, projected before the step
      params = dict(params, threshold=jnp.maximum(params["threshold"], 0.0))
    dead_S = state["since_fired"] > lc.dead_feature_window
    (loss, (terms, (f_NxS, x_hat_NxD))), grads = jax.value_and_grad(
        lambda p: _with_aux(losses(p, cfg, lc, x_NxD, dead_S, state["step"])),
        has_aux=True)(params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    fired_S = (f_NxS != 0).any(0)
    since = jnp.where(fired_S, 0, state["since_fired"] + 1)
    metrics = {"loss": loss, **terms, **batch_metrics(x_NxD, x_hat_NxD, f_NxS),
               "dead_share": dead_S.mean(), "grad_norm": optax.global_norm(grads)}
    return {**state, "params": new_params, "opt_state": opt_state, "since_fired": since,
            "step": state["step"] + 1}, metrics   # other entries (the run's scale) pass through

  return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def _with_aux(out):
  total, terms, rest = out
  return total, (terms, rest)
