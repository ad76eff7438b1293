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
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bioaudio.config import add_dataclass_args, config_from_args
from bioaudio.errors import ConfigError, DataError
from bioaudio.fileio import check_writable
from bioaudio.inference.infer import infer_file, infer_folder
from bioaudio.inference.predict import load_classifier

DEFAULT_WINDOW = 5.0


@dataclass
class InferConfig:
    """Options of `bioaudio infer`."""

    out: Path | None = field(
        default=None, metadata={"help": "output folder (default: ./predictions_<INPUT name>)"}
    )
    window: float | None = field(
        default=None, metadata={"help": "window seconds (default: the model's training clip)"}
    )
    hop: float | None = field(
        default=None, metadata={"help": "hop between windows in seconds (default: --window)"}
    )
    top_k: int = field(default=3, metadata={"help": "classes listed per file"})
    threshold: float = field(
        default=0.5, metadata={"help": "multi-label: a class is present above this probability"}
    )
    batch_size: int = field(default=16, metadata={"help": "windows per forward pass"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    plot_seconds: float = field(
        default=300.0,
        metadata={"help": "one file: seconds drawn (spectrogram and window probabilities)"},
    )
    cpu: bool = field(default=False, metadata={"help": "run on CPU even when a GPU is available"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        for name in ("window", "hop"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"--{name} must be positive seconds, got {v}")
        if self.top_k < 1:
            raise ConfigError(f"--top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold must be in (0, 1), got {self.threshold}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("--batch_size must be >= 1 and --num_workers >= 0")
        if not self.plot_seconds > 0:
            raise ConfigError(f"--plot_seconds must be positive, got {self.plot_seconds}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", type=Path, help="export folder or run directory")
    parser.add_argument("input", type=Path, help="an audio file or a folder of audio files")
    parser.add_argument("--config", help="YAML / JSON file of options (flags override it)")
    add_dataclass_args(parser, InferConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(InferConfig, args)
    source = Path(args.input).expanduser()
    if not source.exists():
        raise DataError(f"input not found: {source}")
    out = cfg.out or Path.cwd() / f"predictions_{source.stem or source.name}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_writable(out)
    use_cuda = torch.cuda.is_available() and not cfg.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    model = load_classifier(args.model, device=device)
    names = list(getattr(model, "class_names", []) or [])
    if not names or not hasattr(model, "frontend_cfg"):
        raise ConfigError(f"{args.model}: not a classifier (no class names / head)")
    provenance = getattr(model, "provenance", {}) or {}
    window = cfg.window or provenance.get("clip_seconds") or DEFAULT_WINDOW
    cfg = dataclasses.replace(cfg, out=out)
    if source.is_dir():
        messages = infer_folder(model, source.resolve(), out, cfg, float(window), device)
        messages = messages.attrs["messages"]
    else:
        messages = infer_file(model, source, out, cfg, float(window), device)["messages"]
    print("\n".join(messages))
    return 0
