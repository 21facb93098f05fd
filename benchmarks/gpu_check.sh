#!/usr/bin/env bash
# The GPU check (issue 15, item 10): on one GPU, in at most ~8 minutes, install what the
# accelerator image lacks from wheels brought along, run a few fast tests on the device's own
# jax, measure with random weights of the real sizes (benchmarks/gpu_step.py: the Qwen3-1.7B
# bf16 train step through the learner -> tokens/s and MFU vs 989 TFLOP/s; the Qwen3-VL-2B step
# at the paper's visual budget -> time and peak memory; KV-cache decode at batch 64 -> tokens/s)
# and append the figures to docs/benchmarks.md ("## GPU check"). Exits nonzero when any part
# failed or timed out, after recording what it measured.
#
# 1. Here, where pip reaches the package registry, fetch the wheels once (Python 3.12,
#    manylinux x86-64, the versions pinned in constraints.txt; ~10 MB; git-ignored):
#        bash benchmarks/gpu_check.sh --fetch-wheels
# 2. On the lent GPU machine (the device tool's `run`; it has no network), carry that folder:
#        run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"], timeout_s=600)
#    CARRY PATH: benchmarks/wheels
#    The block recorded there comes back in $OUT as gpu_check.md, with the JSON lines
#    (gpu_check.jsonl) and each step's log; record it in this checkout's docs with
#        python benchmarks/gpu_step.py --record <files_at>/gpu_check.jsonl
# 3. `bash benchmarks/gpu_check.sh --dry-run` prints what step 2 runs (no pip, no network).
#
# Environment (all optional): GPU_CHECK_PYTHON (python3: the image's Python with jax),
# GPU_CHECK_WHEELS (benchmarks/wheels), GPU_CHECK_DOC (docs/benchmarks.md), GPU_CHECK_OUT
# (default $OUT: where the results and logs are copied), GPU_CHECK_BUDGET_S (470: the whole
# run; a step gets at most what is left), GPU_CHECK_TIMEOUT_{INSTALL,TESTS,TRAIN,VL,DECODE}
# (45, 70, 140, 150, 65 s), GPU_CHECK_TEST_PLATFORM (cuda: the tests run on the GPU with
# float32 matmuls at full precision; cpu: on the host), GPU_CHECK_STEP_ARGS (extra
# gpu_step.py arguments, e.g. "--train-rows 8 --steps 5").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY_PATH="benchmarks/wheels"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/$CARRY_PATH}"
PYTHON="${GPU_CHECK_PYTHON:-python3}"
DOC="${GPU_CHECK_DOC:-$REPO/docs/benchmarks.md}"
OUT_DIR="${GPU_CHECK_OUT:-${OUT:-}}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
TEST_PLATFORM="${GPU_CHECK_TEST_PLATFORM:-cuda}"
read -r -a STEP_ARGS <<<"${GPU_CHECK_STEP_ARGS:-}"
declare -A TIMEOUT=(
  [install]="${GPU_CHECK_TIMEOUT_INSTALL:-45}"
  [tests]="${GPU_CHECK_TIMEOUT_TESTS:-70}"
  [train]="${GPU_CHECK_TIMEOUT_TRAIN:-140}"
  [vl]="${GPU_CHECK_TIMEOUT_VL:-150}"
  [decode]="${GPU_CHECK_TIMEOUT_DECODE:-65}"
)

# What a JAX image lacks of the runtime set: grain, array-record, ml-collections,
# tensorflow-datasets and their pure-Python needs (checked against the image's pip list in
# /work/.library/device/KINDS.md); versions come from constraints.txt.
WHEEL_PACKAGES=(
  grain array_record ml_collections tensorflow-datasets dm-tree docstring_parser
  googleapis-common-protos immutabledict portpicker promise simple-parsing
  tensorflow-metadata termcolor toml
)
# Fast tests of the models, the sampler and the loss that hold on any backend.
TESTS=(
  tests/test_qwen3.py::test_remat_keeps_values_and_gradients
  tests/test_qwen3.py::test_blocked_attention_equals_plain_values_and_gradients
  tests/test_ggpo.py
  tests/test_losses.py::test_gspo_on_hand_made_numbers
  tests/test_losses.py::test_gspo_gradient_on_hand_made_numbers
  tests/test_losses.py::test_masked_segments_get_exactly_zero_gradient_even_with_garbage
  tests/test_sampling.py::test_sampler_logprobs_equal_learner_logprobs
)
PARTS=(train vl decode)
PLATFORMS=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# The `NAME==VERSION` constraints.txt pins for a package name (-, _ and . alike).
pin() {
  local pattern
  pattern="$(printf '%s' "$1" | sed 's/[-_.]/[-_.]/g')"
  grep -iE "^${pattern}==" "$REPO/constraints.txt" | head -n 1
}

show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

