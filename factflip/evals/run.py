"""`factflip eval`: the evals of one model, or of every checkpoint of a training run in series,
on a facts dataset; a tidy CSV per metric and a summary JSON.

Owns: `METRICS` (name → what it measures and the function that does it) and `evaluate`
(models × metrics through `evals.checkpoints.probe_models`, the driver every study's eval
stage uses too; outputs written atomically).
Must not: define a metric or its summary (the `evals.*` modules do), drive the models itself
or parse command lines (`factflip.cli`).

Metrics (each on the items of the dataset it applies to; definitions in its module):
- preference: ΔLL of true vs counterfactual answers on prompt, paraphrase and question
  prompts (`probes.preference`); accuracy = greedy answer true.
- qa: closed-book QA by greedy answers to each item's question, normalised EM / F1 and
  right / wrong / abstained (`evals.qa`; `k_shot` exemplars from the dev split).
- counterfact: ROME's ES EM PS PM NS NM and S (`evals.counterfact`); fluency of 100-token
  generations from the items' generation prompts when they have them, sampled as ROME's
  `generate_fast` samples them (temperature 1, top-k 5; key from `seed`).
- rwku: ROUGE-L recall of greedy answers to RWKU's forget and neighbour probes per level, and
  RWKU's forget and neighbour scores (`evals.rwku.rwku_summary`).
- mia: LOSS, zlib, Min-K% and Min-K%++ of RWKU's forget and retain MIA texts, and each
  score's means and forget vs retain AUC (`evals.mia.mia_summary`).

Outputs in `out` (replaced whole, so a re-run never mixes two evaluations): <metric>.csv (one
row per item — or per prompt — and model step, `step` = −1 for a model directory),
summary.json ({"model", "facts", "metrics", "steps": {step: {metric: {...}}}}), and
lm_eval/<model>[_step<n>]/ with lm-evaluation-harness's results_<date>.json and
samples_<task>_<date>.jsonl per model step (`evals.lm_eval_files`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factflip import load_model
from factflip.data.loaders import load_facts
from factflip.data.qa_datasets import load_rwku_mia
from factflip.evals import counterfact, mia, qa
from factflip.evals.checkpoints import CheckpointProbe, model_steps, probe_models, table_path
from factflip.evals.generation import generate_until
from factflip.evals.lm_eval_files import write_lm_eval
from factflip.evals.rwku import rwku_probe, rwku_summary
from factflip.fileio import atomic_directory, strict_json, write_csv, write_json
from factflip.probes.fact_preference import preference


@dataclasses.dataclass(frozen=True)
class Metric:
  """`fn(model, tokenizer, items, facts_path, options) -> (rows, summary)`; `applies(item)`
  selects the items it scores."""
  name: str
  doc: str
  fn: Callable[..., tuple[list[dict], dict[str, Any]]]
  applies: Callable[[Any], bool]


def _mean(rows, key):
  v = [r[key] for r in rows]
  return float(np.mean(v)) if v else float("nan")


def _preference(model, tok, items, path, o):
  tab = pd.DataFrame(preference(model, tok, items, kinds=("prompt", "paraphrase", "question"),
                                batch_size=o["batch_size"]))
  tab["correct"] = tab.correct.astype(bool)
  summ = {k: {"rows": len(g), "accuracy": float(g.correct.mean()),
              "dll_positive": float((g.dll > 0).mean()), "mean_dll": float(g.dll.mean())}
          for k, g in tab.groupby("kind")}
  return tab.to_dict("records"), summ


def _qa(model, tok, items, path, o):
  dev = [f for f in items if f.split in ("dev", "train")] if o["k_shot"] else []
  test = [f for f in items if not o["k_shot"] or f.split not in ("dev", "train")]
  rows = qa.closed_book_qa(model, tok, test, dev, k=o["k_shot"], seed=o["seed"],
                           batch_size=o["batch_size"])
  return rows, dict(qa.qa_summary([r["outcome"] for r in rows]), em=_mean(rows, "em"),
                    f1=_mean(rows, "f1"))


def _counterfact(model, tok, items, path, o):
  rows, summ = counterfact.counterfact_scores(model, tok, items, o["batch_size"])
  prompts = [(r, p) for r, f in zip(rows, items) for p in f.meta.get("generation_prompts", ())]
  if prompts:
    import jax
    gens = generate_until(model, tok, [p for _, p in prompts], max_new_tokens=min(
        100, model.cfg.max_seq_len // 2), temperature=1.0, top_k=5,
        key=jax.random.key(o["seed"]), batch_size=o["batch_size"])
    per: dict[str, list[str]] = {}
    for (r, _), (g,) in zip(prompts, gens):
      per.setdefault(r["item"], []).append(g)
    for r in rows:
      r["fluency"] = counterfact.fluency(per[r["item"]]) if r["item"] in per else float("nan")
    summ["fluency"] = float(np.nanmean([r["fluency"] for r in rows]))
  return rows, summ


def _rwku(model, tok, items, path, o):
  rows = rwku_probe(model, tok, items, batch_size=o["batch_size"])
  return rows, rwku_summary([r["set"] for r in rows], [r["level"] for r in rows],
                            [r["rouge_l_recall"] for r in rows])


def _mia(model, tok, items, path, o):
  rows = []
  for target, sets in load_rwku_mia(path).items():
    for split in ("forget", "retain"):
      if sets[split]:
        for r in mia.mia_scores(model, tok, sets[split], batch_size=o["batch_size"]):
          rows.append({"target": target, "set": split, **r})
  df = pd.DataFrame(rows)
  return rows, mia.mia_summary(df["set"], {c: df[c] for c in df
                                           if c not in ("target", "set", "tokens")})


METRICS = {m.name: m for m in (
    Metric("preference", "ΔLL of true vs counterfactual answers", _preference,
           lambda f: f.counterfactual is not None and bool(f.answers)),
    Metric("qa", "closed-book QA: normalised EM, F1, abstention", _qa,
           lambda f: bool(f.question) and bool(f.answers)),
    Metric("counterfact", "ROME's editing scores and fluency", _counterfact,
           lambda f: bool(f.prompt) and f.counterfactual is not None and bool(f.answers)),
    Metric("rwku", "RWKU forget / neighbour ROUGE-L recall", _rwku,
           lambda f: f.source == "rwku"),
    Metric("mia", "RWKU membership inference: LOSS, zlib, Min-K%, Min-K%++, AUC", _mia,
           lambda f: True),
)}


def evaluate(model: str, facts: str, metrics: Sequence[str], out: str, step: int | None = None,
             batch_size: int = 32, k_shot: int = 0, seed: int = 0, dtype: str = "float32",
             log=print) -> dict[str, Any]:
  """Every metric of every model step (see the module docstring); returns summary.json."""
  from factflip.data.tokenizer import model_tokenizer
  bad = [m for m in metrics if m not in METRICS]
  if bad or not metrics:
    raise ValueError(f"metrics {list(metrics)}; expected some of {list(METRICS)}")
  items = list(load_facts(facts)) if any(m != "mia" for m in metrics) else []
  chosen = {m: [f for f in items if METRICS[m].applies(f)] for m in metrics}
  for m in metrics:
    if m != "mia" and not chosen[m]:
      raise ValueError(f"{facts}: no items the {m!r} metric applies to ({METRICS[m].doc})")
  runs = model_steps(model, step)
  tok = model_tokenizer(model)
  opts = {"batch_size": batch_size, "k_shot": k_shot, "seed": seed}
  summary: dict[str, Any] = {"model": os.path.abspath(model), "facts": os.path.abspath(facts),
                             "metrics": list(metrics), "options": opts,
                             "steps": {str(s): {} for s, _ in runs}}

  seconds: dict[int, float] = {}

  def probe(m):
    def fn(model_obj, s):
      t = time.time()
      rows, summary["steps"][str(s)][m] = METRICS[m].fn(model_obj, tok, chosen[m], facts, opts)
      seconds[s] = seconds.get(s, 0.0) + time.time() - t
      log(f"  eval step {s}: {m} ({len(rows)} rows) in {time.time() - t:.1f} s")
      return pd.DataFrame([{"step": s, **r} for r in rows])
    return CheckpointProbe(m, fn)

  with atomic_directory(out) as tmp:
    per_model = os.path.join(tmp, "steps")
    probe_models(runs, per_model, [probe(m) for m in metrics],
                 lambda path: load_model(path, dtype=dtype), log, "eval")
    for m in metrics:
      write_csv(pd.concat([pd.read_csv(table_path(per_model, m, s), dtype=str,
                                       keep_default_na=False) for s, _ in runs],
                          ignore_index=True), os.path.join(tmp, f"{m}.csv"))
    for s, _ in runs:    # lm-evaluation-harness's files, per model step (numbers parsed: the
      #                   CSVs above are concatenated as text, so they keep every value as written)
      write_lm_eval(os.path.join(tmp, "lm_eval"), model, s, strict_json(summary["steps"][str(s)]),
                    {m: pd.read_csv(table_path(per_model, m, s),
                                    keep_default_na=False).to_dict("records")
                     for m in metrics}, facts, k_shot, batch_size, seconds.get(s, 0.0))
    shutil.rmtree(per_model)
    summary = strict_json(summary)
    write_json(os.path.join(tmp, "summary.json"), summary)
  return summary
