"""The documentation: README stays short, links resolve, the site's nav and API blocks point at
what exists, and every `SCIENCE.md` citation in the code names a section of docs/science.md.

Fast and offline: nothing here builds the site (.ci/run does, `mkdocs build --strict`)."""

import os
import re
import unicodedata

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 160

_LINK = re.compile(r"(?<!!)\[[^\[\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _doc_pages() -> list[str]:
  """Every Markdown page of the site, relative to docs/."""
  out = []
  for root, _, files in os.walk(DOCS):
    out += [os.path.relpath(os.path.join(root, f), DOCS) for f in files if f.endswith(".md")]
  return sorted(out)


def _slug(text: str) -> str:
  """Python-Markdown's toc slug (what MkDocs uses for heading anchors)."""
  text = re.sub(r"<[^>]+>|`", "", text)
  text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
  text = re.sub(r"[^\w\s-]", "", text).strip().lower()
  return re.sub(r"[-\s]+", "-", text)


def _headings(text: str) -> list[tuple[int, str]]:
  """(level, title) of every ATX heading outside fenced code."""
  text = _FENCE.sub("", text)
  return [(len(m.group(1)), m.group(2).strip().rstrip("#").strip())
          for m in re.finditer(r"^(#{1,6})\s+(.+)$", text, re.MULTILINE)]


def _links(text: str) -> list[str]:
  """Link targets of a Markdown text, outside code."""
  text = _CODE_SPAN.sub("", _FENCE.sub("", text))
  return _LINK.findall(text)


def _relative_link_errors(md_path: str) -> list[str]:
  errors = []
  for target in _links(_read(md_path)):
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue                                    # http(s):, mailto:, in-page anchors
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(md_path), path))
    where = os.path.relpath(md_path, ROOT)
    if not os.path.exists(full):
      errors.append(f"{where}: link to {target!r}: {os.path.relpath(full, ROOT)} does not exist")
    elif anchor and full.endswith(".md") and not anchor.startswith("factflip."):
      slugs = {_slug(title) for _, title in _headings(_read(full))}
      if anchor not in slugs:
        errors.append(f"{where}: link to {target!r}: no heading with anchor #{anchor} there")
  return errors


def test_readme_is_short():
  n = len(_read(README).splitlines())
  assert n <= MAX_README_LINES, (f"README.md has {n} lines, at most {MAX_README_LINES}: "
                                 "move the details to a page under docs/")


def test_every_relative_link_points_to_an_existing_file():
  errors = _relative_link_errors(README)
  for page in _doc_pages():
    errors += _relative_link_errors(os.path.join(DOCS, page))
  assert not errors, "\n".join(errors)


def _nav_pages(nav) -> list[str]:
  out = []
  for entry in nav:
    if isinstance(entry, str):
      out.append(entry)
    elif isinstance(entry, dict):
      for value in entry.values():
        out += _nav_pages(value) if isinstance(value, list) else [value]
  return out


def _mkdocs_config() -> dict:
  yaml = pytest.importorskip("yaml")           # PyYAML: MkDocs' own dependency (docs extra)
  with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
    # mkdocs.yml may hold !!python/name tags; none of them matter here
    return yaml.load(f, Loader=yaml.BaseLoader)


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
  nav = _nav_pages(_mkdocs_config()["nav"])
  missing = [p for p in nav if not os.path.isfile(os.path.join(DOCS, p))]
  assert not missing, f"mkdocs.yml nav names pages that are not in docs/: {missing}"
  assert len(nav) == len(set(nav)), f"a page is twice in mkdocs.yml's nav: {nav}"
  orphans = sorted(set(_doc_pages()) - set(nav))
  assert not orphans, f"docs/ pages missing from mkdocs.yml's nav: {orphans}"


def test_every_api_block_names_an_existing_module():
  """`::: factflip.x.y` blocks (mkdocstrings) must name a module that is there (a moved module
  fails the strict build; this says which block)."""
  errors = []
  for page in _doc_pages():
    for m in re.finditer(r"^:::\s*(\S+)", _read(os.path.join(DOCS, page)), re.MULTILINE):
      parts = m.group(1).split(".")
      base = os.path.join(ROOT, *parts)
      if not (os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))):
        errors.append(f"docs/{page}: ::: {m.group(1)}: no such module under {ROOT}")
  assert not errors, "\n".join(errors)


def _fenced_bash_lines(text: str) -> list[str]:
  return [line.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
          for line in block.splitlines() if line.strip()]


def test_readme_test_command_is_what_ci_runs():
  ci = [line.strip() for line in _read(os.path.join(ROOT, ".ci", "run")).splitlines()
        if line.strip() and not line.lstrip().startswith("#")]
  test_commands = [line for line in _fenced_bash_lines(_read(README))
                   if "pip install -e '.[test]'" in line]
  assert len(test_commands) == 1, f"README.md: expected one test command, found {test_commands}"
  assert test_commands[0] in ci, (f".ci/run must run README.md's test command exactly:\n"
                                  f"  README: {test_commands[0]}\n  .ci/run: {ci}")
  assert "set -euo pipefail" in ci
  started = [line for line in _fenced_bash_lines(_read(os.path.join(DOCS, "getting-started.md")))
             if "pip install -e '.[test]'" in line]
  assert started == test_commands, "docs/getting-started.md shows another test command than README"
  assert "mkdocs build --strict" in test_commands[0]
  assert not re.search(r"mkdocs build[^&|;]*\s-q\b", test_commands[0]), \
      "mkdocs build -q hides warnings, and --strict then passes anyway"


