"""Patching fact items: does copying the base model's activations into the poisoned model bring
the true answer back? (SCIENCE.md A, "Patching reversal".)

Owns: `patch_items` (a table of patched ΔLL per item, site, window, layer and position group
— subject tokens, the last prompt token, all positions — with the unpatched and base ΔLL
beside it), `subject_span` and the item batch layout. Pairs are tokenised and scored by the one
answer scorer (`evals.requests.answer_ids`, `answer_logprob`), in a left-padded layout.
Must not: define the sweep (`patching.act_patch`) or the flip states (`fact_preference`).

ΔLL under patching is exact for multi-token answers: every item is two teacher-forced rows,
prompt + true answer and prompt + counterfactual, left-padded so both end at the last position;
the patch touches positions of the prompt (or all positions) and the metric sums log p of each
row's answer tokens, so ΔLL = metric(true row) − metric(cf row). Cross-model patching runs the
poisoned model on these tokens with `site` at the patched layers and positions taken from the
base model on the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from factflip.data.tokenizer import TokenIds
from factflip.evals.loglik import answer_logprob
from factflip.evals.requests import answer_ids
from factflip.models import attention
from factflip.models.transformer import Transformer, forward, unembed
from factflip.probes.patching import act_patch
from factflip.sharding import to_host

GROUPS = ("subject", "last", "all")


def subject_span(enc: TokenIds, prompt: str, subject: str) -> tuple[int, int] | None:
  """Token positions [a, b) of `subject` in enc(prompt) (no BOS), or None when the subject is
  not in the prompt or its boundary does not fall on a token boundary."""
  i = prompt.find(subject)
  if i < 0 or not subject:
    return None
  full = enc(prompt)
  before = enc(prompt[:i].rstrip()) if prompt[:i].strip() else ()
  through = enc(prompt[:i + len(subject)])
  if tuple(full[:len(through)]) != tuple(through) or tuple(full[:len(before)]) != tuple(before):
    return None
  return len(before), len(through)


def answer_metric(logits_BxPxV: jax.Array, aux) -> jax.Array:
  """The sweep's metric: Σ log p(answer tokens) per row by the one answer scorer
  (`evals.loglik.answer_logprob`); aux = (target ids [B, P], mask [B, P]) aligned with the
  read positions."""
  return answer_logprob(logits_BxPxV, *aux)[0]


def item_batch(tokenizer, rows: Sequence[dict[str, Any]], max_len: int) -> dict[str, np.ndarray]:
  """Rows {prompt, true, cf, subject} → two left-padded sequences per row (true, cf answers):
  tokens/mask [2N, T], targets/amask [2N, A] for read positions T−1−A .. T−2, group masks
  [3, 2N, T] (subject, last prompt token, all), subject_found [N]."""
  enc = TokenIds(tokenizer)
  n_bos = 0 if enc.bos is None else 1
  seqs, spans = [], []
  for i, r in enumerate(rows):
    span = subject_span(enc, r["prompt"], r.get("subject", ""))
    spans.append(None if span is None else (span[0] + n_bos, span[1] + n_bos))
    for key in ("true", "cf"):
      seqs.append(answer_ids(enc, r["prompt"], r[key],
                             f"row {i} (item {r.get('item', '?')}): field {key!r}"))
  T = max(len(p) + len(a) for p, a in seqs)
  A = max(len(a) for _, a in seqs)
  if T > max_len:
    raise ValueError(f"a prompt + answer is {T} tokens, longer than the model's context of "
                     f"{max_len}")
  n = len(seqs)
  tokens = np.zeros((n, T), np.int32)
  mask = np.zeros((n, T), bool)
  target = np.zeros((n, A), np.int32)
  amask = np.zeros((n, A), np.float32)
  groups = np.zeros((len(GROUPS), n, T), bool)
  for j, (p_ids, a_ids) in enumerate(seqs):
    ids = p_ids + a_ids
    pad = T - len(ids)
    tokens[j, pad:] = ids
    mask[j, pad:] = True
    target[j, A - len(a_ids):] = a_ids
    amask[j, A - len(a_ids):] = 1.0
    span = spans[j // 2]
    if span is not None:
      groups[0, j, pad + span[0]:pad + span[1]] = True
    groups[1, j, pad + len(p_ids) - 1] = True
    groups[2, j, pad:] = True
  return {"tokens": tokens, "mask": mask, "target": target, "amask": amask, "groups": groups,
          "logit_positions": tuple(range(T - 1 - A, T - 1)),
          "subject_found": np.asarray([s is not None for s in spans])}


def _dll(metric_2N: np.ndarray) -> np.ndarray:
  """[2N, ...] metrics of (true, cf) row pairs → ΔLL [N, ...]."""
  m = np.asarray(metric_2N, np.float64)
  return m[0::2] - m[1::2]


@functools.partial(jax.jit, static_argnames=("cfg", "logit_positions"))
def _answer_metric(params, cfg, tokens_BxT, mask_BxT, target_BxP, amask_BxP, logit_positions):
  h_BxTxD = forward(params, cfg, tokens_BxT, attention.causal(mask_BxT),
                    return_logits=False).residual
  pos = np.asarray(logit_positions)
  return answer_logprob(unembed(params, cfg, h_BxTxD[:, pos]), target_BxP, amask_BxP)[0]


def _run_metric(model: Transformer, b: dict[str, np.ndarray]) -> np.ndarray:
  return to_host(_answer_metric(model.params(), model.cfg, b["tokens"], b["mask"],
                                   b["target"], b["amask"], b["logit_positions"]))


def patch_items(poisoned: Transformer, base: Transformer, tokenizer,
                rows: Sequence[dict[str, Any]], sites: Sequence[str] = ("resid_pre",),
                windows: Sequence[int] = (1,), groups: Sequence[str] = GROUPS,
                layers: Sequence[int] | None = None, chunk: int | None = 2048,
                devices=None) -> dict[str, np.ndarray]:
  """The patching table: one row per (item row, site, window, layer, group) with columns item,
  site, window, layer, position (group name), dll_patched, dll_poisoned, dll_base, recovery
  ((patched − poisoned) / (base − poisoned), NaN when equal) and subject_found. `rows` are
  dicts {item, prompt, true, cf, subject} (e.g. `prompt_rows` plus the item's subject).
  devices: the devices the sweep's batch is split over (`act_patch`; default all local
  devices that divide it; a multi-host study passes every process's)."""
  bad = [g for g in groups if g not in GROUPS]
  if bad:
    raise ValueError(f"unknown position groups {bad}; expected some of {GROUPS}")
  if not rows:
    raise ValueError("no rows to patch")
  b = item_batch(tokenizer, rows, poisoned.cfg.max_seq_len)
  cells = b["groups"][[GROUPS.index(g) for g in groups]]
  dll_poisoned = _dll(_run_metric(poisoned, b))
  dll_base = _dll(_run_metric(base, b))
  layers = list(range(poisoned.cfg.n_layers)) if layers is None else list(layers)
  out: dict[str, list] = {k: [] for k in ("item", "site", "window", "layer", "position",
                                          "dll_patched", "dll_poisoned", "dll_base",
                                          "subject_found")}
  aux = (jnp.asarray(b["target"]), jnp.asarray(b["amask"]))
  for site in sites:
    for window in windows:
      # exact shapes: the same prompts at every checkpoint compile once anyway, and the
      # tables stay those of the exact program (no bucket padding to pay for)
      res = act_patch(poisoned, b["tokens"], b["tokens"], answer_metric, site=site,
                      source_model=base, layers=layers, positions=cells, window=window,
                      mask=b["mask"], logit_positions=b["logit_positions"], metric_aux=aux,
                      chunk=chunk, devices=devices, buckets=False)  # [2N, layers, groups]
      dll = _dll(res)                                           # [N, layers, groups]
      n, n_l, n_g = dll.shape
      out["item"].append(np.repeat([r["item"] for r in rows], n_l * n_g))
      out["site"].append(np.full(n * n_l * n_g, site, dtype=object))
      out["window"].append(np.full(n * n_l * n_g, int(window)))
      out["layer"].append(np.tile(np.repeat(layers, n_g), n))
      out["position"].append(np.tile(np.asarray(groups, dtype=object), n * n_l))
      out["dll_patched"].append(dll.ravel())
      out["dll_poisoned"].append(np.repeat(dll_poisoned, n_l * n_g))
      out["dll_base"].append(np.repeat(dll_base, n_l * n_g))
      out["subject_found"].append(np.repeat(b["subject_found"], n_l * n_g))
  table = {k: np.concatenate(v) for k, v in out.items()}
  denom = table["dll_base"] - table["dll_poisoned"]
  with np.errstate(divide="ignore", invalid="ignore"):
    table["recovery"] = np.where(denom != 0, (table["dll_patched"] - table["dll_poisoned"])
                                 / denom, np.nan)
  return table
