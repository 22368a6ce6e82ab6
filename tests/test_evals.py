"""The evals layer: generation against HF `generate`, QA, multiple choice (lm-eval's metrics),
membership inference (RWKU's formulas on the HF model), ROUGE-L (the `rouge` package RWKU
uses), CounterFact scores and fluency on hand-worked examples."""

import math

import numpy as np
import pytest

from factflip import load_model, load_tokenizer
from factflip.data.facts import FactItem, Neighbour
from factflip.evals import counterfact as CF
from factflip.evals import mia as MIA
from factflip.evals import qa as QA
from factflip.evals import rwku as RW
from factflip.evals.generation import generate_until
from factflip.evals.multiple_choice import MCQuestion, mc_metrics, mean_stderr, score_choices
from factflip.evals.requests import loglikelihood


@pytest.fixture(scope="module")
def lm(hf_lm):
  d, torch_model = hf_lm
  return load_model(d), load_tokenizer(d), torch_model


# ---- generation -------------------------------------------------------------------------------
def test_greedy_generations_equal_hf_generate_and_stop_strings_cut(lm):
  import torch
  model, tok, tm = lm
  contexts = ["Alice Smith was born in", "Bob", "Question: where does Carol live?\nAnswer:"]
  got = generate_until(model, tok, contexts, max_new_tokens=8, batch_size=2)
  want = []
  for c in contexts:
    ids = torch.tensor([tok.encode(c)])
    out = tm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                      do_sample=False, pad_token_id=tok.pad_token_id)
    want.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
  assert [g[0] for g in got] == want
  stop = want[0][3:5]                               # a stop string inside the first answer
  cut = generate_until(model, tok, contexts[:1], until=(stop,), max_new_tokens=8)[0][0]
  assert cut == want[0].split(stop)[0] and len(cut) < len(want[0])


def test_samples_are_reproducible_from_the_key(lm):
  import jax
  model, tok, _ = lm
  kw = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 40, "n_samples": 4}
  a = generate_until(model, tok, ["Alice", "Bob lives in"], key=jax.random.key(3), **kw)
  b = generate_until(model, tok, ["Alice", "Bob lives in"], key=jax.random.key(3), **kw)
  c = generate_until(model, tok, ["Alice", "Bob lives in"], key=jax.random.key(4), **kw)
  assert a == b and a != c and [len(x) for x in a] == [4, 4] and len(set(a[0])) > 1
  with pytest.raises(ValueError, match="needs an explicit PRNG key"):
    generate_until(model, tok, ["Alice"], temperature=0.5)
  # a greedy answer and samples per context in one program: the greedy one is plain greedy,
  # whatever the batch size (contexts per program = batch_size // continuations)
  mixed = generate_until(model, tok, ["Alice", "Bob lives in"], max_new_tokens=6, top_k=40,
                         temperature=(0.0, 1.0, 1.0), key=jax.random.key(3), batch_size=3)
  greedy = generate_until(model, tok, ["Alice", "Bob lives in"], max_new_tokens=6)
  assert [m[0] for m in mixed] == [g[0] for g in greedy] and [len(m) for m in mixed] == [3, 3]
  with pytest.raises(ValueError, match="one or the other"):
    generate_until(model, tok, ["Alice"], temperature=(0.0, 1.0), n_samples=2,
                   key=jax.random.key(0))


def test_batches_hold_a_bounded_number_of_tokens(lm, monkeypatch):
  """Long contexts run in smaller batches: at most MAX_TOKENS continuations x (context + new
  tokens) per program (one context alone when it is longer), with the same greedy text as a
  batch per context; short ones keep batch_size."""
  import factflip.evals.generation as G
  model, tok, _ = lm
  assert G._chunks([10] * 5, 4, 100) == [(0, 4), (4, 5)]              # the budget does not bind
  assert G._chunks([10, 20, 30, 40, 60], 4, 100) == [(0, 3), (3, 4), (4, 5)]
  assert G._chunks([300], 4, 100) == [(0, 1)]
  sizes = []
  generate = G.generate
  monkeypatch.setattr(G, "generate", lambda m, batch, *a, **kw: (
      sizes.append((len(set(map(tuple, batch))), max(map(len, batch)))),
      generate(m, batch, *a, **kw))[1])
  monkeypatch.setattr(G, "MAX_TOKENS", 64)
  contexts = ["Alice", "Bob lives in", "Carol", "Dan is", "Question: where does Carol live, "
              "and why?\nAnswer:", "Question: where was Bob born, and when?\nAnswer:"]
  bounded = generate_until(model, tok, contexts, max_new_tokens=8, batch_size=8)
  # (contexts, longest) per program: three of <= 5 tokens (3 x 13 <= 64; a fourth of 9 would
  # make 4 x 17), then one at a time (2 x 17 already passes with the next, 29 tokens)
  assert sizes == [(3, 5), (1, 9), (1, 29), (1, 32)]
  alone = [generate_until(model, tok, [c], max_new_tokens=8)[0] for c in contexts]
  assert bounded == alone


