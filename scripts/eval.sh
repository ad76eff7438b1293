#!/usr/bin/env bash
# Evaluate a classifier on a labelled set with the seed project's flags:
#   scripts/eval.sh --model_path M --data_dir D --labels L [--save_dir S] [--world_size W]
#       [--cuda] [--batch_size B] [--target_length T] [-- BIOAUDIO EVALUATE FLAGS]
# M is an export, a run directory (its best/, else export/) or a RUN_ROOT holding one run.
# L (`filename,labels`; names relative to D, else to L's folder, or absolute) is prepared into
# S/manifest.csv (+ S/labels_resolved.csv, S/skipped.csv; L itself is never written; default
# S: ./eval_<D name>), then
# `accelerate launch [--multi_gpu] --num_processes W -m bioaudio evaluate M S/manifest.csv --out S`
# writes S/test_metrics.json, test_predictions.csv, confusion_*.csv + .png, pr_curves.png, report.md.
#   --target_length frames, 100 per second: --window T/100 (default: the model's training clip)
#   --batch_size   windows per forward pass per process
# Missing files, labels the model does not know, bad flags: one line on stderr, exit 2.
# Nothing is installed: uses .venv/bin/python when present (scripts/test.sh makes it), else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$ROOT/scripts/seed_flags.py" eval "$@"
