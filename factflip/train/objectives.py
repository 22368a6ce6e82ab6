"""Training objectives: token log-probs, per-example sums, and the objectives the studies train
with, each a small interface (`Objective`): named loss terms, their denominators and weights,
and what it needs from a frozen reference model.

Owns: `example_sums` (per packed example sums of `models.transformer.token_logprobs`,
teacher-forced log p(target) per token), `Objective`, the objectives `lm_objective`
(next-token loss over loss_mask: pretraining, CPT, and — with answer-only masks from the
pipeline — SFT and counterfactual tuning), `sft_objective`, `gradient_ascent_objective`,
`npo_objective` and `dpo_objective` (unlearning, each with an optional retain term), and
`total` (an objective's loss and terms on one batch).
Must not: touch optimizers, shardings or files.

An objective's loss is Σ_k weight_k · S_k / C_k over its named terms k, with S_k a
differentiable sum (`terms`) and C_k its denominator (`counts`: tokens or examples, read from the
batch's masks alone). The step sums S_k and C_k over micro-batches before dividing, so gradient
accumulation equals the large-batch step for every term, and logs every term's mean S_k / C_k.
Definitions (per SCIENCE.md D):
- lm:  Σ_tokens −log p(target)·mask / Σ mask (term `nll`).
- sft: the forget set's token mean NLL (its answers relabelled: counterfactual tuning, refusal
  tuning) + retain_weight · (retain token mean NLL) (terms `forget_nll`, `retain_nll`).
- gradient_ascent: −(forget token mean NLL) + retain_weight · (retain token mean NLL) (terms
  `forget_nll` with weight −1, `retain_nll`).
- npo (Zhang et al. 2024): (2/β) · mean_examples log(1 + (π_θ(y|x) / π_ref(y|x))^β) on the
  forget set, log π = the example's summed answer log-prob (term `npo`; π_ref from the frozen
  reference model: `prepare`), + retain_weight · retain NLL.
- dpo (Rafailov et al. 2023): mean over pairs of −log σ(β·[(log π(c) − log π_ref(c)) −
  (log π(r) − log π_ref(r))]) with c the preferred answer (e.g. the counterfactual or "I don't
  know") and r the rejected one (the truth) (term `dpo`), + retain_weight · retain NLL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from factflip.models.config import ModelConfig
from factflip.models.transformer import token_logprobs


def example_sums(values_BxT: jax.Array, mask_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 max_segments: int) -> tuple[jax.Array, jax.Array]:
  """Per packed example (segment s = 1..max_segments of each row): Σ values·mask and Σ mask,
  each [B, max_segments]."""
  onehot_BxTxS = (segment_ids_BxT[..., None] == jnp.arange(1, max_segments + 1)).astype(
      jnp.float32) * mask_BxT[..., None].astype(jnp.float32)
  return (jnp.einsum("bt,bts->bs", values_BxT, onehot_BxTxS), onehot_BxTxS.sum(axis=1))


def lm(params, cfg: ModelConfig, batch: dict):
  """Next-token NLL over loss_mask: (sum, count, {"nll_BxT"}) (held-out evaluation reads it)."""
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  nll_BxT = -token_logprobs(params, cfg, batch)
  return (nll_BxT * mask_BxT).sum(), mask_BxT.sum(), {"nll_BxT": nll_BxT}


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective as data.

  name: for logs and errors. terms(params, cfg, batch, ref) -> {term: differentiable sum}.
  counts(batch) -> {term: its denominator}, from the batch's masks only (so micro-batches' counts
  add up before any division). weights: {term: weight} (the sign included). prepare(ref_params,
  cfg, batch) -> what `terms` reads of the frozen reference model (None: it reads nothing)."""
  name: str
  terms: Callable[..., Mapping[str, jax.Array]]
  counts: Callable[[dict], Mapping[str, jax.Array]]
  weights: Mapping[str, float]
  prepare: Callable[..., Any] | None = None


def total(objective: Objective, params, cfg: ModelConfig, batch: dict, ref=None
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, {term: mean}) of one batch: Σ weight · sum / count, and each term's sum / count."""
  sums, counts = objective.terms(params, cfg, batch, ref), objective.counts(batch)
  means = {k: sums[k] / jnp.maximum(counts[k], 1.0) for k in sums}
  return sum(objective.weights[k] * means[k] for k in means), means


def _tokens(batch: dict) -> jax.Array:
  return batch["loss_mask"].astype(jnp.float32).sum()


def _nll_sum(params, cfg: ModelConfig, batch: dict) -> jax.Array:
  return lm(params, cfg, batch)[0]


def lm_objective() -> Objective:
  return Objective("lm", lambda p, cfg, b, ref: {"nll": _nll_sum(p, cfg, b)},
                   lambda b: {"nll": _tokens(b)}, {"nll": 1.0})


