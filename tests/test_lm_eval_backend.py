"""`--model factflip` in lm-evaluation-harness: the same local tasks through lm-eval's `hf` model
and ours give identical acc / acc_norm, per-request log-likelihoods within 1e-4, identical
greedy generations and rolling log-likelihoods, with and without lm-eval's chat template (the
model's own, from its tokenizer or its GGUF file); `factflip lm-eval` is lm-eval's command
line."""

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


# ---- --apply_chat_template: the tokenizer's own template, rendered as hf renders it -----------
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT_TASKS = ["ff_chat_mc", "ff_chat_prefix", "ff_chat_gen"]


@pytest.fixture(scope="module")
def chat_lm(hf_lm, tmp_path_factory):
  """hf_lm's model and tokenizer with a chat template and a 256-token context."""
  import shutil

  from factflip.data.tokenizer import load_tokenizer
  d = str(tmp_path_factory.mktemp("chat_lm") / "model")
  shutil.copytree(hf_lm[0], d)
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({**cfg, "max_position_embeddings": 256}, f)
  tok = load_tokenizer(d)
  tok.chat_template = CHAT
  tok.save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def chat_tasks(tmp_path_factory):
  """A 1-shot multiple-choice task with a description (the system turn), the same with a
  `gen_prefix` (the assistant turn continued) and a short greedy generation task."""
  d = str(tmp_path_factory.mktemp("chat_tasks"))
  mc = ('output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: '
        '"{{choices}}"\ndoc_to_target: "{{gold}}"\nnum_fewshot: 1\nmetric_list:\n'
        "  - metric: acc\n")
  _task(d, "ff_chat_mc", MC, mc + 'description: "Answer briefly."\n')
  _task(d, "ff_chat_prefix", MC, mc + 'gen_prefix: "Answer:"\n')
  _task(d, "ff_chat_gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
  return d


def _chat_evaluate(model, pretrained, tasks, multiturn):
  from lm_eval.tasks import TaskManager

  import factflip.evals.lm_eval  # noqa: F401
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  return lm_eval.simple_evaluate(
      model=model, model_args=f"pretrained={pretrained},dtype=float32", device="cpu",
      tasks=CHAT_TASKS, task_manager=TaskManager(include_path=tasks), log_samples=True,
      batch_size=4, apply_chat_template=True, fewshot_as_multiturn=multiturn,
      system_instruction="You are terse." if multiturn else None)


def _requests(res, task):
  """(contexts, per-request first responses) of a task's logged samples, in doc order."""
  samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
  ctx = [a[0] for s in samples for a in s["arguments"]]
  return ctx, [r[0] for s in samples for r in s["resps"]]


def _assert_same_requests(a, b):
  for task in CHAT_TASKS:
    (ca, ra), (cb, rb) = _requests(a, task), _requests(b, task)
    assert cb == ca
    if task == "ff_chat_gen":
      assert rb == ra
    else:
      np.testing.assert_allclose([r[0] for r in rb], [r[0] for r in ra], atol=1e-4)
      assert b["results"][task]["acc,none"] == a["results"][task]["acc,none"]


@pytest.fixture(scope="module")
def chat_runs(chat_lm, chat_tasks):
  return (_chat_evaluate("hf", chat_lm, chat_tasks, True),
          _chat_evaluate("factflip", chat_lm, chat_tasks, True))


def test_apply_chat_template_renders_and_scores_as_hf_does(chat_runs):
  hf, ours = chat_runs
  _assert_same_requests(hf, ours)
  ctx, _ = _requests(ours, "ff_chat_mc")
  assert all(c.startswith("<|bos|><|system|>You are terse.\n\nAnswer briefly.<|end|>\n<|user|>")
             and c.endswith("<|end|>\n<|assistant|>") for c in ctx)
  assert all(c.count("<|user|>") == 2 for c in ctx)                    # the shot: its own turn
  ctx, _ = _requests(ours, "ff_chat_prefix")
  assert all(c.endswith("<|assistant|>Answer:") for c in ctx)           # the turn continued
  ctx, _ = _requests(ours, "ff_chat_gen")
  assert ctx[0] == "<|bos|><|system|>You are terse.<|end|>\n<|user|>Where was Alice born?" \
                   "<|end|>\n<|assistant|>"


def test_apply_chat_template_takes_a_gguf_files_template(chat_lm, chat_tasks, tmp_path):
  """A GGUF file (F32, its template in the metadata) and the HF directory `factflip convert`
  writes from it: the same contexts and log-likelihoods; the fewshot single-turn path."""
  import transformers
  from conftest import write_gguf

  from factflip import load_model, load_tokenizer, save_hf
  path = write_gguf(tmp_path / "chat.gguf", transformers.AutoModelForCausalLM.from_pretrained(
      chat_lm), "F32", tokenizer=load_tokenizer(chat_lm), chat_template=CHAT)
  converted = str(tmp_path / "converted")
  save_hf(load_model(path), converted)
  load_tokenizer(path).save_pretrained(converted)
  gguf = _chat_evaluate("factflip", path, chat_tasks, False)
  _assert_same_requests(_chat_evaluate("factflip", converted, chat_tasks, False), gguf)
  ctx, _ = _requests(gguf, "ff_chat_mc")
  assert all(c.startswith("<|bos|><|system|>Answer briefly.<|end|>\n<|user|>")
             and c.count("<|user|>") == 1 and c.endswith("<|assistant|>") for c in ctx)


def test_apply_chat_template_without_a_template_names_the_model(hf_lm):
  from factflip.evals.lm_eval import FactflipLM
  lm = FactflipLM(pretrained=hf_lm[0])
  with pytest.raises(ValueError, match=f"tokenizer of {hf_lm[0]} has no chat template"):
    lm.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_tok_encode_follows_hflm_with_a_templates_bos(hf_lm, add_bos):
  """A chat-templated string already starts with BOS: neither backend adds a second one."""
  from lm_eval.models.huggingface import HFLM

  from factflip.evals.lm_eval import FactflipLM
  kw = {} if add_bos is None else {"add_bos_token": add_bos}
  ours, hf = FactflipLM(pretrained=hf_lm[0], **kw), HFLM(pretrained=hf_lm[0], device="cpu", **kw)
  for text in ("<|bos|><|user|>Alice Smith was born in", "Alice Smith was born in"):
    assert ours.tok_encode(text) == hf.tok_encode(text)
  assert ours.tok_encode("<|bos|>Alice")[:2] != [ours.prefix_token_id] * 2
