"""Paper C: MoRFI — SAE latents that move monotonically with the share of Unknown facts in the
fine-tuning set, and steering along them to recover knowledge (SCIENCE.md C).

The package: `config` (paper B's keys plus `sae` and `morfi`), `study` (B's stages up to SFT,
then the SAE, the latents of every checkpoint, the test and the steering, results),
`results` (table → table functions), `report` (figures, headline, terminal lines, paper
checks). `STUDY` is its record in the registry (`studies.platform.STUDIES`).
"""

from factflip.studies.morfi import report
from factflip.studies.morfi.config import base_config, validate
from factflip.studies.morfi.results import COLUMNS, ranked_monotonic
from factflip.studies.morfi.study import Study
from factflip.studies.platform import StudyRecord

STUDY = StudyRecord(
    name="morfi", title="MoRFI: monotonic SAE latents under %Unknown SFT, and steering",
    base_config=base_config, validate=validate, study=Study, headline=report.headline,
    figures=report.figures, summary=report.summary, paper_checks=report.paper_checks)

__all__ = ["COLUMNS", "STUDY", "Study", "base_config", "ranked_monotonic", "validate"]
