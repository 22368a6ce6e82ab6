"""Shared fixtures: tiny random HF models (one per family) saved with save_pretrained.

XLA is given 8 host devices before jax is imported, so sharding tests can build meshes; every
other test runs on device 0 as usual.
"""

import os

# 8 fake CPU devices for the sharding tests, kept alongside any XLA flags the caller set.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# XLA programs that took over a second to compile are kept across test processes and runs
# (the CLI subprocess tests, whose compile_cache reads the same variable, a re-run of the
# suite); JAX_COMPILATION_CACHE_DIR= turns it off.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))

import numpy as np
import pytest

STUDY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "studies",
                            "poisoning.py")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "olmo2", "phi3",
            "gpt_neox")
VOCAB = 101
SEQ = 14  # longer than the sliding window (5) below


# Test files that share an expensive session fixture run in one pytest-xdist worker
# (`-n 2 --dist loadgroup`), so the fixture is built once; every other file is its own group
# (as --dist loadfile), so its module fixtures are built once too.
XDIST_GROUPS = {
    "test_study": "paper_a", "test_cli": "paper_a", "test_eval_run": "paper_a",   # smoke_study
    "test_new_knowledge": "paper_b", "test_morfi": "paper_b",                      # nk_study
    "test_train_loop": "train_loop", "test_monitor": "train_loop",                 # full_run
    "test_loglik": "scorer", "test_requests": "scorer",                            # hf_lm_pair
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1]
    item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS.get(module, module)))


def make_hf_model(family: str, seed: int = 0):
  """A tiny random HF model of `family` exercising that family's switches."""
  import torch
  import transformers

  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "llama":
    cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    model = transformers.LlamaForCausalLM(cfg)
  elif family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **common, tie_word_embeddings=True, rope_theta=1e6))
  elif family == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24))
  elif family == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        **common, sliding_window=5, head_dim=24))
  elif family == "gemma2":
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **common, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attn_implementation="eager"))
  elif family == "gemma3_text":   # per-head QK-norm, a local and a global RoPE base
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **common, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        attn_implementation="eager"))
  elif family == "olmo2":         # post-norms only, QK-norm over all heads
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
  elif family == "phi3":          # fused qkv and gate_up, partial rotary, sliding windows
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **common, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                         "partial_rotary_factor": 0.75}))
  elif family == "gpt_neox":      # LayerNorm with bias, parallel residual, partial rotary
    c = {k: v for k, v in common.items() if k != "num_key_value_heads"}
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **c, hidden_act="gelu", use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                         "partial_rotary_factor": 0.25}))
  else:
    raise ValueError(family)
  with torch.no_grad():  # non-trivial norms and biases so conventions are actually tested
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "norm" in name:
        p.normal_(0.0, 0.3) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
  return model.eval()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
  """family -> (directory, torch model)."""
  out = {}
  for family in FAMILIES:
    model = make_hf_model(family)
    d = str(tmp_path_factory.mktemp(f"hf_{family}"))
    model.save_pretrained(d)
    out[family] = (d, model)
  return out


@pytest.fixture(scope="session")
def batch():
  """Tokens [3, SEQ] and a padding mask: row 0 full, row 1 right-padded, row 2 left-padded."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, VOCAB, (3, SEQ)).astype(np.int32)
  mask = np.ones((3, SEQ), bool)
  mask[1, 10:] = False
  mask[2, :4] = False
  tokens[~mask] = 0
  return tokens, mask


def torch_forward(model, tokens, mask):
  import torch

  with torch.no_grad():
    out = model(torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64)), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="session")
def small_world():
  """A small fact world (40 people, 4 countries) shared by the data tests."""
  from factflip.data.world import WorldConfig, build_world

  return build_world(WorldConfig(n_people=40, n_countries=4, cities_per_country=3,
                                 n_companies=6))


@pytest.fixture(scope="session")
def world_tokenizer(small_world, tmp_path_factory):
  """A byte-level BPE tokenizer trained on the small world's corpus, saved in HF format."""
  from factflip.data.tokenizer import train_tokenizer

  return train_tokenizer(small_world.texts(), str(tmp_path_factory.mktemp("tok") / "tokenizer"),
                         vocab_size=512)


@pytest.fixture(scope="session")
def hf_lm(world_tokenizer, tmp_path_factory):
  """(directory, torch model): a tiny random HF Llama over the world tokenizer's vocabulary,
  saved with that tokenizer and a 48-token context (the evals' text-level tests)."""
  import torch
  import transformers

  torch.manual_seed(1)
  tok = world_tokenizer
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id)
  model = transformers.LlamaForCausalLM(cfg).eval()
  d = str(tmp_path_factory.mktemp("hf_lm"))
  model.save_pretrained(d)
  tok.save_pretrained(d)
  return d, model


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
  """Paper A's study on its smoke config, run once per session: (workdir, headline, log
  lines). A test that changes the workdir works on a copy."""
  from factflip.configfile import load_config_file
  from factflip.studies.poisoning import Study

  wd = str(tmp_path_factory.mktemp("smoke_study"))
  logs = []
  head = Study(load_config_file(STUDY_CONFIG, "smoke"), wd, log=logs.append).run_and_report()
  return wd, head, logs


