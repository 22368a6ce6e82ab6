"""`factflip eval`: the tables and summary equal the evals layer's functions on the same items;
a training workdir is evaluated at every checkpoint and agrees with the study's own probe rows;
bad metrics and datasets are named."""

import json
import os

import jax
import numpy as np
import pandas as pd
import pytest
from test_loaders import rwku_target

from factflip import cli, load_model, load_tokenizer
from factflip.data.loaders import load_facts
from factflip.data.qa_datasets import load_rwku_mia
from factflip.evals import counterfact as CF
from factflip.evals import mia as MIA
from factflip.evals import qa as QA
from factflip.evals import rwku as RW
from factflip.evals.generation import generate_until
from factflip.evals.run import evaluate


def test_eval_of_a_model_directory_equals_the_layer(hf_lm, tmp_path):
  d, _ = hf_lm
  root = str(tmp_path / "Target")
  rwku_target(root, "1_Stephen_King", "Stephen King", "The Shawshank Redemption")
  facts = tmp_path / "facts.jsonl"
  facts.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "a", "relation": "born", "subject": "Alice", "prompt": "Alice was born in",
       "question": "Where was Alice born?", "answers": ["Paris"], "counterfactual": "Rome",
       "paraphrases": ["Alice's birthplace is"],
       "neighbours": [{"prompt": "Bob was born in", "answers": ["Paris"]}],
       "meta": {"generation_prompts": ["Alice was born in", "Alice lives in"]}},
      {"id": "b", "relation": "lives", "subject": "Bob", "prompt": "Bob lives in",
       "question": "Where does Bob live?", "answers": ["Oslo", "Kristiania"],
       "counterfactual": "Lima"}]))
  out = str(tmp_path / "eval")
  head = evaluate(d, str(facts), ["qa", "counterfact", "preference"], out, log=lambda m: None)
  model, tok = load_model(d), load_tokenizer(d)
  items = list(load_facts(str(facts)))
  qa = pd.read_csv(os.path.join(out, "qa.csv"), keep_default_na=False)
  want = QA.closed_book_qa(model, tok, items)
  assert qa.prediction.tolist() == [r["prediction"] for r in want]
  assert qa.step.tolist() == [-1, -1]
  s = head["steps"]["-1"]
  assert s["qa"]["accuracy"] == QA.qa_summary([r["outcome"] for r in want])["accuracy"]
  _, means = CF.counterfact_scores(model, tok, items)
  for k in ("ES", "PS", "NS"):
    assert s["counterfact"][k] == pytest.approx(means[k])
  gens = generate_until(model, tok, ["Alice was born in", "Alice lives in"], max_new_tokens=24,
                        temperature=1.0, top_k=5, key=jax.random.key(0))   # ROME: top-k 5
  assert s["counterfact"]["fluency"] == pytest.approx(CF.fluency([g for g, in gens]))
  pref = pd.read_csv(os.path.join(out, "preference.csv"), keep_default_na=False)
  assert sorted(pref.kind.unique()) == ["paraphrase", "prompt", "question"]
  assert s["preference"]["prompt"]["rows"] == 2

  out2 = str(tmp_path / "eval2")
  head = evaluate(d, root, ["rwku", "mia"], out2, log=lambda m: None)
  rw = pd.read_csv(os.path.join(out2, "rwku.csv"))
  assert rw.set.tolist() == ["forget", "forget", "neighbour"]
  np.testing.assert_allclose(rw.rouge_l_recall, RW.rouge_l_recall(
      rw.prediction.fillna("").tolist(), rw.answer.tolist()))
  texts = load_rwku_mia(root)["Stephen King"]
  f, r = (MIA.mia_scores(model, tok, texts[k]) for k in ("forget", "retain"))
  auc = head["steps"]["-1"]["mia"]["min_k++_0.2"]["auc"]
  assert auc == MIA.auc([x["min_k++_0.2"] for x in f], [x["min_k++_0.2"] for x in r])
  assert head["steps"]["-1"]["mia"]["loss"]["forget"] == pytest.approx(f[0]["loss"])
  assert sorted(os.listdir(out2)) == ["lm_eval", "mia.csv", "rwku.csv", "summary.json"]

  # lm-evaluation-harness's files, read by its own helpers
  from lm_eval import utils as lm_utils
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(out, "lm_eval")) for f in fs]
  (results,) = lm_utils.get_results_filenames(files)
  samples = lm_utils.get_sample_results_filenames(files)
  assert sorted(lm_utils.get_file_task_name(os.path.basename(f)) for f in samples) == [
      "factflip_counterfact", "factflip_preference", "factflip_qa"]
  res = json.load(open(results))
  for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
              "config"):
    assert key in res, key
  assert res["results"]["factflip_qa"]["accuracy,none"] == s["qa"]["accuracy"]
  assert res["results"]["factflip_preference"]["prompt/accuracy,none"] == (
      s["preference"]["prompt"]["accuracy"])
  assert res["n-samples"]["factflip_qa"] == {"original": 2, "effective": 2}
  assert res["higher_is_better"]["factflip_qa"]["accuracy"] is True
  table = lm_utils.make_table(res)
  assert "factflip_qa" in table and f"{s['qa']['accuracy']:.4f}" in table
  qa_samples = [json.loads(x) for x in open(next(f for f in samples if "_qa_" in f))]
  assert [x["filtered_resps"] for x in qa_samples] == [[p] for p in qa.prediction]
  assert [x["doc"]["item"] for x in qa_samples] == ["a", "b"]