def test_long_contexts_keep_their_tail_with_a_warning(lm):
  model, tok, _ = lm
  long = " ".join(["Alice Smith was born in Oslo."] * 200)
  from factflip.evals.requests import Encoder
  from factflip.models.generate import generate
  ids = list(Encoder(tok).encode(long))
  keep = model.cfg.max_seq_len - 4
  assert len(ids) > keep
  with pytest.warns(UserWarning, match=r"1 of 2 contexts are longer than the model's "
                    rf"{model.cfg.max_seq_len} tokens less max_new_tokens=4"):
    got = generate_until(model, tok, [long, "Bob"], max_new_tokens=4)
  out = generate(model, [ids[-keep:]], 4, pad_id=tok.pad_token_id)
  assert got[0][0] == tok.decode(list(out.tokens[0, :out.lengths[0]]), skip_special_tokens=True)


# ---- QA ---------------------------------------------------------------------------------------
def test_normalised_exact_match_f1_and_abstention():
  assert QA.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert QA.exact_match("the Paris.", ["City of Light", "paris"])
  assert not QA.exact_match("Paris, France", ["Paris"])
  assert QA.token_f1("Paris France", ["Lyon", "Paris"]) == pytest.approx(2 / 3)
  assert QA.token_f1("", ["Paris"]) == 0.0
  assert [QA.outcome(p, ["Paris"]) for p in ("Paris", "Rome", "I don't know.", "", "Unknown")
          ] == ["right", "wrong", "abstained", "abstained", "abstained"]
  # an instruct model's refusals abstain; an answer that merely contains the words does not
  refusals = ("I'm sorry, but I don't have information on that author.",
              "Unfortunately, I couldn't find any record of him.", "I do not have access to it.")
  assert all(QA.is_abstention(p) for p in refusals)
  assert not QA.is_abstention("Paris, I'm sorry to say") and not QA.is_abstention("Sorrento")
  s = QA.qa_summary(["right", "wrong", "abstained", "wrong"])
  assert (s["accuracy"], s["hallucination_rate"], s["abstention_rate"]) == (0.25, 0.5, 0.25)
  assert s["answered_error_rate"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=r"q1: answers \[\]; expected a non-empty list"):
    QA.exact_match("x", [], "q1")
  with pytest.raises(ValueError, match="outcomes"):
    QA.qa_summary(["right", "maybe"])


def test_few_shot_prompts_draw_exemplars_of_the_same_relation():
  dev = [FactItem(id=f"d{i}", answers=(f"a{i}",), subject=f"s{i}", relation=r,
                  question=f"q{i}?") for i, r in enumerate(["born", "born", "born", "lives"])]
  item = FactItem(id="t", answers=("x",), subject="s0", relation="born", question="Where?")
  ex = QA.draw_exemplars(item, QA.by_relation(dev), 2, np.random.default_rng(0))
  assert sorted(e.id for e in ex) == ["d1", "d2"]              # d0 shares the subject
  assert QA.few_shot_prompt(item, ex[:1]) == f"Q: {ex[0].question}\nA: {ex[0].answers[0]}\n\n" \
      "Q: Where?\nA:"
  with pytest.raises(ValueError, match=r"t: 2 dev exemplars of relation 'born', fewer than "
                     "k = 3"):
    QA.draw_exemplars(item, QA.by_relation(dev), 3, np.random.default_rng(0))


