"""Write a training checkpoint as an HF (or factflip) model directory.

usage: factflip export --workdir=DIR [--step=N] --out=DIR [--to=hf|factflip]

Loads the parameters of one checkpoint of a `factflip train` run and writes them, with
the run's model config and tokenizer, as a model directory other tools open.

  factflip export --workdir=/tmp/run --out=/tmp/run-hf
"""

from __future__ import annotations

from factflip.cli.flags import FLAGS

READS = {"workdir": "The training run to read (a `factflip train` --workdir).",
         "step": "The checkpoint step to export (-1 = the latest).",
         "out": "The directory the model is written to.",
         "to": "The format to write."}
REQUIRED = ("workdir", "out")


def main() -> None:
  from factflip import save_hf, save_model
  from factflip.train.checkpoint import load_trained

  model, step = load_trained(FLAGS.workdir, FLAGS.step)
  (save_hf if FLAGS.to == "hf" else save_model)(model, FLAGS.out)
  print(f"wrote step {step} of {FLAGS.workdir} as a {FLAGS.to} model to {FLAGS.out}")