@pytest.fixture(scope="session")
def nk_study(tmp_path_factory):
  """Paper B's smoke study, run once per session through `factflip run` in a process with one
  CPU device (its SFT batch of 2 rows does not divide over the 8 fake devices of this one):
  (workdir, headline, output). Paper C's smoke study starts from a copy (its world, pretraining
  and SliCK stages are reused by fingerprint). A test that changes the workdir works on a
  copy."""
  import json
  wd = str(tmp_path_factory.mktemp("nk_smoke"))
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "studies",
                        "new_knowledge.py")
  log = factflip_run(f"{config}:smoke", wd)
  with open(os.path.join(wd, "report", "summary.json")) as f:
    head = json.load(f)
  return wd, head, log


def factflip_run(config: str, workdir: str, *flags: str, timeout: int = 900) -> str:
  """`factflip run --config=CONFIG --workdir=DIR FLAGS...` in a process with one CPU device
  (the smoke studies' small batches need not divide over this process's 8 simulated ones, and
  their tiny programs run faster on one); its stdout, after asserting it exited 0."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "factflip.cli", "run", f"--config={config}",
                        f"--workdir={workdir}", *flags], env=dict(os.environ, XLA_FLAGS=""),
                       capture_output=True, text=True, timeout=timeout, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def set_keys(c, values: dict):
  """Set config keys by dotted path ({"sae.k": 8, ...}) on an ml_collections config."""
  for key, value in values.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


# ---- GGUF fixtures: what llama.cpp's convert_hf_to_gguf.py writes, for tiny models -----------
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
_GGUF_POST_NORMS = {**_GGUF_LAYER, "post_attention_layernorm": "post_attention_norm",
                    "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm"}
_GGUF_NEOX = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
              "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
             "gpt_neox.embed_in.weight": "token_embd.weight",
             "gpt_neox.final_layer_norm.weight": "output_norm.weight",
             "gpt_neox.final_layer_norm.bias": "output_norm.bias",
             "embed_out.weight": "output.weight"}
_GGUF_ARCH = {"gemma3_text": "gemma3", "gpt_neox": "gptneox"}


def _llama_cpp_permute(w, n_head):
  """llama.cpp's LlamaModel.permute: the rotary halves of each head interleaved."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def gguf_tokens(tokenizer):
  """(tokens, token types, merges) of an HF byte-level BPE tokenizer, as llama.cpp stores them."""
  import json
  vocab = tokenizer.get_vocab()
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  special = set(tokenizer.all_special_tokens)
  types = [3 if t in special else 1 for t in tokens]
  merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  return tokens, types, merges


