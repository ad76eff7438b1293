"""Train a CNN baseline (TinyMelCNN, the Keras genre CNN, the MLP family, a timm backbone, ...) on a
labelled manifest, once per seed (and per fold), and report test metrics with mean +- std.

Splits, in order of precedence:
  --cv                    every fold of --fold_column in turn as test (ESC-10's official 5-fold
                          protocol: `bioaudio split --method esc`), the next fold as validation
  --test_fold K           one fold as test, the next as validation
  a `split` column        train / val / test as written by `bioaudio split`
  otherwise               a seeded stratified split (--val, --test; grouped by recording when
                          several rows share one)

One run directory per (fold,) seed, RUN_ROOT/seed_42/ or RUN_ROOT/fold_1/seed_42/, holding the
training loop's outputs (config.json, metrics.csv, state/, export/, best/, summary.json) and
  history.csv, curves.png                       train loss/accuracy and validation metrics
  test_metrics.json                             accuracy, balanced accuracy, macro-F1, per class
  test_predictions.csv                          one row per test clip, per-class probabilities
  confusion_counts.csv, confusion_normalised.csv, confusion.png, confusion_counts.png
  class_names.json
and RUN_ROOT/run_summary.csv (one row per run, then mean and std rows). Test metrics use the
best model by validation (best/; export/ without a validation set) on the test clips read from
audio, cut into --clip_seconds windows whose probabilities are averaged per clip, exactly as
`bioaudio infer` does.

Re-running the same command resumes: finished runs are skipped, an interrupted one continues
from its last saved state (`--resume auto`) and ends with the same weights as an uninterrupted
run. Features come from a cache made by `bioaudio features MANIFEST --frontend KIND` when one
matches (--features auto), which skips feature extraction during training; waveform
augmentations (--wave.*) need audio and turn the automatic cache lookup off.

Examples:
  bioaudio train-baseline data/manifest.split.csv --out runs/tiny --seeds 42,7,123 --epochs 30
  bioaudio train-baseline esc10.split.csv --out runs/esc10 --cv --model timm:resnet18 \\
      --spec_augment --mixup_alpha 0.2
  bioaudio train-baseline data/manifest.csv --out runs/check --sanity_overfit
  accelerate launch --multi_gpu --num_processes 2 -m bioaudio train-baseline ... (several GPUs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from bioaudio.config import add_dataclass_args, config_from_args, to_dict
from bioaudio.data.augment import SpecAugmentConfig, WaveAugmentConfig, build_wave_augment
from bioaudio.data.datasets import AudioDataset, collate_batch, resolve_classes, segment_windows
from bioaudio.data.features import FeatureDataset, find_cache, frames_for_seconds, open_cache
from bioaudio.data.frontend import FrontendConfig, FrontendKind, frontend_from_options
from bioaudio.data.manifest import read_manifest, split_labels
from bioaudio.data.splits import SplitConfig, assign_splits, split_manifest, strata_of
from bioaudio.data.stats import resolve_stats
from bioaudio.errors import ConfigError, DataError
from bioaudio.fileio import save_json_atomic
from bioaudio.inference.metrics import classification_report, row_normalised
from bioaudio.inference.predict import forward_batch, load_classifier, predict_clips, probabilities
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.training.classification import ClassificationTask
from bioaudio.training.loop import TrainConfig, Trainer
from bioaudio.training.optim import default_param_groups, make_adamw
from bioaudio.training.rundir import model_identity

RUN_SUMMARY = "run_summary.csv"
TEST_METRICS = "test_metrics.json"


# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class TrainBaselineConfig(TrainConfig):
    """Options of `bioaudio train-baseline`: the training loop's plus data, model and runs."""

    # The loop's options set per run, not by flags.
    out_dir: Path = field(
        default=Path("runs/baseline"), metadata={"cli": False, "help": "set per run from --out"}
    )
    seed: int = field(default=0, metadata={"cli": False, "help": "set per run from --seeds"})
    # The loop's options with defaults that suit small CNNs.
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps per run (alternative to --epochs)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    eval_every: int | None = field(
        default=None, metadata={"help": "validate every N steps; unset: once per epoch"}
    )
    save_every: int | None = field(
        default=None,
        metadata={"help": "save a resumable state every N steps; unset: --eval_every"},
    )
    log_every: int | None = field(
        default=None,
        metadata={"help": "write a metrics.csv row every N steps; unset: --eval_every"},
    )
    best_metric: str | None = field(
        default="auto",
        metadata={"help": "metric selecting best/ (auto: eval/accuracy, multi-label eval/mAP)"},
    )

    out: Path = field(
        default=Path("runs/baseline"),
        metadata={"help": "RUN_ROOT: one run directory per (fold,) seed and run_summary.csv"},
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
    seeds: list[int] = field(
        default_factory=lambda: [42], metadata={"help": "comma-separated seeds, one run each"}
    )
    epochs: float | None = field(
        default=None,
        metadata={"help": "epochs per run; unset: 30, unless --max_steps is given"},
    )
    frontend: FrontendKind = field(
        default="logmel", metadata={"help": "logmel | stft | mfcc | beats_fbank | eat_fbank"}
    )
    sample_rate: int = field(default=16000, metadata={"help": "frontend sample rate (Hz)"})
    n_mels: int = field(default=128, metadata={"help": "mel bins"})
    n_fft: int = field(default=1024, metadata={"help": "FFT size (logmel / stft / mfcc)"})
    hop_length: int = field(default=320, metadata={"help": "hop in samples (logmel / stft / mfcc)"})
    n_mfcc: int = field(default=40, metadata={"help": "MFCC coefficients"})
    top_db: float = field(default=80.0, metadata={"help": "dynamic range of dB frontends"})
    stats: Path | None = field(
        default=None,
        metadata={
            "help": "normalisation stats (bioaudio stats); unset: stats.json beside MANIFEST if any"
        },
    )
    features: str = field(
        default="auto",
        metadata={"help": "feature cache: auto (a matching one beside MANIFEST) | none | DIR"},
    )
    clip_seconds: float = field(
        default=5.0, metadata={"help": "training crop / evaluation window in seconds"}
    )
    eval_hop: float | None = field(
        default=None, metadata={"help": "hop between evaluation windows; unset: --clip_seconds"}
    )
    val: float = field(default=0.15, metadata={"help": "validation fraction (own split)"})
    test: float = field(default=0.15, metadata={"help": "test fraction (own split)"})
    split_seed: int = field(
        default=0, metadata={"help": "seed of the own split (the same for every --seeds run)"}
    )
    split_column: str = field(
        default="split", metadata={"help": "manifest column of train/val/test, used when present"}
    )
    fold_column: str = field(default="fold", metadata={"help": "manifest column of folds"})
    test_fold: int | None = field(default=None, metadata={"help": "the fold used as test set"})
    cv: bool = field(
        default=False, metadata={"help": "cross-validation: every fold in turn as test set"}
    )
    cv_val: Literal["next_fold", "none"] = field(
        default="next_fold",
        metadata={
            "help": "validation with folds: the next fold, or none (train on all other folds;"
            " test metrics then use the final model)"
        },
    )
    wave: WaveAugmentConfig = field(default_factory=WaveAugmentConfig)
    spec_augment: bool = field(
        default=False, metadata={"help": "SpecAugment on training features (see --spec.*)"}
    )
    spec: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    mixup_alpha: float = field(default=0.0, metadata={"help": "mixup Beta(alpha, alpha); 0 = off"})
    mixup_prob: float = field(default=1.0, metadata={"help": "fraction of clips mixed"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing (0 = off)"})
    sanity_overfit: bool = field(
        default=False,
        metadata={"help": "only check the pipeline: memorise one batch, exit 1 if it cannot"},
    )
    sanity_steps: int = field(default=300, metadata={"help": "step cap of --sanity_overfit"})

    def validate(self) -> None:
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give --max_steps or --epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        for s in self.seeds:
            if not 0 <= s < 2**31:
                raise ConfigError(f"--seeds: {s} is not in [0, 2**31)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: repeated seed in {','.join(map(str, self.seeds))}")
        if not self.clip_seconds > 0:
            raise ConfigError(f"--clip_seconds must be positive, got {self.clip_seconds}")
        if self.eval_hop is not None and not self.eval_hop > 0:
            raise ConfigError(f"--eval_hop must be positive, got {self.eval_hop}")
        if self.cv and self.test_fold is not None:
            raise ConfigError("give --cv or --test_fold, not both")
        if self.sanity_steps < 1:
            raise ConfigError(f"--sanity_steps must be >= 1, got {self.sanity_steps}")
        if self.log_every is not None and self.log_every < 1:
            raise ConfigError(f"--log_every must be a positive integer, got {self.log_every}")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name} must be >= 0, got {v}")
        if not isinstance(self.model_options, dict):
            raise ConfigError("--model_options must be a JSON object")
        if not self.uses_folds:
            SplitConfig(val=self.val, test=self.test).validate()
        if isinstance(self.resume, str) and self.resume.strip().lower() in ("", "none", "null"):
            self.resume = None
        self.loop_config(out_dir=self.out, seed=0, max_steps=max(self.warmup_steps, 1)).validate()

    @property
    def uses_folds(self) -> bool:
        return self.cv or self.test_fold is not None

    def loop_config(self, **overrides: Any) -> TrainConfig:
        """The plain TrainConfig of one run."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        values.update(eval_every=0, save_every=0, log_every=10, best_metric=None)
        values.update(overrides)
        return TrainConfig(**values)

    def frontend_config(self) -> FrontendConfig:
        return frontend_from_options(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="labelled manifest CSV (bioaudio prepare)")
    parser.add_argument("--config", help="YAML / JSON file of options (flags override it)")
    add_dataclass_args(parser, TrainBaselineConfig)


# ----------------------------------------------------------------------------------------------
# Planning: everything that can be wrong is found here, before any training or writing


@dataclass
class RunPlan:
    """One training run: its directory (relative to RUN_ROOT), seed, fold and manifest rows."""

    name: str
    seed: int
    fold: Any
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class Job:
    """A resolved train-baseline invocation."""

    cfg: TrainBaselineConfig
    manifest: Path
    df: pd.DataFrame
    class_names: list[str]
    multi_label: bool
    frontend: FrontendConfig
    stats_file: Path | None
    cache: Any  # bioaudio.features.FeatureCache | None
    model_options: dict[str, Any]
    plans: list[RunPlan]
    notes: list[str]
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.cfg.out)

    def build_model(self, seed: int) -> BaselineClassifier:
        torch.manual_seed(seed)  # initial weights are part of what a seed decides
        return BaselineClassifier.build(
            self.cfg.model,
            self.frontend,
            self.class_names,
            self.multi_label,
            **dict(self.model_options),
        )

    def task(
        self, plan: RunPlan | None, eval_groups: np.ndarray | None = None
    ) -> ClassificationTask:
        cfg = self.cfg
        return ClassificationTask(
            self.class_names,
            self.multi_label,
            mixup_alpha=cfg.mixup_alpha,
            mixup_prob=cfg.mixup_prob,
            spec_augment=cfg.spec if cfg.spec_augment else None,
            label_smoothing=cfg.label_smoothing,
            seed=plan.seed if plan is not None else 0,
            eval_groups=eval_groups,
            provenance={
                "task": "classification",
                "clip_seconds": cfg.clip_seconds,
                "run": plan.name if plan is not None else None,
                "manifest": str(self.manifest.resolve()),
            },
        )


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(*parts: Any) -> None:
    """Print on the main process only (every process runs this command under accelerate)."""
    if _main_process():
        print(*parts, flush=True)


def _row_counts(df: pd.DataFrame, rows: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for v in df["labels"].to_numpy()[rows]:
        for n in split_labels(v):
            counts[n] = counts.get(n, 0) + 1
    return counts


def _fold_plans(df: pd.DataFrame, cfg: TrainBaselineConfig) -> list[tuple]:
    col = cfg.fold_column
    if col not in df.columns:
        raise DataError(
            f"--fold_column {col!r} is not a manifest column (make folds with `bioaudio split"
            " --method esc` or `--method kfold`)"
        )
    values = df[col]
    if values.isna().any():
        raise DataError(f"--fold_column {col!r} is empty in {int(values.isna().sum())} row(s)")
    folds = sorted(values.unique().tolist())
    if cfg.test_fold is not None and cfg.test_fold not in folds:
        raise ConfigError(
            f"--test_fold {cfg.test_fold} does not exist (folds in {col!r}:"
            f" {', '.join(map(str, folds))})"
        )
    if len(folds) < 2:
        raise DataError(f"--fold_column {col!r} holds a single fold ({folds[0]})")
    if cfg.cv_val == "next_fold" and len(folds) < 3:
        raise ConfigError(
            f"{len(folds)} folds leave no training fold when the next fold validates;"
            " use --cv_val none"
        )
    out = []
    v = values.to_numpy()
    for k, fold in enumerate(folds):
        if cfg.test_fold is not None and fold != cfg.test_fold:
            continue
        val_fold = folds[(k + 1) % len(folds)] if cfg.cv_val == "next_fold" else None
        test = np.flatnonzero(v == fold)
        val = np.flatnonzero(v == val_fold) if val_fold is not None else np.zeros(0, np.int64)
        train = np.flatnonzero((v != fold) & (v != val_fold if val_fold is not None else True))
        out.append((fold, train, val, test))
    return out


def _split_rows(
    df: pd.DataFrame, cfg: TrainBaselineConfig, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    col = cfg.split_column
    if col in df.columns:
        split = df[col].fillna("").astype(str).str.strip().to_numpy()
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise DataError(
                f"--split_column {col!r} holds {', '.join(map(repr, bad[:3]))}; expected"
                " train, val and test"
            )
        train, val, test = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
        if len(val) == 0 and cfg.val > 0 and len(train) > 1:
            # carve a stratified validation set out of the training rows
            sub = df.iloc[train]
            assigned = assign_splits(strata_of(sub), val=cfg.val, test=0.0, seed=cfg.split_seed)
            val, train = train[assigned == "val"], train[assigned == "train"]
            notes.append(f"no val rows in {col!r}: {len(val)} training rows validate instead")
        notes.append(f"splits from the manifest's {col!r} column")
        return train, val, test
    method = "stratified"
    split_cfg = SplitConfig(method="stratified", val=cfg.val, test=cfg.test, seed=cfg.split_seed)
    if "recording" in df.columns and df["recording"].astype(str).duplicated().any():
        # windows of one recording must not land in both train and test
        split_cfg = dataclasses.replace(split_cfg, method="group", group_column="recording")
        method = "grouped by recording"
    result = split_manifest(df, split_cfg)
    split = result.df[result.column].to_numpy()
    notes.append(
        f"{method} split {1 - cfg.val - cfg.test:g}/{cfg.val:g}/{cfg.test:g}"
        f" (--split_seed {cfg.split_seed})"
    )
    return tuple(np.flatnonzero(split == s) for s in ("train", "val", "test"))  # type: ignore


def _resolve_cache(
    cfg: TrainBaselineConfig, manifest: Path, frontend: FrontendConfig, waveform_model: bool
) -> tuple[Any, str | None]:
    """(opened cache or None, a note)."""
    choice = cfg.features.strip()
    if choice.lower() == "none":
        return None, None
    explicit = choice.lower() != "auto"
    if waveform_model:
        if explicit:
            raise ConfigError(
                f"--features {choice}: model {cfg.model} takes the waveform, not features"
            )
        return None, None
    if cfg.wave.enabled:
        if explicit:
            raise ConfigError(
                f"--features {choice}: waveform augmentations (--wave.*) cannot apply to cached"
                " features; drop one of them"
            )
        return None, "waveform augmentations on: features computed from audio (no cache)"
    if explicit:
        try:
            meta = open_cache(choice).meta
        except DataError as e:
            raise ConfigError(f"--features {choice}: {e}") from e
        path = find_cache(manifest, frontend, choice, meta.get("window"), meta.get("hop"))
    else:
        path = find_cache(manifest, frontend)
        if path is None:
            return None, (
                f"no feature cache for {manifest.name}: features computed on the fly"
                f" (`bioaudio features {manifest} --frontend {frontend.kind}` makes one)"
            )
    cache = open_cache(path)  # type: ignore[arg-type]
    if "manifest_row" not in cache.items.columns:
        raise ConfigError(f"--features {path}: cache lacks manifest_row; rebuild it")
    return cache, f"feature cache: {path}"


def plan_job(manifest: Path, cfg: TrainBaselineConfig) -> Job:
    """Read and check everything; raise a one-line error for anything that cannot work."""
    df = read_manifest(manifest)
    if not any(split_labels(v) for v in df["labels"]):
        raise DataError(
            f"{manifest} has no labels; train-baseline needs labelled clips (bioaudio prepare"
            " with a labels.csv, class folders or selection tables)"
        )
    names, multi = resolve_classes(df)
    if len(names) < 2 and not multi:
        raise DataError(f"{manifest}: a single class ({names[0]}); a classifier needs two or more")
    notes: list[str] = []
    frontend, stats_file = resolve_stats(cfg.frontend_config(), cfg.stats, manifest)
    if stats_file is not None:
        notes.append(f"normalisation stats: {stats_file}")
    options = dict(cfg.model_options)
    if options.get("input") == "waveform":
        options.setdefault("input_samples", int(round(cfg.clip_seconds * cfg.sample_rate)))
    job = Job(cfg, manifest, df, names, multi, frontend, stats_file, None, options, [], notes)
    probe = job.build_model(0)  # unknown model names and bad options fail here
    waveform_model = probe.input == "waveform"
    if cfg.spec_augment and waveform_model:
        raise ConfigError(f"--spec_augment needs a feature model; {cfg.model} takes the waveform")
    job.cache, note = _resolve_cache(cfg, manifest, frontend, waveform_model)
    if note:
        notes.append(note)

    if cfg.uses_folds:
        splits = _fold_plans(df, cfg)
    else:
        splits = [(None, *_split_rows(df, cfg, notes))]
    cached_rows = None
    if job.cache is not None:
        cached_rows = job.cache.items["manifest_row"].to_numpy()
        missing = np.setdiff1d(np.arange(len(df)), cached_rows)
        if len(missing):
            notes.append(f"{len(missing)} manifest row(s) are not in the cache (unreadable)")
    plans = []
    for fold, train, val, test in splits:
        where = f" in fold {fold}" if fold is not None else ""
        if cached_rows is not None:
            train = train[np.isin(train, cached_rows)]
            val = val[np.isin(val, cached_rows)]
        if len(test) == 0:
            raise DataError(f"the test set{where} is empty")
        counts = _row_counts(df, train, names)
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise DataError(
                f"class {empty[0]!r} has no training examples{where}"
                f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}"
            )
        n_items = int(np.isin(cached_rows, train).sum()) if cached_rows is not None else len(train)
        if n_items < cfg.batch_size:
            raise ConfigError(
                f"--batch_size {cfg.batch_size} is larger than the training set{where}"
                f" ({n_items} clips)"
            )
        for what, rows in (("validation", val), ("test", test)):
            if len(rows) and not any(split_labels(v) for v in df["labels"].to_numpy()[rows]):
                raise DataError(f"the {what} set{where} has no labelled clips")
        for seed in cfg.seeds:
            name = f"seed_{seed}" if fold is None else f"fold_{fold}/seed_{seed}"
            plans.append(RunPlan(name, seed, fold, train, val, test))
    if cfg.resume not in (None, "auto") and len(plans) > 1:
        raise ConfigError(
            f"--resume {cfg.resume}: a single state cannot resume {len(plans)} runs; use"
            " --resume auto (re-run the same command)"
        )
    job.plans = plans
    job.identity = model_identity(probe, job.task(None), _identity_extra(job))
    for plan in plans:
        _check_run_dir(job, plan)
    return job


def _identity_extra(job: Job) -> dict[str, Any]:
    return {
        "baseline": job.cfg.model,
        "class_names": job.class_names,
        "frontend": job.frontend.kind,
    }


def _steps(job: Job, plan: RunPlan) -> tuple[int, int, int, int]:
    """(max_steps, eval_every, save_every, log_every) of one run."""
    cfg = job.cfg
    n = len(plan.train)
    if job.cache is not None:
        n = int(np.isin(job.cache.items["manifest_row"].to_numpy(), plan.train).sum())
    per_epoch = max(1, n // cfg.batch_size)
    if cfg.max_steps is not None:
        max_steps = cfg.max_steps
    else:
        max_steps = max(1, math.ceil((cfg.epochs or 30.0) * per_epoch))
    eval_every = cfg.eval_every if cfg.eval_every is not None else per_epoch
    save_every = cfg.save_every if cfg.save_every is not None else (eval_every or per_epoch)
    log_every = cfg.log_every if cfg.log_every is not None else (eval_every or per_epoch)
    return max_steps, eval_every, save_every, log_every


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_run_dir(job: Job, plan: RunPlan) -> None:
    """An existing run directory must hold this model and, when finished, this schedule."""
    d = job.root / plan.name
    saved = _read_json(d / "config.json")
    old = (saved or {}).get("identity")
    if isinstance(old, dict) and old != job.identity:
        diffs = [
            f"{k}: {old.get(k)!r} vs {job.identity.get(k)!r}"
            for k in sorted(set(old) | set(job.identity))
            if old.get(k) != job.identity.get(k)
        ]
        raise ConfigError(
            f"{d} holds a run of another model ({'; '.join(diffs[:2])}); choose another --out"
        )
    if job.cfg.resume is None and ((d / "state").is_dir() or (d / "summary.json").is_file()):
        raise ConfigError(f"{d} already holds a run; use --resume auto or another --out")
    summary = _read_json(d / "summary.json")
    if summary and summary.get("status") == "completed":
        max_steps = _steps(job, plan)[0]
        if summary.get("max_steps") != max_steps:
            raise ConfigError(
                f"{d} holds a finished run of {summary.get('max_steps')} steps, this command"
                f" plans {max_steps}; choose another --out"
            )


def is_finished(run_dir: Path) -> bool:
    """A run whose training completed and whose test metrics were written."""
    summary = _read_json(run_dir / "summary.json")
    return (
        bool(summary and summary.get("status") == "completed")
        and (run_dir / TEST_METRICS).is_file()
    )


# ----------------------------------------------------------------------------------------------
# Datasets


def _train_eval_datasets(job: Job, plan: RunPlan, augment: bool = True) -> tuple[Any, Any, Any]:
    """(train dataset, validation dataset or None, validation group per item or None)."""
    cfg = job.cfg
    common = dict(class_names=job.class_names, multi_label=job.multi_label)
    if job.cache is not None:
        rows_of = job.cache.items["manifest_row"].to_numpy()
        frames = max(1, frames_for_seconds(job.frontend, cfg.clip_seconds))
        train = FeatureDataset(
            job.cache,
            clip_frames=frames,
            train=augment,
            seed=plan.seed,
            frontend=job.frontend,
            rows=np.flatnonzero(np.isin(rows_of, plan.train)),
            **common,
        )
        val = groups = None
        if len(plan.val):
            items = np.flatnonzero(np.isin(rows_of, plan.val))
            val = FeatureDataset(
                job.cache, clip_frames=frames, frontend=job.frontend, rows=items, **common
            )
            groups = rows_of[items]
        return train, val, groups
    wave = None
    if augment and cfg.wave.enabled:
        wave = build_wave_augment(dataclasses.replace(cfg.wave, sample_rate=cfg.sample_rate))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sub-frame segments: dropped, counted
        train = AudioDataset(
            job.df.iloc[plan.train],
            sample_rate=cfg.sample_rate,
            clip_seconds=cfg.clip_seconds,
            train=augment,
            seed=plan.seed,
            wave_augment=wave,
            **common,
        )
        val = groups = None
        if len(plan.val):
            windows = segment_windows(job.df.iloc[plan.val], cfg.clip_seconds, cfg.eval_hop)
            val = AudioDataset(
                windows, sample_rate=cfg.sample_rate, clip_seconds=cfg.clip_seconds, **common
            )
            groups = val.df["segment_index"].to_numpy()
    return train, val, groups


# ----------------------------------------------------------------------------------------------
# One run


def _write_csv(df: pd.DataFrame, path: Path, **kw: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, **kw)
    tmp.replace(path)


def train_run(job: Job, plan: RunPlan) -> dict[str, Any] | None:
    """Train (or resume) one run, then write its test metrics and plots. None if interrupted."""
    cfg = job.cfg
    run_dir = job.root / plan.name
    max_steps, eval_every, save_every, log_every = _steps(job, plan)
    train_ds, val_ds, groups = _train_eval_datasets(job, plan)
    best = None
    if val_ds is not None and cfg.best_metric:
        best = cfg.best_metric
        if best == "auto":
            best = "eval/mAP" if job.multi_label else "eval/accuracy"
    loop = cfg.loop_config(
        out_dir=run_dir,
        seed=plan.seed,
        max_steps=max_steps,
        eval_every=eval_every if val_ds is not None else 0,
        save_every=save_every,
        log_every=log_every,
        best_metric=best,
    )
    run_config = {
        "command": "train-baseline",
        "options": to_dict(cfg),
        "run": {
            "name": plan.name,
            "seed": plan.seed,
            "fold": plan.fold,
            "n_train": len(train_ds),
            "n_val_clips": len(plan.val),
            "n_test_clips": len(plan.test),
            "manifest": str(job.manifest.resolve()),
            "feature_cache": str(job.cache.root) if job.cache is not None else None,
            "stats_file": str(job.stats_file) if job.stats_file else None,
            "class_names": job.class_names,
            "multi_label": job.multi_label,
            "frontend": to_dict(job.frontend),
        },
    }
    model = job.build_model(plan.seed)
    task = job.task(plan, groups)
    trainer = Trainer(
        loop,
        model,
        task,
        train_ds,
        val_ds,
        collate_fn=collate_batch,
        run_config=run_config,
        identity=_identity_extra(job),
    )
    say(f"\n== {plan.name}: {len(train_ds)} training items, {max_steps} steps -> {run_dir}")
    summary = trainer.fit()
    if summary["status"] != "completed":
        return None
    return write_run_artifacts(job, plan, run_dir, summary, trainer.accelerator)


def write_run_artifacts(
    job: Job, plan: RunPlan, run_dir: Path, summary: dict[str, Any], accelerator: Any
) -> dict[str, Any]:
    """Test metrics of the best model (clip level), predictions, confusion matrices, curves."""
    from bioaudio.inference.plots import plot_confusion, plot_history

    cfg = job.cfg
    chosen = "best" if (run_dir / "best" / "config.json").is_file() else "export"
    model = load_classifier(run_dir / chosen)
    test_df = job.df.iloc[plan.test].reset_index(drop=True)
    clips = predict_clips(
        model,
        test_df,
        window=cfg.clip_seconds,
        hop=cfg.eval_hop,
        batch_size=cfg.eval_batch_size or max(1, cfg.batch_size // accelerator.num_processes),
        num_workers=cfg.num_workers,
        accelerator=accelerator,
        progress=cfg.progress and accelerator.is_main_process,
        desc="test",
    )
    report = classification_report(clips.scores, clips.targets, job.class_names, job.multi_label)
    if accelerator.is_main_process:
        names = job.class_names
        save_json_atomic(run_dir / "class_names.json", names)
        pred = test_df.iloc[clips.rows][["path", "start", "end", "labels"]].reset_index(drop=True)
        top = clips.scores.argmax(axis=1)
        if job.multi_label:
            pred["predicted"] = [
                ",".join(n for n, p in zip(names, row) if p >= 0.5) for row in clips.scores
            ]
        else:
            pred["predicted"] = [names[i] for i in top]
        pred["probability"] = clips.scores.max(axis=1)
        for c, n in enumerate(names):
            pred[f"p_{n}"] = clips.scores[:, c]
        _write_csv(pred, run_dir / "test_predictions.csv", index=False)
        if not job.multi_label:
            cm = np.asarray(report["confusion"])
            counts = pd.DataFrame(cm, index=names, columns=names)
            counts.index.name = "true \\ predicted"
            _write_csv(counts, run_dir / "confusion_counts.csv")
            norm = pd.DataFrame(row_normalised(cm), index=names, columns=names)
            norm.index.name = "true \\ predicted"
            _write_csv(norm, run_dir / "confusion_normalised.csv", float_format="%.6g")
            title = f"{plan.name}: test accuracy {report['accuracy']:.3f}"
            plot_confusion(cm, names, run_dir / "confusion.png", normalise=True, title=title)
            plot_confusion(cm, names, run_dir / "confusion_counts.png", normalise=False)
        history = _history(run_dir)
        if history is not None:
            _write_csv(history, run_dir / "history.csv", index=False)
            plot_history(history, run_dir / "curves.png", title=f"{cfg.model} {plan.name}")
        record = {
            **report,
            "model": chosen,
            "best": summary.get("best"),
            "steps": summary.get("steps"),
            "run": plan.name,
            "seed": plan.seed,
            "fold": plan.fold,
            "clip_seconds": cfg.clip_seconds,
            "eval_hop": cfg.eval_hop or cfg.clip_seconds,
            "windows": len(clips.windows),
        }
        save_json_atomic(run_dir / TEST_METRICS, record)  # last: marks the run finished
    accelerator.wait_for_everyone()
    return report


def _history(run_dir: Path) -> pd.DataFrame | None:
    """metrics.csv reshaped for people: step, epoch, lr, train loss/accuracy, val_* metrics."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    m = pd.read_csv(path)
    keep = ["step", "epoch", "lr", "loss", "train_accuracy"]
    cols = [c for c in keep if c in m.columns] + [c for c in m.columns if c.startswith("eval/")]
    h = m[cols].rename(columns={c: "val_" + c[5:] for c in cols if c.startswith("eval/")})
    return h.groupby("step", as_index=False).first()


# ----------------------------------------------------------------------------------------------
# Summary over runs


def run_summary(job: Job) -> pd.DataFrame:
    """One row per run (from its test_metrics.json and summary.json), then mean and std rows
    (sample standard deviation, ddof=1) of every metric column."""
    metric_keys = (
        ["mAP", "auroc", "macro_f1", "micro_f1"]
        if job.multi_label
        else ["accuracy", "balanced_accuracy", "macro_f1"]
    )
    rows = []
    for plan in job.plans:
        d = job.root / plan.name
        tm, sm = _read_json(d / TEST_METRICS) or {}, _read_json(d / "summary.json") or {}
        best = sm.get("best") or {}
        row: dict[str, Any] = {"run": plan.name, "fold": plan.fold, "seed": plan.seed}
        row.update({f"test_{k}": tm.get(k) for k in metric_keys})
        row["best_val"] = best.get("value")
        row["best_step"] = best.get("step")
        row["steps"] = sm.get("steps")
        row["n_test"] = tm.get("n")
        row["train_time_s"] = sm.get("train_time_s")
        rows.append(row)
    table = pd.DataFrame(rows)
    if job.plans[0].fold is None:
        table = table.drop(columns="fold")
    stat_cols = [f"test_{k}" for k in metric_keys] + ["best_val", "train_time_s"]
    values = table[stat_cols].apply(pd.to_numeric, errors="coerce")
    mean = {"run": "mean", **values.mean().to_dict()}
    spread = values.std(ddof=1) if len(values) > 1 else values.iloc[0] * np.nan
    std = {"run": "std", **spread.to_dict()}
    table = pd.concat([table, pd.DataFrame([mean, std])], ignore_index=True)
    for c in ("fold", "seed", "best_step", "steps", "n_test"):
        if c in table and pd.api.types.is_numeric_dtype(table[c]):
            table[c] = table[c].astype("Int64")
    return table


def _format_summary(table: pd.DataFrame) -> str:
    shown = table.astype(object).where(table.notna(), "")
    for c in shown.columns:
        if c.startswith("test_") or c == "best_val":
            shown[c] = [f"{v:.4f}" if v != "" else "" for v in shown[c]]
        elif c == "train_time_s":
            shown[c] = [f"{v:.0f}" if v != "" else "" for v in shown[c]]
    return shown.to_string(index=False)


# ----------------------------------------------------------------------------------------------
# Sanity check


def sanity_overfit(job: Job) -> int:
    """Memorise one fixed batch (no augmentation): a quick check that data, labels, model, loss
    and optimizer fit together. 0 when the batch is learnt within --sanity_steps, else 1."""
    cfg = job.cfg
    plan = job.plans[0]
    train_ds, _, _ = _train_eval_datasets(job, plan, augment=False)
    rng = np.random.default_rng(plan.seed)
    order = rng.permutation(len(train_ds))
    items = []
    for i in order:
        item = train_ds[int(i)]
        if job.multi_label or int(item["target"]) >= 0:
            items.append(item)
        if len(items) == cfg.batch_size:
            break
    batch = collate_batch(items)
    use_cuda = torch.cuda.is_available() and not cfg.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model = job.build_model(plan.seed).to(device)
    task = ClassificationTask(job.class_names, job.multi_label, seed=plan.seed)
    task.check_model(model)
    opt = make_adamw(default_param_groups(model, 0.0), lr=cfg.lr)
    y = batch["target"]
    history, t0, solved = [], time.perf_counter(), None
    from tqdm.auto import tqdm

    bar = tqdm(range(1, cfg.sanity_steps + 1), desc="sanity overfit", unit="step",
               disable=not (cfg.progress and _main_process()))  # fmt: skip
    for step in bar:
        model.train()
        loss, _ = task.training_step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        model.eval()
        with torch.no_grad():
            p = probabilities(forward_batch(model, batch), job.multi_label)
        if job.multi_label:
            acc = float(((p >= 0.5).float() == y.float()).all(dim=1).float().mean())
        else:
            acc = float((p.argmax(dim=1) == y).float().mean())
        history.append({"step": step, "loss": loss.item(), "batch_accuracy": acc})
        bar.set_postfix(loss=f"{loss.item():.4g}", acc=f"{acc:.3f}")
        if acc == 1.0:
            solved = step
            break
    bar.close()
    out = job.root / "sanity_overfit"
    result = {
        "passed": solved is not None,
        "steps": solved if solved is not None else cfg.sanity_steps,
        "batch": len(items),
        "final_loss": history[-1]["loss"],
        "final_batch_accuracy": history[-1]["batch_accuracy"],
        "model": cfg.model,
        "lr": cfg.lr,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if _main_process():
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(pd.DataFrame(history), out / "history.csv", index=False)
        save_json_atomic(out / "result.json", result)
    if solved is not None:
        say(
            f"sanity check passed: {cfg.model} memorised a batch of {len(items)} clips in"
            f" {solved} steps (loss {result['final_loss']:.4g}); details in {out}"
        )
        return 0
    say(
        f"sanity check FAILED: {cfg.model} reached {result['final_batch_accuracy']:.1%} on one"
        f" fixed batch of {len(items)} clips after {cfg.sanity_steps} steps (loss"
        f" {result['final_loss']:.4g}); check labels, --lr, features; details in {out}"
    )
    return 1


# ----------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainBaselineConfig, args)
    job = plan_job(args.manifest, cfg)
    names = ", ".join(job.class_names[:12]) + (" ..." if len(job.class_names) > 12 else "")
    kind = "multi-label" if job.multi_label else "single-label"
    say(f"{cfg.model}: {len(job.class_names)} classes ({kind}): {names}")
    for note in job.notes:
        say(f"note: {note}")
    if cfg.sanity_overfit:
        return sanity_overfit(job)
    for plan in job.plans:
        run_dir = job.root / plan.name
        if is_finished(run_dir):
            say(f"{plan.name}: finished earlier, skipped ({run_dir / TEST_METRICS})")
            continue
        if train_run(job, plan) is None:
            say(
                f"{plan.name}: interrupted; state saved in {run_dir / 'state'}; run the same"
                " command again to continue"
            )
            return 130
    table = run_summary(job)
    if _main_process():
        _write_csv(table, job.root / RUN_SUMMARY, index=False)
        say("\n" + _format_summary(table))
        key = "test_mAP" if job.multi_label else "test_accuracy"
        vals = pd.to_numeric(table[key].iloc[: len(job.plans)], errors="coerce")
        spread = f" +- {vals.std(ddof=1):.4f}" if len(vals) > 1 else ""
        say(f"\n{key[5:]}: {vals.mean():.4f}{spread} over {len(vals)} run(s)")
        say(f"runs: {job.root}/<run>/ (test_metrics.json, confusion.png, curves.png, best/)")
        say(f"summary: {job.root / RUN_SUMMARY}")
    return 0
