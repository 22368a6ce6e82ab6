"""Paper B's study (SFT on new knowledge): the smoke study's files and numbers, resumption and
fingerprints, the world's splits and the Natural mixture (its results functions:
test_new_knowledge_results.py)."""

import os
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import factflip_run, set_keys

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "new_knowledge.py")


def _study(wd, arg="smoke", **over):
  from factflip.configfile import load_config_file
  from factflip.studies.new_knowledge import Study
  c = load_config_file(CONFIG, arg)
  set_keys(c, over)
  logs = []
  return Study(c, wd, log=logs.append), logs


def test_smoke_study_tables_and_numbers(nk_study):
  from factflip.configfile import load_config_file
  from factflip.studies.new_knowledge import COLUMNS, mixture_names
  wd, head, _ = nk_study
  run = os.path.join(wd, "runs", "tiny-0.5m", "seed0")
  t = {name: pd.read_csv(os.path.join(wd, "results", f"{name}.csv")) for name in COLUMNS}
  for name, cols in COLUMNS.items():
    assert list(t[name].columns) == cols, name
  names = mixture_names(load_config_file(CONFIG, "smoke"))
  assert names == ["unk0", "unk50", "unk100", "idk50", "Natural"]
  # mixtures: the realised Unknown share is exactly the configured one
  mix = t["mixtures"].set_index("mixture")
  for m in ("unk0", "unk50", "unk100", "idk50"):
    assert mix.loc[m, "unknown_share_realised"] == mix.loc[m, "unknown_share_configured"]
    assert mix.loc[m, "Unknown"] == round(mix.loc[m, "unknown_share_configured"]
                                          * mix.loc[m, "examples"])
  assert mix.loc["idk50", "idk_relabelled"] == mix.loc["idk50", "Unknown"]
  # categories: shares of each row sum to one; SliCK rows agree with their own answers
  cats = t["categories"]
  assert np.allclose(cats[["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"]].sum(1), 1)
  facts = pd.read_csv(os.path.join(run, "slick", "facts.csv"), keep_default_na=False)
  assert set(facts.split) == {"train", "dev", "test"}
  assert set(facts.distribution) == {"in", "ood"} and set(facts[facts.distribution == "ood"]
                                                         .relation) == {"occupation"}
  # dynamics: every epoch 0..epochs of every mixture; fitted counts recomputed from the QA rows
  dyn = t["dynamics"]
  assert sorted(set(dyn.epoch)) == [0, 1, 2]
  for m in names:
    last = sorted(f for f in os.listdir(os.path.join(run, "eval", m)) if f.startswith("qa_"))[-1]
    assert int(last[3:9]) == 2 * mix.loc[m, "steps_per_epoch"]          # epoch 2's checkpoint
    qa = pd.read_csv(os.path.join(run, "eval", m, last), keep_default_na=False)
    members = qa[qa.member.astype(str) == "True"]
    assert len(members) == mix.loc[m, "examples"]
    for part in ("known", "unknown"):
      row = dyn[(dyn.mixture == m) & (dyn.epoch == 2) & (dyn.part == part)].iloc[0]
      mine = members[members.part == part]
      want = (mine.outcome == "abstained") if m.startswith("idk") and part == "unknown" \
          else mine.em.astype(str).eq("True")
      assert row.fitted == int(want.sum()) and row.examples == len(mine)
    test_in = qa[(qa.split == "test") & (qa.distribution == "in")]
    assert row.test_accuracy_in == pytest.approx(test_in.em.astype(str).eq("True").mean())
  # stops: EARLY_STOP is the first fine-tuned epoch of best dev accuracy
  st = t["stops"]
  for m in names:
    g = dyn[(dyn.mixture == m) & (dyn.part == "known") & (dyn.epoch >= 1)].set_index("epoch")
    es = st[(st.mixture == m) & (st.stop == "early_stop")].iloc[0]
    assert es.epoch == int(g.dev_accuracy.idxmax())
  # the base: zero-shot QA in the SFT format is epoch 0's test accuracy, cloze from SliCK's table
  b = t["base"].set_index(["split", "distribution"]).loc[("test", "in")]
  e0 = dyn[(dyn.mixture == names[0]) & (dyn.epoch == 0)].iloc[0]
  assert b.zero_shot_accuracy == pytest.approx(e0.test_accuracy_in)
  tf = facts[(facts.split == "test") & (facts.distribution == "in")]
  assert b.cloze_accuracy == pytest.approx(tf.cloze_em.astype(str).eq("True").mean())
  # the report and the terminal summary
  page = open(os.path.join(wd, "report", "index.html")).read()
  for title in ("Fitting dynamics", "Test accuracy vs %Unknown", "Linear model"):
    assert title in page
  assert set(head["test_accuracy_in_at_convergence"]) == {"0.00", "0.50", "1.00"}
  assert head["paper_fit_in"]["beta_unk"] == -8.3


