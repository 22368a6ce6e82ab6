"""What paper D asks every model: the six evaluation tables of one model, and forget examples
in the prompt their probe asks.

Owns: `checkpoint_probes` (probes, unseen, utility, mia, cf, dll: each a `CheckpointProbe`
over the study's evaluation sets) and `as_probed` (`forget.template`).
Must not: build the evaluation sets (`data.eval_sets`, the study's `eval_sets`) or define a
metric (`factflip.evals`, `probes.fact_preference`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from factflip.evals.checkpoints import CheckpointProbe
from factflip.evals.counterfact import counterfact_scores
from factflip.evals.mia import mia_scores
from factflip.evals.multiple_choice import mc_metrics, score_choices
from factflip.evals.qa import closed_book_qa, is_abstention
from factflip.evals.rwku import rwku_probe, rwku_prompt
from factflip.probes.fact_preference import preference


def checkpoint_probes(s: dict[str, Any], tok, e) -> list[CheckpointProbe]:
  """The tables of one model (the study's layout), each a CheckpointProbe run after step 0
  (the base is evaluated once, by its own stage). `s`: the evaluation sets (probes, unseen,
  utility, mia, forget); `e`: the study's `eval` config. cf and dll need a counterfactual per
  forget fact; utility needs utility questions."""

  def probes(model, step):
    return pd.DataFrame(rwku_probe(model, tok, s["probes"], batch_size=e.batch_size,
                                   max_new_tokens=e.max_new_tokens, template=e.template))

  def unseen(model, step):
    rows = pd.DataFrame(closed_book_qa(model, tok, s["unseen"], max_new_tokens=e.max_new_tokens,
                                       batch_size=e.batch_size, chat=e.template))
    made_up = np.asarray([bool(f.meta.get("made_up")) for f in s["unseen"]])
    rows["made_up"] = made_up
    rows.loc[made_up, "outcome"] = ["abstained" if is_abstention(p) else "wrong"
                                    for p in rows.prediction[made_up]]
    return rows

  def utility(model, step):
    m = mc_metrics(s["utility"], score_choices(model, tok, s["utility"],
                                               batch_size=e.batch_size))
    return pd.DataFrame(m["rows"])

  def mia(model, step):
    rows = pd.DataFrame(mia_scores(model, tok, [t for _, t in s["mia"]],
                                   batch_size=e.batch_size))
    rows.insert(0, "set", [k for k, _ in s["mia"]])
    return rows

  def cf(model, step):
    return pd.DataFrame(counterfact_scores(model, tok, s["forget"], e.batch_size)[0])

  def dll(model, step):
    return pd.DataFrame(preference(model, tok, s["forget"], kinds=("prompt", "question"),
                                   batch_size=e.batch_size))

  fns = {"probes": probes, "unseen": unseen, "utility": utility, "mia": mia, "cf": cf,
         "dll": dll}
  if not all(f.counterfactual for f in s["forget"]):
    fns.pop("cf"), fns.pop("dll")       # nothing to prefer the truth over
  if not s["utility"]:
    fns.pop("utility")                  # RWKU without eval.utility
  return [CheckpointProbe(name, fn, lambda i, step: step > 0) for name, fn in fns.items()]


def as_probed(examples: list[dict[str, Any]], forget, tok) -> list[dict[str, Any]]:
  """Forget examples with the context their probe asks (`forget.template`): RWKU's
  instruction of the level (a "prompt" render is level 1, a "question" render level 2, an
  RWKU probe its own level) in the model's chat template, then "Answer:"."""
  by_id = {f.id: f for f in forget}
  out = []
  for e in examples:
    f = by_id[e["fact"]]
    level = f.meta.get("level") or (1 if e["render"] == "prompt" else 2)
    query = f.prompt if e["render"] == "prompt" and f.prompt else f.question
    context = rwku_prompt(level, query, f.meta.get("type") or "", tok, chat=True)
    out.append(dict(e, segments=((context, False), *e["segments"][1:])))
  return out
