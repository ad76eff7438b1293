#!/usr/bin/env bash
# Does self-supervised pretraining learn? Pretrain EAT and BEATs (iteration 1, iteration 2, and
# with a tokenizer distilled from the EAT run) of the CPU-sized preset on the unlabelled audio of
# ../shared/data for a fixed time budget each, then
# compare linear probes (ESC-10 official folds, spoken digits by speaker) of the pretrained
# encoders against the same encoders with random weights. See benchmarks/ssl_probe.py.
# Usage: benchmarks/ssl_probe.sh [DATA_DIR] [OUT_DIR] [MINUTES]   (defaults: ../shared/data
#        runs/ssl_probe 30); extra flags for ssl_probe.py can follow.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
DATA="${1:-$ROOT/../shared/data}"; OUT="${2:-$ROOT/runs/ssl_probe}"; MINUTES="${3:-30}"
shift $(( $# < 3 ? $# : 3 ))
exec "$PY" "$ROOT/benchmarks/ssl_probe.py" --data "$DATA" --out "$OUT" --minutes "$MINUTES" \
    --models eat,beats,beats_eat_teacher,beats_iter2 "$@"