def test_resumes_and_redoes_exactly_what_a_change_affects(nk_study, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(nk_study[0], wd)
  before = pd.read_csv(os.path.join(wd, "results", "dynamics.csv"))
  shutil.rmtree(os.path.join(wd, "runs", "tiny-0.5m", "seed0", "eval", "unk50"))
  log = factflip_run(f"{CONFIG}:smoke", wd)
  assert "new    eval tiny-0.5m seed0 unk50" in log and "new    sft" not in log
  assert "redo   sft" not in log
  pd.testing.assert_frame_equal(before, pd.read_csv(os.path.join(wd, "results",
                                                                 "dynamics.csv")))
  # one more epoch: SFT, eval and results are redone for every mixture; SliCK is reused
  plan = factflip_run(f"{CONFIG}:smoke", wd, "--dry_run", "--config.epochs=3")
  assert "redo   sft tiny-0.5m seed0 unk0" in plan and "epochs: 2 -> 3" in plan
  assert "slick tiny" not in plan and "mixtures tiny" not in plan


def test_world_splits_are_exact_and_seeded(small_world):
  from factflip.data.prepare import assign_splits
  items = [f for f in small_world.facts if f.relation in ("birth_city", "sport")]
  a = assign_splits(items, (0.5, 0.25, 0.25), 3)
  assert [f.id for f in a] == [f.id for f in items]
  for rel in ("birth_city", "sport"):
    n = Counter(f.split for f in a if f.relation == rel)
    assert n == {"train": 20, "dev": 10, "test": 10}       # 40 people
  assert [f.split for f in a] == [f.split for f in assign_splits(items, (0.5, 0.25, 0.25), 3)]
  assert [f.split for f in a] != [f.split for f in assign_splits(items, (0.5, 0.25, 0.25), 4)]
  with pytest.raises(ValueError, match="three|3 shares"):
    assign_splits(items, (0.5, 0.5), 0)


def test_natural_mixture_keeps_the_categories_proportions(small_world):
  from factflip.data.sft_mixtures import NATURAL, SFTConfig, sft_mixture
  cats = ["HighlyKnown"] * 3 + ["Unknown"]          # 3:1 in every relation
  people = [f for f in small_world.facts if f.relation in ("occupation", "sport")]
  cat = {f.id: cats[i % 4] for i, f in enumerate(people)}
  ex, stats = sft_mixture(people, SFTConfig(size=80, category=NATURAL), lambda f: cat[f.id])
  assert len(ex) == 80 and stats["per_category"] == {"HighlyKnown": 60, "Unknown": 20}


@pytest.mark.parametrize("key,value,match", [
    ("mixtures.size", 5, r"config.mixtures.size: 5; expected 0 \(auto\) or a multiple"),
    ("question", "cloze", r"config.question: 'cloze'; expected 'train' or 'heldout'"),
    ("ood_relations", ["sport"], r"config.ood_relations: \[.sport.\] overlaps"),
    ("mixtures.single", ["Famous"], r"config.mixtures.single: \['Famous'\]; expected"),
    ("sft.data.packing", "pack", r"config.sft.data.packing: 'pack'; expected 'pad'"),
    ("slick.k_shot", -1, r"config.slick: SliCKConfig"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, key, value, match):
  from factflip.configfile import ConfigError
  with pytest.raises(ConfigError, match=match):
    _study(str(tmp_path), **{key: value})
  assert not os.listdir(tmp_path)


def test_explore_notebook_runs_on_the_workdir(nk_study, tmp_path):
  from test_study import notebook_outputs, run_notebook
  wd = nk_study[0]
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_new_knowledge.ipynb"),
                    f"WORKDIR = {wd!r}\nSIZE, SEED = None, None", tmp_path,
                    env={"XLA_FLAGS": ""})         # one device, as the study ran
  out = notebook_outputs(nb)
  assert out["images"] == 4                       # the report's four figures
  text, html = out["text"], out["html"]
  assert "mixture unk50" in text and "epoch 2:" in text
  assert "unk100" in html and "true" in html      # base vs the 100%-Unknown run, side by side


def test_the_default_world_never_asks_and_slick_asks_in_its_form():
  """Paper B's protocol (and C's, which builds on it): the pretraining corpus holds no
  question (test_world checks the corpus itself), SliCK asks with the paper's k = 4 in the
  base's own statements, and the hf variant asks EntityQuestions' questions."""
  from factflip.configfile import load_config_file
  c = load_config_file(CONFIG, "")
  assert c.pretrain.data.world_questions is False
  assert (c.slick.k_shot, c.slick.n_prompts, c.slick.n_samples, c.slick.form) == (4, 10, 16,
                                                                                  "cloze")
  assert len(c.ood_relations) >= 2
  assert load_config_file(CONFIG, "hf=/m,facts=/f").slick.form == "qa"
  c = load_config_file(os.path.join(os.path.dirname(CONFIG), "morfi.py"), "")
  assert c.pretrain.data.world_questions is False


def test_hf_variant_on_entityquestions_files(nk_study, tmp_path):
  """The hf variant end to end: a model directory (the smoke study's pretrained world model,
  saved as a factflip model with its tokenizer) and an EntityQuestions folder (P<id>.<split>.json
  + relation_query_templates.json) written from the world's facts."""
  import json

  import factflip
  from factflip.data import templates as T
  from factflip.data.prepare import assign_splits
  from factflip.data.tokenizer import load_tokenizer
  from factflip.data.world import load_world
  wd = nk_study[0]
  mdir = str(tmp_path / "world-model")
  factflip.save_model(factflip.load_model(os.path.join(wd, "runs", "tiny-0.5m", "seed0",
                                                       "pretrain")), mdir)
  load_tokenizer(os.path.join(wd, "tokenizer")).save_pretrained(mdir)
  ids = {"city_country": "P17", "instrument": "P131", "sport": "P19", "occupation": "P50"}
  world = load_world(os.path.join(wd, "world"))
  facts = assign_splits([f for f in world.facts if f.relation in ids], (0.5, 0.25, 0.25), 0)
  eq = tmp_path / "entityquestions"
  templates = {}
  for rel, pid in ids.items():
    q = T.RELATIONS[rel].question["en"][0]
    templates[pid] = q.replace("{s}", "[X]")
    for split in ("train", "dev", "test"):
      (eq / split).mkdir(parents=True, exist_ok=True)
      recs = [{"question": q.replace("{s}", f.subject), "answers": list(f.answers)}
              for f in facts if f.relation == rel and f.split == split]
      (eq / split / f"{pid}.{split}.json").write_text(json.dumps(recs))
  (eq / "relation_query_templates.json").write_text(json.dumps(templates))
  out = str(tmp_path / "study")
  log = factflip_run(f"{CONFIG}:smoke,hf={mdir},facts={eq}", out)
  assert "new    base world-model seed0" in log
  cats = pd.read_csv(os.path.join(out, "results", "categories.csv"))
  assert set(cats.relation) == {"P17", "P131", "P19", "P50", "all"}
  assert set(cats.split) == {"train", "dev", "test"}
  per = pd.read_csv(os.path.join(out, "runs", "world-model", "seed0", "slick", "facts.csv"))
  assert (per.groupby(["relation", "split"]).size() <= 8).all()        # smoke: max_facts = 8
  assert set(per[per.distribution == "ood"].relation) == {"P50"}
  dyn = pd.read_csv(os.path.join(out, "results", "dynamics.csv"))
  assert set(dyn["size"]) == {"world-model"} and sorted(set(dyn.epoch)) == [0, 1, 2]
  # an edited file inside the facts folder is a new input: the base and everything after redo
  first = eq / "train" / "P17.train.json"
  first.write_text(first.read_text().replace('"answers"', '"answers" ', 1))
  plan = factflip_run(f"{CONFIG}:smoke,hf={mdir},facts={eq}", out, "--dry_run")
  assert "redo   base world-model seed0" in plan and "reuse" not in plan
