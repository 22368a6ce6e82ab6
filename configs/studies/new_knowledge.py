r"""Paper B's study: SFT on new knowledge (SliCK categories, %Unknown mixtures, fitting dynamics,
the linear fit), on the embedded fact world or on HF models with EntityQuestions.

  factflip run --config=configs/studies/new_knowledge.py --workdir=workdir/new_knowledge
  factflip run --config=configs/studies/new_knowledge.py:smoke --workdir=/tmp/nk   # the tests

Stages (fingerprinted, resumable; --dry_run prints the plan): world → pretrain (per size and
seed) → slick (categories of every train / dev / test fact) → mixtures (every SFT set) → sft
(per mixture, a checkpoint per epoch) → eval (closed-book QA on every checkpoint) → results.
Every study key, its default and meaning: `base_config` in factflip/studies/new_knowledge.py
(`pretrain` and `sft` are training configs: factflip/train/config.py); this file sets values.

Variants (`--config=configs/studies/new_knowledge.py:VARIANT[,VARIANT...]`):
  (none)           tiny-2m pretrained on a 100-person world whose corpus never asks or answers
                   a question (pretrain.data.world_questions = False: facts only as
                   statements, so SFT teaches the QA format, as paper B's premise has it);
                   relations birth_city, occupation, employer, instrument (in) and sport,
                   city_country (out of distribution); SliCK with the paper's k = 4 and
                   N_ex = 10 x 16 samples, its prompts in the base's own form (slick.form =
                   "cloze", below); mixtures with 0/25/50/75/100% Unknown, idk50, D_MK, D_WK,
                   D_Natural (too few HighlyKnown facts for D_HK); 12 SFT epochs each.
  smoke            tiny-0.5m on a 10-person world with questions in its corpus (the tests'
                   hf variant asks its base questions), relations sport, instrument,
                   city_country (in) and occupation (ood), SliCK with k = 1 (2-3 dev facts per
                   relation), a few epochs of everything: what the tests run.
  scale=A+B+...    presets side by side (`scale=ladder`: tiny-0.5m, -2m, -8m).
  seeds=0+1+...    seeds (pretraining, the SliCK draws, the mixtures, SFT order).
  hf=DIR[+DIR...],facts=ENTITYQUESTIONS_DIR
                   HF (or factflip) model directories as the bases and EntityQuestions'
                   folder (P*.{train,dev,test}.json): paper B's 12 in-distribution and 7
                   out-of-distribution relations, SliCK with k = 4 as in the paper.
  cpu              with hf=: sized for a ~100M-parameter model on a 2-core laptop, at most
                   25 minutes (benchmarks/RESULTS.md: SmolLM2-135M-Instruct). Relations the
                   model answers (4-shot greedy on 25 dev questions each: P495 21, P36 9,
                   P17 7, P131 3; P407 9, P176 3), all in paper B's lists: in P131, P17, P36,
                   P495, out of distribution P176, P407; the first 24 facts per relation and
                   split; SliCK with the paper's k = 4 but 2 prompts x 4 samples (paper: 10 x
                   16); mixtures 0 / 50 / 100% Unknown; 8 epochs at lr 1e-4.

  factflip run --config=configs/studies/new_knowledge.py:hf=/models/Llama-3.2-1B,\
facts=/data/entityquestions --workdir=workdir/eq --config.sft.model.dtype=bfloat16
  factflip run --config=configs/studies/new_knowledge.py:hf=SmolLM2-135M-Instruct.Q4_1.gguf,\
facts=/data/entityquestions,cpu --workdir=workdir/smollm2-b

The protocol on the world. Paper B fine-tunes a pretrained model on closed-book QA: the base
knows facts from pretraining and SFT teaches it to answer questions about them. A world whose
forum posts wrote "Q: <question>\nA: <object>." (world_questions = True, the other studies'
world) made the Known SFT examples verbatim pretraining strings, so SFT had nothing to teach
(EARLY_STOP was epoch 0 for every mixture, and β_kn < 0). Without questions in the corpus the
base answers no question zero-shot (results/base.csv: zero-shot QA accuracy beside its cloze
accuracy), and SliCK cannot ask it questions either: 4-shot QA prompts made every train fact
Unknown (measured: the tiny base continues them as corpus text). So SliCK asks in the form the
base knows, its statements: 4 exemplars "<cloze prompt> <answer>." of dev facts of the
relation, then the fact's cloze prompt (probes.slick, form "cloze"). The question asked in SFT
and evaluation is the relation's first template (`question = "train"`, in no corpus now) with
answers ending "." (answer_end). EARLY_STOP is chosen among fine-tuned epochs and the linear
fit runs over fine-tuned checkpoints (epoch >= 1). The hf variant uses the paper's QA form.
"""

import os

from factflip.configfile import apply_study_variants, load_config_file, study_variants
from factflip.studies.new_knowledge import ENTITYQUESTIONS_IN, ENTITYQUESTIONS_OOD, base_config

LADDER = ("tiny-0.5m", "tiny-2m", "tiny-8m")


