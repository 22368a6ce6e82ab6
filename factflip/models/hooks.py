"""Hook sites and interventions: the data contract between the model and the probes.

Owns: the names of the sites a forward pass exposes per layer, the `Intervention` pytree that the
layer scan consumes, and TransformerLens-style hook-name parsing.
Must not: run models or build sweeps (that is `factflip.probes`).

An intervention is data, not a callback. Because masks and values are array leaves of a pytree,
a sweep over (layer, position) cells is a `jax.vmap` over interventions inside one compiled
program, and cross-model patching is "capture in model A, replace in model B".

Sites, per layer l (block l maps resid_pre[l] to resid_post[l] = resid_pre[l + 1]):
  resid_pre   block input (resid_pre[0] is the embedding output, after any embedding scale)
  attn_out    what the attention branch adds to the residual stream (after Gemma's post-norm)
  resid_mid   resid_pre + attn_out (the MLP branch's input residual; with a parallel
              residual, GPT-NeoX's, the MLP reads resid_pre and resid_post = resid_mid + mlp_out)
  mlp_out     what the MLP branch adds to the residual stream (after Gemma's post-norm)
  resid_post  block output
  z           attention's per-head outputs before the output projection, [B, T, heads, d_head]
              (TransformerLens `attn.hook_z`: what Gemma Scope's attention SAEs read)
  mlp_post    the MLP's hidden activation, act(gate) * up, [B, T, d_ff] (TransformerLens
              `mlp.hook_post`: what transcoders and MLP-neuron probes read)
  q, k, v     attention's projections before any QK-norm and RoPE, [B, T, heads, d_head] (k and
              v: kv heads) (`attn.hook_q`, `hook_k`, `hook_v`)
  rot_q, rot_k
              queries and keys after QK-norm and RoPE, what the scores are made of
              (`attn.hook_rot_q`, `hook_rot_k`)
  attn_scores the scaled (and soft-capped) scores after the mask, [B, T, heads, S] (S: key
              slots; masked slots hold float32's lowest value where TransformerLens has -inf)
              (`attn.hook_attn_scores`)
  pattern     the softmax of the scores, [B, T, heads, S] (`attn.hook_pattern`)
  ln1_scale, ln2_scale
              what the attention / MLP branch's pre-norm divides by, [B, T, 1]: the RMS of its
              input, or for LayerNorm its standard deviation (`ln1.hook_scale`,
              `ln2.hook_scale`: replace them with another run's to freeze the norms; absent
              without pre-norms, OLMo 2)
  ln1_normalized, ln2_normalized
              the pre-norm's input (centred, for LayerNorm) divided by that scale, before the
              norm's weight and bias, [B, T, d_model] (`ln1.hook_normalized`,
              `ln2.hook_normalized`)
  mlp_pre     the MLP's pre-activation, [B, T, d_ff]: the gate's projection of a gated MLP, the
              input projection (with its bias) of an ungated one (`mlp.hook_pre`)
  mlp_pre_linear
              a gated MLP's up projection, the factor the activation multiplies
              (`mlp.hook_pre_linear`; absent from ungated MLPs, GPT-NeoX)
Opt-in sites (TransformerLens hooks them only behind a config flag; `OPT_IN_SITES`): hooking
one changes how the block computes, not what it computes, and costs a per-head copy.
  result      each head's write z_h · W_O[h] before the heads are summed and W_O's bias added,
              [B, T, heads, d_model] (`attn.hook_result`, use_attn_result; with Gemma's and
              OLMo 2's post-attention norm, before it: the norm reads the heads' sum)
  q_input, k_input, v_input
              per-head copies of resid_pre that feed the pre-norm and then only that head's
              query, key or value, [B, T, heads (kv heads for k and v), d_model] (`hook_q_input`
              ..., use_split_qkv_input): patch one head's input without touching the others
  attn_in     one resid_pre copy per head feeding that head's query, key and value, [B, T,
              heads, d_model] (`hook_attn_in`, use_attn_in; only where every query head has its
              own kv head, n_kv_heads = n_heads)
  mlp_in      the MLP branch's input residual before its pre-norm, [B, T, d_model]
              (`hook_mlp_in`, use_hook_mlp_in): resid_mid, or resid_pre with a parallel
              residual; editing it changes the MLP, not the residual stream
The first five are [B, T, d_model]. Every site is position-major, [B, T, ...]: an intervention's
position mask (over [B, T]) broadcasts over whatever trailing axes a site has, and a capture at
`capture_index` keeps those positions. So attn_scores and pattern are [B, query, head, key],
where TransformerLens has [batch, head, query, key] (`probes.cache` gives its layout). The
head axis is axis 2 of every per-head site: an intervention's `head_mask` picks heads there.
TransformerLens' `hook_embed` is resid_pre of layer 0 (these models add no position embedding).

The scan reads an intervention through four members only: `site`, `layer_mask` [L], `values`
(leading axis L, sliced per layer) and `apply(h, on, values_l)`. Any pytree with them is an
intervention: `Intervention` replaces or adds values; `factflip.sae.steering.SAEEdit` encodes
the site with an SAE, edits latents and decodes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import struct

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "z", "mlp_post",
         "q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "ln1_scale", "ln2_scale",
         "ln1_normalized", "ln2_normalized", "mlp_pre", "mlp_pre_linear",
         "result", "q_input", "k_input", "v_input", "attn_in", "mlp_in")
STREAM_SITES = SITES[:5]          # the residual stream and what each branch writes to it
HEAD_SITES = ("z", "q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern",   # [B, T, H, .]
              "result", "q_input", "k_input", "v_input", "attn_in")
ATTENTION_SITES = ("attn_scores", "pattern")   # inside the softmax: the hooked attention path
SPLIT_INPUT_SITES = ("q_input", "k_input", "v_input")
OPT_IN_SITES = ("result",) + SPLIT_INPUT_SITES + ("attn_in", "mlp_in")
_NORM_SITES = ("ln1_scale", "ln2_scale", "ln1_normalized", "ln2_normalized")
MODES = ("replace", "add")

# TransformerLens hook names (after `blocks.{l}.`) of our sites
TL_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
            "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out",
            "resid_post": "hook_resid_post", "z": "attn.hook_z", "mlp_post": "mlp.hook_post",
            "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
            "rot_q": "attn.hook_rot_q", "rot_k": "attn.hook_rot_k",
            "attn_scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern",
            "ln1_scale": "ln1.hook_scale", "ln2_scale": "ln2.hook_scale",
            "ln1_normalized": "ln1.hook_normalized", "ln2_normalized": "ln2.hook_normalized",
            "mlp_pre": "mlp.hook_pre", "mlp_pre_linear": "mlp.hook_pre_linear",
            "result": "attn.hook_result", "q_input": "hook_q_input", "k_input": "hook_k_input",
            "v_input": "hook_v_input", "attn_in": "hook_attn_in", "mlp_in": "hook_mlp_in"}
_FROM_TL = {v: k for k, v in TL_HOOKS.items()}
_TL_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(v) for v in TL_HOOKS.values())
                      + r")$")


def parse_hook_name(name: str) -> tuple[str, int | None]:
  """'blocks.3.hook_resid_pre' -> ('resid_pre', 3); 'blocks.2.attn.hook_z' -> ('z', 2);
  'mlp_out' -> ('mlp_out', None)."""
  if name in SITES:
    return name, None
  m = _TL_NAME.match(name)
  if not m:
    raise ValueError(f"unknown hook site {name!r}; expected one of {SITES} or a TransformerLens "
                     "name like 'blocks.3.hook_resid_pre' or 'blocks.3.attn.hook_z'")
  return _FROM_TL[m.group(2)], int(m.group(1))


def hook_name(site: str, layer: int) -> str:
  """The TransformerLens name of `site` at `layer`: ('z', 2) -> 'blocks.2.attn.hook_z'."""
  return f"blocks.{int(layer)}.{TL_HOOKS[check_site(site)]}"


def site_shape(cfg, site: str, slots: int | None = None) -> tuple[int, ...]:
  """A site's per-token feature shape for a ModelConfig: (d_model,), z / q / rot_q (heads,
  head_dim), k / v / rot_k (kv heads, head_dim), the MLP's hidden sites (d_ff,), the norms'
  scales (1,), attn_scores / pattern (heads, slots) (`slots`: the key slots, T without a
  cache), result / q_input / attn_in (heads, d_model), k_input / v_input (kv heads,
  d_model)."""
  check_site(site)
  if site in ATTENTION_SITES:
    if slots is None:
      raise ValueError(f"site_shape({site!r}) needs slots= (the key slots a query sees)")
    return (cfg.n_heads, slots)
  heads = {"z": cfg.n_heads, "q": cfg.n_heads, "rot_q": cfg.n_heads, "k": cfg.n_kv_heads,
           "v": cfg.n_kv_heads, "rot_k": cfg.n_kv_heads}
  if site in heads:
    return (heads[site], cfg.head_dim)
  model_heads = {"result": cfg.n_heads, "q_input": cfg.n_heads, "k_input": cfg.n_kv_heads,
                 "v_input": cfg.n_kv_heads, "attn_in": cfg.n_heads}
  if site in model_heads:
    return (model_heads[site], cfg.d_model)
  return {"mlp_post": (cfg.d_ff,), "mlp_pre": (cfg.d_ff,), "mlp_pre_linear": (cfg.d_ff,),
          "ln1_scale": (1,), "ln2_scale": (1,)}.get(site, (cfg.d_model,))


def feature_axes(site: str) -> int:
  """How many trailing axes a site has after [B, T]: 2 for the per-head sites, else 1."""
  return 2 if check_site(site) in HEAD_SITES else 1


def model_sites(cfg, opt_in: bool = True) -> tuple[str, ...]:
  """The sites a model of this ModelConfig has: all but the pre-norms' where it has none (OLMo
  2), mlp_pre_linear where the MLP is ungated (GPT-NeoX) and attn_in with grouped-query
  attention; opt_in=False leaves out `OPT_IN_SITES`."""
  absent = set() if cfg.pre_norms else set(_NORM_SITES)
  if not cfg.gated_mlp:
    absent.add("mlp_pre_linear")
  if cfg.n_kv_heads != cfg.n_heads:
    absent.add("attn_in")
  if not opt_in:
    absent.update(OPT_IN_SITES)
  return tuple(s for s in SITES if s not in absent)


def check_site(site: str) -> str:
  if site not in SITES:
    raise ValueError(f"unknown hook site {site!r}; expected one of {SITES}")
  return site


@struct.dataclass
class Intervention:
  """Replace or add `values` at `site`, where layer_mask[l] & pos_mask[b, t].

  Leaves (vmappable):
    layer_mask: bool [L].
    pos_mask:   bool, broadcastable to [B, T].
    values:     [L, ...] with each layer's slice broadcastable to [B, T, D] (e.g. [L, B, T, D]
                from a capture, or [L, 1, 1, D] for a steering vector; [L, B, T, H, K] at z).
    head_mask:  None (every head) or bool [H] (kv heads at k, v, rot_k): the heads of a
                per-head site (HEAD_SITES, head axis 2) that change. Per-head patching is one
                intervention per (layer, head) cell, vmapped.
  Static: site (one of SITES) and mode ("replace" | "add").
  """

  layer_mask: jax.Array
  pos_mask: jax.Array
  values: jax.Array
  head_mask: jax.Array | None = None
  site: str = struct.field(pytree_node=False, default="resid_pre")
  mode: str = struct.field(pytree_node=False, default="replace")

  def __post_init__(self):
    check_site(self.site)
    if self.mode not in MODES:
      raise ValueError(f"Intervention.mode={self.mode!r}: expected one of {MODES}")
    if self.head_mask is not None and self.site not in HEAD_SITES:
      raise ValueError(f"Intervention at {self.site!r} with a head_mask; heads are picked only "
                       f"at the per-head sites {HEAD_SITES}")

  def apply(self, h_BxTxD: jax.Array, on: jax.Array, values_l: jax.Array) -> jax.Array:
    """This intervention at one layer (`on` = layer_mask[l], `values_l` = values[l])."""
    m = jnp.logical_and(on, jnp.broadcast_to(self.pos_mask, h_BxTxD.shape[:2]))
    m = m.reshape(m.shape + (1,) * (h_BxTxD.ndim - 2))     # over d_model, or heads x d_head
    if self.head_mask is not None:                         # [B, T, H, ...]: heads on axis 2
      m = m & self.head_mask.reshape((1, 1, -1) + (1,) * (h_BxTxD.ndim - 3))
    v = values_l.astype(h_BxTxD.dtype)
    if self.mode == "replace":
      return jnp.where(m, v, h_BxTxD)
    return h_BxTxD + jnp.where(m, v, jnp.zeros((), h_BxTxD.dtype))
