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
#
# SERVER=sglang|vllm (default none: the workers' embedded JAX sampler) starts each worker through
# serve_worker.sh with its own server beside it on 127.0.0.1, port SERVER_PORT + i (SGLang 30000,
# vLLM 8000), and the worker told --config.rollout.backend and --config.rollout.server_url;
# server logs: WORKDIR/logs/server_local<i>.log. MODEL (default: the --config.model.path argument)
# is what the servers load first. SERVER_GPUS: one CUDA device list per worker, e.g. "4 5 6 7" or
# "4,5 6,7" (tensor parallel); unset, every server inherits CUDA_VISIBLE_DEVICES. The learner is
# told --config.publish.hf_layout=on (the servers load Hugging Face checkpoints). Other server
# variables (SERVER_FLAGS, SERVER_CMD, SERVER_TIMEOUT, ...): see serve_worker.sh.
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"
cd "$LAUNCH_DIR/.."

CONFIG="${CONFIG:-configs/ggpo.py}"
WORKDIR="${WORKDIR:-/tmp/vimrag}"
NUM_WORKERS="${NUM_WORKERS:-1}"
PYTHON="${PYTHON:-python}"
SERVER="${SERVER:-none}"
read -r -a worker_flags <<<"${WORKER_FLAGS:-}"
read -r -a server_gpus <<<"${SERVER_GPUS:-}"

if ! [[ "$NUM_WORKERS" =~ ^[0-9]+$ ]]; then
  echo "NUM_WORKERS must be a number, got '$NUM_WORKERS'" >&2
  exit 2
fi
if [[ "$SERVER" != none && "$SERVER" != sglang && "$SERVER" != vllm ]]; then
  echo "SERVER must be none, sglang or vllm, got '$SERVER'" >&2
  exit 2
fi
if ((${#server_gpus[@]} > 0 && ${#server_gpus[@]} != NUM_WORKERS)); then
  echo "SERVER_GPUS needs one device list per worker ($NUM_WORKERS), got '${SERVER_GPUS:-}'" >&2
  exit 2
fi
learner_flags=()
[[ "$SERVER" != none ]] && learner_flags+=(--config.publish.hf_layout=on)

trap stop_background EXIT
for ((i = 0; i < NUM_WORKERS; i++)); do
  if [[ "$SERVER" == none ]]; then
    run_background "$WORKDIR/logs/worker_$i.log" \
      "$PYTHON" -m vimrag_jax.rollout.worker --config="$CONFIG" --workdir="$WORKDIR" \
      --worker_id="local$i" "${worker_flags[@]}" "$@"
  else
    gpus=()
    ((${#server_gpus[@]} > 0)) && gpus=("SERVER_GPUS=${server_gpus[i]}")
    run_background "$WORKDIR/logs/worker_$i.log" \
      env SERVER="$SERVER" CONFIG="$CONFIG" WORKDIR="$WORKDIR" PYTHON="$PYTHON" \
      WORKER_ID="local$i" LOCAL_INDEX="$i" "${gpus[@]}" \
      bash "$LAUNCH_DIR/serve_worker.sh" "$@"
  fi
done
run "$PYTHON" -m vimrag_jax.train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.rollout.embedded_workers=0 "${learner_flags[@]}" "$@"
