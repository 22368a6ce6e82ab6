r"""Paper D's study: unlearning by counterfactual tuning and its hidden costs (knowledge
conflict, hallucination spillover) beside gradient ascent, NPO, refusal tuning and DPO, scored
with RWKU-style metrics.

  factflip run --config=configs/studies/unlearning.py --workdir=workdir/unlearning
  factflip run --config=configs/studies/unlearning.py:smoke --workdir=/tmp/ul   # the tests

Stages (fingerprinted, resumable; --dry_run prints the plan): world → pretrain (per size and
seed) → sets (forget / retain / DPO / alignment sets) → align (the world's instruct stage) →
unlearn (per run: cft_consistent, cft_inconsistent,
refusal, gradient_ascent, npo, dpo; a checkpoint per epoch) → eval_base, eval (RWKU-style
probes, unseen questions, utility, MIA, CounterFact, ΔLL on every checkpoint) → conflict
(per-example gradients along the CFT runs) → results. Every key, its default and meaning:
`base_config` in factflip/studies/unlearning.py (`pretrain` and `unlearn` are training
configs: factflip/train/config.py); this file sets values.

Variants (`--config=configs/studies/unlearning.py:VARIANT[,VARIANT...]`):
  (none)           tiny-0.5m pretrained on the 100-person world whose corpus never asks a
                   question (pretrain.data.world_questions = False), then aligned: 2 epochs
                   of SFT answering the questions of the known facts neither forgotten nor
                   retained and saying "I don't know." to half of the never-mentioned facts
                   and to 40 made-up people (the other half and other made-up people are the
                   spillover questions), so the base answers and abstains as RWKU's instruct
                   models do; 24 high-tier facts forgotten, 24 retained, 5 epochs per run,
                   each forgotten fact written in its relation's other statements and a
                   rephrased question (forget.renders), never in the probes' own prompts.
  smoke            a few steps of everything on a 30-person world: what the tests run.
  scale=A+B+...    presets side by side (`scale=ladder`: tiny-0.5m, -2m, -8m).
  seeds=0+1+...    seeds (pretraining, the forget / retain draw, the sets, the run order).
  hf=DIR[+DIR...],facts=FILE
                   HF (or factflip) model directories as bases and a facts file with
                   counterfactuals (CounterFact's layouts, any `factflip facts` format): the
                   forget and retain facts are drawn among those the base knows; give the
                   spillover questions with --config.eval.unseen=FILE (facts the model never
                   saw, e.g. a held-out split of made-up entities).
  cpu              with hf= and facts=RWKU's Target folder: RWKU on a ~100M-parameter instruct
                   model on a 2-core laptop (SmolLM2-135M: benchmarks/RESULTS.md).
                   forget.source rwku with the folder's first 2 targets (the fewest the study
                   takes; RWKU's 1_Stephen_King and 2_Confucius: 36 of
                   their 38 level-1/2 forget probes trained on, 95 forget and 112 neighbour
                   probes and 156 MIA passages of ~31k tokens scored); every method RWKU
                   allows: refusal, gradient_ascent, npo, dpo towards the refusal (no CFT:
                   RWKU has no counterfactuals); no retain term (RWKU ships no retain corpus).
                   Each probe is trained in the prompt it is asked with (forget.template:
                   RWKU's instruction in the model's chat template, which a GGUF carries).
                   One epoch of 9 steps of 4 x 96 tokens at lr 1e-4 (the hf variant's 1e-5 is
                   too gentle for 9 steps; batch 4 gives 9 updates for the compute of one
                   pass), so the base and the end of each run are evaluated: 30 greedy
                   tokens, MIA, the unseen questions through the chat template (give them:
                   --config.eval.unseen=FILE, e.g. TOFU's forget01.json, 40 questions about
                   made-up authors) and, when given, utility: --config.eval.utility=FILE
                   (e.g. CounterFact: 40 four-way multiple-choice questions on its facts).

  factflip run --config=configs/studies/unlearning.py:hf=/models/Qwen2.5-0.5B,facts=\
/data/counterfact.json --workdir=workdir/ul_qwen --config.eval.unseen=/data/unseen.jsonl \
--config.unlearn.model.dtype=bfloat16

RWKU's Target folder as the forget set (its level-1/2 probes trained on; every level, the
neighbours and its MIA texts scored; no counterfactuals, so no CFT):

  factflip run --config=configs/studies/unlearning.py:hf=/models/Llama-3.2-1B-Instruct,\
facts=/data/rwku/Target --config.forget.source=rwku --config.forget.n_targets=10 \
--config.methods="('refusal','gradient_ascent','npo','dpo')" --config.dpo_target=refusal \
--config.eval.unseen=/data/unseen.jsonl --config.unlearn.objective.retain_weight=0 \
--workdir=workdir/ul_rwku
  factflip run --config=configs/studies/unlearning.py:hf=SmolLM2-135M-Instruct.Q4_1.gguf,\
facts=RWKU/Target,cpu --config.eval.unseen=TOFU/forget01.json \
--config.eval.utility=counterfact-val.json --workdir=workdir/smollm2-d

On the world the probes are the prompts as the corpus writes them (eval.template = False: a
tiny base model follows no instruction); with hf= RWKU's instruction wraps every probe.
"""

