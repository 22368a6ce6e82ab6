"""`--model factflip` in lm-evaluation-harness: the same local tasks through lm-eval's `hf` model
and ours give identical acc / acc_norm, per-request log-likelihoods within 1e-4, identical
greedy generations and rolling log-likelihoods; `factflip lm-eval` is lm-eval's command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

MC = [{"question": "Alice Smith was born in", "choices": ["Paris", "Rome", "Oslo and Bergen"],
       "gold": 1},
      {"question": "Bob lives in", "choices": ["Lima", "Quito"], "gold": 0},
      {"question": "Question: where does Carol work?\nAnswer:", "choices": ["Acme", "Globex",
                                                                           "Initech"], "gold": 2},
      {"question": "Dan was born in", "choices": ["Paris", "Rome"], "gold": 0}]
GEN = [{"question": "Where was Alice born?", "answer": "Paris"},
       {"question": "Where does Bob live?", "answer": "Rome"}]
DOCS = [{"text": " ".join(["Alice Smith was born in Paris and lives in Rome."] * 9)},
        {"text": "Bob works at Acme."}]


def _task(path, name, data, body):
  from factflip.evals.lm_eval import write_local_task
  write_local_task(path, name, data, body)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tasks"))
  _task(d, "ff_mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\nmetric_list:\n'
        "  - metric: acc\n  - metric: acc_norm\n")
  _task(d, "ff_gen", GEN, 'output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
  _task(d, "ff_ppl", DOCS, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
  return d


def _evaluate(model, pretrained, tasks):
  from lm_eval.tasks import TaskManager

  import factflip.evals.lm_eval  # noqa: F401  (registers "factflip")
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  return lm_eval.simple_evaluate(
      model=model, model_args=f"pretrained={pretrained},dtype=float32", device="cpu",
      tasks=["ff_mc", "ff_gen", "ff_ppl"], task_manager=TaskManager(include_path=tasks),
      log_samples=True, batch_size=2)


@pytest.fixture(scope="module")
def both(hf_lm, tasks):
  d, _ = hf_lm
  return _evaluate("hf", d, tasks), _evaluate("factflip", d, tasks)


def test_factflip_and_hf_backends_agree(both):
  hf, ours = both
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["ff_mc"][metric] == hf["results"]["ff_mc"][metric]
  lls = [[np.asarray([r[0][0] for r in s["resps"]]) for s in res["samples"]["ff_mc"]]
         for res in (hf, ours)]
  for a, b in zip(*lls):
    np.testing.assert_allclose(b, a, atol=1e-4)
  gen = [[s["resps"][0][0] for s in res["samples"]["ff_gen"]] for res in (hf, ours)]
  assert gen[1] == gen[0] and any(gen[0])
  assert ours["results"]["ff_gen"]["exact_match,none"] == hf["results"]["ff_gen"][
      "exact_match,none"]
  ppl = [[s["resps"][0][0] for s in res["samples"]["ff_ppl"]] for res in (hf, ours)]
  np.testing.assert_allclose(ppl[1], ppl[0], atol=5e-4, rtol=1e-5)


def test_factflip_lm_eval_command_runs_lm_evals_cli(hf_lm, tasks, both, tmp_path):
  d, _ = hf_lm
  out = tmp_path / "out"
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = ""
  p = subprocess.run([sys.executable, "-m", "factflip.cli", "lm-eval", "--model", "factflip",
                      "--model_args", f"pretrained={d}", "--tasks", "ff_mc",
                      "--include_path", tasks, "--output_path", str(out)],
                     capture_output=True, text=True, env=env, timeout=600, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  results = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
  with open(results[0]) as fh:
    acc = json.load(fh)["results"]["ff_mc"]["acc,none"]
  assert acc == both[1]["results"]["ff_mc"]["acc,none"] and "ff_mc" in p.stdout


def test_a_misspelt_model_arg_is_an_error(hf_lm):
  from factflip.evals.lm_eval import FactflipLM
  with pytest.raises(ValueError, match=r"unknown \['dtpye'\]; expected pretrained"):
    FactflipLM.create_from_arg_string(f"pretrained={hf_lm[0]},dtpye=bfloat16",
                                      {"batch_size": 4, "device": "cpu"})
