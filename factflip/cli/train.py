"""Train (or resume) one run; multi-host: see launch/README.md.

usage: factflip train --config=configs/pretrain_tiny.py[:variant] --workdir=DIR
[--config.KEY=VALUE]

Pretraining, continual pretraining, SFT or unlearning as its config says
(factflip/train/config.py lists every key). Checkpoints, metrics.jsonl and
config.json go to --workdir; the same command again resumes from the latest
checkpoint, SIGTERM saves one and stops. Started on every host of a pod or SLURM job
it trains on the global mesh (launch/).

  factflip train --config=configs/pretrain_tiny.py:smoke --workdir=/tmp/run \\
      --config.steps=100 --config.optim.lr=3e-4
"""

from __future__ import annotations

from factflip.cli.flags import CACHE, FLAGS, MULTIHOST, config_source, initialize_distributed

READS = {"config": "The training config, FILE.py[:variant]; override any key with "
                   "--config.KEY=VALUE.",
         "workdir": "The run's directory (checkpoints/, metrics.jsonl, config.json); an "
                    "existing run there is resumed.",
         **MULTIHOST, **CACHE}
REQUIRED = ("config", "workdir")


def main() -> None:
  initialize_distributed()
  from factflip.train.loop import train

  # a ConfigError is reported by cli.main (one error line, exit 2), as for every command
  result = train(FLAGS.config, FLAGS.workdir, source=config_source())
  if result.preempted:
    print(f"stopped by SIGTERM at step {result.step} (checkpoint saved); run the same command "
          "again to resume")
