"""Run a study end to end (default: paper A's poisoning study).

usage: factflip run [--config=FILE.py[:variant] --config.KEY=VALUE --workdir=DIR --dry_run]

Runs the study its config names (`study = "poisoning"`, ...; the registry in
factflip/studies/platform.py) into --workdir: for paper A the fact world, pretraining,
continual pretraining per poisoning ratio, probes on every checkpoint, results tables
(results/*.csv), plots and report/index.html. Each stage records the fingerprint of
the config keys it read: running again reuses unchanged stages, resumes a stopped one
and redoes (atomically) exactly the stages whose keys changed and everything
downstream. The plan is printed before any work; --dry_run prints only the plan.
On many hosts the same command runs on every process (TPU pod workers, SLURM tasks,
or launch/local.sh with NUM_PROCESSES=N): training stages on the global mesh, paper
A's probes over every process's devices, process 0 writing (launch/README.md).

  factflip run                                 # configs/studies/poisoning.py
  factflip run --config=configs/studies/poisoning.py:smoke --workdir=/tmp/smoke
  factflip run --config=configs/studies/poisoning.py:scale=ladder,seeds=0+1 \\
      --workdir=workdir/scaling --config.cpt.steps=200
"""

from __future__ import annotations

import os
import sys

from absl import app

from factflip.cli.flags import CACHE, FLAGS, MULTIHOST, config_source, initialize_distributed

READS = {"config": "The study config, FILE.py[:variant] (default configs/studies/poisoning.py); "
                  "override any key with --config.KEY=VALUE.",
         "workdir": "The study's directory: runs/, results/, report/, study.json. The same "
                    "directory again resumes or redoes what changed.",
         "dry_run": "Print which stages would be reused, computed or redone and which config "
                    "keys changed, then stop.",
         **MULTIHOST, **CACHE}


def default_config() -> str:
  """The default study config: ./configs/studies/poisoning.py, else the one next to the
  package (an editable install of the repository)."""
  here = os.path.join("configs", "studies", "poisoning.py")
  repo = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), here)
  for path in (here, repo):
    if os.path.exists(path):
      return path
  raise app.UsageError("no configs/studies/poisoning.py here or next to the package: pass "
                       "--config=PATH/poisoning.py")


def run(workdir: str, config=None, source: str | None = None, dry_run: bool = False
        ) -> dict | None:
  """The study a config names (default: configs/studies/poisoning.py): every stage, resumable.
  In a multi-process job only process 0 prints (the others print only an error)."""
  import jax

  from factflip.configfile import ConfigError, load_config_file
  from factflip.distributed import HostError
  from factflip.studies.platform import study_record
  from factflip.studies.stages import Stopped, StudyError

  if config is None:
    source = default_config()
    config = load_config_file(source)
  main = jax.process_index() == 0
  log = print if main else (lambda line: None)
  log(f"factflip run: {source} -> {os.path.abspath(workdir)}"
      + (f" ({jax.process_count()} processes, {jax.device_count()} devices)"
         if jax.process_count() > 1 else ""))
  try:
    study = study_record(config.get("study", ""), source).study
    summary = study(config, workdir, log=log, source=source).run_and_report(dry_run)
  except Stopped as e:     # exit 0, as `factflip train` does: a requeued job resumes
    log(str(e))
    sys.exit(0)
  except (StudyError, ConfigError, HostError) as e:
    print(f"error: {e}" if main else f"error (process {jax.process_index()}): {e}",
          file=sys.stderr)
    sys.exit(2)
  return summary


def main() -> None:
  initialize_distributed()
  run(FLAGS.workdir, FLAGS.config, config_source(), FLAGS.dry_run)
