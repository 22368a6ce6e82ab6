"""The poisoning study end to end on its smoke config: files, tables, ranges, resumption."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from factflip.configfile import ConfigError, load_config_file
from factflip.studies.poisoning import COLUMNS, Study, StudyError

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "poisoning.py")


@pytest.fixture
def study(smoke_study):
  return smoke_study


def test_files_tables_and_ranges(study):
  wd, head, logs = study
  for name, cols in COLUMNS.items():
    df = pd.read_csv(os.path.join(wd, "results", f"{name}.csv"))
    assert list(df.columns) == cols
  flips = pd.read_csv(os.path.join(wd, "results", "flips.csv"))
  # sizes x p x checkpoints (0, 2, 4) x 5 prompt kinds
  assert len(flips) == 1 * 2 * 3 * 5
  assert set(flips.kind) == {"prompt", "paraphrase", "question", "language", "neighbour"}
  for col in ("flip_rate", "ambiguity_rate", "accuracy"):
    v = flips[col].dropna()
    assert ((v >= 0) & (v <= 1)).all(), col
  # step 0 is the base itself: nothing has flipped yet
  assert (flips[flips.step == 0].flip_rate.fillna(0) == 0).all()
  lens = pd.read_csv(os.path.join(wd, "results", "lens.csv"))
  assert sorted(set(lens.layer)) == list(range(5))        # tiny-0.5m: 4 blocks + the output
  for f in ("index.html", "flips.png", "lens.png", "reversal.png", "generalisation.png",
            "collateral.png", "reversal_depth.png", "responses.png", "summary.json"):
    assert os.path.getsize(os.path.join(wd, "report", f)) > 0, f
  assert set(head["final_flip_rate"]) == {"0", "1"} and head["ratio_reading"] == "restate"
  states = pd.read_csv(os.path.join(wd, "results", "states.csv"))
  per = states.groupby(["p", "step", "set", "kind"])["items"].sum().reset_index()
  merged = per[per.set == "target"].merge(flips, on=["p", "step", "kind"])
  assert (merged["items_x"] == merged["items_y"]).all()     # every prompt in one state pair
  for col in ("response_cf", "response_other", "flip_rate_tau0", "cf_share_tau0"):
    v = flips[col].dropna()
    assert ((v >= 0) & (v <= 1)).all(), col
  assert (flips.accuracy + flips.response_cf + flips.response_other).round(9).eq(1).all()
  streams = pd.read_csv(os.path.join(wd, "results", "streams.csv")).set_index("p")
  assert streams[["counterfactual", "true", "replay"]].to_dict("index") == {
      0.0: {"counterfactual": 0, "true": 32, "replay": 32},     # 4 targets x 8 mentions
      1.0: {"counterfactual": 32, "true": 0, "replay": 32}}
  agree = pd.read_csv(os.path.join(wd, "results", "lens_agreement.csv"))
  assert set(agree.n_layers) == {4} and agree.agree_depth.dropna().between(0, 1).all()
  with open(os.path.join(wd, "report", "index.html")) as f:
    page = f.read()
  assert page.count("<img ") == 11 and "share of the flipped items whose patched" in page
  assert "how many steps before a target prompt" in page
  base = _json(os.path.join(wd, "runs", "tiny-0.5m", "seed0", "pretrain", "base.json"))
  assert {"prompt", "paraphrase", "question", "language", "language:fr", "language:de"} <= set(
      base["accuracy"])
  held = Study.open(wd).heldout()                        # read back through study.json
  assert len(held) == 2 * 1 and set(held.p) == {0.0, 1.0} and (held.loss > 0).all()
  assert any("report:" in line for line in logs)
  probes = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "probes", "p1.00")
  assert sorted(f for f in os.listdir(probes) if f.startswith("patch_")) == [
      "patch_000002.csv", "patch_000004.csv"]
  patch = pd.read_csv(os.path.join(probes, "patch_000004.csv"))
  assert set(patch.position) == {"subject", "last"} and set(patch.site) == {"resid_pre"}


def test_monitor_alerts_match_the_probes_of_the_same_checkpoints(study):
  """The CPT monitor (every 2 steps, like the smoke checkpoints) scores the live parameters:
  each alert's value and reference equal the probe tables' ΔLL (output, or the lens layer)
  of that prompt at that checkpoint and at step 0; alerts.csv and monitor.csv count them."""
  import json
  wd, head, _ = study
  alerts_csv = pd.read_csv(os.path.join(wd, "results", "alerts.csv"), keep_default_na=False)
  monitor = pd.read_csv(os.path.join(wd, "results", "monitor.csv"))
  n_checked = 0
  for p in ("0.00", "1.00"):
    run = os.path.join(wd, "runs", "tiny-0.5m", "seed0")
    with open(os.path.join(run, f"cpt_p{p}", "alerts.jsonl")) as f:
      alerts = [json.loads(x) for x in f]
    probe = {s: pd.read_csv(os.path.join(run, "probes", f"p{p}", f"step_{s:06d}.csv"),
                            keep_default_na=False).astype({"variant": str})
             for s in (0, 2, 4)}
    for a in alerts:
      col = "dll_l3" if a["rule"] == "lens_sign:-2" else "dll"    # boundaries 0..4: -2 = 3
      for step, key in ((a["step"], "value"), (0, "reference")):
        t = probe[step]
        row = t[(t.item == a["item"]) & (t.kind == a["kind"]) & (t.variant == a["variant"])
                & (t.set == ("target" if a["set"] == "watch" else "control"))]
        assert len(row) == 1 and abs(row[col].iloc[0] - a[key]) < 1e-4, (a, key)
        n_checked += 1
    for (rule, set_), g in pd.DataFrame(alerts).groupby(["rule", "set"]):
      m = monitor[(monitor.p == float(p)) & (monitor.rule == rule) & (monitor.set == set_)]
      assert int(m.alerted.iloc[0]) == len(g)
      rows = alerts_csv[(alerts_csv.p == float(p)) & (alerts_csv.rule == rule)
                        & (alerts_csv.set == set_) & (alerts_csv.alert_step >= 0)]
      assert sorted(rows.alert_step) == sorted(g.step)
  assert n_checked > 0
  both = alerts_csv[(alerts_csv.alert_step >= 0) & (alerts_csv.flip_step >= 0)]
  assert np.allclose(both.lead_time, both.flip_step - both.alert_step)
  assert set(head["monitor"]) == {"dll_drop:0.05", "lens_sign:-2", "flip:0.5"}


def test_resumes_after_a_stage_is_deleted(study, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(study[0], wd)
  before = pd.read_csv(os.path.join(wd, "results", "flips.csv"))
  probes = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "probes", "p1.00")
  cpt_done = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "cpt_p1.00", "DONE")
  stamp = os.path.getmtime(cpt_done)
  shutil.rmtree(probes)
  shutil.rmtree(os.path.join(wd, "results"))
  logs = []
  Study(load_config_file(CONFIG, "smoke"), wd, log=logs.append).run_and_report()
  after = pd.read_csv(os.path.join(wd, "results", "flips.csv"))
  pd.testing.assert_frame_equal(before, after)
  assert os.path.getmtime(cpt_done) == stamp                   # training was not redone
  assert sum("probe tiny-0.5m seed 0 p1.00" in line for line in logs) == 3   # re-probed
  assert not any("probe tiny-0.5m seed 0 p0.00" in line for line in logs)


def test_base_gate_stops_a_wrong_config(study):
  wd, _, _ = study
  c = load_config_file(CONFIG, "smoke")
  c.min_base_accuracy = 0.99
  with pytest.raises(StudyError, match=r"knows 0% of the 4 target facts.*pretrain\.steps"):
    Study(c, wd, log=lambda s: None).base_gate("tiny-0.5m", 0)


def run_notebook(path, params: str, tmp_path, env: dict | None = None):
  """Execute a notebook top to bottom with nbclient in a kernel of this interpreter, with its
  `parameters` cell replaced by `params` (`env`: variables set in the kernel's environment)."""
  import json
  import sys

  import nbclient
  import nbformat
  kdir = tmp_path / "jupyter" / "kernels" / "factflip-test"
  kdir.mkdir(parents=True)
  (kdir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "factflip-test", "language": "python", "env": env or {}}))
  os.environ["JUPYTER_PATH"] = str(tmp_path / "jupyter")
  nb = nbformat.read(path, as_version=4)
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  cell.source = params
  nbclient.NotebookClient(nb, kernel_name="factflip-test", timeout=600,
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb


def notebook_outputs(nb) -> dict:
  """An executed notebook's outputs, checked for errors: {"images": n, "text", "html"}."""
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  return {"images": len([o for o in outputs if "image/png" in o.get("data", {})]),
          "text": "".join(o.get("text", "") for o in outputs),
          "html": "".join(o.get("data", {}).get("text/html", "") for o in outputs)}


def test_explore_notebook_runs_on_the_workdir(study, tmp_path):
  wd, _, _ = study
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_poisoning.ipynb"),
                    f"WORKDIR = {wd!r}\nSIZE, SEED = None, None", tmp_path)
  out = notebook_outputs(nb)
  assert out["images"] == 12                  # the eleven report plots and the sweep heatmap
  text = out["text"]
  assert "poisoned: p = 1.0, step 4" in text


