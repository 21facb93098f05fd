#!/usr/bin/env bash
# One rollout worker with its own SGLang or vLLM server beside it, on this machine: what
# local.sh, slurm_gpu.sbatch and tpu_pod.sh start for every worker when SERVER=sglang|vllm.
#
#   SERVER=vllm MODEL=/shared/Qwen3-VL-8B-Instruct WORKDIR=/shared/run WORKER_ID=gpu0 \
#     bash launch/serve_worker.sh [--config.KEY=VALUE ...]
#   DRY_RUN=1 ... bash launch/serve_worker.sh     # print the commands instead
#
# Steps:
# 1. vllm only: point this worker's serving link WORKDIR/serving/<id> at MODEL. vLLM serves that
#    path; the worker re-points it at each published version and asks its server to re-read it
#    (config.rollout.serving_path). One link per worker, so no worker moves another's server.
# 2. Start the server in the background, in its own process group, bound to SERVER_HOST:PORT
#    (loopback by default: vLLM's reload endpoints are development endpoints that must stay
#    private); its output goes to WORKDIR/logs/server_<id>.log.
# 3. Poll GET /health until it answers 200, at most SERVER_TIMEOUT seconds. A server that exits
#    first, never answers, or a port something else already answers on is an error naming the log.
# 4. Run the worker with --config.rollout.backend=SERVER
#    --config.rollout.server_url=http://127.0.0.1:PORT (vllm also: server_model, serving_path).
#    XLA_PYTHON_CLIENT_PREALLOCATE=false: the worker builds no model, and a JAX with a GPU
#    plugin must not reserve the memory the server runs on.
# 5. When the worker exits, stop the server's process group (trap EXIT). TERM / INT given to this
#    script go to the worker first (it finishes its batch, which needs the server, then exits).
#
# The server flags, as the sampler modules' docstrings require them:
#   sglang (vimrag_jax/sampling/sglang.py): SGLANG_RETURN_ORIGINAL_LOGPROB=1 (log-probs before
#     temperature), --weight-version 0 (the initial weights are version 0);
#   vllm (vimrag_jax/sampling/vllm.py): VLLM_SERVER_DEV_MODE=1 (/collective_rpc and
#     /reset_prefix_cache, the weight reload), served on the serving link, --served-model-name
#     policy, --logprobs-mode raw_logprobs (log-probs before temperature),
#     --chat-template-content-format openai --trust-request-chat-template (our request template
#     gets the content parts); vLLM >= 0.10.2 (return_token_ids).
#
# Variables: SERVER (sglang | vllm; required), MODEL (the initial Hugging Face checkpoint, a
# local directory for vllm; default: the --config.model.path argument), WORKDIR (required),
# CONFIG (configs/ggpo.py), PYTHON (python), WORKER_FLAGS, WORKER_ID (required; with
# WORKER_ID_ENV=SLURM_PROCID the id is WORKER_ID followed by that variable's value),
# LOCAL_INDEX (0; or LOCAL_INDEX_ENV=SLURM_LOCALID): this worker's index on the machine,
# PORT = SERVER_PORT (sglang 30000, vllm 8000) + LOCAL_INDEX; SERVER_HOST (127.0.0.1),
# SERVER_GPUS (CUDA_VISIBLE_DEVICES of the server, e.g. "4" or "4,5"; unset: inherited),
# SERVER_TP (tensor-parallel size; default: the number of SERVER_GPUS, else 1), SERVER_CMD
# (sglang: "python -m sglang.launch_server", vllm: "vllm serve"; e.g. a separate venv's),
# SERVER_FLAGS (extra server flags), SERVER_TIMEOUT (1800 s), SERVER_POLL (5 s).
# Arguments are config overrides for the worker.
set -euo pipefail
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$LAUNCH_DIR/common.sh"
cd "$LAUNCH_DIR/.."

die() {
  echo "serve_worker.sh: $*" >&2
  exit 2
}

