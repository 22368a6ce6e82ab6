#!/usr/bin/env bash
# Run a factflip training job or study on this machine, as one process or as N local processes
# that talk over 127.0.0.1 (a rehearsal of a multi-host job; CPU collectives use gloo).
#
#   launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh configs/pretrain_tiny.py workdir/mh
#   COMMAND=run NUM_PROCESSES=2 launch/local.sh configs/studies/poisoning.py:smoke workdir/st
#
# COMMAND (train, the default, or run: a study), NUM_PROCESSES (default 1),
# DEVICES_PER_PROCESS (CPU only: fake devices per process, default unset = the real devices),
# PORT (coordinator port, default 12355).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cmd=${COMMAND:-train}
if [[ "$cmd" != train && "$cmd" != run ]]; then
  echo "COMMAND=$cmd; expected train or run" >&2; exit 2
fi
n=${NUM_PROCESSES:-1}
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
if [[ "$n" == 1 ]]; then
  exec factflip "$cmd" --config="$config" --workdir="$workdir" "$@"
fi
port=${PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  factflip "$cmd" --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$n" --process_id="$i" "$@" \
    > >(sed "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM   # forwarded: each saves and stops
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