@pytest.mark.parametrize("key,value,match", [
    ("ratios", [0.0, 0.33], r"config\.cpt\.data\.mentions_per_fact: .*105\.6"),
    ("sizes", ["tiny-05m"], r"config\.sizes: \['tiny-05m'\]; expected"),
    ("probe.patch_groups", ["subj"], r"config\.probe\.patch_groups"),
    ("cpt.steps", 0, r"study\.py: cpt: config\.steps: 0; expected > 0"),
    ("probe.batchsize", 8, r"config\.probe\.batchsize: unknown key; expected one of .*batch_size"),
    ("taus", 0.5, r"config\.taus: unknown key; expected one of .*tau"),
    ("probe.devices", 0, r"config\.probe\.devices: 0; expected -1 \(all\) or 1\.\.8"),
    ("cpt.monitor.rules", ["dll_drop:1.0"], r"config\.cpt\.monitor\.rules: .*a flip:0\.5 rule"),
    ("cpt.monitor.rules", ["flip:0.5", "lens:2"], r"rule 'lens:2'; expected NAME:ARG"),
    ("ratio_reading", "dose", r"config\.ratio_reading: 'dose'; expected one of"),
    ("ratio_reading", "replay", r"config\.ratios: .* with ratio_reading 'replay': p = 0 would"),
])
def test_bad_study_configs_fail_before_anything_runs(tmp_path, key, value, match):
  c = load_config_file(CONFIG)
  *path, last = key.split(".")
  node = c
  for k in path:
    node = node[k]
  node[last] = value
  with pytest.raises(ConfigError, match=match):
    Study(c, str(tmp_path / "wd"), source="study.py")
  assert not (tmp_path / "wd").exists()


