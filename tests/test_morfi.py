"""Paper C (MoRFI): the trend statistics against scipy and pymannkendall, the monotonic-latent
verdict on planted data, steered generation (α = 0 is the identity; a steered greedy answer is
the steered model's argmax), recovery, and the smoke study's files and numbers."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import factflip_run, set_keys

from factflip.probes import morfi as M

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies", "morfi.py")
X = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]



def _greedy_with(model, tok, prompt, iv, max_new_tokens=5):
  """The reference: up to 5 greedy tokens of `model` with intervention `iv`, one forward per
  token, cut at EOS or a newline."""
  import jax.numpy as jnp

  from factflip.evals.requests import Encoder
  start = list(Encoder(tok).encode(prompt))
  ids = list(start)
  for _ in range(max_new_tokens):
    nxt = int(jnp.argmax(model(np.asarray([ids], np.int32), interventions=[iv])[0, -1]))
    if nxt == tok.eos_token_id or tok.decode([nxt]) == "\n":
      break
    ids.append(nxt)
  return tok.decode(ids[len(start):], skip_special_tokens=True).split("\n")[0].strip()

def test_mann_kendall_and_spearman_equal_the_reference_packages():
  import pymannkendall
  import scipy.stats
  rng = np.random.default_rng(0)
  y = rng.normal(size=(40, 7))
  y[3] = [1, 1, 2, 2, 3, 3, 3]                      # ties
  y[4] = 5.0                                        # constant
  y[5] = np.arange(7)
  mk = M.mann_kendall(y)
  rho = M.spearman_rows(X, y)
  for r in range(len(y)):
    ref = pymannkendall.original_test(y[r])
    np.testing.assert_allclose([mk["p"][r], mk["tau"][r], mk["s"][r], mk["var_s"][r],
                                mk["z"][r]], [ref.p, ref.Tau, ref.s, ref.var_s, ref.z],
                               rtol=1e-12, atol=1e-12)
    if r != 4:
      assert rho[r] == pytest.approx(scipy.stats.spearmanr(X, y[r]).statistic, abs=1e-12)
  assert np.isnan(rho[4]) and mk["p"][4] == 1.0
  assert rho[5] == 1.0 and mk["p"][5] < 0.01


def test_monotonic_latents_find_the_planted_trends():
  rng = np.random.default_rng(1)
  acts = rng.gamma(1.0, size=(60, 7, 100))           # prompts x models x latents
  acts[:, :, 0] += np.arange(7) * 0.5                # rises with X
  acts[:, :, 1] = np.maximum(acts[:, :, 1] - np.arange(7) * 0.15, 0)   # falls
  acts[:, :, 2] = 0.0                                # dead
  shuffled = [3, 0, 6, 1, 5, 2, 4]                   # models given in any order
  df = M.monotonic_latents(np.array(X)[shuffled], acts[:, shuffled], n_boot=300, seed=0)
  assert df.loc[0, "monotonic"] and df.loc[0, "direction"] == "rises"
  assert df.loc[0, "rho"] == 1.0 and df.loc[0, "rho_low"] > 0.5
  assert df.loc[1, "monotonic"] and df.loc[1, "direction"] == "falls"
  assert not df.loc[2, "alive"] and not df.loc[2, "monotonic"]
  assert df.monotonic[3:].mean() < 0.1               # the null latents rarely pass both tests
  np.testing.assert_allclose(df.loc[0, [f"mean_{x:g}" for x in X]].to_numpy(float),
                             acts[:, :, 0].mean(0))
  again = M.monotonic_latents(np.array(X)[shuffled], acts[:, shuffled], n_boot=300, seed=0)
  pd.testing.assert_frame_equal(df, again)           # the bootstrap is seeded


def test_recovery_counts():
  base = [1, 1, 0, 1, 0, 1]
  m100 = [0, 0, 0, 1, 0, 0]
  steer = [1, 0, 1, 1, 0, 1]
  r = M.recovery(base, m100, steer)
  assert r["accuracy"] == pytest.approx(4 / 6) and r["delta_accuracy"] == pytest.approx(3 / 6)
  assert r["recovered"] == 3 and r["r_k"] == pytest.approx(2 / 3)
  assert np.isnan(M.recovery(base, m100, m100)["r_k"])


@pytest.fixture(scope="module")
def lm(hf_lm):
  from factflip import load_model
  from factflip.data.tokenizer import load_tokenizer
  d, _ = hf_lm
  return load_model(d), load_tokenizer(d)


def test_steered_answers_zero_is_greedy_and_steering_is_the_steered_argmax(lm):

  from factflip.evals.generation import generate_until
  from factflip.probes import add
  model, tok = lm
  prompts = ["Q: Where was Ada born?\nA:", "Q: What does Bob play?\nA:", "Alice"]
  D, L = model.cfg.d_model, model.cfg.n_layers
  v = np.random.default_rng(0).normal(size=D).astype(np.float32) * 3
  got = M.steered_answers(model, tok, prompts, np.stack([np.zeros(D, np.float32), v]),
                          "resid_post", 0, max_new_tokens=5, batch_rows=4)
  plain = [a[0].strip() for a in generate_until(model, tok, prompts, until=("\n",),
                                                max_new_tokens=5)]
  assert got[0] == plain                              # α = 0: the model itself
  # the steered answer of each prompt: greedy argmax of the model with the vector added
  iv = add("resid_post", np.broadcast_to(v, (L, 1, 1, D)), layers=[0])
  for p, want in zip(prompts, got[1]):
    assert want == _greedy_with(model, tok, p, iv)
  assert got[1] != got[0]


def test_latent_vectors_move_one_latent_by_its_amount_through_the_decoder():
  import jax

  from factflip.sae import SAEConfig, encode_with_state, init_sae
  from factflip.sae.steering import latent_vectors
  h = np.random.default_rng(2).normal(size=(5, 16)).astype(np.float32) * 3
  topk = init_sae(SAEConfig("topk", 16, 32, k=4, rescale_acts_by_decoder_norm=True),
                  jax.random.key(0), decoder_norm=0.5)
  W = np.asarray(topk.W_dec)
  got = latent_vectors(topk, h, [3, 7], [0.2, -1.5])   # rescaled: d · W_dec[j] / ‖W_dec[j]‖
  np.testing.assert_allclose(got, [0.2 * W[3] / 0.5, -1.5 * W[7] / 0.5], rtol=1e-5, atol=1e-6)
  norm = init_sae(SAEConfig("standard", 16, 32, normalize_activations="constant_norm_rescale"),
                  jax.random.key(1))
  _, state = encode_with_state(norm, h)                # decode undoes each prompt's scale
  want = 0.7 * np.asarray(norm.W_dec)[5] * np.mean(1 / np.asarray(state.scale))
  np.testing.assert_allclose(latent_vectors(norm, h, [5], [0.7])[0], want, rtol=1e-5,
                             atol=1e-6)


def test_clamped_answers_are_the_clamped_models_argmax(lm):
  import jax

  from factflip.evals.generation import generate_until
  from factflip.probes.morfi import clamped_answers
  from factflip.sae import SAEConfig, clamp, init_sae
  model, tok = lm
  D, L = model.cfg.d_model, model.cfg.n_layers
  sae = init_sae(SAEConfig("standard", D, 64, hook_name="blocks.0.hook_resid_post"),
                 jax.random.key(0), decoder_norm=1.0)
  prompts = ["Q: Where was Ada born?\nA:", "Q: What does Bob play?\nA:", "Alice"]
  plain = [a[0].strip() for a in generate_until(model, tok, prompts, until=("\n",),
                                                max_new_tokens=5)]
  none = clamped_answers(model, tok, prompts, sae, [], np.zeros((1, 0)), "resid_post", 0,
                         max_new_tokens=5, batch_rows=4)
  assert none[0] == plain                             # nothing clamped: the model itself
  values = np.array([[40.0, 0.0], [0.0, 25.0]])
  got = clamped_answers(model, tok, prompts, sae, [3, 9], values, "resid_post", 0,
                        max_new_tokens=5, batch_rows=4)   # rows split over two programs
  for g in range(2):
    iv = clamp(sae, [3, 9], values[g], L)
    for p, want in zip(prompts, got[g]):
      assert want == _greedy_with(model, tok, p, iv)
  assert got[0] != plain


# ---- the smoke study ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def morfi_study(nk_study, tmp_path_factory):
  """The smoke study in a copy of paper B's smoke workdir: the world, pretraining and SliCK
  stages are B's, reused by fingerprint (the log says so); the rest runs here."""
  import shutil
  wd = str(tmp_path_factory.mktemp("morfi") / "smoke")
  shutil.copytree(nk_study[0], wd)
  log = factflip_run(f"{CONFIG}:smoke", wd)
  assert log.splitlines()[1].startswith("plan: 3 reuse")   # world, pretrain, slick
  assert "SliCK:" not in log and "-> 300," not in log      # neither ran again
  return wd, log


