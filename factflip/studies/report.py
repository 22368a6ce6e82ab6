"""The report page of any study and the plot helpers studies share.

Owns: report/index.html (a study's title, its headline table, its figures with their captions
and links to its results tables), report/summary.json (strict JSON), and the helpers a study's
figures use (`save`, `legend`, `final_rows`, `sizes_of`).
Must not: compute metrics or know any study's figures (each study module draws its own:
e.g. `studies.poisoning.report`).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from factflip.fileio import atomic_path, strict_json, write_json, write_text


@dataclasses.dataclass(frozen=True)
class Figure:
  """A report figure: its title, the PNG's file name in report/ and what it shows."""
  title: str
  file: str
  caption: str


def save(fig, path: str) -> str:
  """Write a matplotlib Figure as PNG atomically; its file name (for the page)."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  return os.path.basename(path)


def legend(ax, **kw) -> None:
  """A legend only where something is labelled."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kw)


def final_rows(df: pd.DataFrame, run: Sequence[str], step: str = "step") -> pd.DataFrame:
  """The rows at each run's (the `run` columns') last step."""
  last = df.groupby(list(run))[step].transform("max")
  return df[df[step] == last]


def sizes_of(df: pd.DataFrame) -> list[str]:
  """The model sizes of a table in first-seen order (one panel each; [""] when empty)."""
  return list(dict.fromkeys(df["size"])) or [""]


def write_report(rdir: str, title: str, workdir: str, head: dict[str, Any], figures,
                 tables: Sequence[str], sections: Sequence[tuple[str, str]] = ()
                 ) -> dict[str, Any]:
  """report/summary.json (`head` as strict JSON) and report/index.html: the title, the
  headline, links to results/<table>.csv, `sections` ((title, HTML) each, e.g. a table the
  suite builds) and every figure (`Figure`: title, file in rdir, caption). Returns the strict
  headline."""
  head = strict_json(head)
  write_json(os.path.join(rdir, "summary.json"), head)

  def table_html(d: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in d.items())
    return f"<table>{rows}</table>"
  body = [f"<h1>factflip: {html.escape(title)}</h1>",
          f"<p>Workdir <code>{html.escape(workdir)}</code>. Tables: "
          + ", ".join(f'<a href="../results/{n}.csv">{n}.csv</a>' for n in tables) + ".</p>",
          "<h2>Headline</h2>", table_html(head)]
  for name, section in sections:
    body += [f"<h2>{html.escape(name)}</h2>", section]
  for f in figures:
    body += [f"<h2>{html.escape(f.title)}</h2>", f"<p>{html.escape(f.caption)}</p>"]
    if f.file:                  # a figure with nothing to draw keeps its caption (why)
      body.append(f'<img src="{html.escape(f.file)}" style="max-width:100%">')
  page = (f"<!doctype html><meta charset='utf-8'><title>factflip {html.escape(title)}</title>"
          "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
          "td{padding:2px 10px;border-bottom:1px solid #ddd;vertical-align:top}</style>"
          + "\n".join(body))
  write_text(os.path.join(rdir, "index.html"), page)
  return head


def short(v) -> str:
  """A number for a terminal summary: two decimals, "n/a" for None or NaN."""
  return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _fmt(v) -> str:
  if isinstance(v, dict):
    return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
  if isinstance(v, float):
    return f"{v:.3f}"
  return str(v)