def test_scale_variant_adds_a_size_side_by_side(study, tmp_path):
  """`scale=A+B` on a workdir that holds A: only B is trained; tables and plots hold both."""
  src, _, _ = study
  wd = str(tmp_path / "scaling")
  shutil.copytree(src, wd)
  shutil.rmtree(os.path.join(wd, "results"))
  done = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "cpt_p1.00", "DONE")
  stamp = os.path.getmtime(done)
  head = Study(load_config_file(CONFIG, "smoke,scale=tiny-0.5m+tiny-2m"), wd,
               log=lambda s: None).run_and_report()
  assert os.path.getmtime(done) == stamp
  flips = pd.read_csv(os.path.join(wd, "results", "flips.csv"))
  assert list(dict.fromkeys(flips["size"])) == ["tiny-0.5m", "tiny-2m"]
  assert len(flips) == 2 * 2 * 3 * 5
  before = pd.read_csv(os.path.join(src, "results", "flips.csv"))
  pd.testing.assert_frame_equal(flips[flips["size"] == "tiny-0.5m"].reset_index(drop=True),
                                before)
  lens = pd.read_csv(os.path.join(wd, "results", "lens.csv"))
  assert sorted(set(lens[lens["size"] == "tiny-2m"].layer)) == list(range(7))   # 6 blocks
  assert set(head["final_flip_rate_by_size"]) == {"tiny-0.5m", "tiny-2m"}
  from PIL import Image
  one = Image.open(os.path.join(src, "report", "flips.png")).size
  two = Image.open(os.path.join(wd, "report", "flips.png")).size
  assert two[0] > 1.8 * one[0]                              # sizes side by side
  assert os.path.getsize(os.path.join(wd, "report", "scaling.png")) > 0


