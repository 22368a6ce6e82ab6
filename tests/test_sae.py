"""SAEs: encode / decode against SAELens 6.x for every architecture and input normalisation, the
SAELens directory both ways, Gemma Scope and Llama Scope files as SAELens reads them, and errors
on bad files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import set_keys

from factflip import sae as S
from factflip.configfile import ConfigError
from factflip.fileio import DataError

D_IN, D_SAE = 16, 48


def _random_saelens(arch, norm="none", *, b_dec_in=True, rescale=False, hook_z=False, seed=0):
  """A SAELens inference SAE with random parameters (normal, so some pre-activations are
  negative and TopK's relu of the selected values matters)."""
  import torch
  from sae_lens import SAE as LensSAE
  torch.manual_seed(seed)
  cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
         "device": "cpu", "apply_b_dec_to_input": b_dec_in, "normalize_activations": norm,
         "reshape_activations": "hook_z" if hook_z else "none",
         "metadata": {"hook_name": "blocks.1.attn.hook_z" if hook_z else
                      "blocks.1.hook_resid_post"}}
  if arch == "topk":
    cfg.update(k=5, rescale_acts_by_decoder_norm=rescale)
  lens = LensSAE.from_dict(cfg)
  with torch.no_grad():
    for name, p in lens.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if name.startswith("W") else 0.1))
    if arch == "jumprelu":
      lens.threshold.copy_(torch.rand(D_SAE) * 0.3)
  return lens


