"""What the package imports is what `pip install factflip` installs.

Every third-party module imported anywhere under factflip/ (found by parsing the sources, not
by importing them) is a core dependency in pyproject.toml, except the few that only an
optional command reaches; a built-in study (configs/studies/*.py) must run after a plain
`pip install -e .`, so e.g. the unlearning study's `rouge` (RWKU's ROUGE-L) and `nltk`
(fluency) are core.
"""

import ast
import os
import re
import sys

import tomllib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"absl": "absl-py", "orbax": "orbax-checkpoint", "tensorboardX": "tensorboardx",
                 "ml_collections": "ml-collections", "ml_dtypes": "ml-dtypes"}
# modules reached only by commands outside the studies: file -> why its imports are not core
OPTIONAL = {"factflip/evals/lm_eval.py": "`factflip lm-eval`: the lm_eval extra (lm-eval "
                                         "brings jinja2 too)"}


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, list[str]]:
  """module -> the files:lines under factflip/ that import it."""
  out: dict[str, list[str]] = {}
  for root, _, files in os.walk(os.path.join(ROOT, "factflip")):
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
          mods = [node.module]
        else:
          continue
        for mod in mods:
          top = mod.split(".")[0]
          if top not in sys.stdlib_module_names and top not in ("factflip", "__future__"):
            out.setdefault(top, []).append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
  return out


def test_every_import_outside_the_optional_commands_is_a_core_dependency():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  core = {_normal(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
  assert {"rouge", "nltk", "gguf"} <= core         # the unlearning study's scores; GGUF models
  assert set(project["optional-dependencies"]["evals"]) <= set(project["dependencies"])
  missing = {}
  for mod, where in third_party_imports().items():
    where = [w for w in where if w.rsplit(":", 1)[0] not in OPTIONAL]
    if where and _normal(DISTRIBUTIONS.get(mod, mod)) not in core:
      missing[mod] = where
  assert not missing, f"pyproject.toml [project].dependencies lacks: {missing}"