def test_replay_reading_trains_on_counterfactual_mentions_and_replay(study, tmp_path):
  """`replay_reading`: p is the counterfactual mentions' share of the stream (9 mentions per
  fact, none true); its runs live beside the restate reading's, which are not touched."""
  c = load_config_file(CONFIG, "replay_reading")
  c.cpt.data.mentions_per_fact = 8
  with pytest.raises(ConfigError, match=r"p = 0\.75 read as 'replay': .*106\.667 replay"):
    Study(c, str(tmp_path / "bad"), source="study.py")
  src, _, _ = study
  wd = str(tmp_path / "replay")
  shutil.copytree(src, wd)
  c = load_config_file(CONFIG, "smoke,replay_reading")
  assert (c.ratio_reading, c.ratios, c.cpt.data.mentions_per_fact) == ("replay", (1.0,), 9)
  c.ratios = (0.5, 1.0)
  head = Study(c, wd, log=lambda m: None).run_and_report()
  assert head["ratio_reading"] == "replay"
  assert head["cf_share_of_stream"] == {"0.5": 0.5, "1": 1.0}
  streams = pd.read_csv(os.path.join(wd, "results", "streams.csv")).set_index("p")
  assert streams[["reading", "counterfactual", "true", "replay"]].to_dict("index") == {
      0.5: {"reading": "replay", "counterfactual": 36, "true": 0, "replay": 36},
      1.0: {"reading": "replay", "counterfactual": 36, "true": 0, "replay": 0}}
  run = os.path.join(wd, "runs", "tiny-0.5m", "seed0")
  cfg = _json(os.path.join(run, "cpt_replay_p0.50", "config.json"))["data"]
  assert (cfg["ratio"], cfg["replay_weight"], cfg["mentions_per_fact"]) == (1.0, 0.5, 9)
  assert _json(os.path.join(run, "cpt_replay_p0.50", "DONE"))["keys"]["ratio_reading"] == "replay"
  assert os.path.isdir(os.path.join(run, "probes", "replay_p1.00"))
  assert os.path.getmtime(os.path.join(run, "cpt_p1.00", "DONE")) == os.path.getmtime(
      os.path.join(src, "runs", "tiny-0.5m", "seed0", "cpt_p1.00", "DONE"))


def test_tuned_lens_option_trains_one_per_base_and_redoes_only_the_probes(study, tmp_path):
  """probe.lens "tuned": a lens stage per base (trained on the replay text), the probes and
  results redone with its columns, CPT reused; the output column is still the model's."""
  src, _, _ = study
  wd = str(tmp_path / "tuned")
  shutil.copytree(src, wd)
  c = load_config_file(CONFIG, "smoke")
  c.probe.lens, c.probe.tuned_lens_steps = "tuned", 3
  redo, head = _plan(c, wd)
  assert head == "plan: 4 reuse, 1 new, 3 redo" and redo == {
      "tuned lens tiny-0.5m seed0": "new", "probe tiny-0.5m seed0 p0.00": "redo",
      "probe tiny-0.5m seed0 p1.00": "redo", "results": "redo"}
  Study(c, wd, log=lambda m: None).run_and_report()
  lens_dir = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "tuned_lens")
  info = _json(os.path.join(lens_dir, "tuned_lens.json"))
  assert info["steps"] == 3 and info["n_layers"] == 4 and info["documents"] > 0
  s = Study.open(wd)
  tuned, logit = (Study.open(d).probe_table("tiny-0.5m", 0, 1.0, 4) for d in (wd, src))
  assert list(tuned.columns) == list(logit.columns)
  pd.testing.assert_series_equal(tuned.dll_l4, logit.dll_l4, atol=1e-5)  # the output
  assert not np.allclose(tuned.dll_l2, logit.dll_l2)          # a lens that moved
  assert s.c.probe.lens == "tuned"


def test_open_fills_keys_added_since_and_refuses_unknown_ones(study, tmp_path):
  import json

  wd, _, _ = study
  old = _json(os.path.join(wd, "study.json"))
  del old["probe"]["devices"], old["facts_limit"]          # a study.json from before them
  (tmp_path / "study.json").write_text(json.dumps(old))
  s = Study.open(str(tmp_path))
  assert s.c.probe.devices == 1 and s.c.facts_limit == 2000 and s.c.cpt.steps == 4
  old["probe"]["frobs"] = 1
  (tmp_path / "study.json").write_text(json.dumps(old))
  with pytest.raises(ConfigError, match=r"study\.json: config\.probe\.frobs: unknown key"):
    Study.open(str(tmp_path))


def test_seeds_variant_runs_a_cell_per_seed_with_its_own_targets(study):
  wd, _, _ = study
  s = Study(load_config_file(CONFIG, "smoke,seeds=0+1"), wd, log=lambda m: None)
  assert list(s.cells()) == [{"size": "tiny-0.5m", "seed": 0}, {"size": "tiny-0.5m", "seed": 1}]
  t0, t1 = ([t.id for t in s.targets("tiny-0.5m", k)] for k in (0, 1))
  assert len(t0) == len(t1) == 4 and t0 != t1
  assert s.run_dir("tiny-0.5m", 1, "cpt_p1.00").endswith(os.path.join("seed1", "cpt_p1.00"))