def test_smoke_study_tables_and_numbers(morfi_study):
  import scipy.stats

  from factflip.evals.qa import exact_match
  from factflip.sae import load_sae
  wd, log = morfi_study
  run = os.path.join(wd, "runs", "tiny-0.5m", "seed0")
  for stage in ("slick", "mixtures", "sft_unk0", "sft_unk50", "sft_unk100", "sae",
                "latents/unk0", "steering"):
    assert os.path.exists(os.path.join(run, stage, "DONE")), stage
  lat = pd.read_csv(os.path.join(wd, "results", "latents.csv"))
  sae = load_sae(os.path.join(run, "sae", "sae"))
  assert len(lat) == sae.cfg.d_sae and sae.cfg.hook_name == "blocks.2.hook_resid_post"
  # ρ is Spearman of the per-model means the study wrote, latent by latent
  per = pd.read_csv(os.path.join(run, "steering", "latents.csv"))
  alive = per[per.alive]
  assert len(alive) > 0
  shares = [0, 0.25, 0.5, 0.75, 1]
  for _, r in alive.head(10).iterrows():
    means = [r[f"mean_{x:g}"] for x in shares]
    ref = scipy.stats.spearmanr(shares, means).statistic
    assert (np.isnan(ref) and np.isnan(r.rho)) or r.rho == pytest.approx(ref)
    assert r.delta_m0_m100 == pytest.approx(r["mean_0"] - r["mean_1"])
  # the latents file holds the same means: the last checkpoint's mean over prompts
  with np.load(os.path.join(run, "latents", "unk50", "latents.npz")) as z:
    np.testing.assert_allclose(z["latents"][-1].mean(0), per["mean_0.5"], rtol=1e-5,
                               atol=1e-6)
    assert z["latents"].shape[0] == len(z["steps"]) == 3          # epochs 0, 1, 2
  # the steering table's accuracies are the answers' exact matches
  st = pd.read_csv(os.path.join(wd, "results", "steering.csv"))
  answers = pd.read_csv(os.path.join(run, "steering", "answers.csv"), keep_default_na=False)
  from factflip.data.world import load_world
  by_id = {f.id: f for f in load_world(os.path.join(wd, "world")).facts}
  facts = [by_id[i] for i in answers.item]
  assert {f.relation for f in facts} <= {"sport", "instrument", "city_country"}   # in-dist.
  em = {c: np.mean([exact_match(a, f.answers) for a, f in zip(answers[c], facts)])
        for c in answers.columns if c != "item"}
  assert st[st.kind == "none"].accuracy.iloc[0] == pytest.approx(em["none:-1:0"])
  assert st[st.kind == "M0"].accuracy.iloc[0] == pytest.approx(em["m0"])
  assert set(st.kind) >= {"M0", "none", "composite", "control"}
  assert sorted(st[st.kind == "composite"].alpha) == [1.0, 4.0]
  # α in each direction's own units: the vector at α = 4 is 4 times that at α = 1; the controls
  # carry the steered latents' mean norm
  norm = st[st.kind.isin(["latent", "composite", "control"])].pivot_table(
      index=["kind", "latent"], columns="alpha", values="rel_norm")
  np.testing.assert_allclose(norm[4.0], 4 * norm[1.0], rtol=1e-5)
  mono = pd.read_csv(os.path.join(wd, "results", "monotonic.csv")).iloc[0]
  n_mono = int(per.monotonic.sum())
  assert mono.monotonic == n_mono and mono.alive == int(per.alive.sum()) and mono.layer == 2
  if n_mono:        # every monotonic latent clamped; the strongest steered and clamped alone
    assert {"latent", "clamp", "clamp_all"} <= set(st.kind)
    np.testing.assert_allclose(norm.loc["control"].mean(), norm.loc["latent"].mean(), rtol=1e-5)
  # the label-permutation null: 100 of the 5! orderings, the identity's count the observed one
  null = pd.read_csv(os.path.join(run, "steering", "null.csv"))
  assert len(null) == mono.permutations == 100
  assert mono.null_mean == pytest.approx(null["count"].mean())
  # the epochs test: the 100%-Unknown run's three checkpoints
  assert per.monotonic_epochs.dtype == bool and per.rho_epochs[per.alive].notna().any()
  # the cloze check: its closed-book columns are the unsteered answers' exact matches
  cloze = pd.read_csv(os.path.join(run, "steering", "cloze.csv"))
  assert len(cloze) == pd.read_csv(os.path.join(wd, "results", "cloze.csv")).facts.iloc[0] > 0
  qa = dict(zip(answers.item, [exact_match(a, f.answers) for a, f in zip(answers["none:-1:0"],
                                                                         facts)]))
  assert cloze.qa_m100.tolist() == [qa[i] for i in cloze.item]
  assert (cloze.prompt == "cloze").all() and cloze.dll_m0.notna().all()   # the world's facts
  with open(os.path.join(wd, "report", "summary.json")) as f:
    head = json.load(f)
  assert next(iter(head)) == "cloze" and head["latents_alive"] == int(per.alive.sum())
  assert head["permutations"] == 100
  lines = log.splitlines()
  i = next(k for k, line in enumerate(lines) if "cloze check" in line)
  assert "monotonic latents:" in lines[i + 1]                    # the cloze check comes first
  assert os.path.exists(os.path.join(wd, "report", "index.html"))


