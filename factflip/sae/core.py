"""Sparse autoencoders as data: the parameters, the static metadata, encode and decode.

Owns: `SAEConfig` (architecture, sizes, input handling, the hook site the SAE reads), `SAE` (a
pytree: the parameters as leaves, the config as static metadata), `encode`, `decode`, `forward`
and `reconstruct` (jitted, any leading batch shape), and building an SAE from arrays (`make_sae`).
Must not: read or write files (`sae.formats`), train (`sae.train`), hook into models
(`probes.interventions`) or tell architectures apart by name (`sae.architectures` holds what
differs between them).

The math is SAELens 6.x's (a parity test holds it to 1e-5 for every architecture):

    x' = normalise(x) − b_dec · apply_b_dec_to_input          (normalise: `normalize_activations`)
    h  = x' @ W_enc + b_enc                (· ‖W_dec[j]‖ where the architecture rescales)
    f  = the architecture's activation of h (`sae.architectures`: standard, topk, jumprelu)
    x̂ = unnormalise(f @ W_dec + b_dec)     (f / ‖W_dec[j]‖ first where it rescales)

Input normalisations: "none"; "expected_average_only_in" (a constant the trainer folds into the
weights: nothing at run time, as in SAELens); "constant_norm_rescale" (x · √d_in / ‖x‖ per token)
and "layer_norm" ((x − mean) / (std + 1e-5), std with ddof 1): these two need the statistics of
the input to undo at decode, so `encode_with_state` returns them and `decode(f, state)` takes them
(`forward` threads them). "hook_z" SAEs read attention's per-head outputs [..., heads, d_head],
flattened to d_in, and decode back to that shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from factflip.sae.architectures import ARCHITECTURES

NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Static metadata of an SAE (hashable: a jit static argument).

  architecture: a name in `ARCHITECTURES` (standard, topk, jumprelu); d_in, d_sae: input and
  latent widths; k: the TopK width; rescale_acts_by_decoder_norm: TopK ranks h · ‖W_dec[j]‖
  (SAELens's option); apply_b_dec_to_input: subtract b_dec before encoding;
  normalize_activations: one of NORMALIZATIONS; reshape_activations: "none" | "hook_z" (input
  [..., heads, d_head]); d_head: the head width of a hook_z SAE (0 = taken from the input;
  decode needs it); hook_name: the TransformerLens hook the SAE reads (e.g.
  "blocks.3.hook_resid_post"); dtype: the parameters' dtype; metadata: everything else a file
  carried (model_name, context_size, dataset_path, ...), kept for writing back and not part of
  equality."""
  architecture: str
  d_in: int
  d_sae: int
  k: int = 0
  rescale_acts_by_decoder_norm: bool = False
  apply_b_dec_to_input: bool = True
  normalize_activations: str = "none"
  reshape_activations: str = "none"
  d_head: int = 0
  hook_name: str = ""
  dtype: str = "float32"
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

  def validate(self, source: str = "SAEConfig") -> None:
    def bad(field, value, expected):
      raise ValueError(f"{source}: field '{field}' is {value!r}; expected {expected}")
    if self.architecture not in ARCHITECTURES:
      bad("architecture", self.architecture, f"one of {tuple(ARCHITECTURES)}")
    for name in ("d_in", "d_sae"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        bad(name, getattr(self, name), "a positive integer")
    problem = ARCHITECTURES[self.architecture].check(self)
    if problem:
      bad(problem[0], getattr(self, problem[0]), problem[1])
    if self.normalize_activations not in NORMALIZATIONS:
      bad("normalize_activations", self.normalize_activations, f"one of {NORMALIZATIONS}")
    if self.reshape_activations not in RESHAPES:
      bad("reshape_activations", self.reshape_activations, f"one of {RESHAPES}")
    if self.d_head and self.d_in % self.d_head:
      bad("d_head", self.d_head, f"a divisor of d_in={self.d_in}")
    if self.dtype not in DTYPES:
      bad("dtype", self.dtype, f"one of {DTYPES}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SAE:
  """An SAE: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], `extra`
  (the architecture's own parameters by name: jumprelu's threshold [d_sae]; `sae.threshold`
  reads it, None elsewhere) and its static `cfg`. A pytree, so it goes through jit, vmap and
  tree maps like any parameters; `sae.encode(x)` etc. are the module functions."""
  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  extra: dict[str, jax.Array]
  cfg: SAEConfig = dataclasses.field(metadata={"static": True})

  @property
  def threshold(self) -> jax.Array | None:
    return self.extra.get("threshold")

  def params(self) -> dict[str, jax.Array]:
    """The parameters by SAELens's names (the architecture's own last: threshold for jumprelu)."""
    return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
            **self.extra}

  def encode(self, x):
    return encode(self, x)

  def encode_with_state(self, x):
    return encode_with_state(self, x)

  def decode(self, f, state: NormState | None = None):
    return decode(self, f, state)

  def forward(self, x):
    return forward(self, x)

  def replace(self, **changes) -> SAE:
    """A copy with fields changed; the architecture's own parameters by name too
    (`replace(threshold=...)`)."""
    own = {name: changes.pop(name) for name in list(changes) if name in self.extra}
    if own:
      changes["extra"] = {**self.extra, **own}
    return dataclasses.replace(self, **changes)


class NormState(NamedTuple):
  """The input statistics decode needs to undo `normalize_activations` (None where unused):
  scale [..., 1] (constant_norm_rescale: √d_in / ‖x‖), mean and std [..., 1] (layer_norm)."""
  scale: jax.Array | None = None
  mean: jax.Array | None = None
  std: jax.Array | None = None


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
  """The parameters an SAE of `cfg` has, with their shapes."""
  shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
  for name, param in ARCHITECTURES[cfg.architecture].extra_params.items():
    shapes[name] = tuple(param.shape(cfg))
  return shapes


def make_sae(cfg: SAEConfig, params: dict[str, Any], source: str = "SAE") -> SAE:
  """An SAE from arrays by SAELens's names, checked against `cfg` (shapes, no missing or extra
  tensors) and cast to `cfg.dtype`."""
  cfg.validate(source)
  shapes = param_shapes(cfg)
  missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
  if missing or extra:
    raise ValueError(f"{source}: tensors {sorted(params)}; a {cfg.architecture} SAE has "
                     f"{sorted(shapes)} (missing {missing}, unexpected {extra})")
  dtype = jnp.dtype(cfg.dtype)
  out = {}
  for name, shape in shapes.items():
    arr = params[name]
    if tuple(np.shape(arr)) != shape:
      raise ValueError(f"{source}: tensor '{name}' has shape {tuple(np.shape(arr))}; expected "
                       f"{shape} (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
    out[name] = jnp.asarray(arr, dtype)
  extra = {name: out[name] for name in ARCHITECTURES[cfg.architecture].extra_params}
  return SAE(out["W_enc"], out["b_enc"], out["W_dec"], out["b_dec"], extra, cfg)


def init_sae(cfg: SAEConfig, key: jax.Array, decoder_norm: float = 0.1, **init: float) -> SAE:
  """A fresh SAE as SAELens's trainer starts one: W_dec rows uniform (Kaiming) then scaled to
  `decoder_norm`, W_enc = W_dec.T, zero biases, the architecture's own parameters at the
  constants `init` names (default: the table's; jumprelu: threshold=0.01)."""
  cfg.validate()
  own = ARCHITECTURES[cfg.architecture].extra_params
  unknown = sorted(set(init) - set(own))
  if unknown:
    raise ValueError(f"init_sae: {unknown} are no parameters of a {cfg.architecture} SAE; "
                     f"its own are {sorted(own)}")
  bound = np.sqrt(6.0 / cfg.d_in)
  W_dec = jax.random.uniform(key, (cfg.d_sae, cfg.d_in), jnp.float32, -bound, bound)
  W_dec = W_dec * (decoder_norm / jnp.linalg.norm(W_dec, axis=-1, keepdims=True))
  params = {"W_enc": W_dec.T, "b_enc": jnp.zeros((cfg.d_sae,)), "W_dec": W_dec,
            "b_dec": jnp.zeros((cfg.d_in,))}
  for name, param in own.items():
    params[name] = jnp.full(param.shape(cfg), init.get(name, param.init))
  return make_sae(cfg, params)


# ---- the math ------------------------------------------------------------------------------
def _flatten_in(sae: SAE, x):
  cfg = sae.cfg
  if cfg.reshape_activations == "hook_z":
    if cfg.d_head and x.shape[-1] != cfg.d_head:
      raise ValueError(f"hook_z SAE: input heads of width {x.shape[-1]}; expected d_head "
                       f"{cfg.d_head}")
    x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
  if x.shape[-1] != cfg.d_in:
    raise ValueError(f"SAE input has width {x.shape[-1]}; expected d_in {cfg.d_in}"
                     + (" (heads x d_head)" if cfg.reshape_activations == "hook_z" else ""))
  return x


def _normalise(cfg: SAEConfig, x_NxD):
  how = cfg.normalize_activations
  if how == "constant_norm_rescale":
    scale_Nx1 = np.sqrt(cfg.d_in) / jnp.linalg.norm(x_NxD, axis=-1, keepdims=True)
    return x_NxD * scale_Nx1, NormState(scale=scale_Nx1)
  if how == "layer_norm":
    mean_Nx1 = x_NxD.mean(-1, keepdims=True)
    x_NxD = x_NxD - mean_Nx1
    std_Nx1 = jnp.std(x_NxD, axis=-1, keepdims=True, ddof=1)
    return x_NxD / (std_Nx1 + 1e-5), NormState(mean=mean_Nx1, std=std_Nx1)
  return x_NxD, NormState()


def _unnormalise(cfg: SAEConfig, y_NxD, state: NormState | None):
  how = cfg.normalize_activations
  if how not in ("constant_norm_rescale", "layer_norm"):
    return y_NxD
  if state is None or (state.scale is None and state.std is None):
    raise ValueError(f"decoding an SAE with normalize_activations={how!r} needs the input's "
                     "statistics: decode(f, state) with the state from encode_with_state(x), "
                     "or forward(x)")
  if how == "constant_norm_rescale":
    return y_NxD / state.scale
  return y_NxD * state.std + state.mean


def _rescales(cfg: SAEConfig) -> bool:
  """h · ‖W_dec[j]‖ before the activation and f / ‖W_dec[j]‖ before decoding (TopK's option)."""
  return ARCHITECTURES[cfg.architecture].rescales_by_decoder_norm and (
      cfg.rescale_acts_by_decoder_norm)


def hidden_pre(sae: SAE, x):
  """The pre-activations h [..., d_sae] (after the decoder-norm rescale where the architecture
  has one) and the input statistics: what every architecture's activation reads."""
  cfg = sae.cfg
  x = _flatten_in(sae, jnp.asarray(x).astype(sae.W_enc.dtype))
  x, state = _normalise(cfg, x)
  if cfg.apply_b_dec_to_input:
    x = x - sae.b_dec
  h = x @ sae.W_enc + sae.b_enc
  if _rescales(cfg):
    h = h * jnp.linalg.norm(sae.W_dec, axis=-1)
  return h, state


def activation(sae: SAE, h):
  """The latents f of pre-activations h (the architecture's nonlinearity)."""
  return ARCHITECTURES[sae.cfg.architecture].activation(h, sae.extra, sae.cfg)


@jax.jit
def encode_with_state(sae: SAE, x):
  """(f [..., d_sae], NormState): the latents and what `decode` needs to undo the input's
  normalisation."""
  h, state = hidden_pre(sae, x)
  return activation(sae, h), state


@jax.jit
def encode(sae: SAE, x):
  """The latents f [..., d_sae] of activations x [..., d_in] ([..., heads, d_head] for hook_z)."""
  return encode_with_state(sae, x)[0]


@jax.jit
def decode(sae: SAE, f, state: NormState | None = None):
  """The reconstruction x̂ of latents f [..., d_sae] ([..., heads, d_head] for hook_z with a
  known d_head); `state` from `encode_with_state` where the input normalisation needs it."""
  cfg = sae.cfg
  f = jnp.asarray(f).astype(sae.W_dec.dtype)
  if _rescales(cfg):
    f = f / jnp.linalg.norm(sae.W_dec, axis=-1)
  y = _unnormalise(cfg, f @ sae.W_dec + sae.b_dec, state)
  if cfg.reshape_activations == "hook_z":
    if not cfg.d_head:
      raise ValueError("decoding a hook_z SAE needs its head width: sae.replace(cfg="
                       "dataclasses.replace(sae.cfg, d_head=...)) or forward(x)")
    y = y.reshape(*y.shape[:-1], cfg.d_in // cfg.d_head, cfg.d_head)
  return y


def with_head_width(sae: SAE, head_width: int) -> SAE:
  """A hook_z SAE that knows its head width (decode returns [..., heads, d_head]); any other
  SAE, or one that knows it, as it is."""
  if sae.cfg.reshape_activations == "hook_z" and not sae.cfg.d_head:
    return sae.replace(cfg=dataclasses.replace(sae.cfg, d_head=int(head_width)))
  return sae


@jax.jit
def forward(sae: SAE, x):
  """decode(encode(x)) in x's shape (hook_z: the head shape of the input)."""
  return reconstruct(sae, x)[0]


@jax.jit
def reconstruct(sae: SAE, x):
  """(x̂, f, error = x − x̂): a reconstruction with the error term an intervention keeps."""
  f, state = encode_with_state(sae, x)
  x_hat = decode(with_head_width(sae, x.shape[-1]), f, state)
  return x_hat, f, jnp.asarray(x).astype(x_hat.dtype) - x_hat