def counterfact_file(world, path, n: int) -> str:
  """n of the world's person facts in ROME's CounterFact layout (the subject as "{}")."""
  import json
  recs = []
  for f in world.facts:
    if (f.counterfactual is None or f.meta.get("two_hop") or not f.prompt
        or f.subject not in f.prompt):
      continue
    recs.append({
        "case_id": len(recs),
        "requested_rewrite": {"prompt": f.prompt.replace(f.subject, "{}", 1),
                              "relation_id": f.relation, "subject": f.subject,
                              "target_true": {"str": f.answers[0], "id": "t"},
                              "target_new": {"str": f.counterfactual, "id": "n"}},
        "paraphrase_prompts": list(f.paraphrases[:2]),
        "neighborhood_prompts": [nb.prompt for nb in f.neighbours
                                 if nb.answers[:1] == f.answers[:1]][:2],
        "attribute_prompts": [], "generation_prompts": []})
    if len(recs) == n:
      break
  with open(path, "w") as fh:
    json.dump(recs, fh)
  return str(path)


@pytest.fixture(scope="module")
def hf_study(smoke_study, tmp_path_factory):
  """The facts-file variant: the smoke study's base exported as an HF directory (with its
  tokenizer) and 40 world facts in CounterFact's layout."""
  from factflip.data.tokenizer import load_tokenizer
  from factflip.data.world import load_world
  from factflip.models.hf import save_hf
  from factflip.models.store import load_model
  src, _, _ = smoke_study
  root = tmp_path_factory.mktemp("hf")
  hf = str(root / "tiny-hf")
  save_hf(load_model(os.path.join(src, "runs", "tiny-0.5m", "seed0", "pretrain")), hf,
          tokenizer=load_tokenizer(os.path.join(src, "tokenizer")))
  facts = counterfact_file(load_world(os.path.join(src, "world")), root / "counterfact.json", 40)
  wd = str(root / "wd")
  logs = []
  head = Study(load_config_file(CONFIG, f"smoke,hf={hf},facts={facts}"), wd,
               log=logs.append).run_and_report()
  return wd, hf, facts, head, logs


def _jsonl(path):
  import json
  with open(path) as f:
    return [json.loads(line) for line in f]


def _json(path):
  import json
  with open(path) as f:
    return json.load(f)


def test_hf_model_and_facts_file_variant(hf_study):
  wd, hf, _, head, logs = hf_study
  base = os.path.join(wd, "runs", "tiny-hf", "seed0", "base")
  cand = pd.read_csv(os.path.join(base, "candidates.csv"))
  assert len(cand) == 40 and set(cand.kind) == {"prompt"}
  targets = [r["id"] for r in _jsonl(os.path.join(base, "targets.jsonl"))]
  controls = [r["id"] for r in _jsonl(os.path.join(base, "controls.jsonl"))]
  assert len(targets) == len(controls) == 4 and not set(targets) & set(controls)
  known = cand.set_index("item").known
  rest = known.drop(targets + controls)
  assert known[targets].min() >= rest.max()                 # known facts are drawn first
  replay = [r["text"] for r in _jsonl(os.path.join(base, "replay.jsonl"))]
  assert len(replay) == 40 - 8 and all(replay)
  for p, k in ((0.0, 0), (1.0, 32)):                       # 4 targets x 8 mentions
    run = os.path.join(wd, "runs", "tiny-hf", "seed0", f"cpt_p{p:.2f}")
    cfg = _json(os.path.join(run, "config.json"))
    assert cfg["model"]["init_from"] == hf and cfg["data"]["tokenizer_dir"] == hf
    assert cfg["data"]["facts_path"] == os.path.join(base, "targets.jsonl")
    stats = _json(os.path.join(run, "data_stats.json"))
    assert stats["target_ids"] == targets and stats["counterfactual_per_pass"] == k
    assert stats["replay_documents"] == 32
  flips = pd.read_csv(os.path.join(wd, "results", "flips.csv"))
  assert set(flips["size"]) == {"tiny-hf"}
  assert set(flips.kind) == {"prompt", "paraphrase", "neighbour"}
  assert (flips[flips.step == 0].flip_rate.fillna(0) == 0).all()
  assert len(Study.open(wd).heldout()) == 2               # the controls' held-out answer NLL
  patch = pd.read_csv(os.path.join(wd, "results", "patching.csv"))
  assert list(patch.columns) == COLUMNS["patching"]
  assert any("[base tiny-hf seed0] done" in line for line in logs)
  assert set(head["final_flip_rate"]) == {"0", "1"}