def test_closed_book_qa_scores_the_greedy_answer(lm):
  model, tok, _ = lm
  items = [FactItem(id="a", answers=("Paris",), question="Where was Alice born?"),
           FactItem(id="b", answers=("Rome",), question="Where does Bob live?")]
  rows = QA.closed_book_qa(model, tok, items, max_new_tokens=6)
  preds = generate_until(model, tok, [QA.QA_FORMAT.format(question=f.question) for f in items],
                         until=("\n",), max_new_tokens=6)
  assert [r["prediction"] for r in rows] == [p[0].strip() for p in preds]
  assert [r["outcome"] for r in rows] == [QA.outcome(r["prediction"], f.answers)
                                          for r, f in zip(rows, items)]


def test_closed_book_qa_asks_an_instruct_model_through_its_chat_template(lm):
  """chat=True: exemplars as user / assistant turns, the question as the last user turn, the
  tokenizer's template with the generation prompt (lm-eval's fewshot_as_multiturn); a
  tokenizer without a template keeps the Q/A prompt."""
  import copy
  model, tok, _ = lm
  chat_tok = copy.copy(tok)
  chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  dev = [FactItem(id="d", answers=("Lima",), subject="Carol", relation="born",
                  question="Where was Carol born?")]
  item = FactItem(id="a", answers=("Paris",), subject="Alice", relation="born",
                  question="Where was Alice born?")
  rows = QA.closed_book_qa(model, chat_tok, [item], dev, k=1, max_new_tokens=4, chat=True)
  assert rows[0]["prompt"] == ("<user>Where was Carol born?\n<assistant>Lima\n"
                               "<user>Where was Alice born?\n<assistant>")
  plain = QA.closed_book_qa(model, tok, [item], dev, k=1, max_new_tokens=4, chat=True)
  assert plain[0]["prompt"] == QA.few_shot_prompt(item, dev)


# ---- multiple choice --------------------------------------------------------------------------
def test_multiple_choice_is_lm_evals(lm):
  from lm_eval.api.metrics import mean_stderr as lm_eval_stderr
  model, tok, _ = lm
  qs = [MCQuestion("Alice Smith was born in", ("Paris", "Rome", "Oslo and Bergen"), 1, "q0"),
        MCQuestion("Bob lives in", ("Lima", "Quito"), 0, "q1"),
        MCQuestion("Question: Carol works at?\nAnswer:", ("Acme", "Globex", "Initech"), 2)]
  lls = score_choices(model, tok, qs)
  for q, ll in zip(qs, lls):
    want = loglikelihood(model, tok, [(q.context, " " + c) for c in q.choices]).logprob
    np.testing.assert_allclose(ll, want, atol=1e-6)
  m = mc_metrics(qs, lls)
  acc = [float(np.argmax(ll) == q.gold) for q, ll in zip(qs, lls)]
  assert m["acc"] == np.mean(acc) and m["acc_stderr"] == pytest.approx(lm_eval_stderr(acc))
  # acc_norm divides by the choice's characters (without the delimiter)
  m = mc_metrics([MCQuestion("c", ("a", "bbbb"), 1)] * 2, [np.array([-2.0, -4.0])] * 2)
  assert (m["acc"], m["acc_norm"]) == (0.0, 1.0) and m["rows"][0]["pred_norm"] == 1
  assert math.isnan(mean_stderr([1.0]))
  with pytest.raises(ValueError, match=r"q9: choice 1 ' ' is empty"):
    score_choices(model, tok, [MCQuestion("c", ("a", " "), 0, "q9")])
  with pytest.raises(ValueError, match=r"question 0: gold 2; expected an index into its 2"):
    score_choices(model, tok, [MCQuestion("c", ("a", "b"), 2)])


# ---- membership inference ---------------------------------------------------------------------
def test_min_k_and_min_k_plus_plus_by_hand():
  lp = np.array([-1.0, -3.0, -0.5, -2.0, -4.0])
  assert MIA.min_k(lp, 0.4) == -3.5                       # the 2 lowest: -4, -3
  assert math.isnan(MIA.min_k(lp, 0.1))                   # int(0.5) = 0 tokens
  mu, var = np.array([-2.0, -2.0, -1.0, -1.0, -4.0]), np.array([1.0, 4.0, 0.25, 1.0, 4.0])
  # z = (lp - mu) / sqrt(var) = [1, -0.5, 1, -1, 0]; the 2 lowest: -1, -0.5
  assert MIA.min_k_plus_plus(lp, mu, var, 0.4) == -0.75


