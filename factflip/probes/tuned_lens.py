"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, read out through
the model's own unembedding, trained to match the model's output distribution.

Owns: `TunedLens` (the translators, `translate`, and the architecture they fit: `check_fits`;
evals.loglik applies one through these methods, without importing this module),
`apply_tuned_lens` (pure, jittable: residual stream -> logits per layer), `tuned_lens_logits`,
`lens_kl` (mean KL(output || layer) per layer, the tuned or the plain logit lens),
`train_tuned_lens`, and the lens files `tuned_lens.safetensors` + `tuned_lens.json`.
Must not: change the model's parameters, choose data or studies, or know where models live
(callers pass a directory, typically the model's own).

Definitions (written as in the paper):
- translator ℓ = 0 .. L−1 acts on resid_pre[ℓ] (ℓ = 0 the embedding output):
  T_ℓ(h) = h + h @ weight[ℓ] + bias[ℓ], float32. Zero weight and bias (the initialisation) is
  the identity, i.e. the logit lens. Layer L (the output) needs no translator.
- lens logits ℓ = unembed(T_ℓ(h_ℓ)): the model's final norm, W_U and final soft-cap.
- loss = mean over layers ℓ of the mean over real (mask = 1) tokens of KL(p_L || p_ℓ), p_L the
  model's output distribution (a constant: only the translators train).

Files (in one directory, next to the model's weights): `tuned_lens.safetensors` holds `weight`
F32 [L, D, D], `bias` F32 [L, D] and the fingerprint in its header metadata, so it alone is
the lens (one atomic write); `tuned_lens.json` is a readable copy of the fingerprint plus the
caller's `info` (steps, losses, data), written after it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from factflip.fileio import write_json
from factflip.models import attention
from factflip.models import safetensors_io as st
from factflip.models.config import ModelConfig
from factflip.models.transformer import Params, Transformer, forward, unembed

TENSORS_NAME = "tuned_lens.safetensors"
JSON_NAME = "tuned_lens.json"
FORMAT = "factflip-tuned-lens"
VERSION = 1
F32 = jnp.float32
log = logging.getLogger("factflip")


@struct.dataclass
class TunedLens:
  """Per-layer translators T_ℓ(h) = h + h @ weight[ℓ] + bias[ℓ] for resid_pre[0 .. L−1].

  A pytree (pass it through `jax.jit`); `vocab_size` is static metadata. n_layers and d_model
  are read off `weight`."""

  weight: jax.Array                                     # float32 [L, D, D]
  bias: jax.Array                                       # float32 [L, D]
  vocab_size: int = struct.field(pytree_node=False)

  @property
  def n_layers(self) -> int:
    return self.weight.shape[0]

  @property
  def d_model(self) -> int:
    return self.weight.shape[-1]

  @property
  def fingerprint(self) -> dict[str, int]:
    """The architecture the lens fits (what a model must match to use it)."""
    return {"n_layers": int(self.n_layers), "d_model": int(self.d_model),
            "vocab_size": int(self.vocab_size)}

  def check_fits(self, model: Transformer | ModelConfig, where: str = "tuned lens") -> None:
    """ValueError naming both architectures unless `lens` was made for `model`'s shapes."""
    want, have = self.fingerprint, _fingerprint(_cfg(model))
    if want != have:
      differ = ", ".join(k for k in want if want[k] != have[k])
      raise ValueError(f"{where}: the lens was trained for a model with {_show(want)}, but this "
                       f"model has {_show(have)} ({differ} differ{'s' if ',' not in differ else ''})")
    if self.bias.shape != (self.n_layers, self.d_model) or self.weight.shape[1] != self.d_model:
      raise ValueError(f"{where}: weight {tuple(self.weight.shape)} and bias "
                       f"{tuple(self.bias.shape)} are not [L, D, D] and [L, D]")

  def translate(self, h_LxNxD: jax.Array) -> jax.Array:
    """T_ℓ(h[ℓ]) for every layer ℓ, float32, on residuals [L, N, D] (N any token rows)."""
    h_LxNxD = h_LxNxD.astype(F32)
    return h_LxNxD + jnp.einsum("lnd,lde->lne", h_LxNxD, self.weight) + self.bias[:, None]

  @classmethod
  def identity(cls, model: Transformer | ModelConfig) -> TunedLens:
    """Zero weight and bias: every translator is the identity (the logit lens)."""
    cfg = _cfg(model)
    L, D = cfg.n_layers, cfg.d_model
    return cls(jnp.zeros((L, D, D), F32), jnp.zeros((L, D), F32), cfg.vocab_size)


def _cfg(model: Transformer | ModelConfig) -> ModelConfig:
  return model if isinstance(model, ModelConfig) else model.cfg


def _fingerprint(cfg: ModelConfig) -> dict[str, int]:
  return {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "vocab_size": cfg.vocab_size}


def _show(fp: Mapping[str, int]) -> str:
  return ", ".join(f"{k}={v}" for k, v in fp.items())


# ---- the lens ---------------------------------------------------------------------------------
def _translate(weight_DxD: jax.Array, bias_D: jax.Array, h_NxD: jax.Array) -> jax.Array:
  h_NxD = h_NxD.astype(F32)
  return h_NxD + h_NxD @ weight_DxD + bias_D


def apply_tuned_lens(lens: TunedLens, params: Params, cfg: ModelConfig,
                     resid_LxBxTxD: jax.Array) -> jax.Array:
  """Lens logits float32 [L, B, T, V] = unembed(T_ℓ(resid_LxBxTxD[ℓ])) for every layer at once
  (one batched matmul over layers). `resid_LxBxTxD` is resid_pre as `forward` captures it."""
  lens.check_fits(cfg, "apply_tuned_lens")
  L, B, T, D = resid_LxBxTxD.shape
  if L != lens.n_layers or D != lens.d_model:
    raise ValueError(f"apply_tuned_lens: residual stream has shape {resid_LxBxTxD.shape}; "
                     f"expected [{lens.n_layers}, B, T, {lens.d_model}] (resid_pre)")
  t_LxNxD = lens.translate(resid_LxBxTxD.reshape(L, B * T, D))
  return unembed(params, cfg, t_LxNxD).reshape(L, B, T, cfg.vocab_size)


def _kl_LxBxT(lens: TunedLens, params: Params, cfg: ModelConfig, resid_LxBxTxD: jax.Array,
              logits_BxTxV: jax.Array) -> jax.Array:
  """KL(p_L || p_ℓ) per layer and token, [L, B, T]. One layer at a time (`lax.map`, rematerialised
  in the backward), so memory holds one layer's [B, T, V] logits, not L of them."""
  _, B, T, D = resid_LxBxTxD.shape
  logp_NxV = jax.nn.log_softmax(jax.lax.stop_gradient(logits_BxTxV).astype(F32), axis=-1)
  logp_NxV = logp_NxV.reshape(B * T, -1)
  p_NxV = jnp.exp(logp_NxV)
  neg_entropy_N = (p_NxV * logp_NxV).sum(-1)

  @jax.checkpoint
  def one(xs):
    weight_DxD, bias_D, h_BxTxD = xs
    logits_NxV = unembed(params, cfg, _translate(weight_DxD, bias_D, h_BxTxD.reshape(B * T, D)))
    logq_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    return (neg_entropy_N - (p_NxV * logq_NxV).sum(-1)).reshape(B, T)

  return jax.lax.map(one, (lens.weight, lens.bias, resid_LxBxTxD))


def _masked_mean_L(kl_LxBxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  m_BxT = mask_BxT.astype(F32)
  return (kl_LxBxT * m_BxT).sum((1, 2)) / jnp.maximum(m_BxT.sum(), 1.0)


def _run(params, cfg, batch):
  tokens_BxT, mask_BxT, seg_BxT, pos_BxT = batch
  ctx = (attention.causal(mask_BxT, pos_BxT) if seg_BxT is None
         else attention.packed(seg_BxT, pos_BxT, mask_BxT))
  out = forward(params, cfg, tokens_BxT, ctx, capture=("resid_pre",))
  loss_mask_BxT = mask_BxT if mask_BxT is not None else (
      seg_BxT > 0 if seg_BxT is not None else jnp.ones(tokens_BxT.shape, bool))
  return out, loss_mask_BxT


@functools.partial(jax.jit, static_argnames=("cfg",))
def _lens_logits(lens, params, cfg, tokens_BxT, mask_BxT):
  out = forward(params, cfg, tokens_BxT, attention.causal(mask_BxT), capture=("resid_pre",))
  lens_LxBxTxV = apply_tuned_lens(lens, params, cfg, out.captures["resid_pre"])
  return jnp.concatenate([lens_LxBxTxV, out.logits[None]], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_kl(lens, params, cfg, batch):
  out, mask_BxT = _run(params, cfg, batch)
  kl_LxBxT = _kl_LxBxT(lens, params, cfg, out.captures["resid_pre"], out.logits)
  return _masked_mean_L(kl_LxBxT, mask_BxT)


def tuned_lens_logits(model: Transformer, lens: TunedLens | None, tokens_BxT,
                      mask_BxT=None) -> jax.Array:
  """float32 [L + 1, B, T, V]: the lens at resid_pre[0 .. L−1], then the model's own logits
  (entry L is exactly `model(tokens, mask)`). lens=None is the logit lens."""
  cfg = model.cfg
  lens = TunedLens.identity(cfg) if lens is None else lens
  lens.check_fits(cfg, "tuned_lens_logits")
  tokens, mask, _, _ = _batch((tokens_BxT, mask_BxT), cfg, "tuned_lens_logits")
  return _lens_logits(lens, model.params(), cfg, tokens, mask)


def lens_kl(model: Transformer, lens: TunedLens | None, tokens_BxT, mask_BxT=None) -> np.ndarray:
  """float32 [L]: mean over real tokens of KL(model output || lens at resid_pre[ℓ]), in nats.
  lens=None is the plain logit lens (identity translators)."""
  cfg = model.cfg
  lens = TunedLens.identity(cfg) if lens is None else lens
  lens.check_fits(cfg, "lens_kl")
  batch = _batch((tokens_BxT, mask_BxT), cfg, "lens_kl")
  return np.asarray(_layer_kl(lens, model.params(), cfg, batch), np.float32)


# ---- training ---------------------------------------------------------------------------------
Batch = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _batch(batch, cfg: ModelConfig, where: str) -> Batch:
  """(tokens, mask, segment_ids, positions) from an int [B, T] array, a (tokens, mask) pair or
  a data-pipeline dict (inputs, segment_ids, positions), checked against the model."""
  seg = pos = mask = None
  if isinstance(batch, Mapping):
    key = "inputs" if "inputs" in batch else "tokens"
    if key not in batch:
      raise ValueError(f"{where}: batch dict has keys {sorted(batch)}; expected 'inputs' or "
                       "'tokens' (and optionally 'mask', 'segment_ids', 'positions')")
    tokens, mask = batch[key], batch.get("mask")
    seg, pos = batch.get("segment_ids"), batch.get("positions")
  elif isinstance(batch, tuple | list):
    if len(batch) != 2:
      raise ValueError(f"{where}: a batch given as a sequence must be (tokens, mask); got "
                       f"{len(batch)} items")
    tokens, mask = batch
  else:
    tokens = batch
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{where}: tokens have shape {tokens.shape} and dtype {tokens.dtype}; "
                     "expected integer [batch, seq]")
  B, T = tokens.shape
  if T > cfg.max_seq_len:
    raise ValueError(f"{where}: batch of {T} tokens per row is longer than the model's context "
                     f"of {cfg.max_seq_len} (max_seq_len)")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    raise ValueError(f"{where}: token ids span [{tokens.min()}, {tokens.max()}]; expected ids in "
                     f"[0, {cfg.vocab_size}) (vocab_size)")

  def side(a, name, dtype):
    if a is None:
      return None
    a = np.asarray(a)
    if a.shape != (B, T):
      raise ValueError(f"{where}: {name} has shape {a.shape}; expected the tokens' {(B, T)}")
    return a.astype(dtype)
  return (tokens.astype(np.int32), side(mask, "mask", bool), side(seg, "segment_ids", np.int32),
          side(pos, "positions", np.int32))


def _cycle(token_batches) -> Iterable:
  """Batches forever: a [B, T] array is one batch, [N, B, T] a stack of N; a re-iterable
  (list, dataset) is iterated again each pass; a one-shot iterator is remembered and replayed."""
  if isinstance(token_batches, np.ndarray | jax.Array):
    arr = np.asarray(token_batches)
    if arr.ndim == 2:
      return itertools.repeat(arr)
    if arr.ndim == 3:
      return itertools.cycle(list(arr))
    raise ValueError(f"token_batches is an array of shape {arr.shape}; expected one batch "
                     "[B, T] or a stack [N, B, T]")
  if iter(token_batches) is token_batches:
    return itertools.cycle(token_batches)

  def passes():
    while True:
      empty = True
      for b in token_batches:
        empty = False
        yield b
      if empty:
        return
  return passes()


def default_optimizer(learning_rate: float, steps: int, warmup_steps: int | None = None,
                      weight_decay: float = 1e-3) -> optax.GradientTransformation:
  """Adam with linear warmup (default a tenth of the steps) and cosine decay to lr / 10, global
  gradient norm clipped at 1. Decay pulls the residual translators toward the identity."""
  warmup = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                max(steps, warmup + 1), learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay))


def train_tuned_lens(model: Transformer, token_batches, steps: int,
                     learning_rate: float = 1e-3, *, lens: TunedLens | None = None,
                     optimizer: optax.GradientTransformation | None = None,
                     warmup_steps: int | None = None, weight_decay: float = 1e-3,
                     log_every: int = 0,
                     callback: Callable[[int, float], Any] | None = None,
                     ) -> tuple[TunedLens, list[float]]:
  """Train the translators (the model stays frozen) for `steps` steps; returns the lens and the
  loss of every step (mean KL over layers and real tokens, before that step's update).

  token_batches: int [B, T] arrays, (tokens, mask) pairs or data-pipeline dicts (inputs,
    segment_ids, positions), cycled through as often as needed; also one [B, T] array or a
    stack [N, B, T]. One compiled step (forward with resid_pre capture, KL, update) per batch
    shape.
  lens: start from this lens (default: identity, i.e. the logit lens).
  optimizer: an optax transformation instead of `default_optimizer(learning_rate, steps,
    warmup_steps, weight_decay)`.
  log_every, callback: every `log_every` steps (and the last) `callback(step, loss)` is called,
    or the loss is logged at INFO when no callback is given; the loss is read one step late,
    so the host never waits on the device for it.
  """
  if steps < 1:
    raise ValueError(f"train_tuned_lens: steps={steps}; expected at least 1")
  cfg = model.cfg
  lens = TunedLens.identity(cfg) if lens is None else lens
  lens.check_fits(cfg, "train_tuned_lens")
  tx = optimizer or default_optimizer(learning_rate, steps, warmup_steps, weight_decay)
  params = model.params()

  @jax.jit
  def step(lens, opt_state, params, batch):
    out, mask_BxT = _run(params, cfg, batch)

    def loss_fn(lens):
      kl_LxBxT = _kl_LxBxT(lens, params, cfg, out.captures["resid_pre"], out.logits)
      return _masked_mean_L(kl_LxBxT, mask_BxT).mean()

    loss, grads = jax.value_and_grad(loss_fn)(lens)
    updates, opt_state = tx.update(grads, opt_state, lens)
    return optax.apply_updates(lens, updates), opt_state, loss

  def report(s, loss):
    loss = float(loss)
    if callback is not None:
      callback(s, loss)
    else:
      log.info("tuned lens step %d/%d: KL %.4f", s + 1, steps, loss)

  opt_state = tx.init(lens)
  losses, pending = [], None
  batches = iter(_cycle(token_batches))
  for s in range(steps):
    raw = next(batches, None)
    if raw is None:
      raise ValueError("train_tuned_lens: token_batches yielded no batches")
    lens, opt_state, loss = step(lens, opt_state, params, _batch(raw, cfg, "train_tuned_lens"))
    losses.append(loss)
    if pending is not None:
      report(pending, losses[pending])
      pending = None
    if log_every and (s % log_every == 0 or s == steps - 1):
      pending = s
  if pending is not None:
    report(pending, losses[pending])
  return lens, [float(x) for x in jax.device_get(losses)]


# ---- files ------------------------------------------------------------------------------------
def save_tuned_lens(lens: TunedLens, directory: str, info: Mapping[str, Any] | None = None
                    ) -> str:
  """Write `directory/tuned_lens.safetensors` (atomic; the whole lens and its fingerprint) and
  `directory/tuned_lens.json` (fingerprint + JSON-able `info`). Returns the tensors' path."""
  os.makedirs(directory, exist_ok=True)
  L, D = lens.n_layers, lens.d_model
  weight, bias = np.asarray(lens.weight, np.float32), np.asarray(lens.bias, np.float32)
  if weight.shape != (L, D, D) or bias.shape != (L, D):
    raise ValueError(f"save_tuned_lens: weight {weight.shape} and bias {bias.shape} are not "
                     "[L, D, D] and [L, D]")
  meta = {"format": FORMAT, "version": VERSION, **lens.fingerprint}
  path = os.path.join(directory, TENSORS_NAME)
  st.write_file(path, {"weight": (weight.shape, np.float32, lambda: weight),
                       "bias": (bias.shape, np.float32, lambda: bias)}, meta)
  write_json(os.path.join(directory, JSON_NAME),
             {**dict(info or {}), **meta, "tensors": TENSORS_NAME,
              "translator": "h + h @ weight[l] + bias[l] at resid_pre[l], l = 0..L-1"})
  return path


def load_tuned_lens(directory: str, model: Transformer | ModelConfig | None = None
                    ) -> TunedLens:
  """The lens saved in `directory` (arrays bitwise as saved). With `model`, a lens made for
  another architecture raises ValueError naming both."""
  path = os.path.join(directory, TENSORS_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no tuned lens here (expected {TENSORS_NAME}, written by "
                            "save_tuned_lens)")
  f = st.SafetensorsFile(path)
  if f.metadata.get("format") != FORMAT:
    raise ValueError(f"{path}: header metadata format={f.metadata.get('format')!r}; expected "
                     f"{FORMAT!r}")
  try:
    fp = {k: int(f.metadata[k]) for k in ("n_layers", "d_model", "vocab_size")}
  except (KeyError, ValueError) as e:
    raise ValueError(f"{path}: header metadata lacks an integer n_layers, d_model or "
                     f"vocab_size ({type(e).__name__}: {e})") from e
  L, D = fp["n_layers"], fp["d_model"]
  for name, shape in (("weight", (L, D, D)), ("bias", (L, D))):
    if name not in f.keys():  # noqa: SIM118 (not a dict)
      raise ValueError(f"{path}: no tensor {name!r}; found {f.keys()}")
    if f.shape(name) != shape or f.dtype(name) != np.float32:
      raise ValueError(f"{path}: tensor {name!r} is {f.dtype(name)} {list(f.shape(name))}; "
                       f"expected float32 {list(shape)} for {_show(fp)}")
  lens = TunedLens(jnp.asarray(f.read("weight")), jnp.asarray(f.read("bias")), fp["vocab_size"])
  if model is not None:
    lens.check_fits(model, path)
  return lens


__all__ = ["JSON_NAME", "TENSORS_NAME", "TunedLens", "apply_tuned_lens",
           "default_optimizer", "lens_kl", "load_tuned_lens", "save_tuned_lens",
           "train_tuned_lens", "tuned_lens_logits"]
