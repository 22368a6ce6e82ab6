"""The train state and the one jitted train step.

Owns: `TrainState` (step, params, opt_state), `init_state`, `abstract_state` (built directly into its shardings:
`jax.eval_shape` for the abstract state, then `jit(out_shardings=...)`, so no full copy ever sits
on one device), `state_shardings`, `batch_sharding` and `make_train_step` (gradient accumulation
over micro-batches with a lax.scan, donated state).
Must not: read data, write files or log (the loop does).

Batches carry a leading micro-batch axis when accumulating: every array is
[accum_steps, micro_batch, T]; the step takes every loss term's denominator over all the
micro-batches first (from the masks: `Objective.counts`), then sums the micro-batches' gradients
of Σ weight · sum / that denominator, so accumulating A micro-batches equals one step on their
concatenation (up to float summation order) for every objective.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from factflip.models.config import ModelConfig
from factflip.models.transformer import init_params
from factflip.sharding import param_shardings
from factflip.train.objectives import Objective


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh | None):
  """Shardings for every leaf of the TrainState: parameters by the logical rules, optimizer
  moments like their parameters, scalars (step, counts) replicated."""
  p_sh = param_shardings(cfg, mesh)
  rep = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
         else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                 cfg.param_shapes(), is_leaf=lambda x: isinstance(x, tuple))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, p_sh,
                                 transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=p_sh, opt_state=opt_sh)


def _fresh_state(cfg: ModelConfig, tx: optax.GradientTransformation, key, params) -> TrainState:
  if params is None:
    params = init_params(cfg, key)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.param_dtype)), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, key: jax.Array,
               mesh: Mesh | None = None, params: Any = None) -> TrainState:
  """A fresh state (random init from `key`, or the given params, e.g. a base checkpoint),
  created directly in its shardings."""
  make = functools.partial(_fresh_state, cfg, tx)
  return jax.jit(make, out_shardings=state_shardings(cfg, tx, mesh))(key, params)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation,
                   mesh: Mesh | None = None) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state `init_state` makes: a restore target."""
  shapes = jax.eval_shape(functools.partial(_fresh_state, cfg, tx, params=None),
                          jax.random.key(0))
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      shapes, state_shardings(cfg, tx, mesh))


def batch_sharding(mesh: Mesh | None, accumulate: bool = False):
  """Batches split over (data, fsdp) along the batch axis (after the micro-batch axis)."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  spec = PartitionSpec(None, ("data", "fsdp")) if accumulate else PartitionSpec(("data", "fsdp"))
  return NamedSharding(mesh, spec)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, objective: Objective,
                    accum_steps: int = 1, state_sharding: TrainState | None = None):
  """jit(step)(state, batch, ref_params=None) -> (state, metrics); `state` is donated.
  `ref_params`: the frozen reference model's parameters, for an objective that prepares from
  them (NPO). metrics: loss, each term's mean as loss/<term>, grad_norm, count (the first term's
  denominator: trained tokens, or forget examples for NPO)."""
  names = list(objective.weights)

  def counts_of(batch):
    if accum_steps == 1:
      return objective.counts(batch)
    per = jax.vmap(objective.counts)(batch)
    return {k: v.sum() for k, v in per.items()}

  def grads_of(params, micro, ref_params, counts):
    ref = (objective.prepare(ref_params, cfg, micro) if objective.prepare is not None
           else None)

    def f(p):
      sums = objective.terms(p, cfg, micro, ref)
      loss = sum(objective.weights[k] * sums[k] / jnp.maximum(counts[k], 1.0) for k in names)
      return loss, sums
    (loss, sums), g = jax.value_and_grad(f, has_aux=True)(params)
    return loss, sums, g

  def step(state: TrainState, batch, ref_params=None):
    counts = counts_of(batch)
    if accum_steps == 1:
      loss, sums, g = grads_of(state.params, batch, ref_params, counts)
    else:
      def body(carry, micro):
        l_acc, s_acc, g_acc = carry
        loss, sums, g = grads_of(state.params, micro, ref_params, counts)
        return (l_acc + loss, jax.tree.map(jnp.add, s_acc, sums),
                jax.tree.map(jnp.add, g_acc, g)), None
      zeros = (jnp.float32(0), {k: jnp.float32(0) for k in names},
               jax.tree.map(jnp.zeros_like, state.params))
      (loss, sums, g), _ = jax.lax.scan(body, zeros, batch)
    updates, opt_state = tx.update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(g), "count": counts[names[0]],
               **{f"loss/{k}": sums[k] / jnp.maximum(counts[k], 1.0) for k in names}}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  kw = {}
  if state_sharding is not None:
    kw = {"in_shardings": (state_sharding, None, None),
          "out_shardings": (state_sharding, None)}
  jitted = jax.jit(step, donate_argnums=0, **kw)
  return lambda state, batch, ref_params=None: jitted(state, batch, ref_params)