def _x(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2 + 0.5


CASES = [("standard", "none", True, False), ("standard", "constant_norm_rescale", True, False),
         ("standard", "layer_norm", False, False), ("topk", "none", True, False),
         ("topk", "layer_norm", True, True), ("jumprelu", "none", False, False),
         ("jumprelu", "constant_norm_rescale", True, False),
         ("standard", "expected_average_only_in", True, False)]


@pytest.mark.parametrize("arch,norm,b_dec_in,rescale", CASES)
def test_encode_decode_match_saelens_both_ways(tmp_path, arch, norm, b_dec_in, rescale):
  import torch
  from sae_lens import SAE as LensSAE
  lens = _random_saelens(arch, norm, b_dec_in=b_dec_in, rescale=rescale)
  lens.save_model(str(tmp_path / "lens"))
  ours = S.load_sae(str(tmp_path / "lens"))
  assert ours.cfg.architecture == arch and ours.cfg.hook_name == "blocks.1.hook_resid_post"
  x = _x((3, 4, D_IN))
  with torch.no_grad():
    f_ref = lens.encode(torch.tensor(x)).numpy()
    x_hat_ref = lens.decode(torch.tensor(f_ref)).numpy()     # after its encode: its norm stats
  f, state = S.encode_with_state(ours, x)
  assert f.shape == (3, 4, D_SAE) and 0 < (np.asarray(f) > 0).mean() < 1
  np.testing.assert_allclose(f, f_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(S.decode(ours, f_ref, state), x_hat_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(S.forward(ours, x), x_hat_ref, atol=1e-5, rtol=1e-5)
  if arch == "topk":
    assert ((np.asarray(f) != 0).sum(-1) <= 5).all()
  # and back: our save opens in SAELens with the same numbers
  S.save_sae(ours, str(tmp_path / "ours"))
  back = LensSAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
  assert type(back) is type(lens) and back.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
  with torch.no_grad():
    np.testing.assert_allclose(back.encode(torch.tensor(x)).numpy(), f_ref, atol=1e-6)
    assert back.cfg.normalize_activations == norm and back.cfg.apply_b_dec_to_input == b_dec_in


def test_decode_without_the_input_statistics_is_an_error(tmp_path):
  lens = _random_saelens("standard", "layer_norm")
  lens.save_model(str(tmp_path / "lens"))
  ours = S.load_sae(str(tmp_path / "lens"))
  with pytest.raises(ValueError, match="needs the input's statistics"):
    S.decode(ours, np.zeros((2, D_SAE), np.float32))


def test_hook_z_sae_reads_heads_and_decodes_to_heads(tmp_path):
  import torch
  lens = _random_saelens("standard", hook_z=True)
  lens.save_model(str(tmp_path / "lens"))
  ours = S.load_sae(str(tmp_path / "lens"))
  assert ours.cfg.reshape_activations == "hook_z"
  z = _x((2, 3, 4, 4))                                  # [batch, pos, heads, d_head]
  with torch.no_grad():
    f_ref = lens.encode(torch.tensor(z)).numpy()
    z_hat_ref = lens.decode(torch.tensor(f_ref)).numpy()
  np.testing.assert_allclose(S.encode(ours, z), f_ref, atol=1e-5)
  out = S.forward(ours, z)
  assert out.shape == z.shape
  np.testing.assert_allclose(out, z_hat_ref, atol=1e-5)
  with pytest.raises(ValueError, match="needs its head width"):
    S.decode(ours, f_ref)


def test_gemma_scope_npz_as_saelens_reads_it(tmp_path, monkeypatch):
  """A params.npz in Gemma Scope's layout (lower-case w_ keys are renamed as SAELens does),
  through SAELens's own gemma_2 loader with its download pointed at the local file."""
  import torch
  from sae_lens import SAE as LensSAE
  from sae_lens.loading import pretrained_sae_loaders as L
  rng = np.random.default_rng(0)
  arrays = {"W_enc": rng.normal(size=(D_IN, D_SAE)) * 0.3, "W_dec": rng.normal(
      size=(D_SAE, D_IN)) * 0.3, "b_enc": rng.normal(size=D_SAE) * 0.1,
      "b_dec": rng.normal(size=D_IN) * 0.1, "threshold": rng.uniform(0, 0.3, D_SAE)}
  folder = tmp_path / "layer_3" / "width_16k" / "average_l0_50"
  folder.mkdir(parents=True)
  np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
  monkeypatch.setattr(L, "hf_hub_download", lambda repo_id, filename, subfolder=None, **_:
                      str(tmp_path / subfolder / filename))
  _, state, _ = L.gemma_2_sae_huggingface_loader(
      "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50", device="cpu")
  lens = LensSAE.from_dict({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE,
                            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
                            "normalize_activations": "none", "metadata": {}})
  lens.load_state_dict(state)
  ours = S.load_sae(str(folder), hook_name="blocks.3.hook_resid_post")
  assert ours.cfg.architecture == "jumprelu" and not ours.cfg.apply_b_dec_to_input
  assert ours.cfg.hook_name == "blocks.3.hook_resid_post"
  assert S.load_sae(str(folder / "params.npz")).cfg.d_sae == D_SAE      # the file itself
  x = _x((5, D_IN))
  with torch.no_grad():
    f_ref = lens.encode(torch.tensor(x)).numpy()
    x_hat_ref = lens.decode(torch.tensor(f_ref)).numpy()
  assert 0 < (f_ref > 0).mean() < 1
  np.testing.assert_allclose(S.encode(ours, x), f_ref, atol=1e-5)
  np.testing.assert_allclose(S.forward(ours, x), x_hat_ref, atol=1e-5)


def test_llama_scope_folds_the_dataset_norm_as_saelens_does(tmp_path, monkeypatch):
  """hyperparams.json + checkpoints/final.safetensors (torch layout), through SAELens's
  llama_scope loader and its fold of the dataset-wise norm; ours reads raw activations."""
  import ml_dtypes
  import torch
  from sae_lens import SAE as LensSAE
  from sae_lens.loading import pretrained_sae_loaders as L
  from safetensors.numpy import save_file
  rng = np.random.default_rng(1)
  folder = tmp_path / "Llama3_1-8B-Base-L5R-8x"
  (folder / "checkpoints").mkdir(parents=True)
  # SAELens's loader casts to bfloat16: values it holds exactly (bfloat16-rounded weights, s =
  # √16 / 8 = 0.5, threshold 0.375 · s), so the comparison is of the math, not of the rounding
  hp = {"d_model": D_IN, "d_sae": D_SAE, "act_fn": "jumprelu", "jump_relu_threshold": 0.375,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 8.0,
                                                                              "out": 7.0},
        "hook_point_in": "blocks.5.hook_resid_pre", "apply_decoder_bias_to_pre_encoder": False}
  (folder / "hyperparams.json").write_text(json.dumps(hp))
  def bf16(*shape, scale):
    return (rng.normal(size=shape) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)
  save_file({"encoder.weight": bf16(D_SAE, D_IN, scale=0.3), "encoder.bias": bf16(D_SAE,
                                                                                 scale=0.1),
             "decoder.weight": bf16(D_IN, D_SAE, scale=0.3), "decoder.bias": bf16(D_IN,
                                                                                 scale=0.1)},
            str(folder / "checkpoints" / "final.safetensors"))
  monkeypatch.setattr(L, "hf_hub_download", lambda repo_id, filename, subfolder=None, **_:
                      str(tmp_path / (subfolder or "") / filename))
  cfg, state, _ = L.llama_scope_sae_huggingface_loader(
      "fnlp/Llama3_1-8B-Base-LXR-8x", folder.name, device="cpu")
  cfg = dict(cfg, dtype="float32")
  lens = LensSAE.from_dict(cfg)
  lens.load_state_dict({k: v.float() for k, v in state.items()})
  s = np.sqrt(D_IN) / 8.0
  lens.fold_activation_norm_scaling_factor(s)               # what from_pretrained does
  ours = S.load_sae(str(folder))
  assert ours.cfg.hook_name == "blocks.5.hook_resid_pre"
  assert ours.cfg.normalize_activations == "none" and not ours.cfg.apply_b_dec_to_input
  x = _x((6, D_IN)) * 3
  with torch.no_grad():
    f_ref = lens.encode(torch.tensor(x)).numpy()
    x_hat_ref = lens.decode(torch.tensor(f_ref)).numpy()
  assert 0 < (f_ref > 0).mean() < 1
  np.testing.assert_allclose(S.encode(ours, x), f_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(S.forward(ours, x), x_hat_ref, atol=1e-5, rtol=1e-5)


def test_init_matches_saelens_training_start():
  cfg = S.SAEConfig("jumprelu", D_IN, D_SAE)
  sae = S.init_sae(cfg, jax.random.key(0))
  np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=-1), 0.1, rtol=1e-5)
  np.testing.assert_array_equal(sae.W_enc, np.asarray(sae.W_dec).T)
  assert float(sae.threshold[0]) == pytest.approx(0.01) and not np.any(sae.b_enc)


def _saved(tmp_path, arch="topk"):
  lens = _random_saelens(arch)
  lens.save_model(str(tmp_path / "sae"))
  return tmp_path / "sae"


def _edit_cfg(d, **changes):
  cfg = json.loads((d / "cfg.json").read_text())
  for k, v in changes.items():
    if v is None:
      cfg.pop(k)
    else:
      cfg[k] = v
  (d / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"architecture": "gated"}, r"cfg.json: field 'architecture': 'gated'; factflip reads"),
    ({"d_in": "16"}, r"cfg.json: field 'd_in': '16'; expected a positive integer"),
    ({"d_sae": None}, r"cfg.json: field 'd_sae': missing"),
    ({"k": 0}, r"cfg.json: field 'k' is 0; expected an integer in \[1, d_sae=48\]"),
    ({"normalize_activations": "batch"}, r"field 'normalize_activations' is 'batch'"),
    ({"dtype": "int8"}, r"cfg.json: field 'dtype': 'int8'; expected float32"),
])
def test_bad_cfg_names_file_and_field(tmp_path, changes, match):
  d = _saved(tmp_path)
  _edit_cfg(d, **changes)
  with pytest.raises(DataError, match=match):
    S.load_sae(str(d))