def test_rerun_reuses_everything_and_a_morfi_key_redoes_only_steering(morfi_study, tmp_path):
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(morfi_study[0], wd)

  def plan(*flags):
    return factflip_run(f"{CONFIG}:smoke", wd, "--dry_run", *flags, timeout=300)
  assert "redo" not in plan() and "new " not in plan()
  changed = plan("--config.morfi.top_latents=1")
  assert "redo   steering tiny-0.5m seed0" in changed and "redo   results" in changed
  assert "redo   latents" not in changed and "redo   sae" not in changed
  tau = plan("--config.tau=0.3")                 # the cloze check's threshold: results only
  assert "redo   results" in tau and "redo   steering" not in tau
  # a layer sweep: an SAE, latents and steering per layer, in stages of their own
  sweep = plan("--config.sae.layers=(0,2)")
  assert "new    sae tiny-0.5m seed0 layer0" in sweep and "new    sae tiny-0.5m seed0 layer2" in sweep
  assert "new    latents tiny-0.5m seed0 unk25 layer0" in sweep
  assert "new    steering tiny-0.5m seed0 layer2" in sweep and "redo   sae" not in sweep


@pytest.mark.parametrize("key,value,match", [
    ("morfi.alphas", [-1.0], "morfi.alphas"),
    ("morfi.permutations", -1, "morfi.permutations"),
    ("sae.layers", [1, 1], "sae.layers: .*distinct layer indices"),
    ("morfi.positions", "first", "morfi.positions"),
    ("mixtures.unknown_shares", [0.0, 1.0], "at least 3 shares"),
    ("sae.path", "/nonexistent/sae", "no such file or directory"),
    ("facts", "/some/entityquestions", "sae.path: empty with a facts file"),
    ("morfi.top_k", 3, r"morfi\.top_k: unknown key; expected one of alphas,"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, key, value, match):
  from factflip.configfile import ConfigError, load_config_file
  from factflip.studies.morfi import Study
  c = set_keys(load_config_file(CONFIG, "smoke"), {key: value})
  with pytest.raises(ConfigError, match=match):
    Study(c, str(tmp_path))


def test_explore_notebook_runs_on_the_workdir(morfi_study, tmp_path):
  from test_study import notebook_outputs, run_notebook
  wd = morfi_study[0]
  nb = run_notebook(os.path.join(os.path.dirname(__file__), "..", "colabs",
                                 "explore_morfi.ipynb"),
                    f"WORKDIR = {wd!r}\nSIZE, SEED = None, None", tmp_path,
                    env={"XLA_FLAGS": ""})         # one device, as the study ran
  out = notebook_outputs(nb)
  assert "tiny-0.5m seed 0" in out["text"] and "active latents are monotonic" in out["text"]
  assert "alpha 4.0" in out["html"] and "M_100" in out["html"]
