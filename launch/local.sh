#!/usr/bin/env bash
# The learner and NUM_WORKERS rollout workers on this machine.
#
#   WORKDIR=/tmp/vimrag NUM_WORKERS=2 bash launch/local.sh [--config.KEY=VALUE ...]
#   DRY_RUN=1 bash launch/local.sh        # print the commands instead
#
# Variables: CONFIG (configs/ggpo.py[:preset[,algorithm]]), WORKDIR (/tmp/vimrag), NUM_WORKERS (1),
# PYTHON (python), WORKER_FLAGS (extra worker flags, e.g. "--max_trajectories=64").
# Arguments go to the learner and the workers alike (config overrides). The workers are
# started here, so the learner is told not to start its own (rollout.embedded_workers=0).
# Worker logs: WORKDIR/logs/worker_<i>.log. The workers are stopped when the learner exits.
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"
cd "$LAUNCH_DIR/.."

CONFIG="${CONFIG:-configs/ggpo.py}"
WORKDIR="${WORKDIR:-/tmp/vimrag}"
NUM_WORKERS="${NUM_WORKERS:-1}"
PYTHON="${PYTHON:-python}"
read -r -a worker_flags <<<"${WORKER_FLAGS:-}"

if ! [[ "$NUM_WORKERS" =~ ^[0-9]+$ ]]; then
  echo "NUM_WORKERS must be a number, got '$NUM_WORKERS'" >&2
  exit 2
fi

trap stop_background EXIT
for ((i = 0; i < NUM_WORKERS; i++)); do
  run_background "$WORKDIR/logs/worker_$i.log" \
    "$PYTHON" -m vimrag_jax.rollout.worker --config="$CONFIG" --workdir="$WORKDIR" \
    --worker_id="local$i" "${worker_flags[@]}" "$@"
done
run "$PYTHON" -m vimrag_jax.train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.rollout.embedded_workers=0 "$@"