def write_gguf(path, model, qtype="F32", tokenizer=None, arch=None, chat_template=None,
               tensor_types=None, keys=None):
  """Write torch `model` (a tiny HF Llama / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / OLMo 2 / Phi-3 /
  GPT-NeoX) as llama.cpp's converter would: its metadata keys and tensor names, llama's Q/K rows
  permuted, GPT-NeoX's query_key_value reordered to [q | k | v], Gemma's norms + 1, Llama 3's
  RoPE scaling as `rope_freqs`, 2-D weights in `qtype` (F32, F16, BF16 or a type
  `gguf.quants.quantize` writes), norms and biases in F32. `tokenizer` (HF byte-level BPE) or a
  synthetic vocabulary of `vocab_size` tokens. tensor_types: {gguf name: raw dtype} overrides;
  keys: {key without the arch prefix: value} extra metadata."""
  import math

  import gguf
  from gguf import GGMLQuantizationType as Q

  cfg = model.config
  family = cfg.model_type
  arch = arch or _GGUF_ARCH.get(family, family)
  H = cfg.num_attention_heads
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
  rope = getattr(cfg, "rope_parameters", None) or {}
  rope = rope.get("full_attention", rope)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(f"tiny-{family}")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(H)
  w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
  if family == "gpt_neox":           # GPTNeoXModel.set_gguf_parameters writes no more
    w.add_parallel_residual(cfg.use_parallel_residual)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
  else:
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
  w.add_vocab_size(cfg.vocab_size)
  if rope.get("rope_type") == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope["factor"])
  if family in ("gemma2", "gemma3_text", "phi3"):
    w.add_sliding_window(cfg.sliding_window or 0)
  if family == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
  for k, v in (keys or {}).items():
    w.add_key_value(f"{arch}.{k}", v, gguf.GGUFValueType.get_type(v) if not isinstance(v, list)
                    else gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.get_type(v[0]) if isinstance(v, list) else None)
  if tokenizer is not None:
    tokens, types, merges = gguf_tokens(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("pad", tokenizer.pad_token_id)):
      if tid is not None:
        getattr(w, f"add_{name}_token_id")(tid)
    w.add_add_bos_token(False)
  else:   # a byte-level vocabulary: the first byte symbols ('!' ... ) and one merge
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())[:cfg.vocab_size - 1]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(chars + [chars[0] + chars[1]])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([f"{chars[0]} {chars[1]}"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
  if chat_template:
    w.add_chat_template(chat_template)

  def put(name, t):
    a = t.detach().float().numpy()
    raw = (tensor_types or {}).get(name)
    if raw is not None:
      w.add_tensor(name, a.astype(raw))
    elif a.ndim == 1 or qtype == "F32":
      w.add_tensor(name, a.astype(np.float32))
    elif qtype == "F16":
      w.add_tensor(name, a.astype(np.float16))
    else:
      q = gguf.quants.quantize(a.astype(np.float32), Q[qtype])
      w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q[qtype])

  layer = (_GGUF_NEOX if family == "gpt_neox" else _GGUF_POST_NORMS
           if family in ("gemma2", "gemma3_text", "olmo2") else _GGUF_LAYER)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if family.startswith("gemma") and name.endswith("norm.weight"):
      t = t + 1
    if name in _GGUF_TOP:
      put(_GGUF_TOP[name], t)
      continue
    parts = name.split(".")
    if "layers" not in parts or parts[-1] not in ("weight", "bias"):
      continue                       # buffers (rotary inv_freq, NeoX's causal mask)
    i = parts[parts.index("layers") + 1]
    module = ".".join(parts[parts.index("layers") + 2:-1])
    if module not in layer:
      continue
    if arch == "llama" and module == "self_attn.q_proj":
      t = _llama_cpp_permute(t, H)
    elif arch == "llama" and module == "self_attn.k_proj":
      t = _llama_cpp_permute(t, cfg.num_key_value_heads)
    elif family == "gpt_neox" and module == "attention.query_key_value":
      t = t.reshape(H, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    put(f"blk.{i}.{layer[module]}.{parts[-1]}", t)
  scaling = rope if rope.get("rope_type") == "llama3" else None
  if scaling:   # llama.cpp's LlamaModel.generate_extra_tensors
    base = float(rope["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    lo = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    hi = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for f in freqs:
      wavelen = 2 * math.pi / f
      if wavelen < hi:
        factors.append(1.0)
      elif wavelen > lo:
        factors.append(scaling["factor"])
      else:
        smooth = ((scaling["original_max_position_embeddings"] / wavelen
                   - scaling["low_freq_factor"])
                  / (scaling["high_freq_factor"] - scaling["low_freq_factor"]))
        factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    w.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


# ---- the training loop's shared run (test_train_loop.py, test_monitor.py) --------------------
PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        "pretrain_tiny.py")


@pytest.fixture(scope="session")
def world_dirs(small_world, world_tokenizer, tmp_path_factory):
  """The small world written where a run reads it, and its tokenizer directory."""
  from factflip.data.world import write_world

  d = str(tmp_path_factory.mktemp("loop_world") / "world")
  write_world(small_world, d)
  return d, world_tokenizer.name_or_path


def smoke(world_dirs, **over):
  """configs/pretrain_tiny.py:smoke on the small world: 8 steps of 8 x 32 tokens, checkpoints every 2,
  evaluation every 4; `over`: keys with __ for dots."""
  from factflip.configfile import load_config_file
  c = load_config_file(PRETRAIN, "smoke")
  c.data.world_dir, c.data.tokenizer_dir = world_dirs
  c.data.seq_len, c.data.batch_size = 32, 8
  c.checkpoint.every, c.eval_every, c.steps = 2, 4, 8
  return set_keys(c, {k.replace("__", "."): v for k, v in over.items()})


def params_of(workdir, step=None):
  import jax

  from factflip.train.checkpoint import load_trained
  model, s = load_trained(workdir, step)
  return s, jax.tree.map(np.asarray, model.params())


@pytest.fixture(scope="session")
def full_run(world_dirs, tmp_path_factory):
  """8 steps in one go (the reference for resume and the files tests)."""
  from factflip.train.loop import train
  wd = str(tmp_path_factory.mktemp("full"))
  return wd, train(smoke(world_dirs), wd, quiet=True)


# ---- the scorer against HF transformers (test_loglik.py, test_requests.py) ---------------------
@pytest.fixture(scope="session")
def hf_lm_pair(hf_lm):
  """(factflip model, tokenizer, the HF torch model) of the session's tiny HF model."""
  from factflip import load_model, load_tokenizer
  d, torch_model = hf_lm
  return load_model(d), load_tokenizer(d), torch_model


def torch_logp(torch_model, ids):
  """log-softmax [len(ids), V] (float64) of the HF model over one unpadded sequence."""
  import torch
  with torch.no_grad():
    logits = torch_model(torch.tensor([list(ids)])).logits[0]
  return torch.log_softmax(logits.double(), -1).numpy()


def torch_pair(torch_model, ctx, cont):
  """(Σ log p, greedy, per-token log p, mean and variance of log p) of cont after ctx."""
  lp = torch_logp(torch_model, list(ctx) + list(cont)[:-1])
  rows = lp[len(ctx) - 1:]
  tok = rows[np.arange(len(cont)), list(cont)]
  p = np.exp(rows)
  mu = (p * rows).sum(-1)
  var = (p * rows ** 2).sum(-1) - mu ** 2
  return tok.sum(), bool((rows.argmax(-1) == np.asarray(cont)).all()), tok, mu, var
