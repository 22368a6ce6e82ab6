"""Streamed loading onto a mesh of 8 fake CPU devices gives the same logits as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from factflip import load_model, save_model
from factflip.sharding import logical_to_spec, make_mesh


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=2,
                                                                              tensor=2)])
def test_mesh_load_matches_one_device(sizes, hf_dirs, batch):
  assert len(jax.devices()) == 8
  path, _ = hf_dirs["qwen2"]
  tokens, mask = batch
  ref = np.asarray(load_model(path)(tokens, mask))
  mesh = make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **sizes})
  model = load_model(path, mesh=mesh)
  params = model.params()
  wq = params["layers"]["wq"]                   # [L, D=64, H*K=64]
  assert len(wq.sharding.device_set) == 8
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  assert wq.addressable_shards[0].data.shape == (3, 64 // fsdp, 64 // tensor)
  np.testing.assert_allclose(np.asarray(model(tokens, mask)), ref, atol=1e-5)


def test_native_checkpoint_restores_onto_a_mesh(hf_dirs, batch, tmp_path):
  path, _ = hf_dirs["gemma2"]
  tokens, mask = batch
  model = load_model(path)
  save_model(model, str(tmp_path / "ff"))
  sharded = load_model(str(tmp_path / "ff"), mesh=make_mesh(fsdp=4, tensor=2))
  assert len(sharded.params()["embed"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded(tokens, mask)), np.asarray(model(tokens, mask)),
                             atol=1e-5)


def test_rules_drop_axes_that_do_not_divide():
  mesh = make_mesh(fsdp=2, tensor=4)
  assert logical_to_spec(("layers", "embed", "q_heads"), (3, 64, 64), mesh) == P(None, "fsdp",
                                                                                  "tensor")
  # 14 heads * 64 = 896 divides by 4, but a vocab of 101 does not: replicated on that axis.
  assert logical_to_spec(("vocab", "embed"), (101, 64), mesh) == P(None, "fsdp")
  assert logical_to_spec(("batch", "seq"), (8, 16), mesh) == P("fsdp", None)
  with pytest.raises(ValueError, match="must multiply to the 8 devices"):
    make_mesh(fsdp=3, tensor=1)
  with pytest.raises(ValueError, match="at most one may be -1"):
    make_mesh(fsdp=-1, tensor=-1)


def test_sharded_load_reads_only_each_devices_slice(hf_dirs, monkeypatch):
  """No device's callback reads a whole tensor: host memory per read is one shard."""
  from factflip.models import safetensors_io

  path, _ = hf_dirs["llama"]
  reads = []
  original = safetensors_io.SafetensorsFile.read

  def spy(self, name, index=None):
    out = original(self, name, index)
    reads.append((name, out.size, int(np.prod(self.shape(name)))))
    return out

  monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", spy)
  load_model(path, mesh=make_mesh(fsdp=4, tensor=2))
  big = [(n, got, full) for n, got, full in reads if "proj" in n or "embed" in n or "lm_head" in n]
  assert big and all(got * 4 <= full for _, got, full in big), big[:5]