def _with_retain(terms, counts, weights, retain_weight: float, has_retain: bool):
  """An unlearning objective's forget terms plus the retain set's token NLL (when there is a
  retain stream and a weight)."""
  if not (has_retain and retain_weight):
    return terms, counts, weights

  def terms_r(p, cfg, b, ref):
    return {**terms(p, cfg, b, ref), "retain_nll": _nll_sum(p, cfg, b["retain"])}

  def counts_r(b):
    return {**counts(b), "retain_nll": _tokens(b["retain"])}
  return terms_r, counts_r, {**weights, "retain_nll": retain_weight}


def sft_objective(retain_weight: float = 1.0, has_retain: bool = True) -> Objective:
  """Learn the forget set's (relabelled) answers; batch {"forget": ..., "retain": ... (optional)}:
  counterfactual tuning and refusal tuning are this objective on a relabelled forget set."""
  t, c, w = _with_retain(lambda p, cfg, b, ref: {"forget_nll": _nll_sum(p, cfg, b["forget"])},
                         lambda b: {"forget_nll": _tokens(b["forget"])}, {"forget_nll": 1.0},
                         retain_weight, has_retain)
  return Objective("sft", t, c, w)


def gradient_ascent_objective(retain_weight: float = 1.0, has_retain: bool = True) -> Objective:
  """Ascend the forget set's token NLL; batch {"forget": ..., "retain": ... (optional)}."""
  t, c, w = _with_retain(lambda p, cfg, b, ref: {"forget_nll": _nll_sum(p, cfg, b["forget"])},
                         lambda b: {"forget_nll": _tokens(b["forget"])}, {"forget_nll": -1.0},
                         retain_weight, has_retain)
  return Objective("gradient_ascent", t, c, w)


def npo_objective(beta: float = 0.1, retain_weight: float = 1.0, max_segments: int = 1,
                  has_retain: bool = True) -> Objective:
  """NPO on the forget set against the frozen reference model (its summed answer log-prob per
  forget example, computed by `prepare` from the reference parameters), plus the retain term."""
  def ref_logps(ref_params, cfg, b):
    f = b["forget"]
    return example_sums(token_logprobs(ref_params, cfg, f), f["loss_mask"], f["segment_ids"],
                        max_segments)[0]

  def present(f):
    return (example_sums(jnp.zeros(f["loss_mask"].shape, jnp.float32), f["loss_mask"],
                         f["segment_ids"], max_segments)[1] > 0).astype(jnp.float32)

  def terms(p, cfg, b, ref_logp_BxS):
    f = b["forget"]
    logp_BxS, _ = example_sums(token_logprobs(p, cfg, f), f["loss_mask"], f["segment_ids"],
                               max_segments)
    per_example = (2.0 / beta) * jax.nn.softplus(beta * (logp_BxS - ref_logp_BxS))
    return {"npo": (per_example * present(f)).sum()}

  t, c, w = _with_retain(terms, lambda b: {"npo": present(b["forget"]).sum()}, {"npo": 1.0},
                         retain_weight, has_retain)
  return Objective("npo", t, c, w, prepare=ref_logps)


def dpo_objective(beta: float = 0.1, retain_weight: float = 1.0, has_retain: bool = True
                  ) -> Objective:
  """DPO (Rafailov et al. 2023) on pairs (batch {"chosen", "rejected"}, one example per row,
  row i of each the same pair): −log σ(β · [(log π(c) − log π_ref(c)) − (log π(r) −
  log π_ref(r))]) per pair, log π = the summed answer log-prob; the reference's from `prepare`.
  At the reference point every pair costs log 2."""
  def summed(p, cfg, f):
    return example_sums(token_logprobs(p, cfg, f), f["loss_mask"], f["segment_ids"], 1)[0][:, 0]

  def ref_logps(ref_params, cfg, b):
    return summed(ref_params, cfg, b["chosen"]), summed(ref_params, cfg, b["rejected"])

  def present(b):
    return ((b["chosen"]["loss_mask"].sum(-1) > 0)
            & (b["rejected"]["loss_mask"].sum(-1) > 0)).astype(jnp.float32)

  def terms(p, cfg, b, ref):
    margin = beta * ((summed(p, cfg, b["chosen"]) - ref[0])
                     - (summed(p, cfg, b["rejected"]) - ref[1]))
    return {"dpo": (jax.nn.softplus(-margin) * present(b)).sum()}

  t, c, w = _with_retain(terms, lambda b: {"dpo": present(b).sum()}, {"dpo": 1.0},
                         retain_weight, has_retain)
  return Objective("dpo", t, c, w, prepare=ref_logps)


def gradient_ascent(params, cfg: ModelConfig, batch: dict, retain_weight: float = 1.0):
  """The gradient-ascent loss of one batch (`total` of `gradient_ascent_objective`)."""
  obj = gradient_ascent_objective(retain_weight, has_retain="retain" in batch)
  return total(obj, params, cfg, batch)


def npo(params, cfg: ModelConfig, batch: dict, ref_logp_BxS: jax.Array, beta: float = 0.1,
        retain_weight: float = 1.0, max_segments: int = 1):
  """The NPO loss of one batch given the reference log-probs (`total` of `npo_objective`)."""
  obj = npo_objective(beta, retain_weight, max_segments, has_retain="retain" in batch)
  return total(obj, params, cfg, batch, ref_logp_BxS)
