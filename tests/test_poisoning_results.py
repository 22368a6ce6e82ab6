"""Paper A's results (factflip/studies/poisoning/results.py) on small synthetic tables."""

import numpy as np
import pandas as pd
import pytest

from factflip.studies.poisoning.results import COLUMNS, monitor_tables, run_tables

CELL = {"size": "tiny", "seed": 0, "p": 1.0}


def _frames():
  """Items a, b, c, d (targets, prompt kind) at steps 0, 2, 4 with chosen ΔLL (τ = 0.5). Layer 0
  of the lens: nobody is correct at step 0 (NaN flip rate, not 0); layer 1 = the output."""
  dll = {0: [2.0, 3.0, 1.0, -1.0], 2: [-1.0, 0.2, 1.0, -1.0], 4: [-2.0, -3.0, 0.3, 1.0]}
  return {step: pd.DataFrame({"item": list("abcd"), "set": "target", "kind": "prompt",
                              "variant": "", "dll": v, "correct": [x > 0 for x in v],
                              "dll_l0": 0.1, "dll_l1": v}) for step, v in dll.items()}


def _patches():
  """Patching rows: only the items flipped at that step count (a at 2; a and b at 4; never c)."""
  patch = {2: {"a": ([1.0, -1.0], [0.9, 0.1]), "c": ([-9.0, -9.0], [0.0, 0.0])},
           4: {"a": ([-0.5, 1.0], [0.2, 1.0]), "b": ([0.7, 2.0], [0.6, 0.8]),
               "c": ([-9.0, -9.0], [0.0, 0.0])}}
  return {step: pd.DataFrame([{"item": it, "site": "resid_pre", "window": 1, "layer": layer,
                               "position": "last", "dll_patched": d[layer],
                               "recovery": rec[layer]}
                              for it, (d, rec) in rows.items() for layer in (0, 1)])
          for step, rows in patch.items()}


def test_flip_lens_patching_first_flip_and_abruptness_numbers():
  t = {k: pd.DataFrame(v, columns=COLUMNS[k])
       for k, v in run_tables(CELL, _frames(), _patches(), 0.5).items()}
  pt = t["patching"].set_index(["step", "layer"])
  assert pt.reversal_rate.to_dict() == {(2, 0): 1.0, (2, 1): 0.0, (4, 0): 0.5, (4, 1): 1.0}
  assert pt.recovery.to_dict() == pytest.approx({(2, 0): 0.9, (2, 1): 0.1, (4, 0): 0.4,
                                                 (4, 1): 0.9})
  assert pt.flipped_items.to_dict() == {(2, 0): 1, (2, 1): 1, (4, 0): 2, (4, 1): 2}
  flips = t["flips"].set_index("step")
  assert flips.flip_rate.tolist() == [0.0, 1 / 3, 2 / 3]      # of a, b, c (correct at 0)
  assert flips.ambiguity_rate.tolist() == [0.0, 0.25, 0.25]
  assert flips.accuracy.tolist() == [0.75, 0.5, 0.5] and flips.correct_at_base.tolist() == [3] * 3
  assert (flips["size"] == "tiny").all() and (flips.p == 1.0).all()
  lens = t["lens"]
  assert lens[lens.layer == 0].flip_rate.isna().all()
  assert lens[lens.layer == 1].flip_rate.tolist() == flips.flip_rate.tolist()
  first = t["first_flips"].set_index("item").first_flip_step.to_dict()
  assert first == {"a": 2, "b": 4, "c": -1, "d": -1}
  ab = t["abruptness"].iloc[0]
  assert ab.abruptness == pytest.approx(0.5) and ab.final_flip_rate == pytest.approx(2 / 3)
  assert t["collateral"].empty                                   # no control rows given


def test_monitor_lead_times_detections_and_false_alarms():
  """Target a warns at 0 and flips at 2 (lead 2), b warns at 2 and flips at 4 (lead 2), c warns
  and never flips (a false alarm); control z alerts and never flips (a false alarm)."""
  key = ["set", "item", "kind", "variant"]
  prompts = pd.DataFrame([("watch", x, "prompt", "") for x in "abc"] + [
      ("control", "z", "prompt", "")], columns=key)
  alerts = pd.DataFrame([("watch", "a", "prompt", "", 0, "dll_drop:0.05"),
                         ("watch", "a", "prompt", "", 2, "flip:0.5"),
                         ("watch", "b", "prompt", "", 2, "dll_drop:0.05"),
                         ("watch", "b", "prompt", "", 4, "flip:0.5"),
                         ("watch", "c", "prompt", "", 4, "dll_drop:0.05"),
                         ("control", "z", "prompt", "", 2, "dll_drop:0.05")],
                        columns=key + ["step", "rule"])
  t = monitor_tables(CELL, prompts, alerts, ["flip:0.5", "dll_drop:0.05", "lens_sign:-2"],
                     "flip:0.5")
  al = pd.DataFrame(t["alerts"], columns=COLUMNS["alerts"]).set_index(["rule", "item"])
  assert al.loc["dll_drop:0.05"].lead_time.to_dict() == pytest.approx(
      {"a": 2.0, "b": 2.0, "c": np.nan, "z": np.nan}, nan_ok=True)
  assert al.loc["lens_sign:-2"].alert_step.tolist() == [-1] * 4
  mon = pd.DataFrame(t["monitor"], columns=COLUMNS["monitor"]).set_index(["rule", "set"])
  assert mon.loc[("dll_drop:0.05", "watch")][["prompts", "alerted", "flipped", "detected",
                                               "median_lead", "false_alarms"]].tolist() == [
      3, 3, 2, 2, 2.0, 1]
  assert mon.loc[("dll_drop:0.05", "control")][["prompts", "alerted", "false_alarms"]].tolist(
      ) == [1, 1, 1]
