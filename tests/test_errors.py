"""Bad checkpoints and inputs give errors that name the file, tensor or field."""

import json
import os
import shutil

import numpy as np
import pytest

from factflip import load_model, load_tokenizer
from factflip.models.safetensors_io import SafetensorsError


@pytest.fixture
def llama_copy(hf_dirs, tmp_path):
  src = hf_dirs["llama"][0]
  dst = tmp_path / "model"
  shutil.copytree(src, dst)
  return str(dst)


def edit_config(path, **changes):
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  for k, v in changes.items():
    if v is None:
      cfg.pop(k, None)
    else:
      cfg[k] = v
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)


def test_unknown_model_type(llama_copy):
  edit_config(llama_copy, model_type="gpt2")
  with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'gpt2'; expected one"):
    load_model(llama_copy)


def test_missing_config_field_and_bad_json(llama_copy):
  edit_config(llama_copy, hidden_size=None)
  with pytest.raises(ValueError, match="missing field 'hidden_size'"):
    load_model(llama_copy)
  with open(os.path.join(llama_copy, "config.json"), "w") as f:
    f.write('{"model_type": "llama",\n  "hidden_size": }')
  with pytest.raises(ValueError, match=r"config\.json:2: not valid JSON"):
    load_model(llama_copy)


def test_missing_tensor(llama_copy):
  edit_config(llama_copy, num_hidden_layers=4)  # the file holds 3 layers
  with pytest.raises(ValueError, match=r"lacks .*'model\.layers\.3\.input_layernorm\.weight'"):
    load_model(llama_copy)


def test_shape_mismatch_names_tensor_and_expected_shape(llama_copy):
  edit_config(llama_copy, intermediate_size=128)
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                       r"shape \[96, 64\], expected \[128, 64\]"):
    load_model(llama_copy)


def test_truncated_safetensors(llama_copy):
  path = os.path.join(llama_copy, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(SafetensorsError, match=r"model\.safetensors: tensor '.*': data_offsets .* "
                                             r"\(file truncated or corrupt\)"):
    load_model(llama_copy)


def test_garbage_safetensors_header(llama_copy):
  path = os.path.join(llama_copy, "model.safetensors")
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"\x00garbage")
  with pytest.raises(SafetensorsError, match="corrupt safetensors header, not valid JSON"):
    load_model(llama_copy)
  with open(path, "wb") as f:
    f.write(b"\xff" * 16)
  with pytest.raises(SafetensorsError, match="corrupt safetensors header length"):
    load_model(llama_copy)


def test_missing_weights_and_index_pointing_nowhere(llama_copy):
  os.remove(os.path.join(llama_copy, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index"):
    load_model(llama_copy)
  with open(os.path.join(llama_copy, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
  with pytest.raises(SafetensorsError, match="maps to missing file"):
    load_model(llama_copy)


def test_not_a_model_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a directory nor a .gguf file"):
    load_model(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="neither config.json"):
    load_model(str(tmp_path))


def test_unsupported_switches_are_refused(llama_copy):
  edit_config(llama_copy, mlp_bias=True)
  with pytest.raises(ValueError, match="field 'mlp_bias' is True"):
    load_model(llama_copy)
  edit_config(llama_copy, mlp_bias=False, rope_scaling={"rope_type": "yarn", "factor": 4.0},
              rope_parameters=None)
  with pytest.raises(ValueError, match="rope_type.*'yarn'"):
    load_model(llama_copy)


def test_tokenizer_absent(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(str(tmp_path))


def test_config_validation():
  from factflip.models import ModelConfig

  with pytest.raises(ValueError, match="n_kv_heads=3: expected a divisor of n_heads=4"):
    ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="family='gpt2'"):
    ModelConfig(family="gpt2")
  with pytest.raises(ValueError, match="sliding_window"):
    ModelConfig(n_layers=2, layer_types=("full", "sliding"))
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
    ModelConfig.from_dict({"hidden": 3}, "x.json")
  np.testing.assert_equal(ModelConfig(n_layers=2, layer_types=("full", "sliding"),
                                      sliding_window=8).window_sizes(), (0, 8))
