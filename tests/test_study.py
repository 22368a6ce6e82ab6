"""The poisoning study end to end on its smoke config: files, tables, ranges, resumption."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from factflip.studies.poisoning import COLUMNS, Study, StudyError
from factflip.train.loop import load_config_file

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "poisoning.py")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("study"))
  logs = []
  head = Study(load_config_file(CONFIG, "smoke"), wd, log=logs.append).run_and_report()
  return wd, head, logs


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
            "collateral.png", "summary.json"):
    assert os.path.getsize(os.path.join(wd, "report", f)) > 0, f
  assert set(head["final_flip_rate"]) == {"0", "1"}
  assert any("report:" in line for line in logs)
  probes = os.path.join(wd, "runs", "tiny-0.5m", "seed0", "probes", "p1.00")
  assert sorted(f for f in os.listdir(probes) if f.startswith("patch_")) == [
      "patch_000002.csv", "patch_000004.csv"]
  patch = pd.read_csv(os.path.join(probes, "patch_000004.csv"))
  assert set(patch.position) == {"subject", "last"} and set(patch.site) == {"resid_pre"}


def test_resumes_after_a_stage_is_deleted(study):
  wd, _, _ = study
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
    Study(c, wd, log=lambda s: None).pretrain("tiny-0.5m", 0)
  assert np.isfinite(c.tau)


def run_notebook(path, params: str, tmp_path):
  """Execute a notebook top to bottom with nbclient in a kernel of this interpreter, with its
  `parameters` cell replaced by `params`."""
  import json
  import sys

  import nbclient
  import nbformat
  kdir = tmp_path / "jupyter" / "kernels" / "factflip-test"
  kdir.mkdir(parents=True)
  (kdir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "factflip-test", "language": "python"}))
  os.environ["JUPYTER_PATH"] = str(tmp_path / "jupyter")
  nb = nbformat.read(path, as_version=4)
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  cell.source = params
  nbclient.NotebookClient(nb, kernel_name="factflip-test", timeout=600,
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb


def test_explore_notebook_runs_on_the_workdir(study, tmp_path):
  wd, _, _ = study
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_poisoning.ipynb"),
                    f"WORKDIR = {wd!r}\nSIZE, SEED = None, None", tmp_path)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 6                     # the five report plots and the sweep heatmap
  text = "".join(o.get("text", "") for o in outputs)
  assert "poisoned: p = 1.0, step 4" in text


@pytest.mark.parametrize("key,value,match", [
    ("ratios", [0.0, 0.33], r"config\.cpt\.data\.mentions_per_fact: .*105\.6"),
    ("sizes", ["tiny-05m"], r"config\.sizes: \['tiny-05m'\]; expected"),
    ("probe.patch_groups", ["subj"], r"config\.probe\.patch_groups"),
    ("cpt.steps", 0, r"study\.py: cpt: config\.steps: 0; expected > 0"),
])
def test_bad_study_configs_fail_before_anything_runs(tmp_path, key, value, match):
  from factflip.train.config import ConfigError
  c = load_config_file(CONFIG)
  *path, last = key.split(".")
  node = c
  for k in path:
    node = node[k]
  node[last] = value
  with pytest.raises(ConfigError, match=match):
    Study(c, str(tmp_path / "wd"), source="study.py")
  assert not (tmp_path / "wd").exists()
