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
#   install  create REMOTE_DIR/.venv there (scripts/venv.sh: the tested CPU set of
#            constraints.txt), then add the accelerator packages: on the TPU hosts the `tpu`
#            extra (TPU_EXTRA), on the rollout VMs the `cuda12` extra (ROLLOUT_EXTRA) when their
#            workers sample with JAX (SERVER=none), or, with SERVER=sglang|vllm, the server
#            package (SERVER_PIP) in its own REMOTE_DIR/.venv-server (the worker then builds no
#            model and needs no accelerator; the server's torch stack stays apart from JAX);
#   workers  start WORKERS_PER_VM rollout workers on each of ROLLOUT_VMS, in the background;
#            with SERVER=sglang|vllm each through launch/serve_worker.sh beside its own server
#            (127.0.0.1, port SERVER_PORT + i; logs in WORKDIR/logs/);
#   train    run the learner on all TPU hosts at once; jax.distributed finds its peers from the
#            TPU metadata (config.distributed.enabled=True).
# WORKDIR must be a filesystem every host and VM mounts at the same path (Filestore / NFS /
# gcsfuse): checkpoints, published policies and rollout shards all live there.
# Other variables: PROJECT (gcloud default), REMOTE_DIR (~/vimrag_jax), TPU_EXTRA (tpu),
# ROLLOUT_ZONE (ZONE), WORKER_FLAGS, SERVER (none | sglang | vllm), ROLLOUT_EXTRA (cuda12 with
# SERVER=none, else empty), SERVER_PIP (sglang | "vllm>=0.10.2"), MODEL (the checkpoint the
# servers load first; default: the --config.model.path argument), SERVER_GPUS (one CUDA device
# list per worker of a VM, e.g. "0,1,2,3 4,5,6,7"), SERVER_PORT, SERVER_FLAGS, SERVER_TIMEOUT
# (see serve_worker.sh). Arguments are config overrides for learner and workers.
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"
cd "$LAUNCH_DIR/.."

: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-east5-a}"
: "${WORKDIR:?set WORKDIR to a directory shared by every host (NFS / Filestore / gcsfuse)}"
CONFIG="${CONFIG:-configs/ggpo.py:qwen3vl_8b}"
REMOTE_DIR="${REMOTE_DIR:-~/vimrag_jax}"
TPU_EXTRA="${TPU_EXTRA:-tpu}"
ROLLOUT_VMS="${ROLLOUT_VMS:-}"
ROLLOUT_ZONE="${ROLLOUT_ZONE:-$ZONE}"
WORKERS_PER_VM="${WORKERS_PER_VM:-1}"
STAGES="${STAGES:-copy install workers train}"
WORKER_FLAGS="${WORKER_FLAGS:-}"
SERVER="${SERVER:-none}"
case "$SERVER" in
  none) default_extra=cuda12 default_pip="" ;;
  sglang) default_extra="" default_pip=sglang ;;
  vllm) default_extra="" default_pip="vllm>=0.10.2" ;;  # return_token_ids: sampling/vllm.py
  *)
    echo "SERVER must be none, sglang or vllm, got '$SERVER'" >&2
    exit 2
    ;;
esac
ROLLOUT_EXTRA="${ROLLOUT_EXTRA-$default_extra}"
SERVER_PIP="${SERVER_PIP:-$default_pip}"
project=()
[[ -n "${PROJECT:-}" ]] && project=(--project="$PROJECT")
read -r -a rollout_vms <<<"$ROLLOUT_VMS"
read -r -a server_gpus <<<"${SERVER_GPUS:-}"
if [[ ! "$WORKERS_PER_VM" =~ ^[0-9]+$ ]]; then
  echo "WORKERS_PER_VM must be a number, got '$WORKERS_PER_VM'" >&2
  exit 2
fi
if ((${#server_gpus[@]} > 0 && ${#server_gpus[@]} != WORKERS_PER_VM)); then
  echo "SERVER_GPUS needs one device list per worker of a VM ($WORKERS_PER_VM)," \
    "got '${SERVER_GPUS:-}'" >&2
  exit 2
fi

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
# The accelerator extras go in after venv.sh, without -c constraints.txt: that file pins the
# CPU set CI tests, and jax[tpu] / jax[cuda12] must resolve their plugin (libtpu, the CUDA
# wheels) within setup.py's ranges; pip keeps the installed jax when a plugin for it exists.
if has_stage install; then
  run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$install && pip install --quiet -e '.[$TPU_EXTRA]'"
  rollout_install="$install"
  [[ -n "$ROLLOUT_EXTRA" ]] && rollout_install+=" && pip install --quiet -e '.[$ROLLOUT_EXTRA]'"
  if [[ "$SERVER" != none ]]; then
    rollout_install+=" && { [[ -x .venv-server/bin/python ]] || python3 -m venv .venv-server; }"
    rollout_install+=" && .venv-server/bin/pip install --quiet $(printf '%q' "$SERVER_PIP")"
  fi
  for host in "${rollout_vms[@]}"; do
    run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" --command="$rollout_install"
  done
fi

# The environment serve_worker.sh gets on a rollout VM (the remote shell inherits nothing).
server_env=""
if [[ "$SERVER" != none ]]; then
  if [[ "$SERVER" == sglang ]]; then
    server_cmd=".venv-server/bin/python -m sglang.launch_server"
  else
    server_cmd=".venv-server/bin/vllm serve"
  fi
  server_env="SERVER=$SERVER CONFIG=$(printf '%q' "$CONFIG") WORKDIR=$(printf '%q' "$WORKDIR")"
  server_env+=" SERVER_CMD=$(printf '%q' "${SERVER_CMD:-$server_cmd}")"
  for name in MODEL WORKER_FLAGS SERVER_PORT SERVER_HOST SERVER_FLAGS SERVER_TIMEOUT SERVER_TP; do
    [[ -n "${!name:-}" ]] && server_env+=" $name=$(printf '%q' "${!name}")"
  done
fi

if has_stage workers; then
  for host in "${rollout_vms[@]}"; do
    for ((i = 0; i < WORKERS_PER_VM; i++)); do
      if [[ "$SERVER" == none ]]; then
        worker="python -m vimrag_jax.rollout.worker --config=$CONFIG --workdir=$WORKDIR"
        worker+=" --worker_id=$host-w$i"  # distinct and stable: shard names and question order
        worker+="${WORKER_FLAGS:+ $WORKER_FLAGS}$overrides"
        run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" \
          --command="$install && nohup $worker > worker_$i.log 2>&1 < /dev/null &"
      else
        worker="env $server_env WORKER_ID=$host-w$i LOCAL_INDEX=$i"
        ((${#server_gpus[@]} > 0)) && worker+=" SERVER_GPUS=${server_gpus[i]}"
        worker+=" bash launch/serve_worker.sh$overrides"
        logs="$(printf '%q' "$WORKDIR/logs")"
        run "${vm[@]}" ssh "$host" --zone="$ROLLOUT_ZONE" --command="$install && mkdir -p $logs \
&& nohup $worker > $logs/worker_$host-w$i.log 2>&1 < /dev/null &"
      fi
    done
  done
fi

if has_stage train; then
  learner="python -m vimrag_jax.train --config=$CONFIG --workdir=$WORKDIR"
  learner+=" --config.distributed.enabled=True --config.rollout.embedded_workers=0"
  [[ "$SERVER" != none ]] && learner+=" --config.publish.hf_layout=on"
  learner+="$overrides"
  run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$install && $learner"
fi
