#!/usr/bin/env bash
# Runs lint and the test suite on CPU with 8 fake devices (set in tests/conftest.py).
VIMRAG_EXTRAS=test source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
ruff check vimrag_jax tests benchmarks configs
ruff format --check --quiet vimrag_jax tests benchmarks configs
exec python -m pytest -q -n 2 "$@"
