"""Classify audio with a trained classifier: one file or every audio file under a folder.

MODEL is an export folder (model.safetensors + config.json) or a run directory (its best/ model,
else export/). Each file is cut into --window second windows every --hop seconds (default: the
model's training clip length), every window is classified, and the file's probabilities are the
mean over its windows: softmax for single-label models, sigmoid for multi-label ones (then every
class over --threshold is reported).

One file:  prints the predicted class, its probability and the top-k; writes OUT/<name>.png (the
           spectrogram with the prediction, and a per-window probability strip for files longer
           than one window), OUT/<name>_windows.csv and OUT/<name>.json.
A folder:  writes OUT/predictions.csv (file, predicted class, probability, top-k, per-class
           probabilities), OUT/predicted_classes.png (bar chart) and OUT/skipped.csv (files that
           could not be read, with the reason).

Examples:
  bioaudio infer runs/tiny/seed_42 recordings/owl.wav
  bioaudio infer runs/tiny/seed_42/best recordings/ --out predictions --top_k 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import add_options, config_from_args
from bioaudio.inference.infer import InferConfig, infer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", type=Path, help="export folder or run directory")
    parser.add_argument("input", type=Path, help="an audio file or a folder of audio files")
    add_options(parser, InferConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(InferConfig, args)
    print("\n".join(infer(args.model, args.input, cfg)))
    return 0