def test_eval_of_a_training_run_is_every_checkpoint(smoke_study, tmp_path, capsys):
  """Every checkpoint of the smoke study's p = 1 CPT run; the preference rows at each step
  equal the study's own probe tables (the same scorer) on the shared items."""
  src, _, _ = smoke_study
  run = os.path.join(src, "runs", "tiny-0.5m", "seed0", "cpt_p1.00")
  probes = os.path.join(src, "runs", "tiny-0.5m", "seed0", "probes", "p1.00")
  targets = os.path.join(tmp_path, "targets.jsonl")
  world = load_facts(os.path.join(src, "world", "facts.jsonl"))
  table = pd.read_csv(os.path.join(probes, "step_000000.csv"), keep_default_na=False)
  ids = set(table[table.set == "target"].item)
  with open(targets, "w") as fh:
    fh.writelines(json.dumps(f.to_dict()) + "\n" for f in world if f.id in ids)
  out = str(tmp_path / "eval")
  with pytest.raises(SystemExit) as e:
    cli.main(["factflip", "eval", f"--model={run}", f"--facts={targets}",
              "--metrics=preference", f"--out={out}"])
  assert e.value.code in (0, None)
  assert "wrote preference.csv and summary.json" in capsys.readouterr().out
  got = pd.read_csv(os.path.join(out, "preference.csv"), keep_default_na=False)
  steps = sorted(int(f[5:11]) for f in os.listdir(probes) if f.startswith("step_"))
  assert sorted(got.step.unique()) == steps
  for step in (steps[0], steps[-1]):
    ref = pd.read_csv(os.path.join(probes, f"step_{step:06d}.csv"), keep_default_na=False)
    ref = ref[(ref.set == "target") & ref.kind.isin(["prompt", "paraphrase", "question"])]
    m = got[got.step == step].merge(ref, on=["item", "kind", "variant"], suffixes=("", "_ref"))
    assert len(m) == len(ref) > 0
    np.testing.assert_allclose(m.dll, m.dll_ref, atol=1e-5)
  with open(os.path.join(out, "summary.json")) as fh:
    assert json.load(fh)["steps"].keys() == {str(s) for s in steps}


def test_bad_metrics_and_datasets_are_named(hf_lm, tmp_path):
  d, _ = hf_lm
  facts = tmp_path / "f.jsonl"
  facts.write_text(json.dumps({"id": "a", "answers": ["x"], "prompt": "p"}) + "\n")
  with pytest.raises(ValueError, match=r"metrics \['bleu'\]; expected some of \['preference'"):
    evaluate(d, str(facts), ["bleu"], str(tmp_path / "o"))
  with pytest.raises(ValueError, match=r"f\.jsonl: no items the 'counterfact' metric applies"):
    evaluate(d, str(facts), ["counterfact"], str(tmp_path / "o"))
  assert not (tmp_path / "o").exists()
