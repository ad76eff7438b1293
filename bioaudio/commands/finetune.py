"""Finetune a BEATs / EAT encoder (our pretraining export, an official checkpoint, a Hugging Face
folder) into a classifier on a labelled manifest, over seeds (and folds), under the same
protocol, splits, artifacts and run_summary.csv as `train-baseline`.

Prediction modes (the official ones, plus attentive pooling):
  CLS_TOKEN     the CLS vector -> LayerNorm -> Linear (EAT's official head). BEATs has no CLS
                token of its own: CLS_TOKEN adds a learned one, trained from scratch here.
  MEAN_POOLING  masked mean of the patch tokens -> Linear (BEATs' official head)
  LIN_SOFTMAX   per-token classifier, linear-softmax pooling of the token probabilities
  ATTENTION     class-wise attentive pooling of the tokens
  auto          CLS_TOKEN for encoders with a CLS (EAT), MEAN_POOLING otherwise

--linear_probe freezes the encoder and trains only the head on encoder outputs computed once,
standardised per feature by the training data's statistics (MAE's recipe; --no-standardize);
otherwise the whole model trains with layer-wise learning-rate decay (--layer_decay), drop path,
no weight decay on norms, biases and tokens, optional mixup / SpecAugment / label smoothing.
Multi-class (cross-entropy) or multi-label (BCE) is read from the labels.

Examples:
  bioaudio finetune esc10.split.csv --model_path runs/eat_small/export --out runs/ft --cv
  bioaudio finetune manifest.csv --model_path BEATs_iter3_plus_AS2M.pt --linear_probe
  accelerate launch --multi_gpu --num_processes 2 -m bioaudio finetune ... (several GPUs)
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bioaudio.config import add_options, config_from_args
from bioaudio.data.stats import apply_stats
from bioaudio.errors import ConfigError
from bioaudio.models.checkpoint import load_model
from bioaudio.models.heads import HeadConfig
from bioaudio.training.config import EncoderRunOptions, LoopOptions
from bioaudio.training.experiment import Experiment, ExperimentOptions
from bioaudio.training.optim import param_groups

MODES = {"CLS_TOKEN": "cls", "MEAN_POOLING": "mean", "LIN_SOFTMAX": "lin_softmax",
         "ATTENTION": "attention"}  # fmt: skip


@dataclass
class FinetuneConfig(LoopOptions, EncoderRunOptions, ExperimentOptions):
    """Options of `bioaudio finetune`: loop, runs and splits, model and head."""

    model_path: Path | None = field(
        default=None, metadata={"help": "checkpoint to finetune (required): export or official"}
    )
    out: Path = field(
        default=Path("runs/finetune"),
        metadata={"help": "RUN_ROOT: one run directory per (fold,) seed and run_summary.csv"},
    )
    prediction_mode: Literal["auto", "CLS_TOKEN", "MEAN_POOLING", "LIN_SOFTMAX", "ATTENTION"] = (
        field(default="auto", metadata={"help": "head: see the list above"})
    )
    linear_probe: bool = field(
        default=False, metadata={"help": "freeze the encoder; train the head on cached outputs"}
    )
    standardize: bool | None = field(
        default=None,
        metadata={
            "help": "standardise the head's input features by the training data's statistics "
            "(BatchNorm without affine, MAE's linear-probe recipe); default: on for "
            "--linear_probe, off for full finetuning"
        },
    )
    lr: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "peak learning rate (of the head; layer-wise decayed below it); default: "
            "1e-4 for full finetuning, 1e-3 for --linear_probe (only the head trains)"
        },
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "linear warmup steps; unset: a tenth of the steps"}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    layer_decay: float = field(
        default=0.75, metadata={"help": "layer-wise lr decay: block i of L gets lr * d^(L+1-i)"}
    )
    drop_path: float = field(
        default=0.1, metadata={"help": "stochastic depth (EAT) / layer drop (BEATs) rate"}
    )
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the classifier"})
    num_classes: int | None = field(
        default=None, metadata={"help": "expected number of classes (checked against the labels)"}
    )
    mask_ratio: float | None = field(
        default=None,
        metadata={"help": "seed flag: turn SpecAugment on with masks this fraction wide"},
    )
    balanced_sampling: bool = field(
        default=False, metadata={"help": "draw every class equally often (with replacement)"}
    )
    weights: Path | None = field(
        default=None, metadata={"help": "per-sample sampling weights: CSV filename,weight"}
    )

    def validate(self) -> None:
        if self.lr is None:
            self.lr = 1e-3 if self.linear_probe else 1e-4
        if self.model_path is None:
            raise ConfigError("--model_path is required (an export or an official checkpoint)")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.head_dropout < 1:
            raise ConfigError("--drop_path and --head_dropout must be in [0, 1)")
        if self.mask_ratio is not None:
            if not 0 < self.mask_ratio < 1:
                raise ConfigError(f"--mask_ratio must be in (0, 1), got {self.mask_ratio}")
            frames = int(self.clip_seconds * 100)
            self.spec_augment = True
            self.spec.max_fraction = self.mask_ratio
            self.spec.time_width = max(1, int(self.mask_ratio * frames))
            self.spec.freq_width = max(1, int(self.mask_ratio * 128))
        if self.balanced_sampling and self.weights is not None:
            raise ConfigError("give --balanced_sampling or --weights, not both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="labelled manifest CSV (bioaudio prepare)")
    add_options(parser, FinetuneConfig)


def build_experiment(manifest: Path, cfg: FinetuneConfig) -> Experiment:
    """Load the checkpoint once, check it, and plan the runs (nothing trained yet)."""
    base = load_model(cfg.model_path)
    if not hasattr(base, "encoder"):
        raise ConfigError(
            f"--model_path {cfg.model_path} holds a {getattr(base, 'model_type', '?')} model "
            "without a transformer encoder; finetune takes BEATs / EAT checkpoints"
        )
    mode = cfg.prediction_mode
    if mode == "auto":
        mode = "CLS_TOKEN" if base.has_cls else "MEAN_POOLING"
    if cfg.linear_probe and mode == "CLS_TOKEN" and not base.has_cls:
        raise ConfigError("a linear probe of an encoder without CLS token: use MEAN_POOLING")
    max_frames = getattr(base.encoder, "max_frames", None)
    if max_frames:  # positions beyond the encoder's table do not exist: say so, not "out of memory"
        longest = max_frames / base.frontend_cfg.frame_rate
        if cfg.clip_seconds > longest + 1e-6:
            raise ConfigError(
                f"--clip_seconds {cfg.clip_seconds:g} is longer than this model's longest input "
                f"({longest:.2f} s); use a shorter clip"
            )
    frontend = base.frontend_cfg
    if cfg.stats is not None:
        frontend = apply_stats(frontend, cfg.stats)
        base.set_frontend(frontend)

    def build(seed: int, class_names: list[str], multi_label: bool):
        if cfg.num_classes is not None and cfg.num_classes != len(class_names):
            raise ConfigError(
                f"--num_classes {cfg.num_classes} but the labels hold {len(class_names)} "
                f"classes ({', '.join(class_names[:8])}{' ...' if len(class_names) > 8 else ''})"
            )
        model = copy.deepcopy(base)
        if mode == "CLS_TOKEN" and not model.has_cls:
            model.encoder.add_cls_token()
        if not cfg.linear_probe and cfg.drop_path > 0:
            model.encoder.set_drop_path(cfg.drop_path)
        cfg.apply_to_encoder(model.encoder)
        head = HeadConfig(
            pooling=MODES[mode],  # type: ignore[arg-type]
            num_classes=len(class_names),
            norm=mode == "CLS_TOKEN",
            standardize=cfg.linear_probe if cfg.standardize is None else cfg.standardize,
            dropout=cfg.head_dropout,
        )
        model.set_head(head, class_names, multi_label)
        return model.train()

    return Experiment(
        cfg,
        manifest,
        command="finetune",
        build_model=build,
        frontend=frontend,
        identity={
            "model_path": str(Path(cfg.model_path).resolve()),
            "prediction_mode": mode,
            "linear_probe": cfg.linear_probe,
        },  # fmt: skip
        name=f"{base.model_type} {mode}",
        param_groups=lambda m: param_groups(m, cfg.weight_decay, cfg.layer_decay),
        provenance={"finetuned_from": str(cfg.model_path), "prediction_mode": mode},
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(FinetuneConfig, args)
    return build_experiment(args.manifest, cfg).run_command(cfg.sanity_overfit)