fetch_wheels() {
  local dry="$1" spec name built
  [[ "$dry" == 1 ]] || mkdir -p "$WHEELS"
  for name in "${WHEEL_PACKAGES[@]}"; do
    spec="$(pin "$name")"
    if [[ -z "$spec" ]]; then
      echo "no pin for $name in constraints.txt" >&2
      return 1
    fi
    local cmd=("$PYTHON" -m pip download --quiet --no-deps --only-binary=:all:
      --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$WHEELS" "$spec")
    if [[ "$dry" == 1 ]]; then
      show "${cmd[@]}"
      continue
    fi
    if ! "${cmd[@]}"; then
      # A package published only as source (promise): build its wheel here, and keep it
      # only if it is pure Python (a compiled build of this Python would not load there).
      echo "no 3.12 wheel of $spec on the index; building one" >&2
      built="$(mktemp -d)"
      "$PYTHON" -m pip wheel --quiet --no-deps -w "$built" "$spec"
      if ! compgen -G "$built/*-none-any.whl" >/dev/null; then
        echo "$spec did not build a pure-Python wheel: $(ls "$built")" >&2
        return 1
      fi
      mv "$built"/*-none-any.whl "$WHEELS"/
      rm -rf "$built"
    fi
  done
  [[ "$dry" == 1 ]] && return 0
  local bytes
  bytes="$(du -sb "$WHEELS" | cut -f1)"
  echo "wheels in $WHEELS: $(find "$WHEELS" -name '*.whl' | wc -l) files, $((bytes / 1024)) KiB"
  echo "carry path for the device tool's run: $CARRY_PATH (the tree and carries: 64 MiB in all)"
  if ((bytes > 32 * 1024 * 1024)); then
    echo "the wheels take over 32 MiB: too much of the 64 MiB the device call carries" >&2
    return 1
  fi
}

# A JSON object of key=value pairs (true/false/numbers stay JSON), one line.
json_line() {
  "$PYTHON" - "$@" <<'EOF'
import json
import sys

record = {}
for pair in sys.argv[1:]:
    key, _, value = pair.partition("=")
    try:
        record[key] = json.loads(value)
    except ValueError:
        record[key] = value
print(json.dumps(record))
EOF
}

START="$(date +%s)"
# Seconds left of the whole run's budget.
budget_left() {
  echo $((BUDGET_S - ($(date +%s) - START)))
}

install_commands() {
  # Only the packages the image lacks are installed (an image that ships one keeps its own).
  echo "$PYTHON -m pip install --no-index --find-links $WHEELS --no-deps <the pins of: ${WHEEL_PACKAGES[*]} that the image lacks>"
  echo "$PYTHON -m pip install --no-index --no-deps --no-build-isolation -e $REPO"
  echo "$PYTHON -c 'import jax; print(jax.__version__, jax.devices())'"
}

install_step() {
  local missing=() name spec
  for name in "${WHEEL_PACKAGES[@]}"; do
    if ! "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" \
      2>/dev/null; then
      spec="$(pin "$name")"
      missing+=("$spec")
    fi
  done
  if ((${#missing[@]})); then
    if [[ ! -d "$WHEELS" ]]; then
      echo "no wheels at $WHEELS: run --fetch-wheels where pip reaches the registry and" \
        "carry $CARRY_PATH" >&2
      return 1
    fi
    echo "installing ${missing[*]}"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
      --find-links "$WHEELS" --no-deps "${missing[@]}"
  fi
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --no-build-isolation -e "$REPO"
  "$PYTHON" -c 'import grain, array_record, ml_collections, tensorflow_datasets, vimrag_jax'
  "$PYTHON" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())'
}

tests_step() {
  cd "$REPO"
  JAX_PLATFORMS="$TEST_PLATFORM" JAX_DEFAULT_MATMUL_PRECISION=highest \
    XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$PYTHON" -m pytest -p no:cacheprovider -x -q "${TESTS[@]}"
}

part_command() {
  echo "$PYTHON" "$REPO/benchmarks/gpu_step.py" --part "$1" "${STEP_ARGS[@]}"
}

dry_run() {
  echo "carry path: $CARRY_PATH (run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$CARRY_PATH\"], timeout_s=600))"
  echo "wheels: $WHEELS"
  echo "# install (limit ${TIMEOUT[install]} s)"
  install_commands
  echo "# tests on JAX_PLATFORMS=$TEST_PLATFORM (limit ${TIMEOUT[tests]} s)"
  echo "JAX_PLATFORMS=$TEST_PLATFORM JAX_DEFAULT_MATMUL_PRECISION=highest $PYTHON -m pytest -p no:cacheprovider -x -q ${TESTS[*]}"
  local part
  for part in "${PARTS[@]}"; do
    echo "# $part (limit ${TIMEOUT[$part]} s)"
    echo "timeout ${TIMEOUT[$part]} $(part_command "$part")"
  done
  echo "# record"
  echo "$PYTHON $REPO/benchmarks/gpu_step.py --record <results>/gpu_check.jsonl --doc $DOC"
  echo "budget: $BUDGET_S s in all"
}

# Runs step $1 under its time limit, its output shown and kept in $LOGS/$1.log; appends a
# result line for it unless the step writes its own (the parts) or one says it failed.
step() {
  local name="$1" own_lines="$2"
  shift 2
  local limit left began rc
  limit="${TIMEOUT[$name]}"
  left="$(budget_left)"
  if ((left < 10)); then
    json_line part="$name" ok=false error="skipped: the ${BUDGET_S} s budget is spent" \
      >>"$RESULTS"
    echo "=== $name SKIPPED: the ${BUDGET_S} s budget is spent"
    FAILED+=("$name")
    return 0
  fi
  if ((left < limit)); then limit="$left"; fi
  echo "=== $name (limit $limit s)"
  began="$(date +%s)"
  set +e
  if [[ "$own_lines" == 1 ]]; then
    # stdout (the JSON line) to the results, stderr shown and logged.
    timeout --kill-after=10 "$limit" "$@" 2>&1 >>"$RESULTS" | tee "$LOGS/$name.log"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  fi
  rc="${PIPESTATUS[0]}"
  set -e
  local seconds=$(($(date +%s) - began))
  if [[ "$own_lines" == 1 ]] && ((rc == 0)) && ! grep -q "\"part\": \"$name\"" "$RESULTS"; then
    json_line part="$name" ok=false error="exited 0 without a result line" \
      seconds="$seconds" >>"$RESULTS"
    echo "=== $name FAILED (no result line)"
    FAILED+=("$name")
  elif ((rc == 124 || rc == 137)); then
    json_line part="$name" ok=false error="timed out after $limit s" seconds="$seconds" \
      >>"$RESULTS"
    echo "=== $name TIMED OUT after $limit s"
    FAILED+=("$name")
  elif ((rc != 0)); then
    if [[ "$own_lines" != 1 ]] || ! grep -q "\"part\": \"$name\"" "$RESULTS"; then
      json_line part="$name" ok=false error="exit status $rc: $(tail -n 1 "$LOGS/$name.log")" \
        seconds="$seconds" >>"$RESULTS"
    fi
    echo "=== $name FAILED (exit status $rc)"
    FAILED+=("$name")
  elif [[ "$own_lines" != 1 ]]; then
    json_line part="$name" ok=true note="$(tail -n 1 "$LOGS/$name.log")" seconds="$seconds" \
      >>"$RESULTS"
  fi
}

main() {
  case "${1:-}" in
    --fetch-wheels)
      fetch_wheels "$([[ "${2:-}" == --dry-run ]] && echo 1 || echo 0)"
      return
      ;;
    --dry-run)
      dry_run
      return
      ;;
    -h | --help)
      usage
      return
      ;;
    --step-install) # internal: one step in its own process, under `timeout`
      install_step
      return
      ;;
    --step-tests)
      tests_step
      return
      ;;
    "") ;;
    *)
      usage >&2
      return 2
      ;;
  esac

  local work
  work="$(mktemp -d)"
  RESULTS="$work/gpu_check.jsonl"
  LOGS="$work"
  FAILED=()
  : >"$RESULTS"
  local machine="unknown"
  if command -v nvidia-smi >/dev/null; then
    machine="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
      | head -n 1 || true)"
  fi
  echo "GPU check $(date -u '+%Y-%m-%d %H:%M UTC') on $machine; $("$PYTHON" --version 2>&1)"
  json_line part=meta machine="$machine" command="bash benchmarks/gpu_check.sh" \
    date="$(date -u '+%Y-%m-%d %H:%M UTC')" >>"$RESULTS"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

  local self="${BASH_SOURCE[0]}"
  # Every step runs even after one failed: a device session is too dear to stop early (the
  # working tree is on PYTHONPATH, so a failed editable install alone stops nothing).
  step install 0 bash "$self" --step-install
  step tests 0 bash "$self" --step-tests
  local part
  for part in "${PARTS[@]}"; do
    # Its own process per part: a time limit ends one part only, the peak memory is its own.
    XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}" \
      step "$part" 1 "$PYTHON" "$REPO/benchmarks/gpu_step.py" --part "$part" "${STEP_ARGS[@]}"
  done

  echo "=== record ($DOC)"
  if ! "$PYTHON" "$REPO/benchmarks/gpu_step.py" --record "$RESULTS" --doc "$DOC" \
    | tee "$work/gpu_check.md"; then
    FAILED+=(record)
  fi
  if [[ -n "$OUT_DIR" ]]; then
    mkdir -p "$OUT_DIR"
    cp "$RESULTS" "$work/gpu_check.md" "$work"/*.log "$OUT_DIR"/ 2>/dev/null || true
    echo "results and logs copied to $OUT_DIR"
  fi
  echo "took $(($(date +%s) - START)) s"
  if ((${#FAILED[@]})); then
    echo "FAILED: ${FAILED[*]}" >&2
    return 1
  fi
  echo "all parts passed"
}

main "$@"
