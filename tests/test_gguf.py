"""GGUF files: models and tokenizers against transformers' own GGUF loader, and bad files.

Fixtures are written here with `gguf.GGUFWriter` as llama.cpp's converter writes them
(conftest.write_gguf); nothing is downloaded.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import VOCAB, make_hf_model, torch_forward, write_gguf

import factflip
from factflip.gguf_io import GGUFError

TYPES = ("F32", "F16", "Q8_0", "Q4_1")


def _tiny(family):
  """A tiny random HF model as transformers' GGUF loader can read it back: llama without RoPE
  scaling (it reads no rope_freqs), qwen3 with head_dim = d_model / heads (it reads no
  key_length); the conftest models (scaled RoPE, head_dim 24) are tested against torch below."""
  import torch
  import transformers
  if family == "qwen2":
    return make_hf_model(family)
  torch.manual_seed(3)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = (transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)) if family == "llama"
           else transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
  """(family, type) -> GGUF path, for llama and qwen2 in every test type, qwen3 in Q8_0."""
  d = tmp_path_factory.mktemp("gguf")
  out = {}
  for family, types in (("llama", TYPES), ("qwen2", TYPES), ("qwen3", ("Q8_0",))):
    model = _tiny(family)
    for qtype in types:
      out[family, qtype] = write_gguf(d / f"{family}-{qtype}.gguf", model, qtype)
  return out


def _hf_gguf_logits(path, tokens, mask):
  """transformers' own GGUF loader (dequantising with torch) as the reference."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                               gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
  return torch_forward(model, tokens, mask)[0]


@pytest.mark.parametrize("family,qtype", [(f, t) for f in ("llama", "qwen2") for t in TYPES]
                         + [("qwen3", "Q8_0")])
def test_logits_match_transformers_gguf_loader(gguf_files, batch, family, qtype):
  tokens, mask = batch
  path = gguf_files[family, qtype]
  model = factflip.load_model(path)
  assert model.cfg.family == family
  ours = np.asarray(model(tokens, mask))
  ref = _hf_gguf_logits(path, tokens, mask)
  assert np.abs(ours - ref)[mask].max() <= 1e-4


def test_quantised_weights_are_the_dequantised_blocks(gguf_files):
  """Q4_1 is lossy: the loaded weights differ from F32's by a quantisation step, not more, and
  llama's permuted Q rows are back in HF order (the F32 file equals the torch weights)."""
  exact = factflip.load_model(gguf_files["llama", "F32"]).params()
  q4 = factflip.load_model(gguf_files["llama", "Q4_1"]).params()
  torch_wq = _tiny("llama").model.layers[0].self_attn.q_proj.weight.detach().numpy().T
  np.testing.assert_allclose(np.asarray(exact["layers"]["wq"][0]), torch_wq, atol=1e-7)
  err = np.abs(np.asarray(q4["layers"]["wq"]) - np.asarray(exact["layers"]["wq"]))
  spread = np.abs(np.asarray(exact["layers"]["wq"])).max()
  assert 0 < err.max() <= spread * 2 / 15   # 4 bits: 15 steps over each block's range


def test_gemma2_qwen3_and_llama3_rope_against_the_torch_model(tmp_path, batch):
  """Gemma 2 (norms stored + 1, soft-caps, sliding layers), Qwen3 with head_dim 24 (key_length
  != d_model / heads) and Llama 3.1's RoPE scaling (llama.cpp's rope_freqs tensor), in F32,
  against the torch models they were written from."""
  import torch
  import transformers
  tokens, mask = batch
  torch.manual_seed(5)
  gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
      max_position_embeddings=256, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in gemma.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.3)
  llama3 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192})).eval()
  for name, torch_model in (("gemma2", gemma), ("qwen3", make_hf_model("qwen3")),
                            ("llama3", llama3)):
    path = write_gguf(tmp_path / f"{name}.gguf", torch_model, "F32")
    model = factflip.load_model(path)
    ref = torch_forward(torch_model, tokens, mask)[0]
    assert np.abs(np.asarray(model(tokens, mask)) - ref)[mask].max() <= 1e-4, name
  assert model.cfg.rope_scaling.kind == "llama3" and model.cfg.rope_scaling.factor == 8.0