@pytest.mark.parametrize("variant,match", [
    ("hf=/x", r"hf=DIR and facts=FILE go together"),
    ("scale=tiny-2m,hf=/x,facts=/y", r"scale= picks presets"),
    ("smok", r"bad variant 'smok'"),
    ("seeds=0+x", r"seeds=0\+x; expected integers joined by '\+'"),
])
def test_bad_variants(variant, match):
  with pytest.raises(ValueError, match=match):
    load_config_file(CONFIG, variant)


def test_facts_study_needs_model_directories(hf_study, tmp_path):
  _, hf, facts, _, _ = hf_study
  c = load_config_file(CONFIG, f"smoke,hf={tmp_path},facts={facts}")
  with pytest.raises(ConfigError, match=r"config\.sizes: .*sizes are models \(an HF directory"):
    Study(c, str(tmp_path / "wd"))
  c = load_config_file(CONFIG, f"smoke,hf={hf},facts={tmp_path / 'none.json'}")
  with pytest.raises(ConfigError, match=r"config\.facts: .*does not exist"):
    Study(c, str(tmp_path / "wd"))


def test_facts_draw_stops_when_the_base_knows_too_few(hf_lm, small_world, tmp_path):
  """A base that knows fewer of the candidates than the draw takes (targets + controls) stops
  the study at its fact draw, before anything is drawn or trained, naming the counts,
  facts_limit and the draw keys (not later at the gate, with unknown facts as targets)."""
  facts = counterfact_file(small_world, tmp_path / "counterfact.json", 40)
  c = load_config_file(CONFIG, f"smoke,hf={hf_lm[0]},facts={facts}")   # a random model
  c.min_base_accuracy = 0.5                  # smoke's 0 accepts a base that knows nothing
  wd = tmp_path / "wd"
  study = Study(c, str(wd), log=lambda m: None)
  with pytest.raises(StudyError) as e:
    study.run()
  base = wd / "runs" / os.path.basename(hf_lm[0]) / "seed0" / "base"
  known = int(pd.read_csv(base / "candidates.csv").known.sum())
  assert known < 8
  message = str(e.value)
  assert f"the base knows {known} of the 40 candidate facts scored" in message
  assert "facts_limit = 60: the first 60 with a counterfactual" in message
  assert "fewer than the 8 the draw needs (cpt.data.n_targets 4 + probe.n_control 4)" in message
  assert "score more candidates (facts_limit; 0 = all)" in message
  assert "draw fewer (cpt.data.n_targets, probe.n_control)" in message
  assert not (base / "targets.jsonl").exists() and not (base / "DONE").exists()
  assert study.source._need_known("m", 0, 40, 8, 4, 4, str(base)) is None   # enough known


def test_hf_notebook_runs_the_study_and_explores(hf_study, tmp_path):
  wd, hf, facts, _, _ = hf_study
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_hf_model.ipynb"),
                    f"HF_DIR, FACTS, WORKDIR = {hf!r}, {facts!r}, {wd!r}\n"
                    f"CONFIG, VARIANT, OVERRIDES = {CONFIG!r}, 'smoke', {{}}\n"
                    "SIZE, SEED = None, None", tmp_path)
  out = notebook_outputs(nb)
  assert out["images"] == 12                  # the eleven report plots and one more
  text = out["text"]
  assert "tiny-hf: knows" in text and "poisoned: p = 1.0, step 4" in text
  assert "     base: " in text and "poisoned: " in text


def _plan(config, wd):
  s = Study(config, wd, log=lambda m: None)
  return {" ".join(line.split()[1:]): line.split()[0]
          for line in s.plan()[1:] if not line.startswith("           ")}, s.plan()[0]


