"""Paper A's results (factflip/studies/poisoning/results.py) on small synthetic tables."""

import numpy as np
import pandas as pd
import pytest

from factflip.studies.poisoning.results import (
  COLUMNS,
  agreement_layer,
  belief_recovery_rho,
  head_tables,
  monitor_tables,
  response_flip_rate,
  response_states,
  run_tables,
  stream_row,
)

CELL = {"size": "tiny", "seed": 0, "p": 1.0}


def _frames():
  """Items a, b, c, d (targets, prompt kind) at steps 0, 2, 4 with chosen ΔLL (τ = 0.5). Layer 0
  of the lens: nobody is correct at step 0 (NaN flip rate, not 0); layer 1 = the output."""
  dll = {0: [2.0, 3.0, 1.0, -1.0], 2: [-1.0, 0.2, 1.0, -1.0], 4: [-2.0, -3.0, 0.3, 1.0]}
  return {step: pd.DataFrame({"item": list("abcd"), "set": "target", "kind": "prompt",
                              "variant": "", "dll": v, "correct": [x > 0 for x in v],
                              "greedy_cf": [x < 0 for x in v], "dll_l0": 0.1, "dll_l1": v})
          for step, v in dll.items()}


def _patches():
  """Patching rows: only the items flipped at that step count (a at 2; a and b at 4; never c)."""
  patch = {2: {"a": ([1.0, -1.0], [0.9, 0.1]), "c": ([-9.0, -9.0], [0.0, 0.0])},
           4: {"a": ([-0.5, 1.0], [0.2, 1.0]), "b": ([0.7, 2.0], [0.6, 0.8]),
               "c": ([-9.0, -9.0], [0.0, 0.0])}}
  return {step: pd.DataFrame([{"item": it, "site": "resid_pre", "window": 1, "layer": layer,
                               "position": "last", "dll_patched": d[layer],
                               "dll_base": 2.0, "recovery": rec[layer]}
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
  assert pt.depth.to_dict() == {(2, 0): 0.0, (2, 1): 1.0, (4, 0): 0.0, (4, 1): 1.0}  # L = 1
  assert pt.belief_rho.isna().all()                              # fewer than 3 flipped items
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


def _response_frames():
  """Items a-e (targets, prompt kind) at steps 0 and 4 (τ = 0.5), a 3-block lens (dll_l3 = the
  output). Step 4: ΔLL −2, −0.2, 0.4, −1, 3; greedy answers cf, other, cf, cf, true; at step 0
  every prompt's lens agrees with its output from layer 0, d is ambiguous (0.3) and answers
  something else."""
  base = pd.DataFrame({"dll": [2.0, 3.0, 1.0, 0.3, 2.0], "correct": [1, 1, 1, 0, 1],
                       "greedy_cf": [0, 0, 0, 0, 0]})
  for layer in range(4):
    base[f"dll_l{layer}"] = base.dll
  now = pd.DataFrame({"dll": [-2.0, -0.2, 0.4, -1.0, 3.0], "correct": [0, 0, 0, 0, 1],
                      "greedy_cf": [1, 0, 1, 1, 0]})
  lens = [[-1, -1, 1], [-1, 1, -1], [1, 1, 1], [1, -1, 1], [-1, 1, 1]]   # layers 0-2
  for layer in range(3):
    now[f"dll_l{layer}"] = [float(r[layer]) for r in lens]
  now["dll_l3"] = now.dll
  out = {}
  for step, df in ((0, base), (4, now)):
    df = df.assign(correct=df.correct.astype(bool), greedy_cf=df.greedy_cf.astype(bool))
    df.insert(0, "item", list("abcde"))
    out[step] = df.assign(set="target", kind="prompt", variant="")
  return out


def test_response_states_tau0_split_and_lens_agreement_numbers():
  t = {k: pd.DataFrame(v, columns=COLUMNS[k])
       for k, v in run_tables(CELL, _response_frames(), {}, 0.5).items()}
  f = t["flips"].set_index("step").loc[4]
  assert f.flip_rate == 0.25                   # a of a, b, c, e (correct at step 0)
  assert f.flip_rate_tau0 == 0.6               # a, b, d of all five (ΔLL > 0 at step 0)
  assert f.cf_share_tau0 == 0.6                # a, b, d have ΔLL < 0
  assert f.response_flip_rate == 0.5           # a, c of a, b, c, e (greedy true at step 0)
  assert (f.accuracy, f.response_cf, f.response_other) == (0.2, 0.6, 0.2)
  st = t["states"][t["states"].step == 4].set_index(["dll_state", "response"])["items"]
  assert st[st > 0].to_dict() == {("counterfactual", "counterfactual"): 2,
                                  ("ambiguous", "counterfactual"): 1,
                                  ("ambiguous", "other"): 1, ("correct", "true"): 1}
  assert st.sum() == 5 and len(st) == 9
  ag = t["lens_agreement"].set_index(["step", "group"])
  # step 4: a agrees from layer 3, b 2, c 0, d 3, e 1: median 2 of L = 3; flipped: a alone
  assert ag.loc[(4, "all")][["items", "agree_layer", "n_layers"]].tolist() == [5, 2.0, 3]
  assert ag.loc[(4, "all")].agree_depth == pytest.approx(2 / 3)
  assert ag.loc[(4, "flipped")][["items", "agree_layer", "agree_depth"]].tolist() == [1, 3, 1]
  assert ag.loc[(0, "all")].agree_layer == 0 and np.isnan(ag.loc[(0, "flipped")].agree_layer)


def test_response_agreement_rho_and_stream_rules():
  states = response_states([True, False, False, True], [False, True, False, True])
  assert states.tolist() == ["true", "counterfactual", "other", "true"]   # true wins a tie
  assert response_flip_rate(["true", "true", "other"], ["counterfactual", "true", "true"]) == 0.5
  assert np.isnan(response_flip_rate(["other"], ["counterfactual"]))
  assert agreement_layer([[1, -1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, -1]]).tolist() == [2, 0, 3]
  # ranks (1, 2, 3, 4) against (1, 3, 2, 4): ρ = 1 − 6 · 2 / (4 · 15) = 0.8; NaN pairs dropped
  assert belief_recovery_rho([1, 2, 3, 4, 5], [0.1, 0.3, 0.2, 0.9, np.nan]) == pytest.approx(0.8)
  assert np.isnan(belief_recovery_rho([1, 2], [0.1, 0.2]))
  assert np.isnan(belief_recovery_rho([1, 2, 3], [0.5, 0.5, 0.5]))
  restate = stream_row(CELL, "restate", {"mentions_per_pass": 320, "counterfactual_per_pass": 80,
                                         "replay_per_pass": 320})
  assert {k: restate[k] for k in COLUMNS["streams"][3:]} == {
      "reading": "restate", "counterfactual": 80, "true": 240, "replay": 320,
      "cf_share_of_mentions": 0.25, "cf_share_of_stream": 0.125}
  replay = stream_row(CELL, "replay", {"mentions_per_pass": 360, "counterfactual_per_pass": 360,
                                       "replay_per_pass": 40})
  assert (replay["true"], replay["cf_share_of_mentions"], replay["cf_share_of_stream"]) == (
      0, 1.0, 0.9)


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


def test_head_tables_medians_over_flipped_items_and_change_from_the_base():
  frames = _frames()                                 # a flips at 2; a and b at 4 (τ = 0.5)
  attr = {step: pd.DataFrame([{"item": it, "component": "attn", "layer": 0, "head": -1,
                               "value": v + step, "total": 0.0}
                              for it, v in zip("abcd", (1.0, 2.0, 3.0, 4.0))])
          for step in (0, 4)}
  ko = {4: pd.DataFrame([{"item": it, "layer": 1, "window": 3, "logp_base": 0.0,
                          "logp_knocked": 0.0, "relative_change": r, "relative_change_cf": -r}
                         for it, r in zip("abcd", (-0.8, -0.4, 0.0, 0.2))])}
  t = {k: pd.DataFrame(v, columns=COLUMNS[k])
       for k, v in head_tables(CELL, frames, attr, ko, 0.5).items()}
  a = t["attribution"].set_index(["step", "group"])
  assert a.value.to_dict() == {(0, "all"): 2.5, (4, "all"): 6.5, (4, "flipped"): 5.5}
  assert a.loc[(4, "flipped"), "items"] == 2 and a.loc[(4, "flipped"), "change"] == 4.0
  assert np.isnan(a.loc[(0, "all"), "change"])
  k = t["knockout"].set_index("group")
  assert k.relative_change.to_dict() == pytest.approx({"all": -0.2, "flipped": -0.6})
  assert k.relative_change_cf.to_dict() == pytest.approx({"all": 0.2, "flipped": 0.6})
  assert k.window.tolist() == [3, 3] and k.layer.tolist() == [1, 1]
  assert head_tables(CELL, frames, {}, {}, 0.5) == {"attribution": [], "knockout": []}
