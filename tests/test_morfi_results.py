"""Paper C's results (factflip/studies/morfi/results.py) on small synthetic tables."""

import numpy as np
import pandas as pd

from factflip.studies.morfi.results import COLUMNS, cell_tables, ranked_monotonic


def _latents():
  return pd.DataFrame({"latent": [0, 1, 2, 3], "rho": [0.9, -0.95, 0.2, 0.9],
                       "rho_low": 0.0, "rho_high": 1.0, "mk_p": [0.01, 0.02, 0.5, 0.001],
                       "mk_tau": 0.5, "monotonic": [True, True, False, True],
                       "direction": "up", "alive": True, "rho_epochs": 0.0,
                       "mk_p_epochs": 1.0})


def test_monotonic_latents_rank_by_strength_then_p_then_index():
  assert ranked_monotonic(_latents()).latent.tolist() == [1, 3, 0]


def test_cell_tables_trend_of_the_steered_latents():
  steering = pd.DataFrame({"kind": ["none"], "latent": [-1], "alpha": [0.0], "accuracy": [0.5],
                           "delta_accuracy": [0.0], "recovered": [0.0], "r_k": [np.nan]})
  final = {0.0: np.array([[1.0, 2.0, 0.0, 4.0], [3.0, 2.0, 0.0, 0.0]]),   # [P, d_sae]
           1.0: np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])}
  t = cell_tables({"size": "tiny", "seed": 1}, _latents(), steering, final, top=2)
  trend = t["trend"]
  assert list(trend.columns) == COLUMNS["trend"]
  assert trend.set_index(["unknown_share", "latent"]).mean_activation.to_dict() == {
      (0.0, 1): 2.0, (0.0, 3): 2.0, (1.0, 1): 0.5, (1.0, 3): 1.0}
  assert (t["latents"]["seed"] == 1).all() and list(t["steering"].columns) == COLUMNS["steering"]
