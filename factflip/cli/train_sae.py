"""Train (or resume) an SAE on a frozen model's activations at a hook site.

usage: factflip train-sae --config=configs/sae.py --config.model=DIR --workdir=DIR
[--config.KEY=VALUE]

Streams the model's activations at --config.hook_name (a TransformerLens name, e.g.
blocks.1.hook_resid_post or blocks.0.attn.hook_z) over the config's token data through
a shuffle buffer and trains a standard, TopK or JumpReLU SAE as SAELens trains them
(factflip/sae/train.py lists every key). metrics.jsonl logs the loss terms, explained
variance, L0, the dead-latent share and the CE loss recovered; the SAE is written to
WORKDIR/sae in SAELens's layout. The same command again resumes.

  factflip train-sae --config=configs/sae.py --config.model=/tmp/base \\
      --config.data.world_dir=workdir/default/world --workdir=/tmp/sae
"""

from __future__ import annotations

from factflip.cli.flags import CACHE, FLAGS, config_source

READS = {"config": "The SAE config, FILE.py[:variant]; override any key with "
                   "--config.KEY=VALUE.",
         "workdir": "The run's directory (checkpoints/, metrics.jsonl, sae/); an existing run "
                    "there is resumed.", **CACHE}
REQUIRED = ("config", "workdir")


def main() -> None:
  from factflip.sae.train import train_sae

  result = train_sae(FLAGS.config, FLAGS.workdir, source=config_source())
  last = result.evals[max(result.evals)] if result.evals else {}
  print(f"SAE at {result.sae_path}: explained variance "
        f"{result.metrics.get('explained_variance', float('nan')):.3f}, L0 "
        f"{result.metrics.get('l0', float('nan')):.1f}, CE loss recovered "
        f"{last.get('ce_recovered', float('nan')):.3f}")
