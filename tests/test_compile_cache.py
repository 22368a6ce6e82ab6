"""The persistent compilation cache: where it is (flag, variable, default, off), and a second
fresh process loads the first one's compiled patching sweep instead of compiling it, with the
same values."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_directory_follows_the_flag_then_the_variable_then_the_default():
  from factflip.compile_cache import DEFAULT_DIR, directory
  assert directory("/tmp/x", {"FACTFLIP_COMPILATION_CACHE": "/tmp/y"}) == "/tmp/x"
  assert directory(None, {"FACTFLIP_COMPILATION_CACHE": "/tmp/y"}) == "/tmp/y"
  assert directory(None, {"JAX_COMPILATION_CACHE_DIR": "/tmp/z"}) == "/tmp/z"
  assert directory(None, {"JAX_COMPILATION_CACHE_DIR": ""}) is None
  assert directory(None, {}) == DEFAULT_DIR and DEFAULT_DIR.endswith(os.path.join("factflip",
                                                                                   "xla"))
  assert directory("off", {"FACTFLIP_COMPILATION_CACHE": "/tmp/y"}) is None
  assert directory(None, {"FACTFLIP_COMPILATION_CACHE": "OFF"}) is None


def test_a_fresh_process_loads_the_compiled_sweep(tmp_path):
  import runpy
  child = runpy.run_path(os.path.join(ROOT, "benchmarks", "first_call.py"))["CHILD"]
  cache = str(tmp_path / "cache")
  args = [sys.executable, "-c", child, cache, "2", "32", "8", "128", "0"]   # 2 layers; every
  #                                                                          program written
  env = dict(os.environ, XLA_FLAGS="")
  runs = [json.loads(subprocess.run(args, capture_output=True, text=True, check=True, env=env,
                                    timeout=300).stdout.strip().splitlines()[-1])
          for _ in range(2)]
  assert runs[0]["hits"] == 0 and runs[0]["misses"] >= 1
  assert runs[1]["hits"] == runs[0]["misses"] and runs[1]["misses"] == 0   # none compiled
  assert runs[1]["checksum"] == runs[0]["checksum"]
  assert len(os.listdir(cache)) >= runs[1]["hits"]