def test_bad_tensors_name_file_and_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = _saved(tmp_path)
  weights = load_file(str(d / "sae_weights.safetensors"))
  save_file({**weights, "W_dec": weights["W_dec"][:, :-1]}, str(d / "sae_weights.safetensors"))
  with pytest.raises(DataError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape "
                     r"\(48, 15\); expected \(48, 16\)"):
    S.load_sae(str(d))
  save_file({k: v for k, v in weights.items() if k != "b_enc"},
            str(d / "sae_weights.safetensors"))
  with pytest.raises(DataError, match=r"tensor 'b_enc' missing; a topk SAE has"):
    S.load_sae(str(d))
  save_file({**weights, "threshold": weights["b_enc"]}, str(d / "sae_weights.safetensors"))
  with pytest.raises(DataError, match=r"unexpected tensor 'threshold'; a topk SAE has"):
    S.load_sae(str(d))
  os.remove(d / "sae_weights.safetensors")
  with pytest.raises(DataError, match=r"sae_weights.safetensors missing"):
    S.load_sae(str(d))
  with pytest.raises(DataError, match=r"no SAE here: expected cfg.json"):
    S.load_sae(str(tmp_path))
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(DataError, match=r"bad.npz: not a readable .npz archive"):
    S.load_sae(str(tmp_path / "bad.npz"))


def test_save_is_atomic_and_keeps_metadata(tmp_path):
  cfg = S.SAEConfig("standard", D_IN, D_SAE, hook_name="blocks.0.hook_resid_post",
                    metadata={"model_name": "tiny-2m", "context_size": 64})
  sae = S.init_sae(cfg, jax.random.key(1))
  S.save_sae(sae, str(tmp_path / "a"))
  S.save_sae(sae.replace(b_dec=sae.b_dec + 1), str(tmp_path / "a"))    # replaces the old whole
  back = S.load_sae(str(tmp_path / "a"))
  assert back.cfg == cfg and back.cfg.metadata["model_name"] == "tiny-2m"
  np.testing.assert_array_equal(back.b_dec, np.asarray(sae.b_dec) + 1)
  assert sorted(os.listdir(tmp_path)) == ["a"]                       # no temporary left


