"""What a run directory, an experiment root or a model is, and how it was made.

PATH is a run directory (train-baseline / finetune RUN_ROOT/seed_N, a pretrain --out), an
experiment root (RUN_ROOT: one line per run and the mean +- std of run_summary.csv), an export
folder (export/, best/, bioaudio convert output) or an official BEATs / EAT checkpoint file.

Printed: the training summary (status, steps, final loss, best metric, test metrics), the model's
size, resources (peak memory, data-wait fraction, clips/s) and the provenance recorded when it
was made: the command line (and accelerate world size), bioaudio version and git commit (dirty
or not), Python / torch / torchaudio / accelerate versions, host, CPU and GPU models, device,
processes, seeds and the data fingerprint (rows, hours, sha256 of the manifest).

To re-run a run with the same resolved options: `bioaudio COMMAND INPUT --config
RUN_DIR/config.json --out NEW_DIR` (the command that wrote it).

Examples:
  bioaudio info runs/tiny/seed_42
  bioaudio info runs/tiny
  bioaudio info runs/eat_small/export --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bioaudio.training.describe import describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="run directory, experiment root, export or file")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def run(args: argparse.Namespace) -> int:
    d = describe(args.path)
    if args.json:
        print(json.dumps({"kind": d.kind, **d.data}, indent=2, default=str))
    else:
        print(d.text())
    return 1 if d.data.get("problems") else 0  # a damaged export: said, and not "fine"