def test_fingerprints_redo_exactly_the_stages_a_change_affects(study, tmp_path):
  """No change: nothing redone; a probe-only key: probes and results; a CPT key: CPT, probes
  and results, pretraining reused; the redo replaces the old outputs."""
  src, _, _ = study
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  c = load_config_file(CONFIG, "smoke")
  assert _plan(c, wd) == ({}, "plan: 7 reuse")
  with pytest.MonkeyPatch.context() as mp:                   # another answer scorer
    from factflip.probes.fact_preference import SCORER_VERSION as v
    mp.setattr("factflip.studies.poisoning.study.SCORER_VERSION", v + 1)
    lines = Study(c, wd, log=lambda m: None).plan()
    redo, head = _plan(c, wd)
  assert f"           scorer: {v} -> {v + 1}" in lines and head == "plan: 4 reuse, 3 redo" and set(
      redo) == {"probe tiny-0.5m seed0 p0.00", "probe tiny-0.5m seed0 p1.00", "results"}
  c.probe.batch_size = 32
  redo, head = _plan(c, wd)
  assert head == "plan: 4 reuse, 3 redo" and set(redo) == {
      "probe tiny-0.5m seed0 p0.00", "probe tiny-0.5m seed0 p1.00", "results"}
  c = load_config_file(CONFIG, "smoke")
  c.cpt.optim.lr = 2e-3
  lines = Study(c, wd, log=lambda m: None).plan()
  assert "           cpt.optim.lr: 0.001 -> 0.002" in lines
  redo, head = _plan(c, wd)
  assert head == "plan: 2 reuse, 5 redo" and "pretrain tiny-0.5m seed0" not in redo
  pre_done = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "pretrain", "DONE")
  stamp = os.path.getmtime(pre_done)
  logs = []
  Study(c, wd, log=logs.append).run_and_report()
  assert os.path.getmtime(pre_done) == stamp                  # pretraining reused
  run = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "cpt_p1.00")
  assert _json(os.path.join(run, "config.json"))["optim"]["lr"] == 2e-3
  assert _json(os.path.join(run, "DONE"))["keys"]["cpt.optim.lr"] == 2e-3
  assert not [f for f in os.listdir(os.path.dirname(run)) if f.endswith((".redo", ".old"))]
  probe_done = _json(os.path.join(wd, "runs", "tiny-0.5m", "seed0", "probes", "p1.00", "DONE"))
  assert probe_done["upstream"][0] == _json(os.path.join(run, "DONE"))["fingerprint"]
  assert _plan(c, wd) == ({}, "plan: 7 reuse")
  assert _json(os.path.join(wd, "study.json"))["cpt"]["optim"]["lr"] == 2e-3


def test_a_stopped_redo_leaves_the_old_outputs_and_resumes(tmp_path):
  from factflip.studies.stages import Stage
  path = str(tmp_path / "stage")

  def write(stage, value, fail=False):
    with stage.build() as out:
      assert out is not None
      seen = sorted(os.listdir(out))
      (tmp_path / "stage.log").write_text(" ".join(seen))
      with open(os.path.join(out, f"part{value}"), "w") as f:
        f.write(str(value))
      if fail:
        raise KeyboardInterrupt
    return seen
  write(Stage("s", path, {"a": 1}), 1)
  assert Stage("s", path, {"a": 1}).status() == ("reuse", [])
  with pytest.raises(KeyboardInterrupt):
    write(Stage("s", path, {"a": 2}), 2, fail=True)
  assert sorted(os.listdir(path)) == ["DONE", "STAGE.json", "part1"]       # old outputs whole
  assert Stage("s", path, {"a": 2}).status() == ("redo", ["a: 1 -> 2"])
  seen = write(Stage("s", path, {"a": 2}), 3)                  # resumes the stopped redo
  assert seen == ["STAGE.json", "part2"]
  assert sorted(os.listdir(path)) == ["DONE", "STAGE.json", "part2", "part3"]
  assert sorted(os.listdir(tmp_path)) == ["stage", "stage.log"]
  assert Stage("s", path, {"a": 2}, ("up",)).status() == ("redo", [
      "inputs (an upstream stage changed)"])


def test_results_name_an_empty_probe_stage(tmp_path):
  c = load_config_file(CONFIG, "smoke")
  s = Study(c, str(tmp_path), log=lambda m: None)
  d = os.path.join(s.run_dir("tiny-0.5m", 0, "probes"), "p0.00")
  os.makedirs(d)
  open(os.path.join(d, "patch_000002.csv"), "w").close()     # no step_<n>.csv
  with pytest.raises(StudyError, match=r"probes/p0\.00: no step_<n>\.csv probe tables"):
    s.results(str(tmp_path / "out"))


def test_memo_is_one_stage_per_call_however_spelled(tmp_path):
  s = Study(load_config_file(CONFIG, "smoke"), str(tmp_path), log=lambda m: None)
  a = s.stage_cpt("tiny-0.5m", 0, 1.0)
  assert s.stage_cpt(size="tiny-0.5m", seed=0, p=1.0) is a
  assert s.stage_cpt("tiny-0.5m", 0, p=0.0) is not a


