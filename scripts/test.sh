#!/usr/bin/env bash
# The test command: set up .venv (idempotent), then run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" dev
cd "$ROOT"
exec python -m pytest "$@"