def _pretrain():
  """configs/pretrain_tiny.py:study (the poisoning study's world and base) with the tiny-2m
  preset: the 0.5M-parameter model answers no fact right on all 10 SliCK prompts (no
  HighlyKnown category; benchmarks/RESULTS.md)."""
  return load_config_file(os.path.join(os.path.dirname(__file__), "..", "pretrain_tiny.py"),
                          "study")


def _sft(c):
  c.data.seq_len = 64              # "Q: <question>\nA: <answer>" is ~20 tokens
  c.data.batch_size = 8            # |D| and the single-category sets are multiples of it
  c.optim.lr = 3e-4                # 1e-3 cost tiny-2m 0.81 -> 0.47 test accuracy on Known-only
  #                                  data (unk0); 3e-4: 0.81 -> 0.78 (benchmarks/RESULTS.md)
  c.optim.warmup_steps = 2
  c.optim.schedule = "constant"
  c.checkpoint.async_save = False
  c.log_every = 10
  c.eval_every = 0


def get_config(arg=None):
  variants = study_variants(arg, "configs/studies/new_knowledge.py", flags=("cpu",))
  c = base_config()                # every study key, its default and meaning
  c.sizes = ("tiny-2m",)
  c.pretrain = _pretrain()
  c.pretrain.data.world_questions = False   # the corpus states facts, never asks: SFT teaches
  #                                           the QA format (docstring)
  c.slick.form = "cloze"           # SliCK asks what the base knows in its own form (docstring)
  c.slick.max_new_tokens = 10      # the world's longest answer is 9 tokens with its ".": the
  #                                  same categories as 16 tokens, 25% faster (RESULTS.md)
  c.ood_relations = ("sport", "city_country")   # several, as paper B (country_* have 10
  #                                                facts: too few dev exemplars for k = 4)
  _sft(c.sft)
  c.answer_end = "."               # every trained answer ends "A: <answer>."
  # D_HK left out: tiny-2m answers fewer than one batch (8) of the in-distribution train facts
  # right on all 10 prompts (benchmarks/RESULTS.md); hf= restores it
  c.mixtures.single = ("MaybeKnown", "WeaklyKnown", "Natural")
  c.epochs = 12
  apply_study_variants(c, variants, LADDER)
  if "hf" in variants:
    c.slick.form = "qa"            # EntityQuestions has questions only (paper B's SliCK)
    c.answer_end = ""
    c.mixtures.single = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Natural")
    c.relations = ENTITYQUESTIONS_IN
    c.ood_relations = ENTITYQUESTIONS_OOD
    c.slick.k_shot = 4
    c.slick.batch_size = 272
    c.max_facts = 500              # per relation and split
    c.sft.optim.lr = 1e-5          # paper B: full fine-tuning of a billion-parameter model
    c.sft.optim.warmup_steps = 10
    c.sft.data.seq_len = 64
    c.sft.data.batch_size = 32
    c.eval.batch_size = 64
    c.epochs = 10
  if "cpu" in variants:
    c.relations = ("P131", "P17", "P36", "P495")   # answered by a 135M model (docstring)
    c.ood_relations = ("P176", "P407")
    c.max_facts = 24
    c.slick.n_prompts, c.slick.n_samples, c.slick.max_new_tokens = 2, 4, 8
    c.slick.batch_size = 240
    c.mixtures.unknown_shares = (0.0, 0.5, 1.0)
    c.mixtures.single = ()
    c.mixtures.idk_shares = ()
    c.sft.data.batch_size = 8
    c.sft.optim.lr = 1e-4          # 1e-5 (the paper's, for 7B) fits nothing in ~30 steps
    c.sft.optim.warmup_steps = 2
    c.epochs = 8
    c.eval.max_new_tokens = 8
    c.fit.bootstrap = 200
  if "smoke" in variants:
    if "hf" not in variants and "scale" not in variants:
      c.sizes = ("tiny-0.5m",)
    c.vocab_size = 384
    c.pretrain.data.world_people = 10  # few facts, learnt in a few hundred steps
    c.pretrain.steps, c.pretrain.checkpoint.every, c.pretrain.eval_every = 300, 300, 0
    c.pretrain.optim.warmup_steps = 20
    c.slick.n_prompts, c.slick.n_samples, c.slick.max_new_tokens = 2, 3, 12
    c.slick.batch_size = 64
    c.slick.k_shot = 1             # 2-3 dev facts per relation in a 10-person world
    c.pretrain.data.world_questions = True   # a base that answers questions: the tests' hf
    #                                          variant runs on it (EntityQuestions' QA form)
    c.mixtures.unknown_shares = (0.0, 0.5, 1.0)
    c.mixtures.single = ("Natural",)
    c.sft.data.batch_size = 2
    c.epochs = 2
    c.eval.max_new_tokens = 12
    c.fit.bootstrap = 50
    c.max_facts = 8
    if "hf" in variants:
      c.sft.optim.lr = 1e-3
      c.slick.k_shot = 1
    else:
      c.relations = ("sport", "instrument", "city_country")   # what 300 steps teach: a
      c.ood_relations = ("occupation",)                        # spread of categories
  return c
