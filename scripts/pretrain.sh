#!/usr/bin/env bash
# Self-supervised pretraining with the seed project's flags, run on bioaudio under Accelerate:
#   scripts/pretrain.sh --save_dir S --data_dir D [--batch_size B] [--world_size W] [--cuda]
#       [--update_freq U] [--target_length T] [--mask_ratio R] [--num_updates N]
#       [--learning_rate LR] [--restore_file F] [--preset P] [--model_path M] [--model eat|beats]
#       [--objective NAME:W,...] [-- BIOAUDIO PRETRAIN FLAGS]
# runs `accelerate launch [--multi_gpu] --num_processes W -m bioaudio pretrain D --out S ...`.
#   --batch_size   per process per update (fairseq): global --batch_size = B x W x U,
#                  --grad_accum U (--update_freq)
#   --world_size   processes: GPUs with --cuda (<= CUDA devices), else CPU processes (<= cores)
#   --target_length frames, 100 per second: --segment_duration T/100
#   --mask_ratio   the model's objective: --eat.mask_ratio or --beats.mask_ratio
#   --num_updates  --max_steps;  --learning_rate  --lr
#   --restore_file a training state (state/step_N) or a run directory holding state/ -> --resume F;
#                  a model checkpoint file (.pt, .safetensors) or folder (export, Hugging Face)
#                  -> --model_path F
# Bad input: one line on stderr, exit 2, nothing run. Full help: scripts/pretrain.sh --help.
# Nothing is installed: uses .venv/bin/python when present (scripts/test.sh makes it), else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
exec "$PY" "$ROOT/scripts/seed_flags.py" pretrain "$@"
