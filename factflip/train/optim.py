"""Optimizers and learning-rate schedules, built from plain config values.

Owns: `OptimConfig`, `make_schedule`, `make_optimizer` (AdamW / SGD / Adafactor, global-norm
clipping, weight decay only on matrices).
Must not: know about models, data or the loop.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """name: adamw | sgd | adafactor. schedule: constant | cosine | wsd (warmup-stable-decay).
  lr is the peak; warmup_steps ramp linearly from 0; cosine decays to lr·final_lr_fraction at
  total_steps; wsd holds lr until total_steps·(1 − decay_fraction) then decays linearly to
  lr·final_lr_fraction. clip_norm: global-norm clipping (0 = off)."""
  name: str = "adamw"
  lr: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  total_steps: int = 1000
  decay_fraction: float = 0.2
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  momentum: float = 0.9
  clip_norm: float = 1.0


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  warm = max(cfg.warmup_steps, 0)
  floor = cfg.lr * cfg.final_lr_fraction
  if cfg.schedule == "constant":
    rest = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    rest = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - warm, 1),
                                       alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "wsd":
    decay = max(int(round(cfg.total_steps * cfg.decay_fraction)), 1)
    stable = max(cfg.total_steps - warm - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay)], [stable])
  else:
    raise ValueError(f"OptimConfig.schedule: {cfg.schedule!r}; expected constant, cosine or wsd")
  if warm == 0:
    return rest
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), rest], [warm])


def _decay_mask(params):
  """Weight decay on matrices only (not norms, biases or 1-D tensors; stacked layers count the
  layer axis, so a [L, D] norm is not a matrix)."""
  def is_matrix(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and "norm" not in name and name not in ("bq", "bk", "bv")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  sched = make_schedule(cfg)
  if cfg.name == "adamw":
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  elif cfg.name == "sgd":
    opt = optax.sgd(sched, momentum=cfg.momentum or None)
  elif cfg.name == "adafactor":
    opt = optax.adafactor(sched, weight_decay_rate=cfg.weight_decay or None,
                          weight_decay_mask=_decay_mask)
  else:
    raise ValueError(f"OptimConfig.name: {cfg.name!r}; expected adamw, sgd or adafactor")
  if cfg.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt
