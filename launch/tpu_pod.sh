#!/usr/bin/env bash
# Run a factflip training job or study on every worker of a Cloud TPU VM pod slice.
#
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   COMMAND=run TPU=... ZONE=... launch/tpu_pod.sh configs/studies/poisoning.py:hf=...,facts=...
#       /mnt/shared/study
#
# Every worker runs the same command; JAX finds the coordinator, the process count and its index
# from the TPU environment (factflip's --distributed=auto initialises when the pod has more than
# one worker). WORKDIR must be a directory every worker sees (a Filestore/NFS mount or a gcsfuse
# mount of a bucket): process 0 writes config.json and metrics, every process writes its part of
# each checkpoint. REPO (default ~/factflip) is where the code lives on the workers; SETUP=1
# installs it there first (clone or copy it there beforehand, e.g. with gcloud ... scp).
# COMMAND: train (default) or run (a study: every worker runs it SPMD; process 0 writes).
set -euo pipefail
if [[ $# -lt 2 || -z "${TPU:-}" || -z "${ZONE:-}" ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cmd=${COMMAND:-train}
if [[ "$cmd" != train && "$cmd" != run ]]; then
  echo "COMMAND=$cmd; expected train or run" >&2; exit 2
fi
repo=${REPO:-~/factflip}
setup=""
if [[ "${SETUP:-0}" == 1 ]]; then
  setup="python3 -m pip install -e '${repo}' 'jax[tpu]' &&"
fi
printf -v extra '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd ${repo}; ${setup}
  factflip ${cmd} --config=${config} --workdir=${workdir} ${extra}"
