# Sourced by the launchers: command printing for DRY_RUN=1 and background process bookkeeping.
# shellcheck shell=bash

DRY_RUN="${DRY_RUN:-0}"
BACKGROUND_PIDS=()

# Prints a command as one shell line, quoting only the words that need it.
show() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Runs a command, or prints it when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

# Starts a command in the background with its output in a log file (printed when DRY_RUN=1).
run_background() {
  local log="$1"
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$(show "$@") > $log 2>&1 &"
  else
    mkdir -p "$(dirname "$log")"
    "$@" >"$log" 2>&1 &
    BACKGROUND_PIDS+=("$!")
  fi
}

# Stops the processes this launcher started in the background (by their ids only).
stop_background() {
  local pid
  for pid in "${BACKGROUND_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${BACKGROUND_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
