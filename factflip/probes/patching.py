"""Activation patching sweeps as one compiled, vectorised program.

Owns: `act_patch` (the generic layers × positions sweep: same-model clean→corrupted patching
and cross-model patching, e.g. the base checkpoint's activations into the poisoned one),
`attribution_patch` (its first-order estimate from one backward), `sweep_cost`, the metrics
`answer_logit_diff`, `normalised_recovery`, `reversal_rate`, and `sweep_table` (the tidy
(item, layer, position, value) form). How cells are laid out into rows: `probes.packing`.
Must not: choose items or write tables (studies do), or define sites (`factflip.models.hooks`).

Semantics (TransformerLens' `get_act_patch_*`): cell (ℓ, c) runs `model` on the corrupted
tokens with `site` at layers ℓ .. ℓ+window−1 and the positions of cell c replaced by
`source_model`'s activation at the same site, layer and positions on the clean tokens, and
reports `metric(logits)`. For `resid_pre` with window 1 and one position per cell this is
exactly `get_act_patch_resid_pre`.

What is not recomputed (a patch can change neither the layers below it nor the positions
before it): every cell of layer ℓ starts from the corrupted run's resid_pre[ℓ] (captured once)
and runs only blocks ℓ..L−1, and only on its suffix, the positions from its first patched one
on, attending to the corrupted run's cached keys/values below that. Suffixes are packed into
rows of equal length (`pack_cells`: the cells patched from t and from T−1−t share a row of
T + 1 tokens), rows are a `vmap` in chunks (`lax.map`), and the unembedding runs only at
`logit_positions`. A full single-position sweep runs ~(L+1)/2L x (T+1)/2T of a per-cell loop's
block work (`sweep_cost` reports it and the compiled program's memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models import attention
from factflip.models.hooks import STREAM_SITES, Intervention, check_site, parse_hook_name
from factflip.models.transformer import Transformer, embed, forward, init_cache, unembed
from factflip.probes.packing import Packing, bucket_size, pack_cells, pad_packing, position_groups
from factflip.sharding import to_host

Metric = Callable[[jax.Array], jax.Array]  # logits [B, P, V] -> [B]


@functools.partial(jax.jit, static_argnames=("cfg", "src_cfg", "site", "spans", "metric",
                                             "prefix", "chunk"))
def _sweep(params, cfg, src_params, src_cfg, corrupted_BxT, clean_BxT, mask_BxT, clean_mask_BxT,
           pos_RnxR, start_RnxR, slot_RnxR, patch_RnxBxR, logit_RnxKxP, flat_C, metric_aux,
           noise_BxTxD, *, site, spans, metric, prefix, chunk):
  """[rows, C, B]: sweep row i patches layers spans[i] = (first, stop). Every packed row runs
  blocks first..L−1 on its tokens only, each token attending to its own cell's tokens and to
  the corrupted run's keys/values below its cell's start (`prefix` = the largest start: the
  cached slots anything reads)."""
  L = cfg.n_layers
  B, T = corrupted_BxT.shape
  clean_LxBxTxD = forward(src_params, src_cfg, clean_BxT, attention.causal(clean_mask_BxT),
                          capture=(site,), return_logits=False).captures[site]
  x_BxTxD = embed(params, cfg, corrupted_BxT)
  if noise_BxTxD is not None:                       # causal tracing's corrupted run
    x_BxTxD = x_BxTxD + noise_BxTxD.astype(x_BxTxD.dtype)
  ctx = (attention.decode(init_cache(cfg, B, T), 0, mask_BxT) if prefix
         else attention.causal(mask_BxT))
  run = forward(params, cfg, corrupted_BxT, ctx, capture=("resid_pre",), return_logits=False,
                resid_BxTxD=x_BxTxD)
  corrupt_LxBxTxD = run.captures["resid_pre"]
  k_LxBxSxGxK = (run.cache["k"][:, :, :prefix] if prefix else
                 jnp.zeros((L, B, 0, cfg.n_kv_heads, cfg.head_dim), cfg.dtype))
  v_LxBxSxGxK = (run.cache["v"][:, :, :prefix] if prefix else k_LxBxSxGxK)

  def row_mask(pos_R, start_R, slot_R):           # [B, R, prefix + R]
    R = pos_R.shape[0]
    real_R = slot_R < logit_RnxKxP.shape[1]
    pre_BxRxS = ((jnp.arange(prefix)[None, :] < start_R[:, None])[None]
                 & mask_BxT[:, None, :prefix])
    own_RxR = ((slot_R[:, None] == slot_R[None, :]) & (pos_R[None, :] <= pos_R[:, None])
               & real_R[None, :])
    own_BxRxR = own_RxR[None] & jnp.take(mask_BxT, pos_R, axis=1)[:, None, :]
    return jnp.concatenate([pre_BxRxS, own_BxRxR], axis=2).reshape(B, R, prefix + R)

  out = []
  for layer, stop in spans:
    on_N = jnp.arange(L - layer) < stop - layer
    kv = (k_LxBxSxGxK[layer:], v_LxBxSxGxK[layer:])

    def row(xs, layer=layer, on_N=on_N, kv=kv):
      pos_R, start_R, slot_R, patch_BxR, logit_KxP = xs
      values = jnp.take(clean_LxBxTxD[layer:], pos_R, axis=2)
      iv = Intervention(on_N, patch_BxR, values, site=site, mode="replace")
      ctx = attention.with_prefix(kv, row_mask(pos_R, start_R, slot_R),
                                  jnp.broadcast_to(pos_R, (B, pos_R.shape[0])))
      h_BxRxD = forward(params, cfg, jnp.take(corrupted_BxT, pos_R, axis=1), ctx,
                        interventions=(iv,), return_logits=False,
                        resid_BxTxD=jnp.take(corrupt_LxBxTxD[layer], pos_R, axis=1),
                        start_layer=layer).residual
      logits_KxBxPxV = unembed(params, cfg, jnp.take(h_BxRxD, logit_KxP, axis=1)
                               ).transpose(1, 0, 2, 3)
      read = (metric if metric_aux is None else
              (lambda lg: metric(lg, metric_aux)))
      return jax.vmap(read)(logits_KxBxPxV)                         # [k, B]
    xs = (pos_RnxR, start_RnxR, slot_RnxR, patch_RnxBxR, logit_RnxKxP)
    res_RnxKxB = (jax.vmap(row)(xs) if chunk is None
                  else jax.lax.map(row, xs, batch_size=chunk))
    out.append(res_RnxKxB.reshape(-1, B)[flat_C])
  return jnp.stack(out, axis=0)                                     # [rows, C, B]


class _Prepared(NamedTuple):
  args: tuple
  static: dict
  packing: Packing
  n_layers_run: int      # blocks per batch element and packed token, over the swept layers
  cells: int             # the sweep's cells (its output may hold bucket padding beyond them)


def _stream_site(site: str) -> str:
  check_site(site)
  if site not in STREAM_SITES:
    raise ValueError(f"site {site!r}: patching sweeps patch the residual-stream sites "
                     f"{STREAM_SITES}; patch {site!r} with a replace() intervention")
  return site


def _prepare(model, corrupted_tokens, clean_tokens, metric, site, source_model, layers,
             positions, window, mask, clean_mask, logit_positions, chunk, metric_aux, noise,
             devices, centred=False, buckets=False) -> _Prepared:
  site, named_layer = parse_hook_name(site)
  _stream_site(site)
  source_model, corrupted, clean = _model_and_token_pair(model, source_model, corrupted_tokens,
                                                         clean_tokens)
  cfg, src_cfg = model.cfg, source_model.cfg
  B, T = corrupted.shape
  if layers is None:
    layers = [named_layer] if named_layer is not None else range(cfg.n_layers)
  layers = tuple(int(x) % cfg.n_layers for x in layers)
  logit_positions = tuple(int(p) for p in logit_positions)
  if not logit_positions or any(not -T <= p < T for p in logit_positions):
    raise ValueError(f"logit_positions {logit_positions} out of range for {T} tokens")
  cells = position_groups(T, positions)
  if cells.ndim == 3 and cells.shape[1] != B:
    raise ValueError(f"position groups {cells.shape} are per row of a batch of {cells.shape[1]}; "
                     f"the prompts are a batch of {B}")
  cells_CxBxT = np.broadcast_to(cells[:, None] if cells.ndim == 2 else cells,
                                (cells.shape[0], B, T))
  mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
  clean_mask = mask if clean_mask is None else np.asarray(clean_mask, bool)
  if noise is not None and np.shape(noise) != (B, T, cfg.d_model):
    raise ValueError(f"noise has shape {np.shape(noise)}; expected {(B, T, cfg.d_model)}")

  pk = pack_cells(cells_CxBxT, logit_positions)
  prefix = int(pk.start.max())
  if buckets:   # every shape of the compiled sweep rounded up to its bucket (see act_patch)
    Tb = bucket_size(T)
    right = ((0, 0), (0, Tb - T))
    corrupted, clean = np.pad(corrupted, right), np.pad(clean, right)
    mask, clean_mask = np.pad(mask, right), np.pad(clean_mask, right)
    if noise is not None:
      noise = np.pad(np.asarray(noise), ((0, 0), (0, Tb - T), (0, 0)))
    # lengths that grow with the prompt (row length, cached prefix) are bucketed as if the
    # prompt were Tb long, so every length of a bucket lands on the same shapes
    Rn, R = pk.pos.shape
    pk = pad_packing(pk, bucket_size(Rn), min(bucket_size(R + Tb - T), Tb + 1),
                      bucket_size(pk.logit.shape[1]), bucket_size(len(pk.flat)))
    prefix = min(bucket_size(prefix + Tb - T), Tb) if prefix else 0
  params, src_params = model.params(), source_model.params()
  batch = (corrupted, clean, mask, clean_mask)
  patch = pk.patch
  devices = _batch_devices(devices, B)
  if len(devices) > 1:   # data parallel along the batch: parameters replicated
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    P = jax.sharding.PartitionSpec
    params, src_params = jax.device_put((params, src_params),
                                        jax.sharding.NamedSharding(mesh, P()))
    batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("batch")))
    patch = jax.device_put(patch, jax.sharding.NamedSharding(mesh, P(None, "batch")))
    if noise is not None:
      noise = jax.device_put(noise, jax.sharding.NamedSharding(mesh, P("batch")))
  R = pk.pos.shape[1]
  spans = tuple(_span(layer, window, centred, cfg.n_layers) for layer in layers)
  static = {"site": site, "spans": spans, "metric": metric, "prefix": prefix,
            "chunk": None if chunk is None else max(int(chunk) // R, 1)}
  args = (params, cfg, src_params, src_cfg, *batch, pk.pos, pk.start, pk.slot, patch, pk.logit,
          pk.flat, metric_aux, noise)
  return _Prepared(args, static, pk, sum(cfg.n_layers - first for first, _ in spans),
                   cells_CxBxT.shape[0])


def _span(layer: int, window: int, centred: bool, n_layers: int) -> tuple[int, int]:
  """The layers [first, stop) patched in the sweep row of `layer`: layer..layer+window−1, or
  centred on it as ROME's causal tracing does (layer − window//2 .. layer + ceil(window/2) − 1),
  clipped to the model."""
  window = max(int(window), 1)
  first = layer - window // 2 if centred else layer
  return max(first, 0), min(first + window, n_layers)


def _model_and_token_pair(model, source_model, corrupted_tokens, clean_tokens):
  """(source model, corrupted [B, T], clean [B, T]) after the checks every patching entry point
  needs: the two models' activations and vocabularies fit, the token arrays match and fit the
  context."""
  source_model = source_model or model
  cfg, src_cfg = model.cfg, source_model.cfg
  if (src_cfg.n_layers, src_cfg.d_model) != (cfg.n_layers, cfg.d_model):
    raise ValueError(f"source model has {src_cfg.n_layers} layers x d_model {src_cfg.d_model}; "
                     f"the patched model {cfg.n_layers} x {cfg.d_model}: activations do not fit")
  if src_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"mismatched vocabularies: source model {src_cfg.vocab_size} tokens, "
                     f"patched model {cfg.vocab_size}; both must read the same token ids")
  corrupted = np.atleast_2d(np.asarray(corrupted_tokens, np.int32))
  clean = np.atleast_2d(np.asarray(clean_tokens, np.int32))
  if corrupted.shape != clean.shape:
    raise ValueError(f"corrupted tokens {corrupted.shape} and clean tokens {clean.shape} differ "
                     "in shape (patching copies position t to position t)")
  if corrupted.shape[1] > cfg.max_seq_len:
    raise ValueError(f"prompts of {corrupted.shape[1]} tokens are longer than the model's "
                     f"context of {cfg.max_seq_len}")
  return source_model, corrupted, clean


def _batch_devices(devices, batch: int) -> list:
  """The devices a sweep is split over along the batch: `devices` if given (the batch
  must divide), else all local devices when they divide the batch, else the default one."""
  if devices is None:
    local = jax.local_devices()
    return local if batch % len(local) == 0 else local[:1]
  devices = list(devices)
  if batch % len(devices):
    raise ValueError(f"a batch of {batch} does not split over {len(devices)} devices")
  return devices


def act_patch(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
              site: str = "resid_pre", source_model: Transformer | None = None,
              layers: Sequence[int] | None = None, positions=None, window: int = 1,
              mask=None, clean_mask=None, logit_positions: Sequence[int] = (-1,),
              chunk: int | None = 2048, metric_aux=None, noise=None,
              devices=None, centred: bool = False, buckets: bool = True) -> np.ndarray:
  """The patching sweep: float32 [batch, layers, cells].

  model: the model that runs (the corrupted / poisoned run). source_model: supplies the clean
  activations (default `model`; another checkpoint of the same architecture for cross-model
  patching). site: resid_pre | attn_out | mlp_out | resid_mid | resid_post (or a
  TransformerLens name). layers: the first patched layer of each row (default all). window:
  patch layers ℓ..ℓ+window−1 (clipped at the last layer; centred=True: the window centred on
  ℓ, as ROME's causal tracing). positions: see `position_groups`.
  metric: maps logits [batch, len(logit_positions), vocab] to [batch] (the default
  logit_positions=(-1,) means `logits[:, -1]` is the last token's, as a TransformerLens metric
  reads it), or (logits, metric_aux) to [batch] when `metric_aux` (a pytree of arrays, e.g. each
  row's answer token ids) is given. noise: float [batch, seq, d_model] added to the corrupted
  run's embeddings (causal tracing). mask / clean_mask: bool [batch, seq] padding masks (pad
  on the left so the last position is every row's last token).

  Cost: chunk = packed tokens per batch row evaluated together (the memory budget: a step
  holds the activations of chunk x batch tokens; None = a whole layer's cells at once; see
  `sweep_cost`). devices: split the batch over these devices (default: all local devices
  when they divide the batch; in a multi-host study, devices of every process, each process
  calling with the same inputs). The compiled sweep is cached per (shapes, cell layout,
  site, layers, window, metric, logit_positions, chunk): pass the same metric function object
  (and per-row data through metric_aux) to reuse it.

  buckets: round the compiled shapes up to `bucket_size` (prompt length: right padding,
  masked; packed rows, their length, cells per row, cells: padding that belongs to no cell),
  so prompts of similar length reuse one compiled program instead of compiling their own. The
  values are those of the exact shapes up to float rounding (the padding is never attended
  to and its outputs are dropped); buckets=False runs the exact shapes."""
  p = _prepare(model, corrupted_tokens, clean_tokens, metric, site, source_model, layers,
               positions, window, mask, clean_mask, logit_positions, chunk, metric_aux, noise,
               devices, centred, buckets)
  return to_host(_sweep(*p.args, **p.static))[:, :p.cells].transpose(2, 0, 1)


_COST_ARGS = {"site": "resid_pre", "source_model": None, "layers": None, "positions": None,
              "window": 1, "mask": None, "clean_mask": None, "logit_positions": (-1,),
              "chunk": 2048, "metric_aux": None, "noise": None, "devices": None,
              "centred": False, "buckets": True}


def sweep_cost(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
               **kwargs) -> dict:
  """What `act_patch` with the same arguments costs, without running it: the compiled
  program's memory in bytes (temporaries at peak, arguments, outputs: XLA's buffer
  assignment) and its work: `block_tokens`, the (block, token) evaluations of the sweep's cells
  (packing slack included), as a share of a per-cell loop of full forwards (`block_share`),
  and the unembedded rows as a share of the loop's (`unembed_share`)."""
  unknown = set(kwargs) - set(_COST_ARGS)
  if unknown:
    raise TypeError(f"sweep_cost: unexpected arguments {sorted(unknown)}")
  kw = {**_COST_ARGS, **kwargs}
  p = _prepare(model, corrupted_tokens, clean_tokens, metric, *kw.values())
  mem = _sweep.lower(*p.args, **p.static).compile().memory_analysis()
  B, T = np.atleast_2d(np.asarray(corrupted_tokens)).shape
  L, C = model.cfg.n_layers, p.cells
  n_layers = len(p.static["spans"])
  block_tokens = B * p.n_layers_run * p.packing.tokens
  loop = B * n_layers * C * L * T
  return {"temp_bytes": int(mem.temp_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "block_tokens": block_tokens, "block_share": block_tokens / loop,
          "packed_tokens": p.packing.tokens, "cell_tokens": p.packing.computed,
          "unembed_share": (B * n_layers * C * p.packing.logit.shape[-1]) / (loop // L)}


def answer_logit_diff(logits_BxPxV: jax.Array, answers_Bx2: jax.Array) -> jax.Array:
  """log p(answer a) − log p(answer b) at the last read position, per row: the ΔLL of the
  answers' first tokens (the whole ΔLL for one-token answers), with answers_Bx2 = (a, b) token
  ids per row passed as `metric_aux` — e.g. (true, counterfactual)."""
  logp_BxV = jax.nn.log_softmax(logits_BxPxV[:, -1].astype(jnp.float32), axis=-1)
  lp_Bx2 = jnp.take_along_axis(logp_BxV, answers_Bx2.astype(jnp.int32), axis=-1)
  return lp_Bx2[:, 0] - lp_Bx2[:, 1]


def reversal_rate(patched_dll, flipped, threshold: float = 0.0) -> np.ndarray:
  """Share of the flipped items whose patched ΔLL returns above `threshold` (SCIENCE.md A:
  patching reversal): patched_dll [items, layers, cells], flipped bool [items] →
  [layers, cells] (NaN when no item flipped)."""
  dll = np.asarray(patched_dll, np.float64)
  flipped = np.asarray(flipped, bool)
  if flipped.shape != dll.shape[:1]:
    raise ValueError(f"flipped has shape {flipped.shape}; expected ({dll.shape[0]},), one "
                     "flag per item of the sweep")
  if not flipped.any():
    return np.full(dll.shape[1:], np.nan)
  return (dll[flipped] > threshold).mean(axis=0)


def sweep_table(result, items=None, layers=None, cells=None, value: str = "value") -> dict:
  """A sweep [items, layers, cells] as a tidy column table (pandas.DataFrame(table) opens it):
  one row per (item, layer, cell) with columns item, layer, position (the cell's label: its
  position for one-position cells, or a group name) and `value`. items / layers / cells label
  the axes (default 0..n−1)."""
  res = np.asarray(result)
  if res.ndim != 3:
    raise ValueError(f"a sweep result is [items, layers, cells]; got shape {res.shape}")
  n_i, n_l, n_c = res.shape
  labels = []
  for name, given, n in (("items", items, n_i), ("layers", layers, n_l), ("cells", cells, n_c)):
    given = list(range(n)) if given is None else list(given)
    if len(given) != n:
      raise ValueError(f"{len(given)} {name} labels for a sweep axis of {n}")
    labels.append(np.asarray(given))
  item, layer, cell = (a.ravel() for a in np.meshgrid(*labels, indexing="ij"))
  return {"item": item, "layer": layer, "position": cell, value: res.ravel()}


def normalised_recovery(patched, corrupted, clean):
  """(metric_patched − metric_corrupted) / (metric_clean − metric_corrupted), broadcast over
  the patched sweep (SCIENCE.md A); NaN where clean equals corrupted."""
  patched = np.asarray(patched, np.float64)

  def lift(x):  # [B] -> [B, 1, 1] against a [B, layers, cells] sweep
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape + (1,) * (patched.ndim - x.ndim))
  denom = lift(clean) - lift(corrupted)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denom != 0, (patched - lift(corrupted)) / denom, np.nan)


@functools.partial(jax.jit, static_argnames=("cfg", "src_cfg", "site", "metric",
                                             "logit_positions"))
def _attribution(params, cfg, src_params, src_cfg, corrupted_BxT, clean_BxT, mask_BxT,
                 clean_mask_BxT, *, site, metric, logit_positions):
  clean_LxBxTxD = forward(src_params, src_cfg, clean_BxT, attention.causal(clean_mask_BxT),
                          capture=(site,), return_logits=False).captures[site]
  pos = jnp.asarray(logit_positions, jnp.int32)

  def run(delta_LxBxTxD):  # an all-zero "add" at every layer and position: its gradient is
    iv = Intervention(jnp.ones((cfg.n_layers,), bool), jnp.ones((1,), bool), delta_LxBxTxD,
                      site=site, mode="add")             # d metric / d activation
    out = forward(params, cfg, corrupted_BxT, attention.causal(mask_BxT), interventions=(iv,),
                  capture=(site,), return_logits=False)
    m_B = metric(unembed(params, cfg, jnp.take(out.residual, pos, axis=1)))
    return m_B.sum(), out.captures[site]
  zeros = jnp.zeros_like(clean_LxBxTxD)
  grad_LxBxTxD, corrupt_LxBxTxD = jax.grad(run, has_aux=True)(zeros)
  return ((clean_LxBxTxD - corrupt_LxBxTxD) * grad_LxBxTxD).sum(-1)   # [L, B, T]


def attribution_patch(model: Transformer, corrupted_tokens, clean_tokens, metric: Metric,
                      site: str = "resid_pre", source_model: Transformer | None = None,
                      mask=None, clean_mask=None, logit_positions: Sequence[int] = (-1,)
                      ) -> np.ndarray:
  """Attribution patching (Nanda 2023): the first-order estimate of every act_patch cell from
  one forward and one backward, (clean − corrupted activation) · ∂metric/∂activation at the
  corrupted run, summed over d_model: float32 [batch, layers, positions]. Same arguments and
  result layout as `act_patch` with one position per cell and window 1."""
  site, _ = parse_hook_name(site)
  _stream_site(site)
  source_model, corrupted, clean = _model_and_token_pair(model, source_model, corrupted_tokens,
                                                         clean_tokens)
  mask = np.ones(corrupted.shape, bool) if mask is None else np.asarray(mask, bool)
  clean_mask = mask if clean_mask is None else np.asarray(clean_mask, bool)
  res = _attribution(model.params(), model.cfg, source_model.params(), source_model.cfg,
                     corrupted, clean, mask, clean_mask, site=check_site(site), metric=metric,
                     logit_positions=tuple(int(p) for p in logit_positions))
  return to_host(res).transpose(1, 0, 2)
