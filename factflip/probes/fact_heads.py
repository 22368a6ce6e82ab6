"""Attention-level probes of fact items: which layers and heads write the answer, and whether the
answer position still needs to read the subject (paper A's probe stage, behind study keys).

Owns: `item_prompts` (fact rows → left-padded prompts, subject masks and the first tokens of
the true and counterfactual answers), `attribute_items` (direct logit attribution of
logit(true) − logit(cf) per item, component, layer and head) and `knockout_items` (the
answer position's attention to the subject knocked out in a window of layers, swept over the
layers: Geva et al. 2023's test of where the attribute is read from the subject).
Must not: define the attribution or the knockout (`probes.attribution`, `probes.head_patching`)
or choose items (studies do).

Both read the first answer token at the last prompt position: the logit difference of the
first tokens of the true and counterfactual objects (they must differ; items whose first tokens
coincide are dropped and counted). Tables are column dicts (pandas.DataFrame opens them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from factflip.data.tokenizer import TokenIds
from factflip.evals.requests import answer_ids
from factflip.models.transformer import Transformer
from factflip.probes.attribution import logit_attribution
from factflip.probes.fact_patching import subject_span
from factflip.probes.head_patching import knockout_sweep


def item_prompts(tokenizer, rows: Sequence[dict[str, Any]], max_len: int) -> dict[str, Any]:
  """Rows {item, prompt, true, cf, subject} → tokens / mask / subject [N, T] (left-padded
  prompts, the subject's tokens), answers [N, 2] (the first tokens of true and cf), items [N],
  and `dropped`: the items whose true and cf first tokens coincide or whose subject is not on
  token boundaries of the prompt."""
  enc = TokenIds(tokenizer)
  n_bos = 0 if enc.bos is None else 1
  kept, dropped = [], []
  for i, r in enumerate(rows):
    where = f"row {i} (item {r.get('item', '?')})"
    p_ids, t_ids = answer_ids(enc, r["prompt"], r["true"], f"{where}: field 'true'")
    _, c_ids = answer_ids(enc, r["prompt"], r["cf"], f"{where}: field 'cf'")
    span = subject_span(enc, r["prompt"], r.get("subject", ""))
    if t_ids[0] == c_ids[0] or span is None:
      dropped.append(r.get("item", i))
      continue
    kept.append((r.get("item", i), p_ids, (t_ids[0], c_ids[0]), (span[0] + n_bos,
                                                                 span[1] + n_bos)))
  T = max((len(p) for _, p, _, _ in kept), default=1)
  if T > max_len:
    raise ValueError(f"a prompt is {T} tokens, longer than the model's context of {max_len}")
  n = len(kept)
  tokens, mask, subject = (np.zeros((n, T), np.int32), np.zeros((n, T), bool),
                           np.zeros((n, T), bool))
  for j, (_, p_ids, _, (a, b)) in enumerate(kept):
    pad = T - len(p_ids)
    tokens[j, pad:], mask[j, pad:] = p_ids, True
    subject[j, pad + a:pad + b] = True
  return {"tokens": tokens, "mask": mask, "subject": subject,
          "answers": np.asarray([k[2] for k in kept], np.int32).reshape(n, 2),
          "items": [k[0] for k in kept], "dropped": dropped}


def attribute_items(model: Transformer, tokenizer, rows: Sequence[dict[str, Any]],
                    batch_size: int = 64) -> dict[str, np.ndarray]:
  """Direct logit attribution of logit(true) − logit(cf) (first answer tokens, last prompt
  position) per item: one row per (item, component, layer, head) with columns item,
  component (embed | attn | mlp | head), layer (−1 for embed), head (−1 but for heads), value,
  and total (the item's logit difference; an item's embed + attn + mlp rows sum to it)."""
  b = item_prompts(tokenizer, rows, model.cfg.max_seq_len)
  L, H = model.cfg.n_layers, model.cfg.n_heads
  heads = not model.cfg.post_norms
  cols: dict[str, list] = {k: [] for k in ("item", "component", "layer", "head", "value",
                                          "total")}
  for start in range(0, len(b["items"]), batch_size):
    sl = slice(start, start + batch_size)
    res = logit_attribution(model, b["tokens"][sl], b["answers"][sl], mask=b["mask"][sl],
                            heads=heads)
    for j, item in enumerate(b["items"][sl]):
      parts = [("embed", -1, -1, res["embed"][j])]
      parts += [(c, layer, -1, res[c][j, layer]) for c in ("attn", "mlp") for layer in range(L)]
      if heads:
        parts += [("head", layer, h, res["heads"][j, layer, h]) for layer in range(L)
                  for h in range(H)]
      for comp, layer, h, v in parts:
        for k, x in zip(("item", "component", "layer", "head", "value", "total"),
                        (item, comp, layer, h, float(v), float(res["total"][j]))):
          cols[k].append(x)
  return {k: np.asarray(v, dtype=object if k in ("item", "component") else None)
          for k, v in cols.items()}


def knockout_items(model: Transformer, tokenizer, rows: Sequence[dict[str, Any]],
                   window: int, batch_size: int = 64) -> dict[str, np.ndarray]:
  """The last prompt position's attention to the subject knocked out in a window of `window`
  layers centred on each layer: one row per (item, layer) with columns item, layer, window,
  logp_base and logp_knocked (log p of the true object's first token), relative_change
  (p_knocked / p_base − 1), and the same three for the counterfactual object's first token
  (logp_cf_base, logp_cf_knocked, relative_change_cf)."""
  b = item_prompts(tokenizer, rows, model.cfg.max_seq_len)
  names = ("logp_base", "logp_knocked", "relative_change")
  cf_names = ("logp_cf_base", "logp_cf_knocked", "relative_change_cf")
  cols: dict[str, list] = {k: [] for k in ("item", "layer", "window") + names + cf_names}
  L = model.cfg.n_layers
  for start in range(0, len(b["items"]), batch_size):
    sl = slice(start, start + batch_size)
    res = knockout_sweep(model, b["tokens"][sl], b["subject"][sl], b["answers"][sl],
                         window=window, mask=b["mask"][sl])       # [B, 2]: true, cf
    for j, item in enumerate(b["items"][sl]):
      cols["item"] += [item] * L
      cols["layer"] += list(range(L))
      cols["window"] += [int(window)] * L
      for k, cols_k in enumerate((names, cf_names)):
        cols[cols_k[0]] += [float(res["base"][j, k])] * L
        cols[cols_k[1]] += [float(x) for x in res["logprob"][j, :, k]]
        cols[cols_k[2]] += [float(x) for x in res["relative_change"][j, :, k]]
  return {k: np.asarray(v, dtype=object if k == "item" else None) for k, v in cols.items()}
