"""The four-study suite: papers A–D on one world and one pretrained base per size and seed,
read side by side against what each paper reports.

The package: `config` (the shared keys and one config per study), `study` (the shared stages,
every study in its own workdir), `report` (the findings table). `STUDY` is its record in the
registry (`studies.platform.STUDIES`).
"""

from factflip.studies.platform import StudyRecord
from factflip.studies.suite.config import STUDIES, base_config, study_config, validate
from factflip.studies.suite.study import Study, eta_seconds

STUDY = StudyRecord(name="suite", title="the four-study suite (papers A–D side by side)",
                    base_config=base_config, validate=validate, study=Study)

__all__ = ["STUDIES", "STUDY", "Study", "base_config", "eta_seconds", "study_config",
           "validate"]