SERVER="${SERVER:-}"
[[ "$SERVER" == sglang || "$SERVER" == vllm ]] || die "SERVER must be sglang or vllm, got '$SERVER'"
[[ -n "${WORKDIR:-}" ]] || die "set WORKDIR to the run directory"
[[ -n "${WORKER_ID:-}" ]] || die "set WORKER_ID (distinct per worker: it names its shards)"
CONFIG="${CONFIG:-configs/ggpo.py}"
PYTHON="${PYTHON:-python}"
SERVER_HOST="${SERVER_HOST:-127.0.0.1}"
SERVER_TIMEOUT="${SERVER_TIMEOUT:-1800}"
SERVER_POLL="${SERVER_POLL:-5}"
read -r -a worker_flags <<<"${WORKER_FLAGS:-}"
read -r -a server_flags <<<"${SERVER_FLAGS:-}"

model="${MODEL:-}"
if [[ -z "$model" ]]; then
  for arg in "$@"; do
    [[ "$arg" == --config.model.path=* ]] && model="${arg#--config.model.path=}"
  done
fi
[[ -n "$model" ]] || die "set MODEL (or pass --config.model.path=...) to the checkpoint to serve"

id="$WORKER_ID"
if [[ -n "${WORKER_ID_ENV:-}" ]]; then
  [[ -n "${!WORKER_ID_ENV+set}" ]] || die "WORKER_ID_ENV=$WORKER_ID_ENV, but $WORKER_ID_ENV is not set"
  id+="${!WORKER_ID_ENV}"
fi
index="${LOCAL_INDEX:-0}"
if [[ -n "${LOCAL_INDEX_ENV:-}" ]]; then
  [[ -n "${!LOCAL_INDEX_ENV+set}" ]] || die "LOCAL_INDEX_ENV=$LOCAL_INDEX_ENV, but $LOCAL_INDEX_ENV is not set"
  index="${!LOCAL_INDEX_ENV}"
fi
[[ "$index" =~ ^[0-9]+$ ]] || die "the local index must be a number, got '$index'"
if [[ "$SERVER" == sglang ]]; then default_port=30000; else default_port=8000; fi
SERVER_PORT="${SERVER_PORT:-$default_port}"
[[ "$SERVER_PORT" =~ ^[0-9]+$ ]] || die "SERVER_PORT must be a number, got '$SERVER_PORT'"
port=$((SERVER_PORT + index))
((port < 65536)) || die "port $port (SERVER_PORT=$SERVER_PORT + index $index) is out of range"

# The worker reaches its server over loopback unless the server is bound to one other address.
url_host="$SERVER_HOST"
[[ "$url_host" == 0.0.0.0 || "$url_host" == "::" ]] && url_host=127.0.0.1
url="http://$url_host:$port"
log="$WORKDIR/logs/server_$id.log"

server_env=()
[[ -n "${SERVER_GPUS:-}" ]] && server_env+=("CUDA_VISIBLE_DEVICES=$SERVER_GPUS")
if [[ -n "${SERVER_GPUS:-}" ]]; then
  IFS=, read -r -a gpus <<<"$SERVER_GPUS"
  tp="${SERVER_TP:-${#gpus[@]}}"
else
  tp="${SERVER_TP:-1}"
fi
[[ "$tp" =~ ^[1-9][0-9]*$ ]] || die "SERVER_TP must be a positive number, got '$tp'"

if [[ "$SERVER" == sglang ]]; then
  read -r -a server_cmd <<<"${SERVER_CMD:-python -m sglang.launch_server}"
  server_env+=(SGLANG_RETURN_ORIGINAL_LOGPROB=1)
  server=("${server_cmd[@]}" --model-path "$model" --host "$SERVER_HOST" --port "$port"
    --weight-version 0)
  ((tp > 1)) && server+=(--tp-size "$tp")
  backend=(--config.rollout.backend=sglang --config.rollout.server_url="$url")
