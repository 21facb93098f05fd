# Sourced by the other scripts: makes sure .venv exists and holds this
# project's requirements, reinstalling only when setup.py changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.vimrag_installed"
want="$(sha256sum "$ROOT/setup.py" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[venv] creating $VENV" >&2
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  echo "[venv] installing vimrag_jax[test] into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
