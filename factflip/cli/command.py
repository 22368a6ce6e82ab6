"""A subcommand of `factflip`: one module per command, its help text its docstring.

A command module has a docstring whose first line is the summary for the command table, then
a `usage: factflip ...` line, then what it does and its launch lines; `READS` (the flags it
reads -> what each means for it), `REQUIRED` (those it cannot run without) and `main()`.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from types import ModuleType

from factflip.cli.flags import FLAGS, SPECS


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: its launch line(s), a one-line summary for the table, what it does, the
  flags it reads (name -> what that flag means for it) and the function that runs it."""
  name: str
  usage: str
  summary: str
  doc: str
  flags: dict[str, str]
  fn: Callable[[], object]
  required: tuple[str, ...] = ()

  @classmethod
  def of(cls, name: str, module: ModuleType) -> Command:
    """The command a module defines (the module docstring: summary, usage, the rest)."""
    summary, rest = module.__doc__.strip().split("\n", 1)
    rest = rest.strip()
    if not rest.startswith("usage: "):
      raise ValueError(f"{module.__name__}: its docstring's second paragraph must be "
                       "'usage: factflip ...'")
    usage, _, doc = rest.partition("\n\n")
    return cls(name, " ".join(usage.removeprefix("usage: ").split()), summary.strip(),
               doc, dict(module.READS), module.main, tuple(getattr(module, "REQUIRED", ())))

  def flag_list(self) -> str:
    return (", ".join(f"--{n}" for n in self.flags) or "none") + f" (factflip {self.name} --help)"

  def refusal(self, flag: str) -> str:
    return f"factflip {self.name} does not take --{flag}; its flags: {self.flag_list()}"

  def help(self) -> str:
    lines = [f"usage: {self.usage}", "", self.summary, "", textwrap.dedent(self.doc).strip()]
    if self.flags:
      lines += ["", "flags:"]
      for name, text in self.flags.items():
        f = FLAGS[name]
        enum = getattr(f.parser, "enum_values", None)
        value = ("" if f.flag_type() == "bool" else "=" + ("|".join(enum) if enum else
                 SPECS[name].metavar or f.flag_type().upper()))
        extra = ("  (required)" if name in self.required else
                 "" if f.default in (None, []) else f"  (default: {f.default_as_str})")
        lines.append(f"  --{name}{value}{extra}")
        lines += ["      " + t for t in textwrap.wrap(text, 86)]
    return "\n".join(lines)