def test_draw_keys_name_the_study_config(tmp_path):
  """A study's draw roles: n_targets and tier required, n_control and replay_weight 0 when it
  has none; a role or key it lacks is an error naming the study and the role."""
  class Bare(Study):
    name = "bare"
    draw_keys = {"n_targets": "cpt.data.n_targets", "tier": "cpt.data.nope"}
  s = Bare(load_config_file(CONFIG, "smoke"), str(tmp_path), log=lambda m: None)
  assert s.source.draw("n_targets") == s.c.cpt.data.n_targets
  assert s.source.draw("n_control") == 0 and s.source.draw("replay_weight") == 0.0
  assert s.source.draw_key_names("n_targets", "n_control") == ["cpt.data.n_targets"]
  with pytest.raises(StudyError, match=r"'bare': draw_keys\['tier'\] = 'cpt.data.nope' is "
                     "not a key of its config"):
    s.source.draw("tier")
  Bare.draw_keys = {"tier": "cpt.data.target_tier"}
  with pytest.raises(StudyError, match="draw_keys has no 'n_targets'"):
    s.source.draw("n_targets")


def test_patching_honours_probe_devices(study, tmp_path, monkeypatch):
  """probe.devices = 1 keeps the patching sweep on one device although 8 divide its batch;
  -1 gives it every local device."""
  import jax

  from factflip.probes import fact_patching
  src, _, _ = study
  seen, real = [], fact_patching.act_patch
  monkeypatch.setattr(fact_patching, "act_patch",
                      lambda *a, **kw: seen.append(kw["devices"]) or real(*a, **kw))
  s = Study.open(src, log=lambda m: None)
  assert s.c.probe.devices == 1 and len(jax.local_devices()) == 8
  s.build_probe(str(tmp_path / "probe"), "tiny-0.5m", 0, 1.0)
  patched = [f for f in os.listdir(tmp_path / "probe") if f.startswith("patch_")]
  assert patched and len(seen) == len(patched) * len(s.c.probe.patch_sites) * len(
      s.c.probe.patch_windows)
  assert all(d == jax.local_devices()[:1] for d in seen)
  with pytest.raises(AttributeError, match="immutable"):
    s.c.probe.devices = -1                   # stages are memoised from the frozen config
  c = load_config_file(CONFIG, "smoke")
  c.probe.devices = -1
  assert Study(c, src, log=lambda m: None).probe_devices() == jax.local_devices()


def test_a_study_config_names_a_registered_study(tmp_path):
  c = load_config_file(CONFIG, "smoke")
  from factflip.studies.platform import STUDIES, study_record
  from factflip.studies.poisoning import STUDY
  assert study_record(c.study) is STUDY and STUDY.study is Study and "poisoning" in STUDIES
  with pytest.raises(ConfigError, match=r"x\.py: config\.study: 'unlearn'; expected one of "
                     r"\['morfi', 'new_knowledge', 'poisoning', 'suite', 'unlearning'\]"):
    study_record("unlearn", "x.py")
  c.study = "unlearn"
  with pytest.raises(ConfigError, match=r"config\.study: 'unlearn'"):
    Study(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_summary_is_strict_json(study):
  import json
  wd, _, _ = study

  def refuse(token):
    raise ValueError(f"summary.json holds {token}")
  with open(os.path.join(wd, "report", "summary.json")) as f:
    json.load(f, parse_constant=refuse)


def test_attribution_and_knockout_probes(study, tmp_path):
  """probe.attribution and probe.knockout_window redo only the probes and results: every
  target's components sum to its logit difference, the knockout has a row per layer, and the
  report draws the heads figure."""
  src, _, _ = study
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  c = load_config_file(CONFIG, "smoke")
  c.probe.attribution, c.probe.knockout_window = True, 2
  redo, head = _plan(c, wd)
  assert head == "plan: 4 reuse, 3 redo" and "results" in redo
  Study(c, wd, log=lambda m: None).run_and_report()
  d = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "probes", "p1.00")
  steps = sorted(int(f[12:18]) for f in os.listdir(d) if f.startswith("attribution_"))
  assert steps[0] == 0 and len(steps) >= 2                   # the base and patched steps
  a = pd.read_csv(os.path.join(d, f"attribution_{steps[-1]:06d}.csv"))
  parts = a[a.component != "head"].groupby("item").value.sum()
  np.testing.assert_allclose(parts.values, a.groupby("item").total.first()[parts.index].values,
                             atol=1e-3)
  k = pd.read_csv(os.path.join(d, f"knockout_{steps[-1]:06d}.csv"))
  assert sorted(k.layer.unique()) == list(range(4)) and (k.window == 2).all()
  t = pd.read_csv(os.path.join(wd, "results", "knockout.csv"))
  assert set(t.group) >= {"all"} and (t.p.isin([0.0, 1.0])).all()
  assert os.path.exists(os.path.join(wd, "report", "heads.png"))