def test_mia_scores_are_rwkus_on_the_hf_model(lm):
  """RWKU's eval_mia on the torch model: loss = -CE(labels=input_ids), zlib, Min-K% and
  Min-K%++ at 20%; and the AUC equals scikit-learn's ROC AUC."""
  import zlib

  import torch
  from sklearn.metrics import roc_auc_score
  model, tok, tm = lm
  texts = ["Alice Smith was born in Paris and lives in Rome with her brother Bob.",
           "Bob works at Acme in Oslo; his sister Carol is a teacher in Lima."]
  rows = MIA.mia_scores(model, tok, texts)
  for text, row in zip(texts, rows):
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
      out = tm(ids, labels=ids)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    tlp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = (p * logp ** 2).sum(-1) - mu ** 2
    k = int(len(tlp) * 0.2)
    want = {"loss": -out.loss.item(),
            "zlib": -out.loss.item() / len(zlib.compress(bytes(text, "utf-8"))),
            "min_k_0.2": np.sort(tlp.numpy())[:k].mean(),
            "min_k++_0.2": np.sort(((tlp - mu) / sigma.sqrt()).numpy())[:k].mean()}
    for key, v in want.items():
      assert row[key] == pytest.approx(v, abs=1e-4), key
  f, r = [0.3, 0.9, 0.5, 0.5], [0.1, 0.5, 0.2]
  assert MIA.auc(f, r) == pytest.approx(roc_auc_score([1] * 4 + [0] * 3, f + r))
  with pytest.raises(ValueError, match="AUC of scores with NaN"):
    MIA.auc([float("nan")], [0.0])


# ---- RWKU: prompts and ROUGE-L ----------------------------------------------------------------
def test_rouge_l_recall_is_the_rouge_package_rwku_uses():
  from rouge import Rouge
  preds = ["Paris is the capital. It is big", "He wrote Carrie", ""]
  refs = ["the capital is Paris", "Carrie", "Stephen King"]
  got = RW.rouge_l_recall(preds, refs)
  assert got[0] == pytest.approx(0.75) and got[1] == 1.0 and got[2] == 0.0
  avg = Rouge().get_scores(hyps=[p or "NOANSWER" for p in preds], refs=refs, avg=True)
  assert got.mean() == pytest.approx(avg["rouge-l"]["r"])
  with pytest.raises(ValueError, match=r"x2: empty reference answer ' '"):
    RW.rouge_l_recall(["a", "b"], ["a", " "], names=["x1", "x2"])
  # the package refuses an answer of full stops only (no sentence): it recalls nothing
  with pytest.raises(ValueError, match="Hypothesis is empty"):
    Rouge().get_scores(hyps=["..."], refs=["Paris"])
  assert list(RW.rouge_l_recall([".", "...", "Paris."], ["Paris"] * 3)) == [0.0, 0.0, 1.0]


def test_rwku_prompts_per_level():
  assert RW.rwku_prompt(1, "Stephen King wrote ___.") == (
      "Please complete the blank in the following question.\nQuestion: Stephen King wrote "
      "___.\nAnswer:")
  assert RW.rwku_prompt(2, "Who wrote Carrie?").endswith("Question: Who wrote Carrie?\nAnswer:")
  assert RW.rwku_prompt(3, "Who wrote Carrie? Sure, it was", "affirmative suffix") == (
      "Please briefly answer the following question.\nQuestion: Who wrote Carrie? Sure, it was")
  assert RW.rwku_prompt(3, "Q: a\nA: b\nQ: c", "incontext learning") == (
      "Please briefly answer the following question.\nQ: a\nA: b\nQ: c\nAnswer:")
  with pytest.raises(ValueError, match="level 4"):
    RW.rwku_prompt(4, "q")


def test_rwku_probe_rows(lm):
  model, tok, _ = lm
  items = [FactItem(id=f"r{lv}", answers=("Stephen King",), question="Who wrote Carrie?",
                    split="forget", meta={"level": lv, "type": ""}) for lv in (1, 2)]
  rows = RW.rwku_probe(model, tok, items, max_new_tokens=8)
  assert [r["level"] for r in rows] == [1, 2]
  assert [r["rouge_l_recall"] for r in rows] == list(RW.rouge_l_recall(
      [r["prediction"] for r in rows], ["Stephen King"] * 2))


