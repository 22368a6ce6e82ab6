"""Every sequence in every config file is a tuple, so `--config.KEY=...` can set it.

ml_collections' config_flags overrides tuples but refuses list-valued fields ("Type list of
field config.ratios is not supported for overriding"). Each config file in configs/ and
configs/studies/ is loaded with its variants and walked for lists; one tuple key per file is
then set through absl flags (a fresh FlagValues, not factflip's global FLAGS), and a config
read back from JSON (study.json, a DONE record) fingerprints as the one it was written from.
Config construction and flag parsing only: nothing trains.
"""

import glob
import json
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from factflip.configfile import load_config_file

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
STUDY_FILES = sorted(glob.glob(os.path.join(CONFIGS, "studies", "*.py")))
TRAIN_FILES = sorted(glob.glob(os.path.join(CONFIGS, "*.py")))
# the variants each study config's docstring lists (paths need not exist to build a config)
STUDY_VARIANTS = (None, "smoke", "scale=ladder", "seeds=0+1", "smoke,scale=tiny-0.5m+tiny-2m",
                  "hf=/models/a+/models/b,facts=/data/facts.json",
                  "smoke,hf=/models/a,facts=/data/facts.json")
SUITE_VARIANTS = (None, "smoke", "seeds=0+1",
                  "hf=/models/a,poisoning=/data/cf.json,new_knowledge=/data/eq,"
                  "morfi=/data/eq,unlearning=/data/rwku",
                  "smoke,hf=/models/a,poisoning=/data/cf.json,unlearning=/data/cf.json")
TRAIN_VARIANTS = {"pretrain_tiny.py": (None, "smoke", "study"),
                  "sae.py": (None, "jumprelu", "standard")}


def _name(path: str) -> str:
  return os.path.relpath(path, os.path.dirname(CONFIGS))


def _cases():
  for path in STUDY_FILES:
    variants = SUITE_VARIANTS if path.endswith("suite.py") else STUDY_VARIANTS
    yield from ((path, v) for v in variants)
  for path in TRAIN_FILES:
    yield from ((path, v) for v in TRAIN_VARIANTS[os.path.basename(path)])


