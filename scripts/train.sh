#!/usr/bin/env bash
# Runs the learner: scripts/train.sh --config=configs/ggpo.py [--workdir=DIR] [--config.KEY=VALUE ...]
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python -m vimrag_jax.train "$@"