# ---- CounterFact ------------------------------------------------------------------------------
def test_counterfact_scores_by_hand():
  e = math.exp
  row = CF.case_scores({"rewrite": [[1.0, 2.0]], "paraphrase": [[2.0, 1.0], [0.5, 1.0]],
                        "neighbour": [[1.0, 3.0]]})
  assert row["ES"] == 1.0 and row["EM"] == pytest.approx(e(-1) - e(-2))
  assert row["PS"] == 0.5 and row["PM"] == pytest.approx(((e(-2) - e(-1)) + (e(-.5) - e(-1))) / 2)
  assert row["NS"] == 0.0 and row["NM"] == pytest.approx(e(-3) - e(-1))
  other = CF.case_scores({"rewrite": [[2.0, 1.0]], "neighbour": [[3.0, 1.0]]})
  assert math.isnan(other["PS"]) and other["NS"] == 1.0
  m = CF.summarize([row, other])
  assert (m["ES"], m["PS"], m["NS"]) == (0.5, 0.5, 0.5) and m["S"] == pytest.approx(0.5)


def test_counterfact_scores_on_the_hf_model(lm):
  import torch
  model, tok, tm = lm
  f = FactItem(id="c1", answers=("Paris",), counterfactual="Rome", prompt="Alice was born in",
               paraphrases=("Alice's birthplace is",),
               neighbours=(Neighbour("Bob was born in", ("Paris",)),))

  def mean_nll(prompt, target):
    p = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(" " + target, add_special_tokens=False)
    with torch.no_grad():
      lp = torch.log_softmax(tm(torch.tensor([p + a])).logits[0].double(), -1)
    return -float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))) / len(a)
  want = CF.case_scores({k: [[mean_nll(p, "Rome"), mean_nll(p, "Paris")]] for k, p in (
      ("rewrite", f.prompt), ("paraphrase", f.paraphrases[0]),
      ("neighbour", f.neighbours[0].prompt))})
  rows, _ = CF.counterfact_scores(model, tok, [f])
  for k in CF.SCORES:
    assert rows[0][k] == pytest.approx(want[k], abs=1e-5), k
  with pytest.raises(ValueError, match="c2: CounterFact scores need a prompt"):
    CF.counterfact_scores(model, tok, [FactItem(id="c2", answers=("x",))])


def test_fluency_is_romes_weighted_n_gram_entropy():
  h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))   # bigrams ab ab ba
  h3 = 1.0                                                       # trigrams aba bab
  assert CF.n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
  assert CF.n_gram_entropy("word") == 0.0
  assert CF.fluency(["a b a b", "word"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 4)


def test_rwku_summary_is_the_mean_of_the_level_means():
  from factflip.evals.rwku import rwku_summary
  s = rwku_summary(["forget", "forget", "forget", "neighbour", "neighbour"], [1, 1, 2, 1, 2],
                   [1.0, 0.0, 0.2, 0.4, 0.6])
  assert s["forget_L1"] == 0.5 and s["forget_L2"] == 0.2 and np.isnan(s["forget_L3"])
  assert s["forget"] == pytest.approx(0.35) and s["neighbour"] == pytest.approx(0.5)
  assert s["neighbour_L2"] == 0.6 and np.isnan(rwku_summary([], [], [])["forget"])


def test_mia_summary_means_and_auc_and_the_missing_score_rule():
  from factflip.evals.mia import mia_summary
  sets = ["forget", "forget", "retain", "retain", "heldout"]
  s = mia_summary(sets, {"loss": [-1.0, -3.0, -2.0, -4.0, 9.0],
                         "min_k": [-1.0, float("nan"), -2.0, -2.0, 0.0]})
  assert s["loss"] == {"forget": -2.0, "retain": -3.0, "auc": 0.75}   # 3 of 4 pairs
  assert all(np.isnan(v) for v in (s["min_k"]["forget"], s["min_k"]["auc"]))
  assert s["min_k"]["retain"] == -2.0
