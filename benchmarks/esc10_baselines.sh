#!/usr/bin/env bash
# Reproduce the CNN baseline numbers of docs/results.md: TinyMelCNN and a timm ResNet-18 on
# ESC-10 (official 5-fold protocol: every fold in turn is the test set, the next fold validates,
# the other three train) and on the generated demo data (seeded 70/15/15 split, 3 seeds).
#
#   benchmarks/esc10_baselines.sh [ESC10_DIR] [OUT]
#     ESC10_DIR  the ESC-10 folders "001 - Dog bark/1-100032-A.ogg" ... (default ../shared/data/esc10)
#     OUT        where manifests, feature caches and runs go (default runs/baselines)
#   PYTHON=/path/to/python  (default .venv/bin/python);  PARTS="esc10 demo" to choose parts.
#
# Every step is resumable: re-running skips finished runs and continues an interrupted one.
# Each part prints its wall time and the mean +- std test accuracy from run_summary.csv.
set -euo pipefail

ESC10=${1:-../shared/data/esc10}
OUT=${2:-runs/baselines}
PY=${PYTHON:-.venv/bin/python}
PARTS=${PARTS:-"esc10 demo"}
BA="$PY -m bioaudio"
mkdir -p "$OUT"

# Shared training settings (all runs on CPU here; the same flags work on a GPU).
COMMON=(--frontend logmel --clip_seconds 5 --batch_size 32 --spec_augment --num_workers 0)
TINY=(--model tiny_mel_cnn --n_mels 128 --epochs 60 --lr 1e-3)
RESNET=(--model timm:resnet18 --n_mels 64 --epochs 30 --lr 1e-3)

cache() {  # cache MANIFEST N_MELS DIR: logmel features, built once
    [ -f "$3/cache.json" ] || $BA features "$1" --frontend logmel --n_mels "$2" --out "$3" --no-progress
}

report() {  # report RUN_ROOT SECONDS
    $PY - "$1" "$2" <<'EOF'
import sys, pandas as pd
t = pd.read_csv(f"{sys.argv[1]}/run_summary.csv")
runs = t[~t["run"].isin(["mean", "std"])]
acc = runs["test_accuracy"]
print(f"RESULT {sys.argv[1]}: accuracy {acc.mean():.4f} +- {acc.std(ddof=1):.4f} "
      f"over {len(acc)} runs (min {acc.min():.4f}, max {acc.max():.4f}); "
      f"macro-F1 {runs['test_macro_f1'].mean():.4f}; wall {float(sys.argv[2]) / 60:.1f} min")
EOF
}

if [[ " $PARTS " == *" esc10 "* ]]; then
    D="$OUT/esc10"
    mkdir -p "$D"
    [ -f "$D/manifest.csv" ] || $BA prepare "$ESC10" --out "$D/manifest.csv" --no-progress
    [ -f "$D/manifest.split.csv" ] || $BA split "$D/manifest.csv" --method esc
    cache "$D/manifest.split.csv" 128 "$D/features/logmel128"
    cache "$D/manifest.split.csv" 64 "$D/features/logmel64"

    SECONDS=0
    $BA train-baseline "$D/manifest.split.csv" --out "$D/tiny_mel_cnn" --cv --seeds 0 \
        "${COMMON[@]}" "${TINY[@]}" --features "$D/features/logmel128"
    report "$D/tiny_mel_cnn" $SECONDS

    SECONDS=0
    $BA train-baseline "$D/manifest.split.csv" --out "$D/resnet18" --cv --seeds 0 \
        "${COMMON[@]}" "${RESNET[@]}" --features "$D/features/logmel64"
    report "$D/resnet18" $SECONDS
fi

if [[ " $PARTS " == *" demo "* ]]; then
    D="$OUT/demo"
    [ -f "$D/data/.bioaudio-demo-data.json" ] || $BA demo-data "$D/data" --seed 0
    [ -f "$D/manifest.csv" ] || $BA prepare "$D/data/by_class" --out "$D/manifest.csv" --no-progress
    cache "$D/manifest.csv" 128 "$D/features/logmel128"
    cache "$D/manifest.csv" 64 "$D/features/logmel64"

    SECONDS=0
    $BA train-baseline "$D/manifest.csv" --out "$D/tiny_mel_cnn" --seeds 42,7,123 \
        --val 0.15 --test 0.15 --split_seed 0 \
        "${COMMON[@]}" "${TINY[@]}" --features "$D/features/logmel128"
    report "$D/tiny_mel_cnn" $SECONDS

    SECONDS=0
    $BA train-baseline "$D/manifest.csv" --out "$D/resnet18" --seeds 42,7,123 \
        --val 0.15 --test 0.15 --split_seed 0 \
        "${COMMON[@]}" "${RESNET[@]}" --features "$D/features/logmel64"
    report "$D/resnet18" $SECONDS
fi