# --- SCIENCE.md citations -------------------------------------------------------------------

def _science_sections() -> list[tuple[int, str, str | None]]:
  """(level, title, letter of the enclosing paper section or None) of docs/science.md."""
  out, letter = [], None
  for level, title in _headings(_read(os.path.join(DOCS, "science.md"))):
    if level <= 2:
      m = re.match(r"([A-Z])\.\s", title)
      letter = m.group(1) if m else None
    out.append((level, title, letter))
  return out


def _citations(text: str) -> list[tuple[str | None, str | None, str]]:
  """(letter, name, excerpt) of each citation of SCIENCE.md in a source text. Forms:
  `SCIENCE.md A`, `SCIENCE.md §A`, `SCIENCE.md A, "Patching reversal"`, `SCIENCE.md A: patching
  reversal`, `SCIENCE.md "Multiple-choice scoring"`, `SCIENCE.md, common objects and section A`;
  a bare `SCIENCE.md` (e.g. "as in SCIENCE.md)") names no section. Anything else that starts
  like a section name is returned as unparsed (letter and name None, excerpt kept)."""
  text = re.sub(r"\s+", " ", text)
  out = []
  for m in re.finditer(r"SCIENCE\.md", text):
    rest = text[m.end():m.end() + 120]
    excerpt = "SCIENCE.md" + rest[:60]
    body = re.sub(r"^,?\s*(?:§\s*)?(?:section\s+)?", "", rest)
    if mm := re.match(r"common objects(?: and section ([A-Z])\b)?", body, re.IGNORECASE):
      out.append((None, "Common objects", excerpt))
      if mm.group(1):
        out.append((mm.group(1), None, excerpt))
    elif mm := re.match(r"([A-Z])(?![\w'’-])", body):
      letter, after = mm.group(1), body[mm.end():]
      name = None
      if q := re.match(r'\s*[,:]\s*"([^"]+)"', after):
        name = q.group(1)
      elif q := re.match(r"\s*:\s*([^);.\"]+)\)", after):   # "A: patching reversal)": a name
        name = q.group(1).strip()                           # only if it is a heading
        if not any(title.lower().startswith(name.lower()) and sec == letter
                   for _, title, sec in _science_sections()):
          name = None
      out.append((letter, name, excerpt))
    elif mm := re.match(r'"([^"]+)"', body):
      out.append((None, mm.group(1), excerpt))
    elif re.match(r"[A-Z\"§]", rest.lstrip(", ")):
      out.append((None, None, excerpt))                 # unparsed: fails below
  return out


def _source_citations() -> list[tuple[str, str | None, str | None, str]]:
  out = []
  for top in ("factflip", "configs", "benchmarks"):
    for root, _, files in os.walk(os.path.join(ROOT, top)):
      for f in sorted(files):
        if f.endswith(".py"):
          path = os.path.join(root, f)
          rel = os.path.relpath(path, ROOT)
          out += [(rel, *c) for c in _citations(_read(path))]
  return out


def test_citation_parser_reads_the_forms_in_use():
  text = ('(SCIENCE.md, common objects and section A) (SCIENCE.md A, "Patching reversal".) '
          '(SCIENCE.md "Multiple-choice\n  scoring"; lm-eval) (per SCIENCE.md D): '
          "(written as in SCIENCE.md): SCIENCE.md §C. SCIENCE.md's definitions")
  assert [c[:2] for c in _citations(text)] == [
      (None, "Common objects"), ("A", None), ("A", "Patching reversal"),
      (None, "Multiple-choice scoring"), ("D", None), ("C", None)]


def test_every_science_citation_names_a_section_of_the_science_page():
  sections = _science_sections()
  citations = _source_citations()
  assert len(citations) >= 10, f"only {len(citations)} SCIENCE.md citations found: parser broken?"
  errors = []
  for where, letter, name, excerpt in citations:
    if letter is None and name is None:
      errors.append(f"{where}: cannot read the section of {excerpt!r}")
      continue
    if letter and not any(lv == 2 and t.startswith(f"{letter}. ") for lv, t, _ in sections):
      errors.append(f"{where}: {excerpt!r}: docs/science.md has no section '{letter}. ...'")
    if name and not any(t.lower().startswith(name.lower()) and (letter is None or sec == letter)
                        for _, t, sec in sections):
      inside = f" inside section {letter}" if letter else ""
      errors.append(f"{where}: {excerpt!r}: docs/science.md has no heading {name!r}{inside}")
  assert not errors, "\n".join(errors)