def test_a_new_architecture_is_one_table_entry(monkeypatch, tmp_path):
  """A fourth architecture registered in the table and nowhere else (a toy: f = min(relu(h ·
  scale), 6) with its own per-latent `scale`, ranked by decoder norm, an L1 term in training)
  validates, initialises, encodes, saves, loads, trains and configures a training run."""
  from factflip.sae import architectures as A
  from factflip.sae.losses import LossConfig, init_state, losses, make_optimizer, make_train_step
  from factflip.sae.train import _sae_config, base_config, validate
  with pytest.raises(ValueError, match="field 'architecture' is 'relu6'; expected one of"):
    S.SAEConfig("relu6", D_IN, D_SAE).validate()

  def relu6(h, extra, cfg):
    return jnp.minimum(jax.nn.relu(h * extra["scale"]), 6.0)

  def l1(fw, cfg, lc):
    return {"l1_loss": lc.l1_coefficient * jnp.abs(fw.f_NxS).sum(-1).mean()}
  monkeypatch.setitem(A.ARCHITECTURES, "relu6", A.Architecture(
      "relu6", relu6, loss=l1, extra_params={"scale": A.Param(lambda cfg: (cfg.d_sae,), 1.5)},
      rescales_by_decoder_norm=True, cfg_fields=("rescale_acts_by_decoder_norm",)))
  cfg = S.SAEConfig("relu6", D_IN, D_SAE, rescale_acts_by_decoder_norm=True,
                    hook_name="blocks.0.hook_resid_post")
  cfg.validate()
  sae = S.init_sae(cfg, jax.random.key(0), decoder_norm=0.5)
  assert list(sae.params()) == ["W_enc", "b_enc", "W_dec", "b_dec", "scale"]
  np.testing.assert_array_equal(sae.extra["scale"], np.full(D_SAE, 1.5, np.float32))
  with pytest.raises(ValueError, match=r"\['threshold'\] are no parameters of a relu6 SAE"):
    S.init_sae(cfg, jax.random.key(0), threshold=0.1)
  rng = np.random.default_rng(0)
  sae = sae.replace(b_enc=jnp.asarray(rng.normal(size=D_SAE) * 0.2, jnp.float32),
                    scale=jnp.asarray(rng.uniform(1, 12, D_SAE), jnp.float32))
  x = _x((5, D_IN))
  W_enc, b_enc, W_dec, b_dec, scale = (np.asarray(v, np.float64) for v in sae.params().values())
  norm_S = np.linalg.norm(W_dec, axis=-1)
  f_ref = np.clip(((x - b_dec) @ W_enc + b_enc) * norm_S * scale, 0, 6)
  assert 0 < (f_ref == 0).mean() and 0 < (f_ref == 6).mean() and ((0 < f_ref) & (f_ref < 6)).any()
  np.testing.assert_allclose(S.encode(sae, x), f_ref, atol=1e-5)
  np.testing.assert_allclose(S.forward(sae, x), (f_ref / norm_S) @ W_dec + b_dec, atol=1e-5)
  # its file: the architecture's own field and tensor written, and read back
  S.save_sae(sae, str(tmp_path / "relu6"))
  record = json.loads((tmp_path / "relu6" / "cfg.json").read_text())
  assert record["architecture"] == "relu6" and record["rescale_acts_by_decoder_norm"] is True
  assert "k" not in record
  back = S.load_sae(str(tmp_path / "relu6"))
  assert back.cfg == cfg
  for name, v in sae.params().items():
    np.testing.assert_array_equal(back.params()[name], v, err_msg=name)
  # training: the MSE and its own term, its own parameter learned
  lc = LossConfig(l1_coefficient=0.01)
  _, terms, _ = losses(sae.params(), cfg, lc, jnp.asarray(x), jnp.zeros(D_SAE, bool), 0)
  assert set(terms) == {"mse_loss", "l1_loss"} and float(terms["l1_loss"]) > 0
  tx = make_optimizer(1e-2, 3)
  state = init_state(sae, tx)
  step_fn = make_train_step(cfg, lc, tx, donate=False)
  for seed in range(3):
    state, metrics = step_fn(state, jnp.asarray(_x((16, D_IN), seed=seed)))
  assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 3
  assert not np.array_equal(state["params"]["scale"], sae.extra["scale"])
  # a training run's config names it and sets its own field from sae.<field>
  c = base_config()
  c.model, c.sae.architecture = "model", "relu6"
  validate(c)
  assert _sae_config(c, D_IN) == S.SAEConfig("relu6", D_IN, 8 * D_IN, hook_name=c.hook_name,
                                             rescale_acts_by_decoder_norm=True)
  c.loss.feature_sampling_window = 0     # SAELens's sparsity window: at least one step
  with pytest.raises(ConfigError, match="loss.feature_sampling_window.*expected an integer >= 1"):
    validate(c)


# ---- interventions ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  """A random 3-layer factflip model (d_model 16) and a batch with padding."""
  from flax import nnx

  from factflip.models import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=64, d_model=D_IN, n_layers=3, n_heads=4, n_kv_heads=2,
                    head_dim=4, d_ff=32, max_seq_len=32)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(1, 64, (2, 7)).astype(np.int32)
  mask = np.ones((2, 7), bool)
  mask[1, :2] = False
  return model, tokens, mask


def _sae_at(hook, arch="standard", seed=0, d_in=D_IN, **kw):
  cfg = S.SAEConfig(arch, d_in, D_SAE, hook_name=hook, **kw)
  sae = S.init_sae(cfg, jax.random.key(seed), decoder_norm=1.0)
  return sae.replace(b_enc=jax.random.normal(jax.random.key(seed + 1), (D_SAE,)) * 0.2)