@pytest.mark.parametrize("family", ["gemma3_text", "olmo2", "phi3", "gpt_neox"])
def test_newer_families_against_the_torch_model(hf_dirs, tmp_path, batch, family):
  """Gemma 3 (per-head QK-norm + 1, local and linearly scaled global RoPE; the sliding layers
  from the file's pattern key), OLMo 2 (post-norms only), Phi-3 (fused qkv and gate_up, partial
  rotary, sliding windows) and GPT-NeoX (query_key_value reordered to [q | k | v], LayerNorm
  biases, parallel residual), in Q8_0, against the torch models they were written from: the
  dequantised weights differ from HF's by a quantisation step, the logits by its effect."""
  import copy
  tokens, mask = batch
  torch_model, keys = hf_dirs[family][1], None
  want = factflip.load_model(hf_dirs[family][0]).cfg
  if family == "gemma3_text":   # GGUF has no query_pre_attn_scalar key: llama.cpp's is head_dim
    config = copy.deepcopy(torch_model.config)
    config.query_pre_attn_scalar = config.head_dim
    state = torch_model.state_dict()
    torch_model = type(torch_model)(config).eval()
    torch_model.load_state_dict(state)
    keys = {"attention.sliding_window_pattern": [True, False, True]}
    want = want.replace(query_pre_attn_scalar=float(config.head_dim))
  f32 = factflip.load_model(write_gguf(tmp_path / "f32.gguf", torch_model, "F32", keys=keys))
  assert f32.cfg.norm_eps == pytest.approx(want.norm_eps)      # stored as float32
  assert f32.cfg == want.replace(norm_eps=f32.cfg.norm_eps, pad_token_id=None)
  ref_logits = torch_forward(torch_model, tokens, mask)[0]
  assert np.abs(np.asarray(f32(tokens, mask)) - ref_logits)[mask].max() <= 1e-4
  q8 = factflip.load_model(write_gguf(tmp_path / "q8.gguf", torch_model, "Q8_0", keys=keys))
  err = np.abs(np.asarray(q8(tokens, mask)) - ref_logits)[mask].max()
  assert 0 < err <= 0.05


def test_gemma3_sliding_layers_default_to_llama_cpps_every_sixth(batch, tmp_path):
  """Without a pattern key, a Gemma 3 file's every sixth layer is global, as in llama.cpp
  and as HF's default sliding_window_pattern=6; the local RoPE base is 10,000."""
  import torch
  import transformers
  tokens, mask = batch
  torch.manual_seed(7)
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
      query_pre_attn_scalar=16, max_position_embeddings=256, attn_implementation="eager")).eval()
  ours = factflip.load_model(write_gguf(tmp_path / "g3.gguf", model, "F32"))
  assert ours.cfg.layer_types == ("sliding",) * 5 + ("full",)
  assert ours.cfg.rope_local_theta == 10000.0
  ref = torch_forward(model, tokens, mask)[0]
  assert np.abs(np.asarray(ours(tokens, mask)) - ref)[mask].max() <= 1e-4


def test_sharded_load_reads_only_each_devices_rows(gguf_files, batch, monkeypatch):
  """On a mesh each device dequantises only the rows of its slice; the logits are unchanged."""
  from factflip.gguf_io import GGUFFile
  from factflip.sharding import make_mesh
  tokens, mask = batch
  path = gguf_files["qwen2", "Q8_0"]
  whole = np.asarray(factflip.load_model(path)(tokens, mask))
  rows = []
  read = GGUFFile.read

  def spy(self, name, rows_=None):
    out = read(self, name, rows_)
    if name == "blk.0.ffn_gate.weight":
      rows.append(out.shape[0])
    return out

  monkeypatch.setattr(GGUFFile, "read", spy)
  model = factflip.load_model(path, mesh=make_mesh(data=1, fsdp=-1, tensor=2))
  assert rows and max(rows) < 96          # ffn_gate has 96 rows, split over the tensor axis
  np.testing.assert_allclose(np.asarray(model(tokens, mask)), whole, atol=1e-5)