def leaves(node, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict."""
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict | dict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_every_config_file_has_its_variants_listed_here():
  """A new config file in configs/ gets its variants added to this test."""
  assert {os.path.basename(p) for p in TRAIN_FILES} == set(TRAIN_VARIANTS)
  assert {os.path.basename(p) for p in STUDY_FILES} >= {
      "poisoning.py", "new_knowledge.py", "morfi.py", "unlearning.py", "suite.py"}


@pytest.mark.parametrize("path,variant", list(_cases()),
                         ids=lambda x: _name(x) if str(x).endswith(".py") else str(x))
def test_no_config_leaf_is_a_list(path, variant):
  c = load_config_file(path, variant)
  lists = [f"config.{k} = {v!r}" for k, v in leaves(c) if isinstance(v, list)]
  assert not lists, (f"{_name(path)}:{variant or ''}: list-valued keys cannot be set with "
                     f"--config.KEY (make them tuples): {'; '.join(lists)}")


def parse(path: str, variant: str | None, *overrides: str):
  """The config `factflip` would get from --config=PATH[:VARIANT] and `overrides`, parsed by
  config_flags into a fresh FlagValues."""
  spec = path if variant is None else f"{path}:{variant}"
  argv = ["factflip", f"--config={spec}", *overrides]
  fv = flags.FlagValues()                # the override flags are made from sys_argv's
  config_flags.DEFINE_config_file("config", None, "a config file", flag_values=fv,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _get(c, key: str):
  for part in key.split("."):
    c = c[part]
  return c


# per config file: command-line overrides of tuple keys and the values they must give
OVERRIDES = {
    "poisoning.py": {"ratios": ("(0.0,1.0)", (0.0, 1.0)),
                     "probe.patch_sites": ("('resid_pre','mlp_out')", ("resid_pre", "mlp_out")),
                     "probe.patch_windows": ("(1, 3)", (1, 3)),
                     "probe.kinds": ("('prompt',)", ("prompt",)),
                     "sizes": ("('tiny-0.5m','tiny-2m')", ("tiny-0.5m", "tiny-2m")),
                     "seeds": ("(0,1)", (0, 1)),
                     "cpt.monitor.rules": ("('flip:0.5!',)", ("flip:0.5!",))},
    "new_knowledge.py": {"mixtures.unknown_shares": ("(0.0,0.5,1.0)", (0.0, 0.5, 1.0)),
                         "mixtures.single": ("()", ()),
                         "relations": ("('occupation','sport')", ("occupation", "sport")),
                         "splits": ("(0.6,0.2,0.2)", (0.6, 0.2, 0.2))},
    "morfi.py": {"morfi.alphas": ("(0.5,2.0)", (0.5, 2.0)),
                 "mixtures.unknown_shares": ("(0.0,0.5,0.75,1.0)", (0.0, 0.5, 0.75, 1.0)),
                 "mixtures.idk_shares": ("()", ())},
    "unlearning.py": {"methods": ("('refusal','npo')", ("refusal", "npo")),
                      "forget.renders": ("('prompt',)", ("prompt",)),
                      "seeds": ("(0,1)", (0, 1))},
    "suite.py": {"studies": ("('unlearning',)", ("unlearning",)),
                 "poisoning.ratios": ("(0.0,1.0)", (0.0, 1.0)),
                 "new_knowledge.mixtures.unknown_shares": ("(0.0,1.0)", (0.0, 1.0)),
                 "sizes": ("('tiny-0.5m',)", ("tiny-0.5m",))},
    "pretrain_tiny.py": {"monitor.rules": ("('flip:0.5!',)", ("flip:0.5!",)),
                         "monitor.kinds": ("('prompt','question')", ("prompt", "question"))},
}


def _override_cases():
  for path in STUDY_FILES + TRAIN_FILES:
    variants = TRAIN_VARIANTS.get(os.path.basename(path), STUDY_VARIANTS)
    yield from ((path, v) for v in (None, "smoke") if v in variants)


@pytest.mark.parametrize("path,variant", list(_override_cases()),
                         ids=lambda x: _name(x) if str(x).endswith(".py") else str(x))
def test_tuple_keys_are_set_from_the_command_line(path, variant):
  overrides = OVERRIDES.get(os.path.basename(path))
  if overrides is None:                 # configs/sae.py: no sequence keys at all
    assert not [k for k, v in leaves(load_config_file(path, variant))
                if isinstance(v, tuple)], f"{_name(path)} has tuple keys: add one to OVERRIDES"
    return
  c = parse(path, variant, *(f"--config.{k}={text}" for k, (text, _) in overrides.items()))
  for key, (_, want) in overrides.items():
    got = _get(c, key)
    assert isinstance(got, tuple) and got == want, f"{_name(path)}: config.{key} = {got!r}"
  untouched = load_config_file(path, variant)
  for key, value in leaves(untouched):
    if key not in overrides:
      assert _get(c, key) == value, f"{_name(path)}: config.{key} changed"


def test_issue_command_line_reaches_the_study(tmp_path):
  """The command of the issue: --config.ratios='(0.0,1.0)' on paper A's config passes the
  study's validation and plans one CPT run per ratio."""
  from factflip.studies.poisoning import Study
  c = parse(os.path.join(CONFIGS, "studies", "poisoning.py"), None, "--config.ratios=(0.0,1.0)",
            "--config.probe.patch_sites=('resid_pre',)")
  plan = Study(c, str(tmp_path / "wd"), log=lambda m: None).plan()
  cpt = [line.split()[-1] for line in plan if line.split()[1:2] == ["cpt"]]
  assert cpt == ["p0.00", "p1.00"], plan


@pytest.mark.parametrize("path", STUDY_FILES, ids=_name)
def test_a_config_read_back_from_json_fingerprints_the_same(path):
  """study.json and DONE records hold the config as JSON (tuples become lists): merged back
  over the schema (`Study.open`) the sequences are tuples again, and every key's fingerprint
  equals the one of the config it was written from, so a re-run reuses its stages."""
  from factflip.studies import platform, schema
  from factflip.studies.stages import config_keys, fingerprint
  c = load_config_file(path, "smoke")
  back = platform.study_record(c.study).base_config()
  schema.merge(back, json.loads(json.dumps(c.to_dict())), "study.json")
  assert not [k for k, v in leaves(back) if isinstance(v, list)]
  frozen = ml_collections.FrozenConfigDict(c)       # what a Study computes its stages from
  for key in c.keys():
    want = config_keys(frozen, [key])
    assert config_keys(back, [key]) == want, key
    assert fingerprint(config_keys(back, [key])) == fingerprint(want), key
    assert fingerprint(config_keys(c, [key])) == fingerprint(want), key


def test_cpu_variant_sizes_a_real_model_and_needs_one():
  """Papers A's, B's, C's and D's `cpu` variant (a ~100M model on 2 cores): their sizes, and an
  error without hf=; the studies without one refuse it (a bad variant, not a silently ignored
  one)."""
  path = os.path.join(CONFIGS, "studies", "poisoning.py")
  c = load_config_file(path, "hf=/models/smollm2.gguf,facts=/data/cf.json,cpu")
  assert (c.sizes, c.facts_limit, c.ratios, c.cpt.data.n_targets, c.probe.n_control) == (
      ("/models/smollm2.gguf",), 0, (0.0, 0.5, 1.0), 16, 16)
  assert (c.cpt.steps, c.cpt.checkpoint.every, c.cpt.optim.lr, c.probe.patch_stride) == (
      16, 8, 3e-4, 3)
  with pytest.raises(ValueError, match="cpu sizes a real model's study for a laptop; give the "
                                       "model and its facts: hf=MODEL,facts=FILE,cpu"):
    load_config_file(path, "cpu")
  b = load_config_file(os.path.join(CONFIGS, "studies", "new_knowledge.py"),
                       "hf=/models/smollm2.gguf,facts=/data/eq,cpu")
  assert (b.relations, b.ood_relations, b.max_facts, b.slick.k_shot, b.slick.n_prompts,
          b.mixtures.unknown_shares, b.epochs) == (
      ("P131", "P17", "P36", "P495"), ("P176", "P407"), 24, 4, 2, (0.0, 0.5, 1.0), 8)
  d = load_config_file(os.path.join(CONFIGS, "studies", "unlearning.py"),
                       "hf=/models/smollm2.gguf,facts=/data/rwku/Target,cpu")
  assert (d.sizes, d.facts, d.forget.source, d.forget.n_targets, d.methods, d.dpo_target) == (
      ("/models/smollm2.gguf",), "/data/rwku/Target", "rwku", 2,
      ("refusal", "gradient_ascent", "npo", "dpo"), "refusal")
  assert (d.unlearn.objective.retain_weight, d.unlearn.data.batch_size, d.unlearn.data.seq_len,
          d.epochs, d.unlearn.optim.lr, d.forget.template) == (0.0, 4, 96, 1, 1e-4, True)
  assert (d.eval.template, d.eval.max_new_tokens, d.eval.batch_size, d.eval.unseen,
          d.eval.utility) == (True, 30, 32, "", "")   # the files come from the command line
  m = load_config_file(os.path.join(CONFIGS, "studies", "morfi.py"),
                       "hf=/models/smollm2.gguf,facts=/data/eq,cpu")
  t = m.sae.train                        # B's cpu mixtures, an SAE on the given text
  assert (m.relations, m.slick.k_shot, m.epochs, m.mixtures.unknown_shares) == (
      b.relations, b.slick.k_shot, b.epochs, (0.0, 0.25, 0.5, 0.75, 1.0))
  assert (t.data.kind, t.data.path, t.steps, t.batch_tokens, t.sae.k,
          t.sae.normalize_activations) == ("examples", "", 300, 2048, 32,
                                           "expected_average_only_in")
  with pytest.raises(ValueError, match="bad variant 'cpu'"):
    load_config_file(os.path.join(CONFIGS, "studies", "suite.py"),
                     "hf=/models/a,unlearning=/data/rwku/Target,cpu")


def test_patch_stride_is_checked():
  from factflip.configfile import ConfigError
  from factflip.studies.poisoning import validate
  c = load_config_file(os.path.join(CONFIGS, "studies", "poisoning.py"), "smoke")
  c.probe.patch_stride = 0
  with pytest.raises(ConfigError, match=r"config\.probe\.patch_stride: 0; expected >= 1"):
    validate(c, "poisoning.py")
