"""The layer order of factflip's packages, enforced on its import graph.

Layers, lowest first: the core (files, configs, processes, compilation), data and models (with
the model's sharding rules), evals (scoring), SAEs, probes, train, studies, the command line. A
module may import its own layer and those below, never one above — module-level and
function-level imports alike (a function-level import hides a cycle, it does not remove it).

Function-level imports of factflip modules remain only where they keep an import cheap or
optional (`LAZY`): the command line loads a command's work when it runs (`factflip help` stays
instant), and a few modules pull a heavy or optional package (transformers, torch, lm-eval,
Orbax and grain) that most importers never need."""

import ast
import os

import factflip

ROOT = os.path.dirname(factflip.__file__)
LAYERS = (
    ("core", ("compile_cache", "configfile", "distributed", "fileio", "gguf_io", "kernels")),
    ("data / models", ("data", "models", "sharding")),
    ("evals", ("evals",)),
    ("sae", ("sae",)),
    ("probes", ("probes",)),
    ("train", ("train",)),
    ("studies", ("studies",)),
    ("cli", ("cli",)),
)
# Modules placed by what they do rather than by their package:
PLACED = {
    "factflip.sae.train": "train",   # the SAE trainer: a training loop on train's checkpoints
    #                                  and metrics, beside the model trainer
    "factflip.evals.run": "probes",  # `factflip eval`: drives every metric, paper A's
}                                    # preference probe among them
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
TOP = {top: name for name, tops in LAYERS for top in tops}


def layer_of(module: str) -> str | None:
  """The layer of a factflip module (None: not factflip's). The package itself, `factflip`,
  re-exports data and models (`from factflip import load_model`): their layer."""
  for prefix, layer in PLACED.items():
    if module == prefix or module.startswith(prefix + "."):
      return layer
  parts = module.split(".")
  if parts[0] != "factflip":
    return None
  if len(parts) == 1:
    return "data / models"
  if parts[1] not in TOP:
    raise AssertionError(f"{module}: no layer for factflip.{parts[1]}; add it to LAYERS")
  return TOP[parts[1]]


def imports(path: str, module: str):
  """(imported module, line) of every absolute `factflip` import in a file, at any depth."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, node.lineno
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "factflip":          # a subpackage, or a name the package re-exports
        for a in node.names:
          sub = os.path.join(ROOT, a.name)
          yield (f"factflip.{a.name}" if os.path.isdir(sub) or os.path.exists(sub + ".py")
                 else "factflip"), node.lineno
      else:
        yield node.module, node.lineno


def modules():
  """(path, module) of every module in the package but the package's own __init__."""
  for root, _, files in os.walk(ROOT):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield path, rel.removesuffix(".__init__")


def test_every_import_points_down_the_layers():
  up = []
  for path, module in modules():
    if module == "factflip":
      continue
    here = layer_of(module)
    for target, line in imports(path, module):
      there = layer_of(target)
      if there is not None and RANK[there] > RANK[here]:
        up.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}: {module} ({here}) "
                  f"imports {target} ({there})")
  assert not up, "imports up the layers:\n" + "\n".join(up)


def test_the_check_sees_an_upward_import(tmp_path):
  """The walk finds function-level imports and names the file and line."""
  f = tmp_path / "m.py"
  f.write_text("import numpy\n\ndef g():\n  from factflip.train.loop import run\n")
  assert list(imports(str(f), "factflip.evals.m")) == [("numpy", 1),
                                                       ("factflip.train.loop", 4)]
  assert RANK[layer_of("factflip.train.loop")] > RANK[layer_of("factflip.evals.m")]
  assert layer_of("factflip.sae.train") == "train" and layer_of("factflip.sae.core") == "sae"


# Modules a function may import lazily: each pulls a heavy or optional package that most of its
# importers never need (the reason beside it). Every other factflip import is at module level.
LAZY = {
    "factflip.data.tokenizer": "transformers' tokenizers (seconds to import)",
    "factflip.models.hf": "transformers' configs and torch-free loaders",
    "factflip.models.gguf": "the gguf package",
    "factflip.evals.lm_eval": "lm-evaluation-harness (an optional extra)",
    "factflip.train.loop": "Orbax and grain (a study's training stage)",
    "factflip.train.checkpoint": "Orbax",
}
LAZY_IMPORTERS = ("factflip.cli",)   # a command loads its work when it runs


def function_imports(path: str):
  """(imported module, line) of every `factflip` import inside a function body."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  seen = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if id(node) in seen:
          continue
        seen.add(id(node))
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module.split(".")[0] == "factflip"):
          yield node.module, node.lineno
        elif isinstance(node, ast.Import):
          yield from ((a.name, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "factflip")


def test_function_level_imports_are_only_the_lazy_ones():
  found = []
  for path, module in modules():
    if module.startswith(LAZY_IMPORTERS):
      continue
    for target, line in function_imports(path):
      if target not in LAZY:
        found.append(f"{os.path.relpath(path, os.path.dirname(ROOT))}:{line}: {target}")
  assert not found, ("function-level imports of modules not in LAZY (move them to the top "
                     "of the module):\n" + "\n".join(sorted(found)))
