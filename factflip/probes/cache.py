"""A TransformerLens-style activation cache: one forward pass's activations under
TransformerLens' names and layouts, and its residual-stream decompositions.

Owns: `run_with_cache` and `ActivationCache` (`cache["resid_pre", 5]`,
`cache["blocks.5.attn.hook_pattern"]`, `cache["scale", 5, "ln1"]`, `cache["ln_final.hook_scale"]`,
`decompose_resid`, `accumulated_resid`, `stack_head_results`, `apply_ln_to_stack`,
`logit_attrs`), with TransformerLens' semantics so code written against its cache reads ours.
Must not: define sites (`factflip.models.hooks`) or the attribution arithmetic
(`probes.attribution`: one place, shared with the compiled `logit_attribution`).

Layouts are TransformerLens': [batch, pos, ...] for every site but attn_scores and pattern,
[batch, head, query, key]. Arrays are jax arrays (np.asarray reads them). Differences: our
norms' weights are not folded into the next matrix, so `logit_attrs` multiplies by the final
norm's weight where TransformerLens (fold_ln=True) has it inside W_U — the same numbers as a
TransformerLens model loaded with fold_ln=True; masked scores hold float32's lowest value
instead of -inf.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from factflip.models.hooks import (
  ATTENTION_SITES,
  SITES,
  TL_HOOKS,
  hook_name,
  model_sites,
  parse_hook_name,
)
from factflip.models.transformer import Transformer, norm, normalized, rms_scale
from factflip.probes.attribution import answer_directions, final_norm_stack, head_results

# TransformerLens' short names (utils.get_act_name) -> our sites
SHORT = {"resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
         "attn_out": "attn_out", "mlp_out": "mlp_out", "z": "z", "q": "q", "k": "k", "v": "v",
         "query": "q", "key": "k", "value": "v", "rot_q": "rot_q", "rot_k": "rot_k",
         "attn_scores": "attn_scores", "attn_logits": "attn_scores", "attn": "pattern",
         "pattern": "pattern", "pre": "mlp_pre", "mlp_pre": "mlp_pre",
         "pre_linear": "mlp_pre_linear", "post": "mlp_post", "mlp_post": "mlp_post",
         "result": "result", "q_input": "q_input", "k_input": "k_input", "v_input": "v_input",
         "mlp_in": "mlp_in"}


def _pos(x: jax.Array, pos_slice, axis: int) -> jax.Array:
  """TransformerLens' Slice: None keeps every position, an int picks one (dropping the axis),
  a slice or index list picks those."""
  if pos_slice is None:
    return x
  if isinstance(pos_slice, int):
    return jnp.take(x, pos_slice, axis=axis)
  idx = np.arange(x.shape[axis])[pos_slice] if isinstance(pos_slice, slice) else pos_slice
  return jnp.take(x, jnp.asarray(idx), axis=axis)


class ActivationCache:
  """Activations of one forward pass, read by TransformerLens name (see the module doc).

  captures: {site: [L, B, T, ...]} as `forward` returns them; residual: the final residual
  stream [B, T, D] (before the final norm); logits [B, T, V] or None."""

  def __init__(self, model: Transformer, captures: dict[str, jax.Array], residual: jax.Array,
               logits: jax.Array | None = None):
    self.model, self.cfg = model, model.cfg
    self.captures, self.residual, self.logits = dict(captures), residual, logits
    self.final_scale = rms_scale(residual, self.cfg)        # [B, T, 1]
    self._results = None                                   # every head's z · W_O, when asked

  def _head_results(self) -> jax.Array:
    """[L, B, T, H, D]: each head's write into the residual stream, the captured result site
    or computed once from z (`attribution.head_results`, which refuses post-norm models)."""
    if "result" in self.captures and not self.cfg.post_norms:
      return self.captures["result"]
    if self._results is None:
      self._results = head_results(self.model.params(), self.cfg, self._site("z"))
    return self._results

  # ---- names ------------------------------------------------------------------------------
  def _name(self, key) -> str:
    if isinstance(key, str):
      return key
    name, layer, *sub = key
    if name in ("scale", "normalized"):
      if layer is None:
        return f"ln_final.hook_{name}"
      return f"blocks.{int(layer) % self.cfg.n_layers}.{sub[0] if sub else 'ln1'}.hook_{name}"
    if name == "embed":
      return "hook_embed"
    if name not in SHORT:
      raise KeyError(f"{name!r}: expected one of {sorted(SHORT)} or 'scale' / 'normalized' / "
                     "'embed'")
    return hook_name(SHORT[name], int(layer) % self.cfg.n_layers)

  def keys(self) -> list[str]:
    """The TransformerLens names this cache answers."""
    names = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in"]
    names += ["unembed.hook_out"] if self.logits is not None else []
    for layer in range(self.cfg.n_layers):
      names += [hook_name(site, layer) for site in SITES if site in self.captures]
      if "z" in self.captures and "result" not in self.captures and not self.cfg.post_norms:
        names.append(f"blocks.{layer}.attn.hook_result")
    return names

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self.keys())

  def __contains__(self, key) -> bool:
    try:
      return self._name(key) in self.keys()
    except KeyError:
      return False

  def __getitem__(self, key) -> jax.Array:
    """cache["blocks.5.attn.hook_pattern"], cache["pattern", 5], cache["resid_pre", 5],
    cache["scale", 5, "ln2"], cache["scale", None] (the final norm's), cache["hook_embed"],
    cache["ln_final.hook_normalized"], cache["unembed.hook_in"] / ["unembed.hook_out"] (the
    final norm's output / the logits)."""
    name = self._name(key)
    if name == "hook_embed":
      return self._site("resid_pre")[0]
    if name == "ln_final.hook_scale":
      return self.final_scale
    if name == "ln_final.hook_normalized":
      return normalized(self.residual, self.final_scale, self.cfg)
    if name == "unembed.hook_in":                       # the final norm's output
      p = self.model.params()
      return norm(self.residual, p["final_norm"], p.get("final_norm_bias"), self.cfg)
    if name == "unembed.hook_out":
      if self.logits is None:
        raise KeyError("'unembed.hook_out': this cache holds no logits")
      return self.logits
    if name.endswith(".attn.hook_result") and "result" not in self.captures:
      layer = int(name.split(".")[1])
      return self._head_results()[layer]
    try:
      site, layer = parse_hook_name(name)
    except ValueError as e:
      raise KeyError(f"{name!r}: not a hook this cache holds ({e})") from None
    if layer is None:
      raise KeyError(f"{name!r} names no layer; e.g. {hook_name(site, 0)!r}")
    x = self._site(site)[layer]
    return jnp.swapaxes(x, 1, 2) if site in ATTENTION_SITES else x     # [B, H, query, key]

  def _site(self, site: str) -> jax.Array:
    if site not in self.captures:
      raise KeyError(f"{TL_HOOKS.get(site, site)!r}: not captured (run_with_cache(..., "
                     f"names=) left it out)")
    return self.captures[site]

  # ---- decompositions ---------------------------------------------------------------------
  def _layer(self, layer: int | None) -> int:
    L = self.cfg.n_layers
    return L if layer is None or layer == -1 else int(layer)

  def apply_ln_to_stack(self, stack: jax.Array, layer: int | None = None,
                        mlp_input: bool = False, pos_slice=None) -> jax.Array:
    """Components [N, B, (pos,) D] (centred, for LayerNorm) divided by the scale of the norm
    that reads them: the final norm's (layer None, -1 or L), else layer's ln2 (mlp_input) or
    ln1 — TransformerLens' `apply_ln_to_stack`."""
    layer = self._layer(layer)
    if layer == self.cfg.n_layers:
      scale = self.final_scale
    else:
      scale = self._site("ln2_scale" if mlp_input else "ln1_scale")[layer]
    return normalized(stack, _pos(scale, pos_slice, 1), self.cfg)

  def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                      mode: str = "all", apply_ln: bool = False, pos_slice=None,
                      incl_embeds: bool = True, return_labels: bool = False):
    """The residual stream entering `layer` (default: the final one) as a stack of what wrote
    it: [components, B, (pos,) D] — embed, then each earlier layer's attn_out and mlp_out
    (mode "attn" / "mlp": only those), plus `layer`'s attn_out with mlp_input."""
    layer = self._layer(layer)
    parts, labels = [], []
    if incl_embeds:
      parts.append(self["hook_embed"])
      labels.append("embed")
    for i in range(layer):
      if mode != "mlp":
        parts.append(self._site("attn_out")[i])
        labels.append(f"{i}_attn_out")
      if mode != "attn":
        parts.append(self._site("mlp_out")[i])
        labels.append(f"{i}_mlp_out")
    if mlp_input and mode != "mlp":
      parts.append(self._site("attn_out")[layer])
      labels.append(f"{layer}_attn_out")
    stack = jnp.stack([_pos(p, pos_slice, 1) for p in parts])
    if apply_ln:
      stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice)
    return (stack, labels) if return_labels else stack

  def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False,
                        apply_ln: bool = False, pos_slice=None, mlp_input: bool = False,
                        return_labels: bool = False):
    """The residual stream entering each layer up to and including `layer` (default: all, then
    the final one): [layers, B, (pos,) D], labels "{l}_pre" (incl_mid: and "{l}_mid" before
    `layer`; mlp_input: `layer`'s "_mid"), "final_post". apply_ln: up to the final layer each
    component is normalised by its own RMS, as the logit lens reads it (TransformerLens'
    recompute_ln); up to layer l < L, divided by that layer's cached ln1 (ln2) scale."""
    L = self.cfg.n_layers
    layer = self._layer(layer)
    parts, labels = [], []
    for i in range(layer + 1):
      if i == L:
        parts.append(self.residual)
        labels.append("final_post")
        continue
      parts.append(self._site("resid_pre")[i])
      labels.append(f"{i}_pre")
      if (incl_mid and i < layer) or (mlp_input and i == layer):
        parts.append(self._site("resid_mid")[i])
        labels.append(f"{i}_mid")
    stack = jnp.stack([_pos(p, pos_slice, 1) for p in parts])
    if apply_ln:
      stack = (normalized(stack, rms_scale(stack, self.cfg), self.cfg) if layer == L
               else self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice))
    return (stack, labels) if return_labels else stack

  def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                         incl_remainder: bool = False, pos_slice=None, apply_ln: bool = False):
    """Every head's write (z · W_O) of the layers before `layer` (default all):
    [layers·heads, B, (pos,) D], labels "L{l}H{h}"; incl_remainder adds the residual stream
    minus their sum (embedding, MLPs, biases) as "remainder"."""
    layer = self._layer(layer)
    r = self._head_results()[:layer]                                 # [l, B, T, H, D]
    H = self.cfg.n_heads
    stack = jnp.moveaxis(r, 3, 1).reshape((layer * H,) + r.shape[1:3] + r.shape[4:])
    labels = [f"L{i}H{h}" for i in range(layer) for h in range(H)]
    if incl_remainder:
      total = self.residual if layer == self.cfg.n_layers else self._site("resid_pre")[layer]
      stack = jnp.concatenate([stack, (total - stack.sum(0))[None]])
      labels.append("remainder")
    stack = _pos(stack, pos_slice, 2)
    if apply_ln:
      stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack

  def logit_attrs(self, residual_stack: jax.Array, tokens, incorrect_tokens=None,
                  pos_slice=None) -> jax.Array:
    """Each component's direct contribution to the logit of `tokens` (minus `incorrect_tokens`'):
    the stack through the final norm (its scale, then its weight) dotted with W_U's columns.
    residual_stack [N, B, (pos,) D] with tokens [B] (or [B, pos]) as TransformerLens takes
    them; pos_slice picks the positions the final norm's scale is read at."""
    scaled = final_norm_stack(self.model.params(), self.cfg, residual_stack,
                              _pos(self.final_scale, pos_slice, 1))
    d = answer_directions(self.model.params(), self.cfg, tokens, incorrect_tokens)
    return (scaled * d.astype(scaled.dtype)).sum(-1)


def run_with_cache(model: Transformer, tokens, mask=None, names: Sequence[str] | None = None
                   ) -> tuple[jax.Array, ActivationCache]:
  """(logits [B, T, V], cache) of one forward pass, capturing every site but the opt-in ones
  (`hooks.OPT_IN_SITES`: result, the split q/k/v inputs, mlp_in, which TransformerLens too
  hooks only behind a flag; cache["result", l] is computed from z) — or `names`: our sites or
  TransformerLens names, any layer: the whole stack of that site is kept."""
  sites = (model_sites(model.cfg, opt_in=False) if names is None
           else tuple(dict.fromkeys(parse_hook_name(n)[0] for n in names)))
  out = model.forward(np.atleast_2d(np.asarray(tokens, np.int32)), mask, capture=sites)
  return out.logits, ActivationCache(model, out.captures, out.residual, out.logits)
