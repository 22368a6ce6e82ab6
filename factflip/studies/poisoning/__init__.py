"""Paper A: continual pretraining on misinformation — which facts flip, when, where, and
whether patching the base's activations undoes it (SCIENCE.md A).

The package: `config` (every key and its checks), `study` (the stages: CPT per poisoning ratio,
probes of every checkpoint, results), `results` (table → table functions), `report` (figures,
headline, terminal lines, paper checks). `STUDY` is its record in the registry
(`studies.platform.STUDIES`).
"""

from factflip.studies.platform import StudyRecord
from factflip.studies.poisoning import report
from factflip.studies.poisoning.config import base_config, validate
from factflip.studies.poisoning.results import COLUMNS
from factflip.studies.poisoning.study import Study
from factflip.studies.stages import StudyError

STUDY = StudyRecord(
    name="poisoning", title="continual-pretraining poisoning study", base_config=base_config,
    validate=validate, study=Study, headline=report.headline, figures=report.figures,
    summary=report.summary, paper_checks=report.paper_checks)

__all__ = ["COLUMNS", "STUDY", "Study", "StudyError", "base_config", "validate"]