def test_steering_adds_decoder_directions_and_grids_equal_loops(tiny):
  from factflip.probes import add
  from factflip.sae.steering import run_grid, steer
  model, tokens, mask = tiny
  L = model.cfg.n_layers
  sae = _sae_at("blocks.1.hook_resid_post")
  iv = steer(sae, [3, 7], [2.0, -1.0], L)
  d = 2.0 * sae.W_dec[3] - sae.W_dec[7]
  want = add("resid_post", jnp_stack(d, L), layers=[1])
  np.testing.assert_allclose(model(tokens, mask, interventions=[iv]),
                             model(tokens, mask, interventions=[want]), atol=1e-6)
  # a grid of latents x alpha: one vmapped program, equal to a loop of single forwards
  lat_G = np.repeat(np.arange(4), 3)
  alpha_G = np.tile(np.array([-4.0, 0.0, 4.0], np.float32), 4)
  grid = jax.vmap(lambda j, a: steer(sae, j, a, L))(lat_G, alpha_G)
  read = last_logprob_of_token_5
  got = run_grid(model, tokens, mask, grid, read)
  got_chunked = run_grid(model, tokens, mask, grid, read, chunk=5)
  loop = np.stack([read(model(tokens, mask, interventions=[steer(sae, int(j), float(a), L)]))
                   for j, a in zip(lat_G, alpha_G)])
  assert got.shape == (12, 2)
  np.testing.assert_allclose(got, loop, atol=1e-5)
  np.testing.assert_allclose(got_chunked, loop, atol=1e-5)
  np.testing.assert_allclose(got[1], got[4], atol=1e-6)            # alpha 0: no change
  assert not np.allclose(got[0], got[2])


def jnp_stack(d, L):
  return np.broadcast_to(np.asarray(d), (L, 1, 1, d.shape[-1]))


def last_logprob_of_token_5(logits_BxTxV):
  return jax.nn.log_softmax(logits_BxTxV[:, -1])[:, 5]


def test_clamp_keeps_the_error_term_and_splice_replaces_the_site(tiny):
  from factflip.probes import capture
  from factflip.sae.steering import clamp, splice
  model, tokens, mask = tiny
  L = model.cfg.n_layers
  sae = _sae_at("blocks.2.hook_resid_pre")
  clean = capture(model, tokens, ["resid_pre"], mask)["resid_pre"][2]
  f = np.asarray(S.encode(sae, clean))
  j = int(np.argmax(f.reshape(-1, D_SAE).sum(0)))               # a latent that fires
  assert f[..., j].max() > 0
  # clamping latent j to 0 with the error term kept removes exactly f_j · W_dec[j]
  ablate = clamp(sae, [j], [0.0], L)
  assert ablate.site == "resid_pre" and ablate.keep_error
  out = capture(model, tokens, ["resid_pre"], mask, interventions=[ablate])["resid_pre"][2]
  np.testing.assert_allclose(out, clean - f[..., j:j + 1] * np.asarray(sae.W_dec[j]), atol=1e-5)
  pos = np.zeros(7, bool)
  pos[4] = True
  only4 = capture(model, tokens, ["resid_pre"], mask,
                  interventions=[clamp(sae, [j], [0.0], L, positions=pos)])["resid_pre"][2]
  np.testing.assert_array_equal(np.delete(only4, 4, axis=1), np.delete(clean, 4, axis=1))
  np.testing.assert_allclose(only4[:, 4], out[:, 4], atol=1e-6)
  # an edit that sets nothing: exactly the clean run
  noop = clamp(sae, [], [], L)
  np.testing.assert_array_equal(model(tokens, mask, interventions=[noop]), model(tokens, mask))
  # splice: the site is the SAE's reconstruction
  spliced = capture(model, tokens, ["resid_pre"], mask,
                    interventions=[splice(sae, L)])["resid_pre"][2]
  np.testing.assert_allclose(spliced, S.forward(sae, clean), atol=1e-5)
  with pytest.raises(ValueError, match=r"latents \[48\] out of range for d_sae 48"):
    clamp(sae, [D_SAE], [0.0], L)
  with pytest.raises(ValueError, match="no hook_name"):
    clamp(S.init_sae(S.SAEConfig("standard", D_IN, D_SAE), jax.random.key(0)), [0], [0.0], L)