import os

from factflip.configfile import apply_study_variants, load_config_file, study_variants
from factflip.studies.unlearning import base_config

LADDER = ("tiny-0.5m", "tiny-2m", "tiny-8m")


def _unlearn(c):
  c.data.seq_len = 64              # "Q: <question>\nA: <answer>" is ~20 tokens
  c.data.batch_size = 8            # 24 facts x 3 renderings = 72 examples: 9 steps per epoch
  c.optim.lr = 1e-3                # the poisoning study's CPT rate for tiny-0.5m
  c.optim.warmup_steps = 2
  c.optim.schedule = "constant"
  c.objective.retain_weight = 1.0
  c.checkpoint.async_save = False
  c.log_every = 3                  # results/curves.csv: three points per epoch
  c.eval_every = 0


def get_config(arg=None):
  variants = study_variants(arg, "configs/studies/unlearning.py", flags=("cpu",))
  c = base_config()                # every study key, its default and meaning
  c.pretrain = load_config_file(os.path.join(os.path.dirname(__file__), "..",
                                             "pretrain_tiny.py"), "study")
  c.pretrain.data.world_questions = False   # the corpus never asks a question: the alignment
  c.align.epochs = 2               # stage teaches the QA format, answering the known facts and
  #                                  abstaining on the unknown (RWKU starts from instruct models)
  c.forget.renders = ("restatement", "rephrased_question")   # not the probes (docstring)
  _unlearn(c.unlearn)
  c.eval.template = False          # the world's tiny models follow no instruction
  c.eval.max_new_tokens = 16       # a world answer is a few tokens; RWKU's 30 with hf=
  apply_study_variants(c, variants, LADDER)
  if "hf" in variants:
    c.pretrain.data.world_questions = True
    c.align.epochs = 0             # a model directory is unlearnt as it is (an instruct model)
    c.forget.renders = ("prompt", "question")   # a facts file's own renderings
    c.eval.template = True
    c.eval.max_new_tokens = 30
    c.unlearn.optim.lr = 1e-5      # billion-parameter models (RWKU's full fine-tuning scale)
    c.unlearn.optim.warmup_steps = 2
    c.unlearn.data.batch_size = 8
    c.eval.batch_size = 32
    c.facts_limit = 500
  if "cpu" in variants:
    c.forget.source = "rwku"
    c.forget.n_targets = 2         # the fewest the study takes: 38 level-1/2 forget probes
    c.methods = ("refusal", "gradient_ascent", "npo", "dpo")   # every method RWKU allows
    c.dpo_target = "refusal"
    c.unlearn.objective.retain_weight = 0.0   # RWKU ships no retain corpus
    c.unlearn.data.batch_size = 4  # 36 of the 38 probes: 9 steps per epoch
    c.epochs = 1                   # evaluated at the base and the end only
    c.unlearn.optim.lr = 1e-4      # 1e-5 is too gentle for 9 steps
    c.unlearn.optim.warmup_steps = 2
    c.unlearn.log_every = 3
    c.forget.template = True       # trained as asked: RWKU's instruction, the chat template
    c.unlearn.data.seq_len = 96    # SmolLM2's template + instruction + probe: 55-69 tokens
  if "smoke" in variants:
    c.vocab_size = 384
    c.pretrain.data.world_people = 30
    c.pretrain.steps, c.pretrain.checkpoint.every, c.pretrain.eval_every = 300, 300, 0
    c.pretrain.optim.warmup_steps = 20
    c.pretrain.data.seq_len, c.pretrain.data.batch_size = 64, 8
    c.forget.n_targets, c.forget.n_retain = 4, 4
    c.unlearn.data.batch_size = 8  # 4 facts x 2 renders: 1 step per epoch (8 rows divide
    #                                over the tests' 8 simulated devices)
    if "hf" not in variants:
      c.forget.renders = ("restatement",)   # 2 per fact
      c.align.epochs = 1
      c.align.n_made_up = 12
    c.epochs = 3
    c.eval.n_unseen, c.eval.n_made_up, c.eval.n_utility = 6, 4, 8
    c.eval.max_new_tokens = 8
    c.facts_limit = 60
    if "hf" in variants:
      c.unlearn.optim.lr = 1e-3
      c.forget.n_targets = 8       # CounterFact items have no question: one render per fact
  return c
