#!/usr/bin/env bash
# The test command: set up .venv (idempotent), then run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" dev
# The explorer's browser test needs Chromium + chromedriver: installed here when we are root on
# a Debian/Ubuntu machine (quietly; offline or not root -> that test skips with its reason).
if [ ! -x /usr/bin/chromedriver ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing chromium + chromium-driver for the browser test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium chromium-driver; } >/dev/null 2>&1 || echo "[setup] chromium not installed (offline?)"
fi
cd "$ROOT"
exec python -m pytest "$@"
