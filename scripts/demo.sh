#!/usr/bin/env bash
# The demo: set up .venv (idempotent), then run the whole job on generated demo audio.
# Usage: scripts/demo.sh [OUT_DIR]   (default: demo_out)
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec python -m bioaudio demo "${1:-demo_out}"
