"""Paper D: unlearning by counterfactual tuning and its hidden costs — methods, gradient
conflict, hallucination spillover and RWKU-style metrics (SCIENCE.md D).

The package: `config` (every key, its checks, the runs' names), `study` (the stages: training
sets, an unlearning run per method, the evaluation of the base and of every checkpoint, the
conflict diagnostics, results), `evaluation` (what every model is asked), `results` (table →
table functions), `report` (figures, headline, terminal lines, paper checks). `STUDY` is its
record in the registry (`studies.platform.STUDIES`).
"""

from factflip.studies.platform import StudyRecord
from factflip.studies.unlearning import report
from factflip.studies.unlearning.config import METHODS, base_config, method_of, run_names, validate
from factflip.studies.unlearning.results import COLUMNS, checkpoint_row, conflict_rows
from factflip.studies.unlearning.study import Study

STUDY = StudyRecord(
    name="unlearning",
    title="unlearning by counterfactual tuning: conflict, spillover, RWKU metrics",
    base_config=base_config, validate=validate, study=Study, headline=report.headline,
    figures=report.figures, summary=report.summary, paper_checks=report.paper_checks)

__all__ = ["COLUMNS", "METHODS", "STUDY", "Study", "base_config", "checkpoint_row",
           "conflict_rows", "method_of", "run_names", "validate"]