def test_hook_z_sae_edits_attention_heads(tiny):
  from factflip.probes import capture
  from factflip.sae.steering import clamp, splice
  model, tokens, mask = tiny
  L = model.cfg.n_layers
  sae = _sae_at("blocks.0.attn.hook_z", reshape_activations="hook_z")
  z = capture(model, tokens, ["z"], mask)["z"][0]                    # [B, T, heads, d_head]
  spliced = capture(model, tokens, ["z"], mask, interventions=[splice(sae, L)])["z"][0]
  assert spliced.shape == z.shape == (2, 7, 4, 4)
  np.testing.assert_allclose(spliced, S.forward(sae, z), atol=1e-5)
  f = np.asarray(S.encode(sae, z))
  j = int(np.argmax(f.reshape(-1, D_SAE).sum(0)))
  out = capture(model, tokens, ["z"], mask,
                interventions=[clamp(sae, [j], [0.0], L)])["z"][0]
  want = z - (f[..., j:j + 1] * np.asarray(sae.W_dec[j])).reshape(2, 7, 4, 4)
  np.testing.assert_allclose(out, want, atol=1e-5)


# ---- training objectives ----------------------------------------------------------------------
def _training_pair(arch, seed=0):
  """A SAELens training SAE with random parameters and ours with the same numbers."""
  import sae_lens
  import torch
  torch.manual_seed(seed)
  extra = {"standard": {"l1_coefficient": 0.7},
           "topk": {"k": 6, "aux_loss_coefficient": 0.5, "rescale_acts_by_decoder_norm": True},
           "jumprelu": {"l0_coefficient": 0.3, "jumprelu_bandwidth": 0.2,
                        "jumprelu_init_threshold": 0.1}}[arch]
  cls = {"standard": sae_lens.StandardTrainingSAEConfig, "topk": sae_lens.TopKTrainingSAEConfig,
         "jumprelu": sae_lens.JumpReLUTrainingSAEConfig}[arch]
  lens = sae_lens.TrainingSAE.from_dict(cls(d_in=D_IN, d_sae=D_SAE, **extra).to_dict())
  with torch.no_grad():
    for name, p in lens.named_parameters():
      if name == "threshold":
        p.copy_(torch.rand_like(p) * 0.4)
      else:
        p.copy_(torch.randn_like(p) * (0.3 if name.startswith("W") else 0.1))
  from factflip.sae.losses import LossConfig
  lc = LossConfig(l1_coefficient=extra.get("l1_coefficient", 1.0),
                  l0_coefficient=extra.get("l0_coefficient", 1.0),
                  jumprelu_bandwidth=extra.get("jumprelu_bandwidth", 0.05),
                  aux_loss_coefficient=extra.get("aux_loss_coefficient", 1.0))
  cfg = S.SAEConfig(arch, D_IN, D_SAE, k=extra.get("k", 0),
                    rescale_acts_by_decoder_norm=extra.get("rescale_acts_by_decoder_norm",
                                                           False))
  params = {n: p.detach().numpy().copy() for n, p in lens.named_parameters()}   # not aliased
  return lens, cfg, lc, params


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_losses_and_gradients_match_saelens_training(arch):
  import torch
  from sae_lens.saes.sae import TrainStepInput

  from factflip.sae.losses import losses
  lens, cfg, lc, params = _training_pair(arch)
  x = _x((12, D_IN))
  dead = np.zeros(D_SAE, bool)
  dead[::3] = True                                  # TopK's auxiliary loss reads these
  coeffs = {"standard": {"l1": lc.l1_coefficient}, "topk": {},
            "jumprelu": {"l0": lc.l0_coefficient}}[arch]
  out = lens.training_forward_pass(TrainStepInput(
      sae_in=torch.tensor(x), coefficients=coeffs, dead_neuron_mask=torch.tensor(dead),
      n_training_steps=5, is_logging_step=False))
  out.loss.backward()
  grads_ref = {n: p.grad.numpy() for n, p in lens.named_parameters()}

  def total(p):
    loss, terms, _ = losses(p, cfg, lc, jnp.asarray(x), jnp.asarray(dead), 5)
    return loss, terms
  (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(
      {k: jnp.asarray(v) for k, v in params.items()})
  assert set(terms) == set(out.losses)
  for name, v in out.losses.items():
    np.testing.assert_allclose(terms[name], v.item(), rtol=1e-5, atol=1e-6)
    assert float(terms[name]) > 0
  np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)
  assert set(grads) == set(grads_ref)
  for name, ref in grads_ref.items():
    np.testing.assert_allclose(grads[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)
  if arch == "jumprelu":
    assert np.abs(grads_ref["threshold"]).max() > 0          # the kernel reached θ


def test_training_steps_match_torch_adam_with_clipping():
  """Three SAELens-style steps (forward, dead-latent counters, firing counts with a sampling
  window of 2, backward, clip to 1, Adam) in torch vs our jitted step: same parameters within
  1e-5, the same counters and the same log feature sparsity."""
  import torch
  from sae_lens.saes.sae import TrainStepInput

  from factflip.sae.losses import (
    LossConfig,
    init_state,
    log_feature_sparsity,
    make_optimizer,
    make_train_step,
  )
  lens, cfg, _, params = _training_pair("topk", seed=3)
  from sae_lens.training.sae_trainer import _log_feature_sparsity
  lc = LossConfig(aux_loss_coefficient=0.5, dead_feature_window=1, feature_sampling_window=2)
  opt = torch.optim.Adam(lens.parameters(), lr=1e-2, betas=(0.9, 0.999))
  since, act_freq, n_samples = torch.zeros(D_SAE), torch.zeros(D_SAE), 0
  xs = [_x((16, D_IN), seed=s) for s in range(3)]
  for t, x in enumerate(xs):
    if t > 0 and t % 2 == 0:                   # SAETrainer.maybe_reset_sparsity
      act_freq, n_samples = torch.zeros(D_SAE), 0
    out = lens.training_forward_pass(TrainStepInput(
        sae_in=torch.tensor(x), coefficients={}, dead_neuron_mask=since > 1,
        n_training_steps=t, is_logging_step=False))
    fired = out.feature_acts.bool().any(0)
    since += 1
    since[fired] = 0
    act_freq += out.feature_acts.bool().float().sum(0)   # SAETrainer's act_freq_scores
    n_samples += len(x)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
  sae = S.make_sae(cfg, params)
  tx = make_optimizer(1e-2, 3)
  state = init_state(sae, tx)
  step_fn = make_train_step(cfg, lc, tx, donate=False)
  for x in xs:
    state, metrics = step_fn(state, jnp.asarray(x))
  np.testing.assert_array_equal(state["since_fired"], since.numpy().astype(int))
  np.testing.assert_array_equal(state["window_fired"], act_freq.numpy().astype(int))
  assert int(state["window_tokens"]) == n_samples == 16          # the last window: step 3 only
  np.testing.assert_allclose(log_feature_sparsity(state),
                             _log_feature_sparsity(act_freq / n_samples).numpy(), rtol=1e-6)
  for name, p in lens.named_parameters():
    np.testing.assert_allclose(state["params"][name], p.detach().numpy(), atol=1e-5,
                               err_msg=name)
  assert int(state["step"]) == 3 and 0 < float(metrics["l0"]) <= 6


# ---- training runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_lm(small_world, world_tokenizer, tmp_path_factory):
  """A random 2-layer factflip model over the world tokenizer, saved with it, and the world's
  directory (the SAE's token data)."""
  from flax import nnx

  from factflip.data.world import write_world
  from factflip.models import ModelConfig, Transformer
  from factflip.models.store import save_model
  d = tmp_path_factory.mktemp("sae_lm")
  cfg = ModelConfig(vocab_size=len(world_tokenizer), d_model=32, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
  save_model(Transformer(cfg, rngs=nnx.Rngs(0)), str(d / "model"))
  world_tokenizer.save_pretrained(str(d / "model"))
  write_world(small_world, str(d / "world"))
  return str(d / "model"), str(d / "world")


def _sae_run_config(sae_lm, **over):
  from factflip.sae.train import base_config
  model, world = sae_lm
  c = base_config()
  c.model, c.hook_name = model, "blocks.1.hook_resid_pre"
  c.data.kind, c.data.world_dir, c.data.tokenizer_dir = "world", world, model
  c.data.seq_len, c.data.batch_size = 32, 8
  c.steps, c.batch_tokens, c.buffer_batches = 24, 64, 2
  c.sae.expansion_factor, c.sae.k = 4, 8
  c.optim.lr = 3e-3
  c.eval.every, c.eval.batches = 12, 1
  c.checkpoint.every, c.log_every = 5, 4
  return set_keys(c, over)


def test_sae_training_learns_resumes_exactly_and_writes_a_saelens_sae(sae_lm, tmp_path):
  import torch
  from sae_lens import SAE as LensSAE

  from factflip.sae.train import train_sae
  c = _sae_run_config(sae_lm)
  full = train_sae(c, str(tmp_path / "full"), quiet=True)
  rows = [json.loads(line) for line in
          (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
  assert rows[-1]["explained_variance"] > rows[0]["explained_variance"] + 0.1
  assert all(r["l0"] <= 8 for r in rows)                   # TopK: at most k active
  ev = full.evals[24]
  assert ev["ce_recovered"] == pytest.approx(
      (ev["ce_zero"] - ev["ce_sae"]) / (ev["ce_zero"] - ev["ce_clean"]))
  assert set(full.evals) == {12, 24}
  # stopped after 7 steps (a checkpoint at 7), then resumed: the same SAE, bit for bit
  part = tmp_path / "part"
  first = train_sae(c, str(part), quiet=True, stop_after=7)
  assert first.step == 7 and not os.path.exists(part / "sae")
  train_sae(c, str(part), quiet=True)
  a, b = S.load_sae(str(tmp_path / "full" / "sae")), S.load_sae(str(part / "sae"))
  for name in a.params():
    np.testing.assert_array_equal(a.params()[name], b.params()[name], err_msg=name)
  # the written SAE: what SAELens loads, reading the hook it was trained on
  assert a.cfg.hook_name == "blocks.1.hook_resid_pre" and a.cfg.d_sae == 128
  lens = LensSAE.load_from_disk(str(tmp_path / "full" / "sae"), device="cpu")
  x = _x((5, 32))
  with torch.no_grad():
    np.testing.assert_allclose(lens.encode(torch.tensor(x)).numpy(), S.encode(a, x), atol=1e-5)
  # SAELens's sparsity file (log10 firing frequency, as its trainer saves it) and metadata
  from safetensors.numpy import load_file
  sparsity = load_file(str(tmp_path / "full" / "sae" / "sparsity.safetensors"))["sparsity"]
  assert sparsity.shape == (128,) and sparsity.dtype == np.float32
  assert (sparsity <= 0).all() and np.isclose(10 ** sparsity, 0, atol=1e-9).sum() < 128
  # counted over the training steps' tokens (24 steps, one window), restored on resume
  np.testing.assert_array_equal(
      sparsity, load_file(str(part / "sae" / "sparsity.safetensors"))["sparsity"])
  # TopK with k = 8 of 128 latents: the densities sum to the mean L0, at most 8 per token
  assert 4.0 < (10.0 ** sparsity.astype(np.float64) - 1e-10).sum() <= 8.0 + 1e-3
  meta = json.loads((tmp_path / "full" / "sae" / "cfg.json").read_text())["metadata"]
  assert meta["context_size"] == c.data.seq_len and meta["exclude_special_tokens"] is True
  assert meta["hook_name"] == "blocks.1.hook_resid_pre" and "prepend_bos" in meta
  assert lens.cfg.metadata.context_size == c.data.seq_len


def test_sae_training_folds_the_activation_scale(sae_lm, tmp_path):
  from factflip.sae.train import train_sae
  c = _sae_run_config(sae_lm, **{"sae.normalize_activations": "expected_average_only_in",
                                 "sae.architecture": "standard", "steps": 6,
                                 "eval.every": 0, "loss.l1_coefficient": 0.01})
  train_sae(c, str(tmp_path / "run"), quiet=True)
  sae = S.load_sae(str(tmp_path / "run" / "sae"))
  assert sae.cfg.normalize_activations == "none"
  rows = [json.loads(line) for line in
          (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["ce_recovered"] == rows[-1]["ce_recovered"]     # evaluated at the end
  with pytest.raises(Exception, match="sae.normalize_activations"):
    train_sae(_sae_run_config(sae_lm, **{"sae.normalize_activations": "layer_norm"}),
              str(tmp_path / "bad"), quiet=True)


def test_train_sae_command(sae_lm, tmp_path):
  import subprocess
  import sys
  model, world = sae_lm
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "sae.py")
  args = [f"--config={config}:jumprelu", f"--config.model={model}",
          f"--config.data.world_dir={world}", "--config.hook_name=blocks.0.attn.hook_z",
          "--config.steps=4", "--config.batch_tokens=64", "--config.buffer_batches=2",
          "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.eval.batches=1",
          f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run([sys.executable, "-m", "factflip.cli", "train-sae", *args],
                       check=False, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "CE loss recovered" in out.stdout
  sae = S.load_sae(str(tmp_path / "run" / "sae"))
  assert sae.cfg.architecture == "jumprelu" and sae.cfg.reshape_activations == "hook_z"
  assert sae.cfg.d_in == 32 and sae.cfg.d_head == 8
  assert sae.cfg.hook_name == "blocks.0.attn.hook_z"
  bad = subprocess.run([sys.executable, "-m", "factflip.cli", "train-sae", *args[:1],
                        f"--workdir={tmp_path / 'bad'}"], check=False, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "model: empty; expected the frozen model" in bad.stderr


def test_topk_sae_recovers_a_sparse_dictionary_stream():
  """Activations that are sparse sums of 24 ground-truth directions (3 per token): a TopK SAE
  (k 3, 48 latents) trained 400 steps explains > 90% of their variance."""
  from factflip.sae.losses import LossConfig, init_state, make_optimizer, make_train_step
  rng = np.random.default_rng(0)
  atoms = rng.normal(size=(24, D_IN)).astype(np.float32)
  atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)

  def batch(n=256):
    idx = np.stack([rng.choice(24, 3, replace=False) for _ in range(n)])
    coef = rng.uniform(1, 3, size=(n, 3)).astype(np.float32)
    return np.einsum("nk,nkd->nd", coef, atoms[idx])
  cfg = S.SAEConfig("topk", D_IN, D_SAE, k=3, rescale_acts_by_decoder_norm=True)
  tx = make_optimizer(1e-2, 400)
  state = init_state(S.init_sae(cfg, jax.random.key(0)), tx)
  step = make_train_step(cfg, LossConfig(dead_feature_window=50), tx)
  evs = []
  for _ in range(400):
    state, m = step(state, jnp.asarray(batch()))
    evs.append(float(m["explained_variance"]))
  assert evs[0] < 0.5 and np.mean(evs[-20:]) > 0.9
  assert float(m["l0"]) == 3.0
