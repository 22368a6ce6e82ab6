"""Activations of a frozen model at a hook site, streamed through a shuffle buffer.

Owns: `site_activations` (a jitted forward of the model's first layers up to the site, returning
the site's activations of the real tokens) and `ActivationStream` (token batches in, shuffled
[batch_tokens, d_in] activation batches out; its state, for Orbax through grain's checkpoint
handler, makes a resumed run see the same batches).
Must not: train (`sae.train`) or decide what text to read (it is handed a token iterator).

The buffer: `buffer_batches` token batches are run through the model, the activations of their
real tokens (mask true, token not in `exclude_ids`: the special tokens, as SAELens's
exclude_special_tokens) are kept, permuted with a key derived from
(seed, window index) and served `batch_tokens` at a time; a window's tail shorter than a batch is
dropped; then the next window is read. At most one window is in host memory, never the
dataset's activations. The state is (window index, batches served from it, the token
iterator's state at the window's start): a restore re-reads that window (the model is
deterministic) and skips what was served.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention, transformer
from factflip.models.hooks import parse_hook_name


def truncated(model, layer: int):
  """(params, cfg) of the model's first layer + 1 blocks: enough for any site of `layer`."""
  import dataclasses
  params = model.params()
  cfg = dataclasses.replace(model.cfg, n_layers=layer + 1)
  params = dict(params, layers=jax.tree.map(lambda a: a[:layer + 1], params["layers"]))
  return params, cfg


@functools.partial(jax.jit, static_argnames=("cfg", "site", "layer"))
def _capture(params, cfg, tokens_BxT, segment_ids_BxT, positions_BxT, *, site: str, layer: int):
  out = transformer.forward(params, cfg, tokens_BxT,
                            attention.packed(segment_ids_BxT, positions_BxT), capture=(site,),
                            return_logits=False)
  return out.captures[site][layer]


def site_activations(model, hook_name: str):
  """fn(batch) -> activations [B, T, ...] at `hook_name` (a TransformerLens name with a layer)
  of a data-pipeline batch (inputs, segment_ids, positions: packed rows attend within their
  segments), computed with only the blocks up to that layer."""
  site, layer = parse_hook_name(hook_name)
  if layer is None:
    raise ValueError(f"hook name {hook_name!r} names no layer (e.g. 'blocks.1.hook_resid_post')")
  if not 0 <= layer < model.cfg.n_layers:
    raise ValueError(f"hook name {hook_name!r}: layer {layer} out of range for a "
                     f"{model.cfg.n_layers}-layer model")
  params, cfg = truncated(model, layer)
  return lambda b: _capture(params, cfg, jnp.asarray(b["inputs"]), jnp.asarray(b["segment_ids"]),
                           jnp.asarray(b["positions"]), site=site, layer=layer)


class ActivationStream:
  """Shuffled activation batches [batch_tokens, d_in] (float32 numpy) from token batches.

  batches: an iterator of data-pipeline batches ({"inputs", "segment_ids", "positions", ...},
  [B, T] each) with get_state() / set_state() (`train.inputs.ShardedBatches`); acts: fn(batch)
  -> [B, T, ...] (`site_activations`);
  exclude_ids: token ids whose activations are never served (BOS, EOS, padding)."""

  def __init__(self, batches, acts, *, batch_tokens: int, buffer_batches: int, seed: int,
               exclude_ids: tuple[int, ...] = ()):
    if buffer_batches < 1 or batch_tokens < 1:
      raise ValueError(f"buffer_batches {buffer_batches}, batch_tokens {batch_tokens}: "
                       "expected >= 1")
    self.batches, self.acts = batches, acts
    self.batch_tokens, self.buffer_batches = batch_tokens, buffer_batches
    self.seed, self.exclude_ids = seed, np.asarray(exclude_ids, np.int64)
    self.window, self.served = -1, 0
    self.window_state = None
    self.buffer = None

  def _fill(self) -> None:
    self.window += 1
    self.window_state = self.batches.get_state()
    parts = []
    for _ in range(self.buffer_batches):
      b = next(self.batches)
      tokens = np.asarray(b["inputs"])
      mask = np.asarray(b["segment_ids"]) > 0
      keep = mask & ~np.isin(tokens, self.exclude_ids)
      a = np.asarray(self.acts(b))
      parts.append(a.reshape(*a.shape[:2], -1)[keep])
    acts = np.concatenate(parts).astype(np.float32)
    if len(acts) < self.batch_tokens:
      raise ValueError(f"a buffer window holds {len(acts)} activations, fewer than one batch "
                       f"({self.batch_tokens}): raise buffer_batches")
    order = np.random.default_rng([self.seed, self.window]).permutation(len(acts))
    self.buffer = acts[order]
    self.served = 0

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    if self.buffer is None or (self.served + 1) * self.batch_tokens > len(self.buffer):
      self._fill()
    out = self.buffer[self.served * self.batch_tokens:(self.served + 1) * self.batch_tokens]
    self.served += 1
    return out

  def get_state(self) -> bytes:
    state = self.window_state if self.window >= 0 else self.batches.get_state()
    return json.dumps({"window": self.window, "served": self.served,
                       "batch_tokens": self.batch_tokens, "buffer_batches": self.buffer_batches,
                       "tokens": base64.b64encode(state).decode()}).encode()

  def start_prefetch(self) -> None:    # grain's checkpoint handler calls it after a restore
    pass

  def set_state(self, state: bytes) -> None:
    d = json.loads(state)
    if (d["batch_tokens"], d["buffer_batches"]) != (self.batch_tokens, self.buffer_batches):
      raise ValueError(f"activation stream state for batch_tokens {d['batch_tokens']}, "
                       f"buffer_batches {d['buffer_batches']}; this run has "
                       f"{self.batch_tokens}, {self.buffer_batches} (they must match to resume)")
    self.batches.set_state(base64.b64decode(d["tokens"]))
    self.buffer = None
    if d["window"] >= 0:
      self.window = d["window"] - 1
      self._fill()
      self.served = d["served"]
    else:
      self.window, self.served = -1, 0
