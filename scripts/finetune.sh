#!/usr/bin/env bash
# Finetune a BEATs / EAT checkpoint into a classifier with the seed project's flags:
#   scripts/finetune.sh --model_path M --save_dir S --data_dir D --labels L [--batch_size B]
#       [--world_size W] [--cuda] [--target_length T] [--mixup X] [--mask_ratio R]
#       [--num_classes C] [--prediction_mode MODE] [--restore_file F] [--weights CSV]
#       [--epochs E] [--lr LR] [-- BIOAUDIO FINETUNE FLAGS]
# L (`filename,labels`; names relative to D, else to L's folder, or absolute) is prepared into
# S/manifest.csv (+ S/labels_resolved.csv, S/skipped.csv; nothing is written into D or over L,
# nor over a file of those names these scripts did not write), then
# `accelerate launch [--multi_gpu] --num_processes W -m bioaudio finetune S/manifest.csv --out S`.
#   --batch_size   per process: global --batch_size = B x W
#   --target_length frames, 100 per second: --clip_seconds T/100
#   --mixup X      --mixup_alpha X;  --mask_ratio R  SpecAugment masks R wide (--mask_ratio)
#   --restore_file a state or run directory: --resume F
#   --weights, --num_classes, --prediction_mode, --epochs, --lr: the bioaudio flags
# Bad input: one line on stderr, exit 2, nothing run. Full help: scripts/finetune.sh --help.
# Nothing is installed: uses .venv/bin/python when present (scripts/test.sh makes it), else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$ROOT/scripts/seed_flags.py" finetune "$@"