def test_gpt2_tokenizer_and_chat_template_match_transformers(hf_lm, world_tokenizer, tmp_path):
  from transformers import AutoTokenizer
  _, torch_model = hf_lm
  template = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")
  path = write_gguf(tmp_path / "lm.gguf", torch_model, "Q8_0", tokenizer=world_tokenizer,
                    chat_template=template)
  ours = factflip.load_tokenizer(path)
  ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="lm.gguf")
  texts = ["The capital of Norway is Oslo.", "  two  spaces\nand a line", "<|eos|> x 1234",
           "Ünïcödé ✓ 日本語"]
  for text in texts:
    assert ours(text).input_ids == ref(text).input_ids
    assert ours(text).input_ids == world_tokenizer(text, add_special_tokens=False).input_ids
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
      world_tokenizer.bos_token_id, world_tokenizer.eos_token_id, world_tokenizer.pad_token_id)
  chat = [{"role": "user", "content": "Where is Oslo?"}]
  assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
      ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
  assert ours.chat_template == template


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
  """A llama-style SentencePiece vocabulary (scores, byte fallback, BOS added)."""
  import gguf
  from transformers import AutoTokenizer
  pieces = ["\u2581", "t", "h", "e", "a", "c", "\u2581t", "he", "\u2581the", "\u2581c", "at",
            "\u2581cat", "s", "\u2581a"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
  scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
  w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_scores(scores)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  ours = factflip.load_tokenizer(str(tmp_path / "sp.gguf"))
  ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
  for text in ["the cat sat", "a cats hat", "zebra ✓"]:
    assert ours(text).input_ids == ref(text).input_ids
  assert ours("the cat").input_ids[0] == 1          # SentencePiece files add BOS


def test_convert_gguf_to_hf_and_factflip(gguf_files, batch, tmp_path):
  """`factflip convert` writes the dequantised model (and the GGUF's tokenizer) that loads
  with the same logits, in HF and factflip formats."""
  tokens, mask = batch
  path = gguf_files["llama", "Q4_1"]
  ref = np.asarray(factflip.load_model(path)(tokens, mask))
  for fmt in ("hf", "factflip"):
    out = str(tmp_path / fmt)
    subprocess.run([sys.executable, "-m", "factflip.cli", "convert", f"--model={path}",
                    f"--out={out}", f"--to={fmt}"], check=True, capture_output=True,
                   env=dict(os.environ, XLA_FLAGS=""))
    np.testing.assert_allclose(np.asarray(factflip.load_model(out)(tokens, mask)), ref,
                               atol=1e-5)
    assert factflip.load_tokenizer(out)("abc").input_ids == (
        factflip.load_tokenizer(path)("abc").input_ids) == [64, 65, 66]


def test_core_install_reads_gguf_without_torch(gguf_files):
  """The model and its tokenizer load with torch unimportable (the core install has none)."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "import factflip\n"
          f"m = factflip.load_model({gguf_files['qwen2', 'Q4_1']!r})\n"
          f"t = factflip.load_tokenizer({gguf_files['qwen2', 'Q4_1']!r})\n"
          "print(m.cfg.family, *t('abc').input_ids)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, XLA_FLAGS=""), check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-4:] == ["qwen2", "64", "65", "66"]


def test_bad_files_name_the_file_and_what_was_expected(gguf_files, tmp_path):
  import gguf
  good = gguf_files["llama", "Q8_0"]
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(open(good, "rb").read()[:os.path.getsize(good) // 2])
  with pytest.raises(GGUFError, match=f"{cut}: unreadable GGUF file, truncated or corrupt"):
    factflip.load_model(str(cut))

  not_gguf = tmp_path / "x.gguf"
  not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))
  with pytest.raises(GGUFError, match="not a GGUF file"):
    factflip.load_model(str(not_gguf))

  w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(GGUFError, match=r"general.architecture is 'mamba'; factflip reads "
                                      r"\['gemma2', 'gemma3', 'gptneox', 'llama', 'olmo2', 'phi3', "
                                      r"'qwen2', 'qwen3'\]"):
    factflip.load_model(str(tmp_path / "mamba.gguf"))

  model = _tiny("llama")
  bad = write_gguf(tmp_path / "int.gguf", model, "F32",
                   tensor_types={"blk.1.attn_v.weight": np.int32})
  with pytest.raises(GGUFError, match="tensor 'blk.1.attn_v.weight' has type I32, which "
                                      "gguf.quants cannot dequantise"):
    factflip.load_model(bad)


def test_gguf_paths_are_models_everywhere(gguf_files):
  """The config reader and the model tokenizer take a GGUF path like a directory."""
  from factflip.data.tokenizer import model_tokenizer
  from factflip.models.store import model_config
  path = gguf_files["qwen2", "F16"]
  cfg = model_config(path)
  assert (cfg.family, cfg.n_layers, cfg.vocab_size, cfg.tie_embeddings, cfg.qkv_bias) == (
      "qwen2", 3, VOCAB, True, True)
  assert model_tokenizer(path)("abc").input_ids == [64, 65, 66]
