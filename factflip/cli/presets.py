"""The model size ladder with parameter counts.

usage: factflip presets

Prints every model preset (`--config.model.preset=NAME`, `scale=A+B`): family,
parameters, layers, width, heads, KV heads, MLP width.
"""

from __future__ import annotations

READS: dict[str, str] = {}


def main() -> None:
  from factflip.models import get_preset, presets

  print(f"{'preset':<18}{'family':<9}{'params':>16}  L    D     H  G   F")
  for name, n in presets().items():
    c = get_preset(name)
    print(f"{name:<18}{c.family:<9}{n:>16,}  {c.n_layers:<4} {c.d_model:<5} {c.n_heads:<2} "
          f"{c.n_kv_heads:<3}{c.d_ff}")
