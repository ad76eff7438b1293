# Sourced by demo.sh and test.sh: create/update the project venv (.venv) idempotently.
# A second run with unchanged requirements skips pip entirely (hash stamp in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIOAUDIO_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "error: Python >= 3.10 is needed (found: $("$PY" --version 2>&1 || echo none)); set PYTHON=/path/to/python3" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.bioaudio-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-${EXTRAS:-base}"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$HAVE" = "$WANT" ] || { [ "$EXTRAS" = "" ] && [ "${HAVE%-*}" = "${WANT%-*}" ]; }; then
  echo "[setup] environment up to date ($VENV)"
else
  echo "[setup] installing dependencies into $VENV (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt" -e "$ROOT[$EXTRAS]"
  else
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt" -e "$ROOT"
  fi
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# numba (UMAP) compiles once per machine into this cache instead of once per process.
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$ROOT/.venv/numba-cache}"
