"""Paper B: SFT on new knowledge — SliCK categories, %Unknown mixtures, fitting dynamics and
the linear fit (SCIENCE.md B; Gekhman et al. 2024).

The package: `config` (every key, its checks, the mixtures' names), `study` (the stages:
SliCK, mixtures, SFT per mixture, QA on every checkpoint, results), `results` (table → table
functions), `report` (figures, headline, terminal lines, paper checks). `STUDY` is its record
in the registry (`studies.platform.STUDIES`).
"""

from factflip.studies.new_knowledge import report
from factflip.studies.new_knowledge.config import (
                                                   ENTITYQUESTIONS_IN,
                                                   ENTITYQUESTIONS_OOD,
                                                   base_config,
                                                   mixture_names,
                                                   unknown_share,
                                                   validate,
)
from factflip.studies.new_knowledge.results import (
                                                   COLUMNS,
                                                   checkpoint_metrics,
                                                   epochs_to,
                                                   linear_fit,
)
from factflip.studies.new_knowledge.study import Study
from factflip.studies.platform import StudyRecord

STUDY = StudyRecord(
    name="new_knowledge", title="SFT on new knowledge (SliCK, %Unknown, fitting dynamics)",
    base_config=base_config, validate=validate, study=Study, headline=report.headline,
    figures=report.figures, summary=report.summary, paper_checks=report.paper_checks)

__all__ = ["COLUMNS", "ENTITYQUESTIONS_IN", "ENTITYQUESTIONS_OOD", "STUDY", "Study",
           "base_config", "checkpoint_metrics", "epochs_to", "linear_fit", "mixture_names",
           "unknown_share", "validate"]
