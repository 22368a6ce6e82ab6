"""The suite's report: each study's headline beside what its paper reports.

Owns: `findings` (one row per paper finding, from each study's record's `paper_checks`),
`report` (results/findings.csv; report/index.html with the findings table and links to each
study's report; summary.json) and `summary` (terminal lines).
Must not: know any study's science (its record's `paper_checks` does) or run a study.
"""

from __future__ import annotations

import html
import os
from typing import Any

import pandas as pd

from factflip.fileio import read_json, write_csv
from factflip.studies.platform import study_record
from factflip.studies.report import write_report


def findings(heads: dict[str, dict]) -> pd.DataFrame:
  """One row per paper finding: study, finding, protocol (the study headline's "protocol": how
  this run tests the paper, where the toy world departs from it or follows it by a choice),
  measured, reproduced (True / False / None)."""
  rows = [{"study": name, "protocol": head.get("protocol", ""), **r}
          for name, head in heads.items() for r in study_record(name).paper_checks(head)]
  return pd.DataFrame(rows, columns=["study", "finding", "protocol", "measured", "reproduced"])


def report(suite, heads: dict[str, dict]) -> dict[str, Any]:
  """results/findings.csv; report/index.html (the findings table, links to each study's
  report) and summary.json (wall seconds per part; the findings)."""
  df = findings(heads)
  write_csv(df, os.path.join(suite.wd, "results", "findings.csv"))
  verdict = {True: "yes", False: "no", None: "n/a"}
  rows = "".join(
      f"<tr><td>{html.escape(r.study)}</td><td>{html.escape(r.finding)}</td>"
      f"<td>{html.escape(r.protocol)}</td><td>{html.escape(r.measured)}</td>"
      f"<td>{verdict[r.reproduced]}</td></tr>" for r in df.itertuples())
  table = ("<table><tr><th>study</th><th>paper's finding</th><th>protocol here</th>"
           "<th>measured here</th>"
           f"<th>reproduced</th></tr>{rows}</table><p>Each study's own report: "
           + " ".join(f'<a href="../{n}/report/index.html">{n}</a>' for n in suite.studies)
           + ".</p>")
  head = {"sizes": list(suite.c.sizes), "seeds": list(suite.c.seeds),
          "timings_s": read_json(os.path.join(suite.wd, "results", "timings.json"))}
  section = "What each paper reports, and what this run measured"
  head = write_report(os.path.join(suite.wd, "report"), suite.title, suite.wd, head, [],
                      ["findings"], sections=[(section, table)])
  return dict(head, findings=df.to_dict("records"))


def summary(head: dict[str, Any]) -> list[str]:
  verdict = {True: "yes", False: "NO", None: "n/a"}
  return [f"{r['study']:<14} {verdict[r['reproduced']]:>3}  {r['finding']}: {r['measured']}"
          for r in head["findings"]]
