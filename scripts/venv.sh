# Sourced by the other scripts: makes sure .venv exists and holds this project's requirements,
# installed with the exact tested set of constraints.txt. A script asks for extras by setting
# VIMRAG_EXTRAS first (test.sh: "test"; train.sh: none, the runtime set only). It reinstalls
# only when setup.py or constraints.txt changed, or when extras it lacks are asked for.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.vimrag_installed"
EXTRAS="${VIMRAG_EXTRAS:-}"
want="$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
have_hash="" have_extras=""
if [[ -f "$STAMP" ]]; then
  read -r have_hash have_extras < "$STAMP" || true
fi
missing=""
for extra in ${EXTRAS//,/ }; do
  [[ ",$have_extras," == *",$extra,"* ]] || missing="$extra"
done
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[venv] creating $VENV" >&2
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if [[ "$have_hash" != "$want" || -n "$missing" ]]; then
  [[ "$have_hash" == "$want" ]] && EXTRAS="${have_extras:+$have_extras,}$EXTRAS"
  target="$ROOT${EXTRAS:+[$EXTRAS]}"
  echo "[venv] installing vimrag_jax${EXTRAS:+[$EXTRAS]} into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$target"
  echo "$want $EXTRAS" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
