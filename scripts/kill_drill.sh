#!/usr/bin/env bash
# Kill drill: SIGKILLs the learner of a short run N times at random moments, restarting it each
# time, and checks the run ends on one timeline (see scripts/kill_drill.py).
#   bash scripts/kill_drill.sh [N] [--workdir=DIR] [--seed=S] [--total_steps=T]
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python scripts/kill_drill.py "$@"
