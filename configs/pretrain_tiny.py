r"""Pretrain the smallest preset on the embedded fact world (about a minute on a 2-core CPU).

  factflip train --config=configs/pretrain_tiny.py --workdir=workdir/pretrain_tiny
  factflip train --config=configs/pretrain_tiny.py:smoke --workdir=/tmp/smoke   # seconds
  factflip train --config=configs/pretrain_tiny.py --workdir=W --config.steps=2000 \
      --config.model.preset=tiny-2m --config.mesh.fsdp=-1

The world (people, places, 9 relations, 3 languages) and its byte-level BPE tokenizer are built
into WORKDIR/world and WORKDIR/tokenizer on first use. Every key and its meaning:
factflip/train/config.py (`base_config`).

Variants (`--config=configs/pretrain_tiny.py:VARIANT`):
  (none)  tiny-0.5m, 500 steps of 16 x 128 packed tokens, AdamW 3e-3, cosine with warmup.
  smoke   12 steps of 8 x 64 on the same world: what the tests and CI run.
  study   the studies' base: a 100-person world, a checkpoint every 250 steps (the poisoning
          and new-knowledge study configs start their `pretrain` from it).
"""

from factflip.train.config import base_config


def get_config(arg=None):
  c = base_config()
  c.seed = 0
  c.steps = 500
  c.model.preset = "tiny-0.5m"
  c.data.kind = "world"
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.checkpoint.every = 100
  c.log_every = 20
  c.eval_every = 100
  if arg == "smoke":
    c.steps = 12
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.data.eval_batches = 2
    c.optim.warmup_steps = 2
    c.checkpoint.every = 4
    c.log_every = 1
    c.eval_every = 6
  elif arg == "study":
    c.data.world_people = 100
    c.checkpoint.every = 250
    c.log_every = 50
    c.eval_every = 250
  elif arg:
    raise ValueError(f"configs/pretrain_tiny.py: unknown variant {arg!r}; expected '', 'smoke' "
                     "or 'study'")
  return c
