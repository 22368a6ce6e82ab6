"""Per-example gradients and the knowledge-conflict diagnostics built on them (paper D).

Owns: `param_subset` (which parameters a diagnostic reads, as data), `per_example_grads` (one
flattened gradient per example of a padded batch, vmapped and chunked with `lax.map` so at most
`chunk` examples' full gradients are live at once), `cosine_matrix`, `conflict_stats` (the share
of example pairs whose gradients point against each other, and their mean cosine) and
`gradient_cosine` (e.g. the forget gradient against the retain gradient).
Must not: train, choose examples or write tables (the unlearning study does).

Definitions (SCIENCE.md D): an example's loss is its mean token NLL over its loss mask (answer
tokens for SFT / counterfactual-tuning examples); g_i = ∇_θ loss_i restricted to the subset;
cos_ij = <g_i, g_j> / (‖g_i‖ ‖g_j‖); conflict ratio = #{i < j : cos_ij < 0} / #{i < j}; mean
cosine over the same pairs.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models.config import ModelConfig
from factflip.models.transformer import token_logprobs


def _path(key_path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def param_subset(params, pattern: str = ".*") -> list[str]:
  """The dotted paths of the parameters whose path matches `pattern` (a regex searched in
  e.g. "layers.w_down", "embed", "final_norm"); an error when none does."""
  paths = [_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keep = [p for p in paths if re.search(pattern, p)]
  if not keep:
    raise ValueError(f"parameter pattern {pattern!r} matches none of {paths}")
  return keep


def _split(params, paths: tuple[str, ...]):
  """(the leaves at `paths` in tree order, a function putting such leaves back into params)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  where = [i for i, (kp, _) in enumerate(flat) if _path(kp) in paths]
  leaves = [leaf for _, leaf in flat]

  def merge(sub):
    out = list(leaves)
    for i, x in zip(where, sub):
      out[i] = x
    return jax.tree_util.tree_unflatten(treedef, out)
  return [leaves[i] for i in where], merge


@functools.partial(jax.jit, static_argnames=("cfg", "paths", "chunk"))
def _grads(params, cfg: ModelConfig, batch, *, paths: tuple[str, ...], chunk: int):
  sub, merge = _split(params, paths)       # differentiate the subset only: the other
  #                                           parameters' gradients are never formed

  def example_loss(sub_params, row):
    one = jax.tree.map(lambda a: a[None], row)
    nll = -token_logprobs(merge(sub_params), cfg, one)[0]
    mask = row["loss_mask"].astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)

  def flat_grad(row):
    g = jax.grad(example_loss)(sub, row)
    return jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in g])

  return jax.lax.map(flat_grad, batch, batch_size=chunk)


def per_example_grads(params, cfg: ModelConfig, batch: dict, pattern: str = ".*",
                      chunk: int = 8) -> jax.Array:
  """[N, P] float32: each example's gradient (its mean answer-token NLL) over the parameters
  matching `pattern`, flattened in tree order. `batch`: a padded data-pipeline batch, one example
  per row (inputs, targets, loss_mask, segment_ids, positions [N, T]); `chunk` examples' gradients
  are computed at once (vmapped), the rest in sequence."""
  paths = tuple(param_subset(params, pattern))
  rows = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask", "segment_ids",
                                              "positions")}
  return _grads(params, cfg, rows, paths=paths, chunk=max(1, min(chunk, len(rows["inputs"]))))


def cosine_matrix(G_NxP) -> np.ndarray:
  """[N, N] cosines of the rows of G (0 where a row is all zero)."""
  G = np.asarray(G_NxP, np.float64)
  norm = np.linalg.norm(G, axis=1)
  unit = G / np.where(norm > 0, norm, 1.0)[:, None]
  return unit @ unit.T


def conflict_stats(cos_NxN) -> dict[str, float]:
  """Over the pairs i < j: conflict_ratio (share with cos < 0), mean_cos, pairs."""
  cos = np.asarray(cos_NxN)
  i, j = np.triu_indices(len(cos), 1)
  c = cos[i, j]
  return {"conflict_ratio": float((c < 0).mean()) if len(c) else float("nan"),
          "mean_cos": float(c.mean()) if len(c) else float("nan"), "pairs": len(c)}


def gradient_cosine(g_a, g_b) -> float:
  """The cosine between two flattened gradients (e.g. the mean forget and retain gradients)."""
  a, b = np.asarray(g_a, np.float64), np.asarray(g_b, np.float64)
  d = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / d) if d > 0 else float("nan")
