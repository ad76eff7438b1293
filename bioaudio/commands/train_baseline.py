"""Train a CNN baseline (TinyMelCNN, the Keras genre CNN, the MLP family, a timm backbone, ...) on a
labelled manifest, once per seed (and per fold), and report test metrics with mean +- std.

Splits (--cv, --test_fold, a `split` column, or a seeded split), run directories, artifacts and
run_summary.csv are those of the experiment layer (bioaudio/training/experiment.py), shared with
`bioaudio finetune`. Features come from a cache made by `bioaudio features MANIFEST --frontend
KIND` when one matches (--features auto); waveform augmentations (--wave.*) need audio and turn
the automatic cache lookup off. Re-running the same command resumes.

Examples:
  bioaudio train-baseline data/manifest.split.csv --out runs/tiny --seeds 42,7,123 --epochs 30
  bioaudio train-baseline esc10.split.csv --out runs/esc10 --cv --model timm:resnet18 \\
      --spec_augment --mixup_alpha 0.2
  bioaudio train-baseline data/manifest.csv --out runs/check --sanity_overfit
  accelerate launch --multi_gpu --num_processes 2 -m bioaudio train-baseline ... (several GPUs)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioaudio.config import add_options, config_from_args
from bioaudio.data.augment import WaveAugmentConfig
from bioaudio.data.frontend import FrontendKind, FrontendOptions
from bioaudio.data.stats import resolve_stats
from bioaudio.errors import ConfigError
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.training.config import LoopOptions
from bioaudio.training.experiment import Experiment, ExperimentOptions


@dataclass
class TrainBaselineConfig(LoopOptions, ExperimentOptions, FrontendOptions):
    """Options of `bioaudio train-baseline`: loop, runs and splits, frontend, model."""

    out: Path = field(
        default=Path("runs/baseline"),
        metadata={"help": "RUN_ROOT: one run directory per (fold,) seed and run_summary.csv"},
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    frontend: FrontendKind = field(
        default="logmel", metadata={"help": "logmel | stft | mfcc | beats_fbank | eat_fbank"}
    )
    model: str = field(
        default="tiny_mel_cnn",
        metadata={
            "help": "tiny_mel_cnn | genre_cnn | drone_cnn | mlp | mlp2 | cel | cel2 | cel3 |"
            " timm:<name> (e.g. timm:resnet18, timm:efficientnet_b0)"
        },
    )
    model_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": 'model constructor options as JSON, e.g. {"input": "waveform"}'},
    )
    wave: WaveAugmentConfig = field(default_factory=WaveAugmentConfig)

    def validate(self) -> None:
        if not isinstance(self.model_options, dict):
            raise ConfigError("--model_options must be a JSON object")
        self.validate_frontend()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="labelled manifest CSV (bioaudio prepare)")
    add_options(parser, TrainBaselineConfig)


def build_experiment(manifest: Path, cfg: TrainBaselineConfig) -> Experiment:
    """The experiment of a train-baseline invocation (everything checked, nothing trained)."""
    frontend, stats_file = resolve_stats(cfg.frontend_config(), cfg.stats, manifest)
    options = dict(cfg.model_options)
    if options.get("input") == "waveform":
        options.setdefault("input_samples", int(round(cfg.clip_seconds * cfg.sample_rate)))

    def build(seed: int, class_names: list[str], multi_label: bool) -> BaselineClassifier:
        return BaselineClassifier.build(cfg.model, frontend, class_names, multi_label, **options)

    return Experiment(
        cfg,
        manifest,
        command="train-baseline",
        build_model=build,
        frontend=frontend,
        identity={"baseline": cfg.model},
        name=cfg.model,
        stats_file=stats_file,
        wave=cfg.wave,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainBaselineConfig, args)
    return build_experiment(args.manifest, cfg).run_command(cfg.sanity_overfit)