else
  read -r -a server_cmd <<<"${SERVER_CMD:-vllm serve}"
  [[ "$model" == /* ]] || model="$PWD/$model"  # the link must not depend on its directory
  if [[ "$DRY_RUN" != 1 && ! -d "$model" ]]; then
    die "vLLM serves a local directory (through the serving link); MODEL=$model is not one"
  fi
  link="$WORKDIR/serving/$id"
  server_env+=(VLLM_SERVER_DEV_MODE=1)
  server=("${server_cmd[@]}" "$link" --served-model-name policy --host "$SERVER_HOST"
    --port "$port" --logprobs-mode raw_logprobs --chat-template-content-format openai
    --trust-request-chat-template)
  ((tp > 1)) && server+=(--tensor-parallel-size "$tp")
  backend=(--config.rollout.backend=vllm --config.rollout.server_url="$url"
    --config.rollout.server_model=policy --config.rollout.serving_path="$link")
fi
server=(env "${server_env[@]}" "${server[@]}" "${server_flags[@]}")
worker=(env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m vimrag_jax.rollout.worker
  --config="$CONFIG" --workdir="$WORKDIR" --worker_id="$id" "${worker_flags[@]}" "$@"
  "${backend[@]}")

# 0 when URL answers 200 within 5 seconds.
http_ok() {
  if command -v curl >/dev/null; then
    curl --silent --fail --output /dev/null --max-time 5 "$1"
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
      "$1" >/dev/null 2>&1
  fi
}

server_pid=""
worker_pid=""

stop_server() {
  [[ -n "$server_pid" ]] || return 0
  # Its own process group (setsid): the server's engine and scheduler processes go too.
  kill -TERM -- "-$server_pid" 2>/dev/null || kill -TERM "$server_pid" 2>/dev/null || true
  local waited=0
  while kill -0 "$server_pid" 2>/dev/null && ((waited < 30)); do
    sleep 1
    waited=$((waited + 1))
  done
  kill -KILL -- "-$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

fail_server() {
  echo "serve_worker.sh: $SERVER server for worker $id: $*; its log: $log" >&2
  [[ -f "$log" ]] && tail -n 20 "$log" | sed 's/^/  | /' >&2
  exit 1
}

forward() {
  [[ -n "$worker_pid" ]] && kill -"$1" "$worker_pid" 2>/dev/null
  [[ -n "$worker_pid" ]] || exit 143
}

if [[ "$DRY_RUN" == 1 ]]; then
  if [[ "$SERVER" == vllm ]]; then
    show mkdir -p "$WORKDIR/serving"
    show ln -sfn "$model" "$link"
  fi
  echo "$(show "${server[@]}") > $log 2>&1 &"
  echo "# wait up to ${SERVER_TIMEOUT}s for $url/health (server log: $log)"
  show "${worker[@]}"
  exit 0
fi

mkdir -p "$WORKDIR/logs"
if http_ok "$url/health"; then
  fail_server "something already answers on $url (a server left from an earlier run?)"
fi
if [[ "$SERVER" == vllm ]]; then
  mkdir -p "$WORKDIR/serving"
  ln -sfn "$model" "$link"
fi
trap stop_server EXIT
trap 'forward TERM' TERM
trap 'forward INT' INT
echo "serve_worker.sh: starting $(show "${server[@]}") > $log" >&2
if command -v setsid >/dev/null; then
  setsid "${server[@]}" >"$log" 2>&1 </dev/null &
else
  "${server[@]}" >"$log" 2>&1 </dev/null &
fi
server_pid=$!
start=$SECONDS
until http_ok "$url/health"; do
  kill -0 "$server_pid" 2>/dev/null || fail_server "exited before $url/health answered"
  ((SECONDS - start < SERVER_TIMEOUT)) ||
    fail_server "$url/health did not answer within ${SERVER_TIMEOUT}s"
  sleep "$SERVER_POLL"
done
kill -0 "$server_pid" 2>/dev/null || fail_server "exited; $url answers from another process"
echo "serve_worker.sh: $SERVER server ready at $url after $((SECONDS - start))s" >&2

"${worker[@]}" &
worker_pid=$!
status=0
while true; do
  wait "$worker_pid" && status=0 || status=$?
  kill -0 "$worker_pid" 2>/dev/null || break  # else a trapped signal interrupted the wait
done
worker_pid=""
exit "$status"
