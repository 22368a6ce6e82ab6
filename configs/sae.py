r"""An SAE on a frozen model's residual stream (factflip/sae/train.py lists every key).

  factflip export --workdir=workdir/default/runs/tiny-0.5m/seed0/pretrain --out=/tmp/base
  factflip train-sae --config=configs/sae.py --config.model=/tmp/base \
      --config.data.world_dir=workdir/default/world --workdir=/tmp/sae

Variants (`--config=configs/sae.py:VARIANT`): (none) a TopK SAE (k 32, 8x expansion) on the
middle layer's resid_post of a tiny world model, trained on the world's corpus; `jumprelu` and
`standard` swap the architecture (SAELens's default coefficients: L0 1.0, bandwidth 0.05; L1
1.0). For an HF model, point data at its text (`--config.data.kind=examples
--config.data.path=FILE.jsonl`) and the hook at its layer.
"""

from factflip.sae.train import base_config


def get_config(arg=None):
  c = base_config()
  c.hook_name = "blocks.2.hook_resid_post"     # the middle of tiny-0.5m's and tiny-2m's stack
  c.steps = 2000
  c.batch_tokens = 1024
  c.data.kind = "world"
  c.data.seq_len, c.data.batch_size = 64, 16
  c.optim.lr = 1e-3
  c.optim.warm_up_steps = 50
  if arg in ("jumprelu", "standard"):
    c.sae.architecture = arg
  elif arg:
    raise ValueError(f"configs/sae.py: unknown variant {arg!r}; expected jumprelu or standard")
  return c
