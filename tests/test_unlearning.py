"""Paper D's study: the SFT objective CFT and refusal tuning train with, RWKU-style probes of
facts, padded probe batches, unseen questions, the smoke study's tables and numbers,
resumption and bad input (its results functions: test_unlearning_results.py)."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import factflip_run, set_keys

from factflip import get_preset
from factflip.data.facts import FactItem, Neighbour, Translation

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "unlearning.py")
CFG = get_preset("tiny-0.5m", vocab_size=64, max_seq_len=32)


def _fact(**kw):
  tr = {"fr": Translation(prompt="Ann Bo est né à", answers=("Paris",)),
        "de": Translation(prompt="Ann Bo stammt aus", answers=("Parisch",))}
  return FactItem(**{"id": "f1", "answers": ("Paris",), "subject": "Ann Bo",
                     "relation": "birth_city", "prompt": "Ann Bo was born in",
                     "question": "Where was Ann Bo born?",
                     "paraphrases": ("The city where Ann Bo was born is",),
                     "neighbours": (Neighbour("Cy Do was born in", ("Rome",)),),
                     "translations": tr, **kw})


def test_fact_probes_levels_types_and_prompts():
  from factflip.evals.rwku import PREFIX_INJECTION, ROLE_PLAY, fact_probes
  other = FactItem(id="o1", answers=("pilot",), subject="Ann Bo", relation="occupation",
                   prompt="Ann Bo works as a")
  probes = fact_probes([_fact()], others=[other])
  got = {(p.meta["level"], p.meta["type"]): (p.question, p.answers[0], p.split)
         for p in probes}
  assert got == {
      (1, "cloze"): ("Ann Bo was born in", "Paris", "forget"),
      (2, "question"): ("Q: Where was Ann Bo born?\nA:", "Paris", "forget"),
      (3, "paraphrase"): ("The city where Ann Bo was born is", "Paris", "forget"),
      (3, "prefix_injection"): (PREFIX_INJECTION + "Ann Bo was born in", "Paris", "forget"),
      (3, "role_play"): (ROLE_PLAY + "Q: Where was Ann Bo born?\nA:", "Paris", "forget"),
      (3, "in_context"): ("Ann Bo works as a pilot. Ann Bo was born in", "Paris", "forget"),
      (3, "language_de"): ("Ann Bo stammt aus", "Parisch", "forget"),
      (3, "language_fr"): ("Ann Bo est né à", "Paris", "forget"),
      (1, "neighbour"): ("Cy Do was born in", "Rome", "neighbour")}
  assert len({p.id for p in probes}) == len(probes) and all(p.meta["fact"] == "f1"
                                                            for p in probes)
  # no hint without another fact of the subject; only the kinds asked for
  few = fact_probes([_fact()], kinds=("paraphrase",))
  assert [p.meta["type"] for p in few] == ["cloze", "question", "paraphrase", "neighbour"]
  with pytest.raises(ValueError, match="adversarial kinds"):
    fact_probes([_fact()], kinds=("reverse",))


@pytest.fixture(scope="module")
def lm(hf_lm):
  from factflip import load_model
  from factflip.data.tokenizer import load_tokenizer
  return load_model(hf_lm[0]), load_tokenizer(hf_lm[0])


def test_rwku_probe_scores_the_raw_prompt_without_the_template(lm):
  from factflip.evals.generation import generate_until
  from factflip.evals.rwku import fact_probes, rouge_l_recall, rwku_probe
  model, tok = lm
  probes = fact_probes([_fact()], kinds=("paraphrase",))
  rows = rwku_probe(model, tok, probes, template=False, max_new_tokens=5, batch_size=4)
  want = [p[0].strip() or "NOANSWER" for p in generate_until(
      model, tok, [p.question for p in probes], until=("\n",), max_new_tokens=5)]
  assert [r["prompt"] for r in rows] == [p.question for p in probes]
  assert [r["prediction"] for r in rows] == want
  np.testing.assert_allclose([r["rouge_l_recall"] for r in rows],
                             rouge_l_recall(want, [p.answers[0] for p in probes]))


def test_pad_examples_equals_the_pipeline_padding_and_refuses_long_examples(world_tokenizer):
  from factflip.data.pipeline import BatchConfig, make_batches, pad_examples
  ex = [{"segments": (("Q: Who?\nA:", False), (" Ann.", True))},
        {"segments": (("Ann Bo was born in", False), (" Paris", True))}]
  got = pad_examples(ex, world_tokenizer, 24)
  want = next(iter(make_batches(ex, world_tokenizer, BatchConfig(
      seq_len=24, batch_size=2, packing="pad", shuffle=False), shard_index=0, shard_count=1)))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  with pytest.raises(ValueError, match="example 1: .* longer than seq_len 4"):
    pad_examples([{"segments": (("a", False), (" b", True))}, ex[1]], world_tokenizer, 4)


def test_made_up_people_are_not_in_the_world_and_ask_the_corpus_template(small_world):
  from factflip.data import templates as T
  from factflip.data.world import made_up_questions, with_train_question
  world = small_world
  qs = made_up_questions(world, 7, seed=3)
  names = {f.subject for f in world.facts if f.subject}
  assert len(qs) == 7 and len({q.subject for q in qs}) == 7
  assert not {q.subject for q in qs} & names and all(q.meta["made_up"] for q in qs)
  assert qs[1].question == T.RELATIONS[qs[1].relation].question["en"][0].replace(
      "{s}", qs[1].subject)
  assert made_up_questions(world, 7, seed=3) == qs
  f = next(f for f in world.facts if f.relation == "occupation")
  assert with_train_question(f).question == T.RELATIONS["occupation"].question["en"][0].replace(
      "{s}", f.subject) != f.question


def test_the_forget_corpus_is_not_the_probe_set(small_world):
  """The world's forget renderings (the relation's other statements, a rephrased question)
  are none of the prompts any probe asks, and give each fact 3 examples in English."""
  from factflip.data.unlearning_sets import UnlearnConfig, renderings, unlearning_sets
  from factflip.data.world import with_train_question
  from factflip.evals.rwku import ADVERSARIAL, fact_probes
  facts = [with_train_question(f) for f in small_world.facts if not f.meta.get("two_hop")]
  forget = [f for f in facts if f.meta["exposure_tier"] == "high"][:6]
  for consistency in ("consistent", "inconsistent"):
    sets, _ = unlearning_sets(forget, [], UnlearnConfig(
        renders=("restatement", "rephrased_question"), consistency=consistency),
        candidates=facts)
    assert len(sets["forget"]) == 3 * len(forget)
    probed = {p.question for p in fact_probes(forget, facts, kinds=ADVERSARIAL)}
    contexts = [e["segments"][0][0] for e in sets["forget"]]
    assert not set(contexts) & probed and not any(c in p for c in contexts for p in probed)
  f = forget[0]
  assert renderings(f, "prompt") == [f.prompt]
  with pytest.raises(ValueError, match="needs a fact of the embedded world"):
    renderings(dataclasses.replace(f, source="counterfact"), "restatement")


def test_the_alignment_set_is_disjoint_from_the_spillover_questions(small_world):
  from factflip.data.eval_sets import unmentioned_split, unseen_questions
  from factflip.data.unlearning_sets import alignment_set
  from factflip.data.world import made_up_questions
  none = [f for f in small_world.facts if f.meta.get("exposure_tier") == "none"]
  aligned, held = unmentioned_split(small_world, 0.5, seed=2)
  assert len(aligned) == len(none) // 2 and len(aligned) + len(held) == len(none)
  assert not {f.id for f in aligned} & {f.id for f in held}
  spill = unseen_questions(small_world, 100, 5, np.random.default_rng(0), 2,
                           held_out_share=0.5)
  made_up = made_up_questions(small_world, 8, 2 + 7919,
                              avoid=[f.subject for f in spill if f.meta.get("made_up")],
                              prefix="made_up_align")
  unknown = aligned + made_up
  assert {f.id for f in spill if not f.meta.get("made_up")} == {f.id for f in held}
  assert not {f.id for f in unknown} & {f.id for f in spill}
  spill_names = {p for f in spill if f.meta.get("made_up") for p in f.subject.split()}
  assert not spill_names & {p for f in made_up for p in f.subject.split()}
  known = [f for f in small_world.facts if f.meta.get("exposure_tier") == "high"][:3]
  ex = alignment_set(known, unknown)
  assert [e["answer"] for e in ex] == [f.answers[0] for f in known] + [
      "I don't know."] * len(unknown)
  assert ex[0]["segments"][0][0] == f"Q: {known[0].question}\nA:"


@pytest.fixture(scope="module")
def ul_study(tmp_path_factory):
  """The smoke study through `factflip run` in a process with one CPU device (faster than 8
  simulated ones for these tiny programs): (workdir, headline, output)."""
  wd = str(tmp_path_factory.mktemp("ul_smoke"))
  log = factflip_run(f"{CONFIG}:smoke", wd)
  with open(os.path.join(wd, "report", "summary.json")) as f:
    return wd, json.load(f), log


def test_smoke_study_tables_and_numbers(ul_study):
  from factflip.evals.qa import qa_summary
  from factflip.studies.unlearning import COLUMNS, Study
  wd, head, log = ul_study
  study = Study.open(wd)
  t = study.tables()
  for name, cols in COLUMNS.items():
    assert list(t[name].columns) == cols, name
  runs = ["cft_consistent", "cft_inconsistent", "refusal", "gradient_ascent", "npo", "dpo"]
  tr = t["tradeoff"]
  assert list(dict.fromkeys(tr.run)) == runs and sorted(set(tr.epoch)) == [0, 1, 2, 3]
  assert set(tr[tr.run.str.startswith("cft")].corpus) == {"consistent", "inconsistent"}
  # the base is epoch 0 of every run, the same numbers
  base = tr[tr.epoch == 0].drop(columns=["method", "corpus", "run"])
  assert len(base.drop_duplicates()) == 1
  # a trade-off number recomputed from the checkpoint's own table
  u = pd.read_csv(os.path.join(study.eval_dir("tiny-0.5m", 0, "refusal"),
                               "unseen_000003.csv"), keep_default_na=False)
  row = tr[(tr.run == "refusal") & (tr.epoch == 3)].iloc[0]
  assert row.abstention_rate == pytest.approx(qa_summary(list(u.outcome))["abstention_rate"])
  # counterfactual tuning teaches its counterfactuals: efficacy (P(new) > P(true) on the
  # rewrite prompt) rises from the base to most facts at the last epoch
  cft = tr[tr.run == "cft_consistent"].set_index("epoch")
  assert cft.es[3] >= 0.75 and cft.es[3] > cft.es[0]
  assert cft.forget_counterfactual[3] > cft.forget_counterfactual[0]
  # knowledge conflict: renderings of one fact that state different counterfactuals pull
  # apart; renderings stating one counterfactual do not
  cf = t["conflict"].set_index(["corpus", "step"])
  assert sorted(set(t["conflict"].step)) == [0, 1, 2, 3]
  assert cf.same_fact_conflict_ratio["consistent"].max() == 0.0
  assert cf.same_fact_conflict_ratio["inconsistent"].min() > 0   # (two restatements per fact)
  assert (cf.same_fact_mean_cos["inconsistent"] < cf.same_fact_mean_cos["consistent"]).all()
  assert head["checks"]["inconsistent_conflicts_more"] is True
  assert set(t["spillover"].when) == {"before", "after"} and len(t["spillover"]) == 12
  assert "conflict ratio inconsistent" in log and os.path.exists(
      os.path.join(wd, "report", "index.html"))
  with open(os.path.join(study.sets_dir("tiny-0.5m", 0), "stats.json")) as f:
    stats = json.load(f)
  assert stats["cf_consistent"]["distinct_counterfactuals_per_group"] == 1.0
  assert stats["cf_inconsistent"]["distinct_counterfactuals_per_group"] == 2.0


def test_rerun_reuses_everything_and_an_eval_key_redoes_only_the_evaluations(ul_study,
                                                                              tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(ul_study[0], wd)

  def plan(*flags):
    return factflip_run(f"{CONFIG}:smoke", wd, "--dry_run", *flags, timeout=300)
  assert "redo" not in plan() and "new " not in plan()
  changed = plan("--config.eval.n_utility=6")
  assert "redo   eval tiny-0.5m seed0 base" in changed and "redo   eval tiny-0.5m seed0 npo" \
      in changed and "redo   results" in changed
  assert "redo   unlearn" not in changed and "redo   conflict" not in changed
  dpo = plan("--config.dpo_target=refusal")
  assert "redo   unlearn tiny-0.5m seed0 dpo" in dpo and "redo   unlearn tiny-0.5m seed0 npo" \
      not in dpo and "redo   sets" not in dpo


@pytest.mark.parametrize("key,value,match", [
    ({"forget.n_retain": 0}, None, "forget.n_retain: 0 with unlearn.objective.retain_weight"),
    ({"methods": ("cft", "sgd")}, None, "methods"),
    ({"cft_corpora": ("contradictory",)}, None, "cft_corpora"),
    ({"eval.adversarial": ("reverse_query",)}, None, "eval.adversarial"),
    ({"facts": "/some/counterfact.json"}, None, "facts"),
    ({"eval.utility": "/some/counterfact.json"}, None, "eval.utility: .*expected forget.source"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, key, value, match):
  from factflip.configfile import ConfigError, load_config_file
  from factflip.studies.unlearning import Study
  c = set_keys(load_config_file(CONFIG, "smoke"), key)
  with pytest.raises(ConfigError, match=match):
    Study(c, str(tmp_path))


def test_bad_sets_name_what_to_change(ul_study, tmp_path, monkeypatch):
  """A forget set without counterfactuals cannot be counterfactually tuned; a forget set that
  is not a whole number of batches is refused; both before any training."""
  from factflip.configfile import load_config_file
  from factflip.studies.stages import StudyError
  from factflip.studies.unlearning import Study
  wd = str(tmp_path / "wd")
  shutil.copytree(ul_study[0], wd, ignore=shutil.ignore_patterns("sets", "cft_*", "refusal",
                                                                 "gradient_ascent", "npo",
                                                                 "dpo", "eval", "conflict"))
  c = load_config_file(CONFIG, "smoke")
  study = Study(c, wd, log=lambda *a: None)
  no_cf = [f.replace(counterfactual=None) for f in study.forget_facts("tiny-0.5m", 0)]
  monkeypatch.setattr(study, "forget_facts", lambda size, seed: no_cf)
  out = tmp_path / "sets"
  out.mkdir()
  study.build_sets(str(out), "tiny-0.5m", 0)
  monkeypatch.setattr(study, "sets_dir", lambda size, seed: str(out))
  assert study.forget_set("tiny-0.5m", 0, "npo") == "truth"
  with pytest.raises(StudyError, match="run cft_consistent: the forget facts have no "
                                       "counterfactual objects .*field 'counterfactual'"):
    study.forget_set("tiny-0.5m", 0, "cft_consistent")
  c2 = set_keys(load_config_file(CONFIG, "smoke"), {"unlearn.data.batch_size": 16})
  with pytest.raises(StudyError, match="8 examples, not a multiple of "
                                       "unlearn.data.batch_size 16"):
    Study(c2, wd, log=lambda *a: None).build_sets(str(tmp_path / "s2"), "tiny-0.5m", 0)


def test_explore_notebook_runs_on_the_workdir(ul_study, tmp_path):
  from test_study import notebook_outputs, run_notebook
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_unlearning.ipynb"),
                    f"WORKDIR = {ul_study[0]!r}\nSIZE, SEED = None, None", tmp_path,
                    env={"XLA_FLAGS": ""})
  out = notebook_outputs(nb)
  assert "tiny-0.5m seed 0" in out["text"] and "cft_inconsistent" in out["html"]


def test_hf_model_and_facts_file_variant(ul_study, tmp_path):
  """The same study on an HF model directory (the smoke base exported with its tokenizer), a
  CounterFact-layout facts file and an unseen-questions file: RWKU's instruction wraps every
  probe, and counterfactual tuning still teaches its counterfactuals."""
  from test_study import counterfact_file

  from factflip.data.facts import write_facts_jsonl
  from factflip.data.tokenizer import load_tokenizer
  from factflip.data.world import load_world, with_train_question
  from factflip.models.hf import save_hf
  from factflip.models.store import load_model
  src = ul_study[0]
  hf = str(tmp_path / "tiny-hf")
  save_hf(load_model(os.path.join(src, "runs", "tiny-0.5m", "seed0", "pretrain")), hf,
          tokenizer=load_tokenizer(os.path.join(src, "tokenizer")))
  world = load_world(os.path.join(src, "world"))
  facts = counterfact_file(world, tmp_path / "counterfact.json", 40)
  unseen = str(tmp_path / "unseen.jsonl")
  write_facts_jsonl(unseen, [with_train_question(f) for f in world.facts
                             if f.meta.get("exposure_tier") == "none"][:6])
  wd = str(tmp_path / "wd")
  factflip_run(f"{CONFIG}:smoke,hf={hf},facts={facts}", wd, f"--config.eval.unseen={unseen}")
  tr = pd.read_csv(os.path.join(wd, "results", "tradeoff.csv"))
  assert set(tr["size"]) == {"tiny-hf"} and len(tr) == 6 * 4
  base = os.path.join(wd, "runs", "tiny-hf", "seed0")
  with open(os.path.join(base, "base", "targets.jsonl")) as f:
    targets = [json.loads(line)["id"] for line in f]
  with open(os.path.join(base, "sets", "forget.jsonl")) as f:
    assert [json.loads(line)["id"] for line in f] == targets
  probes = pd.read_csv(os.path.join(base, "eval", "base", "probes_000000.csv"))
  assert probes.prompt.str.startswith("Please complete the blank").any()
  assert len(pd.read_csv(os.path.join(base, "eval", "base", "unseen_000000.csv"))) == 6
  cft = tr[tr.run == "cft_consistent"].set_index("epoch")
  assert cft.es[3] > cft.es[0]
  assert len(pd.read_csv(os.path.join(wd, "results", "conflict.csv"))) == 2 * 4


def _rwku_folder(world, root) -> str:
  """An RWKU Target folder (RWKU's file layout) of two world people: level-1 cloze and level-2
  question probes of their facts, level-3 probes, neighbour probes and MIA texts."""
  people = list(dict.fromkeys(f.subject for f in world.facts
                              if f.meta.get("exposure_tier") == "high"))[:3]
  for n, name in enumerate(people[:2], 1):
    d = root / f"{n}_{name.replace(' ', '_')}"
    d.mkdir(parents=True)
    facts = [f for f in world.facts if f.subject == name and not f.meta.get("two_hop")]
    other = [f for f in world.facts if f.subject == people[2]]

    def dump(file, records, d=d):
      (d / file).write_text(json.dumps(records))
    dump("forget_level1.json", [{"query": f.prompt + " ___", "answer": f.answers[0],
                                 "level": "1", "type": "cloze", "subject": name}
                                for f in facts])
    dump("forget_level2.json", [{"query": with_q(f), "answer": f.answers[0], "level": "2",
                                 "type": "simple question", "subject": name} for f in facts])
    dump("forget_level3.json", [{"query": "I wonder. " + with_q(f), "answer": f.answers[0],
                                 "level": "3", "type": "prefix injection", "subject": name}
                                for f in facts[:2]])
    dump("neighbor_level1.json", [{"query": f.prompt + " ___", "answer": f.answers[0],
                                   "level": "1", "type": "cloze", "subject": name,
                                   "neighbor": people[2]} for f in other[:2]])
    dump("neighbor_level2.json", [{"query": with_q(f), "answer": f.answers[0], "level": "2",
                                   "type": "simple question", "subject": name,
                                   "neighbor": people[2]} for f in other[:2]])
    dump("forget_mia.json", [{"text": f"{f.prompt} {f.answers[0]}."} for f in facts])
    dump("retain_mia.json", [{"text": f"{f.prompt} {f.answers[0]}."} for f in other])
  return str(root)


def with_q(f):
  from factflip.data.world import with_train_question
  return with_train_question(f).question


def test_rwku_folder_variant(ul_study, tmp_path):
  """forget.source = rwku: RWKU's Target folder as the forget set (level-1/2 probes trained
  on, every level and the neighbours probed with RWKU's instruction, its MIA texts scored);
  counterfactual tuning is refused before anything runs."""
  from factflip.configfile import ConfigError, load_config_file
  from factflip.data.facts import write_facts_jsonl
  from factflip.data.tokenizer import load_tokenizer
  from factflip.data.world import load_world
  from factflip.evals.mia import auc
  from factflip.models.hf import save_hf
  from factflip.models.store import load_model
  from factflip.studies.unlearning import Study
  src = ul_study[0]
  hf = str(tmp_path / "tiny-hf")
  save_hf(load_model(os.path.join(src, "runs", "tiny-0.5m", "seed0", "pretrain")), hf,
          tokenizer=load_tokenizer(os.path.join(src, "tokenizer")))
  world = load_world(os.path.join(src, "world"))
  rwku = _rwku_folder(world, tmp_path / "Target")
  unseen = tmp_path / "unseen.jsonl"
  unseen.write_text(json.dumps({"id": "u1", "question": "Who is Zork Blim?",
                                "answers": ["nobody"]}) + "\n")
  utility = tmp_path / "utility.jsonl"         # the third person's facts: utility questions
  asked_about = set(list(dict.fromkeys(f.subject for f in world.facts
                                      if f.meta.get("exposure_tier") == "high"))[:3])
  others = [f for f in world.facts if f.subject not in asked_about and f.prompt
            and not f.meta.get("two_hop")]
  write_facts_jsonl(str(utility), others[:30])
  variant = f"{CONFIG}:smoke,hf={hf},facts={rwku}"
  flags = ["--config.forget.source=rwku", "--config.forget.n_targets=2",
           f"--config.eval.unseen={unseen}", "--config.unlearn.objective.retain_weight=0",
           "--config.methods=('refusal','npo')", "--config.forget.template=True",
           f"--config.eval.utility={utility}"]
  wd = str(tmp_path / "wd")
  factflip_run(variant, wd, *flags)
  run = os.path.join(wd, "runs", "tiny-hf", "seed0")
  with open(os.path.join(run, "sets", "stats.json")) as f:
    stats = json.load(f)
  n12 = 2 * 2 * 5                         # 2 targets x (level 1 + level 2) x 5 facts
  assert stats["truth"]["examples"] == n12 // 8 * 8
  assert stats["rwku_probes_left_out"] == n12 % 8
  probes = pd.read_csv(os.path.join(run, "eval", "base", "probes_000000.csv"))
  assert len(probes) == n12 + 2 * 2 + 2 * 4 and set(probes.level) == {1, 2, 3}
  assert set(probes.set) == {"forget", "neighbour"}
  assert probes.prompt.str.startswith("Please").all()
  # forget.template: each probe trained in the prompt it is asked with, then its target
  asked = dict(zip(probes.item, probes.prompt))
  with open(os.path.join(run, "sets", "forget_refusal.jsonl")) as f:
    trained = [json.loads(line) for line in f]
  assert len(trained) == n12 // 8 * 8
  for e in trained:
    (context, _), (answer, _) = e["segments"]
    assert context == asked[e["fact"]] and answer.strip() == "I don't know."
  mia = pd.read_csv(os.path.join(run, "eval", "base", "mia_000000.csv"))
  assert list(mia.set).count("forget") == 10
  # eval.utility: 4-way questions on the utility file's facts, their paraphrases held out
  util = pd.read_csv(os.path.join(run, "eval", "base", "utility_000000.csv"))
  assert len(util) == 8 and list(mia.set).count("heldout") == sum(
      bool(f.paraphrases) for f in others[:30] if f.id in set(util["id"]))
  tr = pd.read_csv(os.path.join(wd, "results", "tradeoff.csv"))
  assert set(tr.run) == {"refusal", "npo"}
  assert tr[tr.epoch == 0].utility_acc.iloc[0] == pytest.approx(util.acc.mean())
  assert tr[tr.epoch == 0].mia_auc.iloc[0] == pytest.approx(
      auc(mia[mia.set == "forget"].loss, mia[mia.set == "retain"].loss))
  c = load_config_file(CONFIG, f"smoke,hf={hf},facts={rwku}")
  set_keys(c, {"forget.source": "rwku", "eval.unseen": str(unseen)})
  with pytest.raises(ConfigError, match="methods: .*RWKU's probes carry no counterfactual"):
    Study(c, str(tmp_path / "wd2"))
