#!/usr/bin/env bash
# The learner on every host of a Cloud TPU VM pod slice, rollout workers on separate VMs.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/shared/run1 \
#   CONFIG=configs/ggpo.py:qwen3vl_8b ROLLOUT_VMS="gpu-vm-1 gpu-vm-2" \
#     bash launch/tpu_pod.sh --config.model.path=/mnt/shared/Qwen3-VL-8B-Instruct
#   DRY_RUN=1 ... bash launch/tpu_pod.sh     # print the commands instead
#
# Stages (STAGES, default "copy install workers train"):
#   copy     pack this checkout (no .venv/.git) and unpack it in REMOTE_DIR on every TPU host
#            and rollout VM;
#   install  create REMOTE_DIR/.venv there (scripts/venv.sh) and add ACCEL_PIP (jax[tpu]);
#   workers  start WORKERS_PER_VM rollout workers on each of ROLLOUT_VMS, in the background;
#   train    run the learner on all TPU hosts at once; jax.distributed finds its peers from the
#            TPU metadata (config.distributed.enabled=True).
# WORKDIR must be a filesystem every host and VM mounts at the same path (Filestore / NFS /
# gcsfuse): checkpoints, published policies and rollout shards all live there.
# Other variables: PROJECT (gcloud default), REMOTE_DIR (~/vimrag_jax), ACCEL_PIP ("jax[tpu]"),
# ROLLOUT_ZONE (ZONE), WORKER_FLAGS. Arguments are config overrides for learner and workers.
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"
cd "$LAUNCH_DIR/.."

: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-east5-a}"
: "${WORKDIR:?set WORKDIR to a directory shared by every host (NFS / Filestore / gcsfuse)}"
CONFIG="${CONFIG:-configs/ggpo.py:qwen3vl_8b}"
REMOTE_DIR="${REMOTE_DIR:-~/vimrag_jax}"
ACCEL_PIP="${ACCEL_PIP:-jax[tpu]}"
ROLLOUT_VMS="${ROLLOUT_VMS:-}"
ROLLOUT_ZONE="${ROLLOUT_ZONE:-$ZONE}"
WORKERS_PER_VM="${WORKERS_PER_VM:-1}"
STAGES="${STAGES:-copy install workers train}"
WORKER_FLAGS="${WORKER_FLAGS:-}"
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
read -r -a rollout_vms <<<"$ROLLOUT_VMS"

overrides=""
for arg in "$@"; do
  overrides+=" $(printf '%q' "$arg")"
done
tpu=(gcloud compute tpus tpu-vm "${project[@]}")
vm=(gcloud compute "${project[@]}")
archive=/tmp/vimrag_jax_src.tgz

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

if has_stage copy; then
  run tar czf "$archive" --exclude=.venv --exclude=.git --exclude='*.egg-info' .
  run "${tpu[@]}" scp "$archive" "$TPU_NAME:/tmp/" --zone="$ZONE" --worker=all
  run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="mkdir -p $REMOTE_DIR && tar xzf $archive -C $REMOTE_DIR"
  for host in "${rollout_vms[@]}"; do
    run "${vm[@]}" scp "$archive" "$host:/tmp/" --zone="$ROLLOUT_ZONE"
    run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" \
      --command="mkdir -p $REMOTE_DIR && tar xzf $archive -C $REMOTE_DIR"
  done
fi

install="cd $REMOTE_DIR && source scripts/venv.sh"
if has_stage install; then
  run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$install && pip install --quiet '$ACCEL_PIP'"
  for host in "${rollout_vms[@]}"; do
    run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" --command="$install"
  done
fi

if has_stage workers; then
  for host in "${rollout_vms[@]}"; do
    for ((i = 0; i < WORKERS_PER_VM; i++)); do
      worker="python -m vimrag_jax.rollout.worker --config=$CONFIG --workdir=$WORKDIR"
      worker+=" --worker_id=$host-w$i"  # distinct and stable: shard names and question order
      worker+="${WORKER_FLAGS:+ $WORKER_FLAGS}$overrides"
      run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" \
        --command="$install && nohup $worker > worker_$i.log 2>&1 < /dev/null &"
    done
  done
fi

if has_stage train; then
  learner="python -m vimrag_jax.train --config=$CONFIG --workdir=$WORKDIR"
  learner+=" --config.distributed.enabled=True --config.rollout.embedded_workers=0$overrides"
  run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$install && $learner"
fi
