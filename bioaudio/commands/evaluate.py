"""Evaluate a trained classifier on a labelled manifest: test metrics, confusion matrix,
precision-recall curves, per-clip predictions and a short report.

MODEL is an export folder (model.safetensors + config.json), a run directory (its best/ model,
else export/) or a finetune / train-baseline RUN_ROOT holding one run. MANIFEST is a labelled
manifest (`bioaudio prepare`); every file must exist and every label must be a class of the
model. Each clip is cut into --window second windows every --hop seconds (default: the model's
training clip length) and its window probabilities are averaged, as `bioaudio infer` does.

OUT gets test_metrics.json (accuracy, balanced accuracy, macro-F1, mAP, AUROC, per-class
precision / recall / F1; multi-label: mAP, AUROC, F1), test_predictions.csv (per-class
probabilities per clip), confusion_counts.csv, confusion_normalised.csv, confusion.png,
confusion_counts.png (single-label), pr_curves.png and report.md: the same files a training
run writes for its test set. Files evaluate did not write are never replaced without --overwrite:
an OUT holding one of those names (a training run's own test results, your report.md), or a
training run / export folder, is refused before any work; re-running into an earlier evaluate's
OUT replaces its files.

Examples:
  bioaudio evaluate runs/ft/seed_42 data/test/manifest.csv --out runs/ft_test
  accelerate launch --num_processes 2 --multi_gpu -m bioaudio evaluate ... (several processes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bioaudio.config import add_options, config_from_args
from bioaudio.distributed import start_accelerator
from bioaudio.inference.evaluate import EvaluateOptions, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="export folder, run directory or RUN_ROOT")
    parser.add_argument("manifest", type=Path, help="labelled manifest CSV (bioaudio prepare)")
    add_options(parser, EvaluateOptions)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvaluateOptions, args)
    accelerator = start_accelerator(cpu=cfg.device().type == "cpu")
    try:
        record = evaluate(args.model, args.manifest, cfg, accelerator=accelerator)
    finally:
        if accelerator.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if accelerator.is_main_process:
        keys = ["mAP", "auroc", "macro_f1"]
        if not record["multi_label"]:
            keys = ["accuracy", "balanced_accuracy", *keys]
        scores = ", ".join(f"{k} {record[k]:.4f}" for k in keys)
        print(f"{record['n']} clip(s) of {args.manifest}: {scores}")
        if record.get("unlabelled"):
            print(f"note: {record['unlabelled']} unlabelled clip(s) predicted but not scored")
        if record.get("unreadable"):
            print(f"note: {record['unreadable']} unreadable file(s) skipped, listed in "
                  f"{Path(record['out']) / 'test_skipped.csv'}")  # fmt: skip
        print(f"results: {record['out']} (test_metrics.json, test_predictions.csv, report.md)")
    return 0
