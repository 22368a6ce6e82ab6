"""Evaluate a model, or every checkpoint of a run, on a facts dataset.

usage: factflip eval --model=DIR --facts=PATH --out=DIR
[--metrics=qa,counterfact,rwku,mia,preference --step=N --k_shot=K]

Scores the model on the items of any `load_facts` dataset each metric applies to
(factflip/evals/run.py defines them): preference (ΔLL), qa (closed-book EM / F1 /
abstention), counterfact (ROME's ES PS NS S and fluency), rwku (ROUGE-L recall per
level), mia (RWKU's LOSS / zlib / Min-K% / Min-K%++ and AUC). --model may be a
training workdir: every checkpoint is evaluated in series (or only --step). Writes
<metric>.csv and summary.json into --out, replacing it whole.

  factflip eval --model=/tmp/run --facts=RWKU/Target --metrics=rwku,mia \\
      --out=/tmp/eval
"""

from __future__ import annotations

from factflip.cli.flags import CACHE, FLAGS

READS = {"model": "An HF or factflip model directory, or a training workdir.",
         "facts": "The dataset file or folder (any load_facts format; an RWKU Target folder "
                  "for rwku and mia).",
         "out": "The directory written (replaced whole).",
         "metrics": "Which metrics: preference, qa, counterfact, rwku, mia.",
         "step": "With a training workdir: only this checkpoint (-1 = the latest).",
         "k_shot": "QA: exemplars per question from the dataset's dev split.",
         "batch_size": "Rows per compiled batch.",
         "seed": "QA: the seed of the exemplar draw.", **CACHE}
REQUIRED = ("model", "facts", "out")


def main() -> None:
  from factflip.evals.run import evaluate
  head = evaluate(FLAGS.model, FLAGS.facts, FLAGS.metrics, FLAGS.out,
                  step=FLAGS.step if FLAGS["step"].present else None,
                  batch_size=FLAGS.batch_size, k_shot=FLAGS.k_shot, seed=FLAGS.seed)
  for s, per in head["steps"].items():
    for m, summ in per.items():
      flat = {}
      for k, v in summ.items():       # one level of groups (per prompt kind, per MIA score)
        flat.update({f"{k}.{g}": x for g, x in v.items()} if isinstance(v, dict) else {k: v})
      shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in list(flat.items())[:8])
      print(f"step {s} {m}: {shown}")
  print(f"wrote {', '.join(f'{m}.csv' for m in head['metrics'])} and summary.json to "
        f"{FLAGS.out}")
