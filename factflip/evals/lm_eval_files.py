"""`factflip eval`'s results in lm-evaluation-harness's files, so lm-eval's tooling (its results
tables, hub uploaders, notebooks that glob `results_*.json`) reads our evaluations.

Owns: `write_lm_eval` (per model or checkpoint, `<out>/<model>/results_<date>.json` with
lm-eval's keys — results, group_subtasks, configs, versions, n-shot, higher_is_better,
n-samples, config, date — and `samples_<task>_<date>.jsonl`, one line per row of the metric's
table) and `task_name`.
Must not: compute a metric (`evals.run` and the metric modules do) or import lm-eval.

Each factflip metric is a task named `factflip_<metric>`; its summary's numbers are the task's
metrics, nested keys joined by "/" (e.g. "prompt/accuracy"), each under lm-eval's
"<metric>,<filter>" key with filter "none" and a "<metric>_stderr,none" of "N/A" (our summaries
carry no standard errors). A sample line holds the row (`doc`), its prediction as `resps` /
`filtered_resps` where the row has one, its numeric fields, and lm-eval's sha256 hashes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from factflip.fileio import atomic_path, write_json

FILTER = "none"
# what a larger value means, by the last part of a metric's name
HIGHER_IS_BETTER = {"accuracy": True, "em": True, "f1": True, "dll_positive": True,
                    "mean_dll": True, "right": True, "wrong": False, "fluency": True,
                    "ES": True, "PS": True, "NS": True, "S": True}


def task_name(metric: str) -> str:
  return f"factflip_{metric}"


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flat(v, key))
    elif isinstance(v, bool | int | float):
      out[key] = float(v)
  return out


def _hash(x) -> str:
  return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def sanitized(model: str) -> str:
  """lm-eval's model_name_sanitized: the path with each run of the characters a file name
  cannot hold (quotes, <>:/|\\?*[]) replaced by '__'."""
  return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", model)


def write_lm_eval(out: str, model: str, step: int, summaries: Mapping[str, Mapping[str, Any]],
                  rows: Mapping[str, Sequence[Mapping[str, Any]]], facts: str, k_shot: int,
                  batch_size: int, seconds: float, date_id: str | None = None) -> list[str]:
  """lm-eval's results JSON and samples JSONL for one model (step −1) or checkpoint, under
  `out/<sanitized model>[_step<step>]/`. Returns the paths written."""
  date_id = date_id or datetime.datetime.now().isoformat().replace(":", "-")
  name = sanitized(os.path.abspath(model)) + (f"_step{step}" if step >= 0 else "")
  d = os.path.join(out, name)
  os.makedirs(d, exist_ok=True)
  results, configs, versions, n_shot, better, n_samples = {}, {}, {}, {}, {}, {}
  for metric, summary in summaries.items():
    task = task_name(metric)
    flat = _flat(summary)
    results[task] = {"alias": task}
    for key, value in flat.items():
      results[task][f"{key},{FILTER}"] = value
      results[task][f"{key}_stderr,{FILTER}"] = "N/A"
    configs[task] = {"task": task, "dataset_path": os.path.abspath(facts),
                     "num_fewshot": int(k_shot), "output_type": "generate_until"
                     if metric in ("qa", "rwku") else "loglikelihood",
                     "metric_list": [{"metric": k} for k in flat],
                     "metadata": {"version": 1.0, "factflip_metric": metric}}
    versions[task] = 1.0
    n_shot[task] = int(k_shot)
    better[task] = {k: HIGHER_IS_BETTER[k.rsplit("/", 1)[-1]] for k in flat
                    if k.rsplit("/", 1)[-1] in HIGHER_IS_BETTER}
    n = len(rows.get(metric, ()))
    n_samples[task] = {"original": n, "effective": n}
  payload = {
      "results": results, "groups": {}, "group_subtasks": {t: [] for t in results},
      "configs": configs, "versions": versions, "n-shot": n_shot, "higher_is_better": better,
      "n-samples": n_samples,
      "config": {"model": "factflip", "model_args": f"pretrained={os.path.abspath(model)}"
                 + (f",step={step}" if step >= 0 else ""), "batch_size": batch_size,
                 "batch_sizes": [], "device": None, "use_cache": None, "limit": None,
                 "bootstrap_iters": 0, "gen_kwargs": None},
      "git_hash": None, "date": datetime.datetime.now().timestamp(),
      "model_name": os.path.abspath(model), "model_name_sanitized": name,
      "total_evaluation_time_seconds": str(round(seconds, 3)),
  }
  paths = [os.path.join(d, f"results_{date_id}.json")]
  write_json(paths[0], payload)
  for metric, table in rows.items():
    path = os.path.join(d, f"samples_{task_name(metric)}_{date_id}.jsonl")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      for i, row in enumerate(table):
        doc = dict(row)
        pred = row.get("prediction")
        target = row.get("answer", row.get("true", ""))
        numbers = {k: float(v) for k, v in row.items()
                   if isinstance(v, bool | int | float) and k not in ("step",)}
        line = {"doc_id": i, "doc": doc, "target": str(target), "arguments": {},
                "resps": [[pred]] if pred is not None else [],
                "filtered_resps": [pred] if pred is not None else [], "filter": FILTER,
                "metrics": sorted(numbers), **numbers,
                "doc_hash": _hash(doc), "prompt_hash": _hash(row.get("prompt", "")),
                "target_hash": _hash(str(target))}
        f.write(json.dumps(line, default=str, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths
