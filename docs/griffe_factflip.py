"""A griffe extension for the API reference: factflip's docstrings as Markdown.

factflip's docstrings are written for a terminal (`help()`, the source): aligned two-space
indented tables after a line ending in ':', lists that start right under a sentence, and
index notation such as `[G][P]` or `meta["translations"][lang]`. Markdown reads the first
as one run-on paragraph, the second as part of the paragraph and the third as a
reference-style link (which the autorefs plugin then reports as an unresolved
cross-reference, failing `mkdocs build --strict`). This extension rewrites each docstring's
text before griffe parses it, so the source stays as it is:

- an indented block under a line ending in ':' (not a Google section such as `Args:`)
  becomes a fenced code block;
- a '- ' list directly under a sentence gets the blank line Markdown needs;
- '][' outside code spans is escaped, so index notation is not read as a link.

Loaded by mkdocs.yml (`plugins.mkdocstrings.handlers.python.options.extensions`).
"""

from __future__ import annotations

import re

import griffe

# Google-style section titles griffe parses (griffe's `_section_kind`); their indented
# blocks are griffe's to read, never fenced here.
_SECTIONS = {
  "args", "arguments", "params", "parameters", "keyword args", "keyword arguments",
  "other args", "other arguments", "other params", "other parameters", "type args",
  "type arguments", "type params", "type parameters", "raises", "exceptions", "returns",
  "yields", "receives", "examples", "attributes", "functions", "methods", "classes",
  "type aliases", "modules", "warns", "warnings"}
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" "))


def _escape_links(text: str) -> str:
  """'][' -> ']\\[' outside code spans and fences."""
  out, in_fence = [], False
  for line in text.split("\n"):
    if line.lstrip().startswith("```"):
      in_fence = not in_fence
    if in_fence or line.lstrip().startswith("```"):
      out.append(line)
      continue
    parts, last = [], 0
    for m in _CODE_SPAN.finditer(line):
      parts.append(line[last:m.start()].replace("][", "]\\["))
      parts.append(m.group(0))
      last = m.end()
    parts.append(line[last:].replace("][", "]\\["))
    out.append("".join(parts))
  return "\n".join(out)


def _is_section(line: str) -> bool:
  s = line.strip()
  return s.endswith(":") and s[:-1].strip().lower() in _SECTIONS


def _fence_blocks(lines: list[str]) -> list[str]:
  """Indented blocks under a '...:' line -> fenced code; '- ' lists get a blank line above."""
  out: list[str] = []
  i, in_fence = 0, False
  while i < len(lines):
    line = lines[i]
    if line.lstrip().startswith("```"):
      in_fence = not in_fence
    if in_fence or line.lstrip().startswith("```"):
      out.append(line)
      i += 1
      continue
    stripped = line.strip()
    base = _indent(line)
    nxt = lines[i + 1] if i + 1 < len(lines) else ""
    if _is_section(line):
      # A Google section: copy it and its indented block untouched.
      out.append(line)
      i += 1
      while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        out.append(lines[i])
        i += 1
      continue
    if (stripped.endswith(":") and len(stripped) > 3 and nxt.strip()
        and _indent(nxt) >= base + 2):
      out.append(line)
      block = []
      i += 1
      while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= base + 2:
        block.append(lines[i])
        i += 1
      cut = min(_indent(b) for b in block)
      out += ["", " " * base + "```text", *[" " * base + b[cut:] for b in block],
              " " * base + "```", ""]
      continue
    if (stripped.startswith("- ") and out and out[-1].strip()
        and not out[-1].strip().startswith("- ") and _indent(out[-1]) <= base
        and not out[-1].strip().startswith("```")):
      out.append("")
    out.append(line)
    i += 1
  return out


def markdown_docstring(text: str) -> str:
  """The docstring text as the reference renders it (see the module docstring)."""
  return _escape_links("\n".join(_fence_blocks(text.split("\n"))))


class FactflipDocstrings(griffe.Extension):
  """Rewrites every docstring with `markdown_docstring` as griffe loads it."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = markdown_docstring(obj.docstring.value)
