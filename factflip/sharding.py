"""Meshes and logical axis rules: where every parameter and activation lives.

Owns: the mesh axes (`data`, `fsdp`, `tensor`), the logical axis names of every parameter, and
the short rules table mapping logical names to mesh axes.
Must not: build models, read files or run steps.

A logical axis maps to its mesh axis only if that mesh axis divides the dimension; otherwise the
dimension is replicated (a 14-head model still loads on tensor=4), so one table serves every
preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from factflip.models.config import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("seq", None),
)

_LAYER_AXES = {
    "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    "post_attn_norm": ("layers", "norm"), "post_mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads"), "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"), "wo": ("layers", "q_heads", "embed"),
    "bq": ("layers", "q_heads"), "bk": ("layers", "kv_heads"), "bv": ("layers", "kv_heads"),
    "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "attn_norm_bias": ("layers", "norm"), "mlp_norm_bias": ("layers", "norm"),
    "post_attn_norm_bias": ("layers", "norm"), "post_mlp_norm_bias": ("layers", "norm"),
    "bo": ("layers", "norm"), "b_up": ("layers", "mlp"), "b_down": ("layers", "norm"),
}
_FULL_QK_NORM = {"q_norm": ("layers", "q_heads"), "k_norm": ("layers", "kv_heads")}
_TOP_AXES = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": ("norm",),
             "final_norm_bias": ("norm",)}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} (product {int(np.prod(sizes))}) "
                     f"must multiply to the {len(devices)} devices")
  return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


def to_host(tree):
  """Every jax array of `tree` as a numpy array on this process: fetched when its shards are all
  local or it is replicated, all-gathered across processes when it is sharded over devices of
  several (a probe whose batch spans every host: each process calls this at the same point, as
  with any collective). Other leaves pass through."""
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def param_logical_axes(cfg: ModelConfig) -> dict[str, Any]:
  """Same tree as `cfg.param_shapes()`, with a tuple of logical axis names at each leaf."""
  shapes = cfg.param_shapes()
  out = {k: _TOP_AXES[k] for k in shapes if k != "layers"}
  axes = {**_LAYER_AXES, **(_FULL_QK_NORM if cfg.qk_norm_full else {})}
  out["layers"] = {k: axes[k] for k in shapes["layers"]}
  return out


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for one array; mesh axes that do not divide a dimension (or are already
  used by an earlier dimension) are dropped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    size = 1
    for t in targets:
      n = mesh.shape[t]
      if t in used or n == 1 or dim % (size * n):
        continue
      kept.append(t)
      size *= n
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh | None) -> dict[str, Any]:
  """A sharding for every parameter (same tree as `cfg.param_shapes()`): NamedShardings from the
  rules on `mesh`, or the first local device when mesh is None."""
  shapes = cfg.param_shapes()
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: dev, shapes, is_leaf=lambda x: isinstance(x, tuple))
  axes = param_logical_axes(cfg)
  return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(a, s, mesh)), axes, shapes,
                      is_leaf=lambda x: isinstance(x, tuple))
