"""The experiment layer: one classifier recipe trained over seeds (and folds) on a labelled
manifest, evaluated under one protocol, summarised with mean +- std. `train-baseline` (CNN
baselines) and `finetune` (BEATs / EAT) both run through it, so their numbers compare.

Splits, in order of precedence:
  --cv                    every fold of --fold_column in turn as test (ESC-10's official 5-fold
                          protocol: `bioaudio split --method esc`), the next fold as validation
  --test_fold K           one fold as test, the next as validation
  a `split` column        train / val / test as written by `bioaudio split` (or by the dataset)
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
from its last saved state and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from bioaudio import runinfo, runlog
from bioaudio.config import to_dict
from bioaudio.data.audio import decode_failure_reason, is_url
from bioaudio.data.augment import SpecAugmentConfig, WaveAugmentConfig, build_wave_augment
from bioaudio.data.datasets import AudioDataset, collate_batch, resolve_classes, segment_windows
from bioaudio.data.features import FeatureDataset, find_cache, frames_for_seconds, open_cache
from bioaudio.data.frontend import FrontendConfig
from bioaudio.data.manifest import read_manifest, split_labels
from bioaudio.data.splits import SplitConfig
from bioaudio.distributed import any_process
from bioaudio.errors import ConfigError, DataError, first_line
from bioaudio.fileio import check_writable, save_json_atomic, write_csv_atomic
from bioaudio.training.artifacts import (
    RUN_SUMMARY,
    TEST_METRICS,
    format_summary,
    read_history,
    run_summary,
    write_run_artifacts,
)
from bioaudio.training.classification import ClassificationTask
from bioaudio.training.config import LoopOptions, TrainConfig
from bioaudio.training.frozen import CachedWindows, EncoderOutputCache, FrozenEncoderClassifier
from bioaudio.training.loop import Trainer
from bioaudio.training.rundir import (
    check_out_folder,
    frontend_identity,
    identity_differences,
    model_identity,
    read_json_object,
    read_skipped,
)
from bioaudio.training.runsplits import fold_splits, split_rows
from bioaudio.training.sampling import weights_from_file

# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class ExperimentOptions:
    """Runs (seeds x folds), their length and evaluation, the splits, augmentation."""

    out: Path = field(
        default=Path("runs/experiment"),
        metadata={"help": "RUN_ROOT: one run directory per (fold,) seed and run_summary.csv"},
    )
    seeds: list[int] = field(
        default_factory=lambda: [42], metadata={"help": "comma-separated seeds, one run each"}
    )
    epochs: float | None = field(
        default=None,
        metadata={"help": "epochs per run; unset: 30, unless --max_steps is given"},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps per run (alternative to --epochs)"}
    )
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
    early_stopping: int = field(
        default=0,
        metadata={"help": "stop a run after N validations without improvement (0 = off)"},
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

    @property
    def uses_folds(self) -> bool:
        return self.cv or self.test_fold is not None

    def validate_experiment(self) -> None:
        """One-line ConfigError for values that cannot work."""
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give --max_steps or --epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps must be a positive integer, got {self.max_steps}")
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
        if self.early_stopping < 0:
            raise ConfigError(f"--early_stopping must be >= 0, got {self.early_stopping}")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name} must be >= 0, got {v}")
        if not self.uses_folds:
            SplitConfig(val=self.val, test=self.test).validate()


# ----------------------------------------------------------------------------------------------
# Plans


@dataclass
class RunPlan:
    """One training run: its directory (relative to RUN_ROOT), seed, fold and manifest rows."""

    name: str
    seed: int
    fold: Any
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


ModelFactory = Callable[[int, list[str], bool], nn.Module]
"""(seed, class names, multi-label) -> a fresh classifier (see bioaudio.training.classification)."""


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(*parts: Any) -> None:
    """Print on the main process only (every process runs the command under accelerate)."""
    if is_main_process():
        print(*parts, flush=True)


def is_finished(run_dir: Path) -> bool:
    """A run whose training completed and whose test metrics were written."""
    summary = read_json_object(run_dir / "summary.json")
    return (
        bool(summary and summary.get("status") == "completed")
        and (run_dir / TEST_METRICS).is_file()
    )


def _row_counts(df: pd.DataFrame, rows: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for v in df["labels"].to_numpy()[rows]:
        for n in split_labels(v):
            counts[n] = counts.get(n, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# The experiment


class Experiment:
    """Seeds x folds of one classifier recipe on one labelled manifest.

    `cfg` holds `LoopOptions` and `ExperimentOptions` fields (a command's options dataclass
    inherits both). `build_model(seed, class_names, multi_label)` makes a fresh classifier;
    `identity` names what must match to resume a run directory (model name, frontend, ...);
    `name` is how runs are titled (plots, messages);
    `param_groups(model)` optionally gives optimiser groups (layer-wise decay, frozen parts).
    Everything that can be wrong is found by the constructor, before any training or writing.
    """

    def __init__(
        self,
        cfg: Any,
        manifest: Path,
        *,
        command: str,
        build_model: ModelFactory,
        frontend: FrontendConfig,
        identity: dict[str, Any],
        name: str = "",
        stats_file: Path | None = None,
        wave: WaveAugmentConfig | None = None,
        param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        cfg.validate_loop()
        cfg.validate_experiment()
        check_writable(cfg.out)
        self.cfg, self.manifest, self.command = cfg, Path(manifest), command
        self.name = name or command
        self._build, self.frontend, self.stats_file = build_model, frontend, stats_file
        self.wave = wave if wave is not None and wave.enabled else None
        self.param_groups = param_groups
        self.provenance = dict(provenance or {})
        self.notes: list[str] = []
        if stats_file is not None:
            self.notes.append(f"normalisation stats: {stats_file}")
        self.df = df = read_manifest(self.manifest)
        if not any(split_labels(v) for v in df["labels"]):
            raise DataError(
                f"{self.manifest} has no labels; {command} needs labelled clips (bioaudio prepare"
                " with a labels.csv, class folders or selection tables)"
            )
        names, multi = resolve_classes(df)
        if len(names) < 2 and not multi:
            raise DataError(
                f"{self.manifest}: a single class ({names[0]}); a classifier needs two or more"
            )
        self.class_names, self.multi_label = names, multi
        self.linear_probe = bool(getattr(cfg, "linear_probe", False))
        probe = self.build_model(0)  # unknown model names and bad options fail here
        self.waveform_model = getattr(probe, "input", "features") == "waveform"
        self.encoder_cache = None
        if self.linear_probe:
            if cfg.spec_augment or cfg.mixup_alpha > 0 or self.wave is not None:
                raise ConfigError(
                    "a linear probe trains on encoder outputs computed once: SpecAugment, "
                    "mixup and waveform augmentations do not apply (drop them or finetune)"
                )
            self.encoder_cache = EncoderOutputCache(
                probe.model, batch_size=cfg.eval_batch_size or 16, progress=cfg.progress
            )
            self.notes.append("linear probe: frozen encoder, its outputs computed once")
        if cfg.spec_augment and self.waveform_model:
            raise ConfigError("--spec_augment needs a model that takes features, not the waveform")
        self.cache = self._resolve_cache()
        self.unreadable = self._unreadable_rows()
        self.skipped_per_run: dict[str, int] = {}
        self.plans = self._plan()
        # The frontend is part of what a run is: other features never continue a run.
        self._identity_extra = {**identity, "class_names": names, **frontend_identity(frontend)}
        self.identity = model_identity(probe, self.task(None), self._identity_extra)
        for plan in self.plans:
            self._check_run_dir(plan)

    @property
    def root(self) -> Path:
        return Path(self.cfg.out)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)  # initial weights are part of what a seed decides
        model = self._build(seed, self.class_names, self.multi_label)
        return FrozenEncoderClassifier(model) if self.linear_probe else model

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
                **self.provenance,
                "task": "classification",
                "command": self.command,
                "clip_seconds": cfg.clip_seconds,
                "run": plan.name if plan is not None else None,
                "manifest": str(self.manifest.resolve()),
            },
        )

    # ---- planning

    def _resolve_cache(self) -> Any:
        """The opened feature cache to train from, or None (features from audio)."""
        cfg = self.cfg
        choice = cfg.features.strip()
        if choice.lower() == "none" or self.linear_probe:
            return None
        explicit = choice.lower() != "auto"
        if self.waveform_model:
            if explicit:
                raise ConfigError(f"--features {choice}: this model takes the waveform")
            return None
        if self.wave is not None:
            if explicit:
                raise ConfigError(
                    f"--features {choice}: waveform augmentations (--wave.*) cannot apply to"
                    " cached features; drop one of them"
                )
            self.notes.append("waveform augmentations on: features computed from audio")
            return None
        if explicit:
            try:
                meta = open_cache(choice).meta
            except DataError as e:
                raise ConfigError(f"--features {choice}: {e}") from e
            path = find_cache(
                self.manifest, self.frontend, choice, meta.get("window"), meta.get("hop")
            )
        else:
            path = find_cache(self.manifest, self.frontend)
            if path is None:
                self.notes.append(
                    f"no feature cache for {self.manifest.name}: features computed on the fly"
                    f" (`bioaudio features {self.manifest} --frontend {self.frontend.kind}`"
                    " makes one)"
                )
                return None
        cache = open_cache(path)  # type: ignore[arg-type]
        if "manifest_row" not in cache.items.columns:
            raise ConfigError(f"--features {path}: cache lacks manifest_row; rebuild it")
        self.notes.append(f"feature cache: {path}")
        return cache

    def _unreadable_rows(self) -> dict[int, str]:
        """Manifest rows whose file is missing or empty, with the reason (one stat per file,
        nothing decoded). They are left out of every split and listed in each run's
        skipped.csv; files that fail to decode during training are skipped there too."""
        reasons: dict[int, str] = {}
        checked: dict[str, str | None] = {}
        for i, p in enumerate(self.df["path"].astype(str)):
            if is_url(p):
                continue
            if p not in checked:
                try:
                    st = os.stat(p)
                    checked[p] = (
                        "is a directory"
                        if stat.S_ISDIR(st.st_mode)
                        else "empty file (0 bytes)"
                        if st.st_size == 0
                        else None
                    )
                except FileNotFoundError:
                    checked[p] = "no such file"
                except OSError as e:
                    checked[p] = e.strerror or first_line(e)
            if checked[p]:
                reasons[i] = checked[p]  # type: ignore[assignment]
        if reasons:
            n = len({self.df["path"].iloc[i] for i in reasons})
            self.notes.append(
                f"{n} file(s) of the manifest are missing or empty and are left out (each run"
                " lists them in its skipped.csv)"
            )
        return reasons

    def _record_skips(
        self,
        plan: RunPlan,
        datasets: Sequence[Any],
        summary: dict[str, Any],
        acc: Any,
        extra: dict[str, str] | None = None,
    ) -> int:
        """Write RUN/skipped.csv (path, reason) of the files this run could not use: missing or
        empty ones (left out of the splits), those that failed to decode during training or
        validation (skipped), and `extra` (path -> reason, e.g. test files), merged with an
        earlier session's; add their count to summary.json."""
        run_dir = self.root / plan.name
        rows = {str(self.df["path"].iloc[i]): r for i, r in sorted(self.unreadable.items())}
        if self.encoder_cache is not None:  # linear probe: windows that could not be encoded
            mine = set(self.df["path"].iloc[np.r_[plan.train, plan.val]].astype(str))
            for (path, _, _), reason in self.encoder_cache.failed.items():
                if path in mine:
                    rows.setdefault(path, reason)

        for ds in datasets:
            if not isinstance(ds, AudioDataset):
                continue
            for path in ds.failed_paths(any_process(acc)):  # each process marks what it read
                rows.setdefault(path, decode_failure_reason(path))
        for path, reason in (extra or {}).items():
            rows.setdefault(path, reason)
        if acc.is_main_process:
            csv_path = run_dir / "skipped.csv"
            for path, reason in read_skipped(csv_path).items():  # a resumed run's earlier ones
                rows.setdefault(path, reason)
            if rows:
                table = pd.DataFrame(list(rows.items()), columns=["path", "reason"])
                write_csv_atomic(table, csv_path)
            if (run_dir / "summary.json").is_file():
                save_json_atomic(run_dir / "summary.json", {**summary, "skipped_files": len(rows)})
        summary["skipped_files"] = len(rows)
        if rows:
            self.skipped_per_run[plan.name] = len(rows)
        return len(rows)

    def _plan(self) -> list[RunPlan]:
        cfg, df, names = self.cfg, self.df, self.class_names
        if cfg.uses_folds:
            splits = fold_splits(df, cfg)
        else:
            splits = [(None, *split_rows(df, cfg, self.notes))]
        cached_rows = None
        if self.cache is not None:
            cached_rows = self.cache.items["manifest_row"].to_numpy()
            missing = np.setdiff1d(np.arange(len(df)), cached_rows)
            if len(missing):
                self.notes.append(f"{len(missing)} manifest row(s) are not in the cache")
        plans = []
        bad = np.array(sorted(self.unreadable), dtype=np.int64)
        for fold, train, val, test in splits:
            where = f" in fold {fold}" if fold is not None else ""
            if len(bad):  # missing / empty files: in no split (listed in skipped.csv)
                train, val, test = (a[~np.isin(a, bad)] for a in (train, val, test))
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
            n_items = (
                int(np.isin(cached_rows, train).sum()) if cached_rows is not None else len(train)
            )
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
        return plans

    def steps(self, plan: RunPlan) -> tuple[int, int, int, int]:
        """(max_steps, eval_every, save_every, log_every) of one run."""
        cfg = self.cfg
        n = len(plan.train)
        if self.cache is not None:
            n = int(np.isin(self.cache.items["manifest_row"].to_numpy(), plan.train).sum())
        per_epoch = max(1, n // cfg.batch_size)
        if cfg.max_steps is not None:
            max_steps = cfg.max_steps
        else:
            max_steps = max(1, math.ceil((cfg.epochs or 30.0) * per_epoch))
        eval_every = cfg.eval_every if cfg.eval_every is not None else per_epoch
        save_every = cfg.save_every if cfg.save_every is not None else (eval_every or per_epoch)
        log_every = cfg.log_every if cfg.log_every is not None else (eval_every or per_epoch)
        return max_steps, eval_every, save_every, log_every

    def _check_run_dir(self, plan: RunPlan) -> None:
        """An existing run directory must hold this model and, when finished, this schedule."""
        d = self.root / plan.name
        saved = read_json_object(d / "config.json")
        old = (saved or {}).get("identity")
        diffs = identity_differences(old, self.identity) if isinstance(old, dict) else []
        if diffs:
            raise ConfigError(
                f"{d} holds a run of another model or frontend ({'; '.join(diffs[:2])}); choose"
                " another --out"
            )
        if self.cfg.resume is None and ((d / "state").is_dir() or (d / "summary.json").is_file()):
            raise ConfigError(f"{d} already holds a run; use --resume auto or another --out")
        summary = read_json_object(d / "summary.json")
        if summary and summary.get("status") == "completed":
            max_steps = self.steps(plan)[0]
            if summary.get("max_steps") != max_steps:
                raise ConfigError(
                    f"{d} holds a finished run of {summary.get('max_steps')} steps, this command"
                    f" plans {max_steps}; choose another --out"
                )

    # ---- datasets

    def datasets(self, plan: RunPlan, augment: bool = True) -> tuple[Any, Any, Any]:
        """(train dataset, validation dataset or None, validation group per item or None)."""
        cfg = self.cfg
        common = dict(class_names=self.class_names, multi_label=self.multi_label)
        if self.encoder_cache is not None:
            return self._cached_encoder_datasets(plan)
        if self.cache is not None:
            rows_of = self.cache.items["manifest_row"].to_numpy()
            frames = max(1, frames_for_seconds(self.frontend, cfg.clip_seconds))
            train = FeatureDataset(
                self.cache,
                clip_frames=frames,
                train=augment,
                seed=plan.seed,
                frontend=self.frontend,
                rows=np.flatnonzero(np.isin(rows_of, plan.train)),
                **common,
            )
            val = groups = None
            if len(plan.val):
                items = np.flatnonzero(np.isin(rows_of, plan.val))
                val = FeatureDataset(
                    self.cache, clip_frames=frames, frontend=self.frontend, rows=items, **common
                )
                groups = rows_of[items]
            return train, val, groups
        wave = None
        if augment and self.wave is not None:
            wave = build_wave_augment(
                dataclasses.replace(self.wave, sample_rate=self.frontend.sample_rate)
            )
        sr = self.frontend.sample_rate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sub-frame segments: dropped, counted
            train = AudioDataset(
                self.df.iloc[plan.train],
                skip_errors=True,  # a file that fails to decode is skipped and counted
                sample_rate=sr,
                clip_seconds=cfg.clip_seconds,
                train=augment,
                seed=plan.seed,
                wave_augment=wave,
                **common,
            )
            val = groups = None
            if len(plan.val):
                windows = segment_windows(self.df.iloc[plan.val], cfg.clip_seconds, cfg.eval_hop)
                # An unreadable validation file is skipped and listed like a training one: its
                # windows are replaced by readable ones, which evaluation counts once by index.
                val = AudioDataset(
                    windows,
                    sample_rate=sr,
                    clip_seconds=cfg.clip_seconds,
                    skip_errors=True,
                    **common,
                )
                groups = val.df["segment_index"].to_numpy()
        return train, val, groups

    def _cached_encoder_datasets(self, plan: RunPlan) -> tuple[Any, Any, Any]:
        """Linear probe: windows of the training rows (every --clip_seconds) and of the
        validation rows (every --eval_hop), read from the encoder cache."""
        cfg, cache = self.cfg, self.encoder_cache
        assert cache is not None
        common = dict(class_names=self.class_names, multi_label=self.multi_label, min_seconds=0.0)
        out: list[Any] = []
        for rows, hop in ((plan.train, cfg.clip_seconds), (plan.val, cfg.eval_hop)):
            if len(rows) == 0:
                out.append(None)
                continue
            windows = segment_windows(self.df.iloc[rows], cfg.clip_seconds, hop)
            cache.fill(windows, cfg.clip_seconds)
            # a file that cannot be read is left out (and listed in skipped.csv, _record_skips)
            readable = [cache.key(r) not in cache.failed for r in windows.itertuples()]
            windows = windows[readable].reset_index(drop=True)
            if len(windows) == 0:
                raise DataError(f"{plan.name}: none of its {len(rows)} clip(s) could be read")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                labelled = AudioDataset(windows, **common)
            out.append(CachedWindows(cache, windows, labelled))
        train, val = out
        groups = val.windows["segment_index"].to_numpy() if val is not None else None
        return train, val, groups

    def sample_weights(self, dataset: Any) -> np.ndarray | None:
        """Per-item sampling weights: class-balanced (--balanced_sampling: each class drawn
        equally often; multi-label: a clip weighs the mean of its labels' weights; unlabelled
        clips weigh like the rarest class) or from --weights (a CSV filename,weight)."""
        cfg = self.cfg
        balanced = bool(getattr(cfg, "balanced_sampling", False))
        weights_file = getattr(cfg, "weights", None)
        if not balanced and weights_file is None:
            return None
        table = getattr(dataset, "df", None)
        if table is None or "labels" not in table:
            raise ConfigError("balanced sampling / --weights need a dataset read from audio")
        if weights_file is not None:
            return weights_from_file(Path(weights_file), table)
        labels = [split_labels(v) for v in table["labels"]]
        counts = Counter(n for labs in labels for n in labs)
        rarest = 1.0 / min(counts.values()) if counts else 1.0
        return np.array(
            [np.mean([1.0 / counts[n] for n in labs]) if labs else rarest for labs in labels]
        )

    # ---- running

    def run_command(self, sanity_overfit: bool = False) -> int:
        """What a training command does with its experiment: print the classes and the notes,
        then train every run (`run`), or only check that one batch is learnt (`sanity_overfit`)."""
        names = ", ".join(self.class_names[:12])
        names += " ..." if len(self.class_names) > 12 else ""
        kind = "multi-label" if self.multi_label else "single-label"
        say(f"{self.name}: {len(self.class_names)} classes ({kind}): {names}")
        for note in self.notes:
            say(f"note: {note}")
        return self.sanity_overfit() if sanity_overfit else self.run()

    def run(self) -> int:
        """Train every planned run (skipping finished ones), then write run_summary.csv.
        0 when all finished, 130 when interrupted (state saved)."""
        check_out_folder(self.root, self.command, "experiment")
        runlog.attach(self.root / "log.txt")  # the whole command's output, appended
        for plan in self.plans:
            run_dir = self.root / plan.name
            if is_finished(run_dir):
                self._check_same_data(run_dir)
                say(f"{plan.name}: finished earlier, skipped ({run_dir / TEST_METRICS})")
                continue
            if self.train_run(plan) is None:
                say(
                    f"{plan.name}: interrupted; state saved in {run_dir / 'state'}; run the same"
                    " command again to continue"
                )
                return 130
        table = self.summary()
        if is_main_process():
            write_csv_atomic(table, self.root / RUN_SUMMARY)
            say("\n" + format_summary(table))
            key = "test_mAP" if self.multi_label else "test_accuracy"
            vals = pd.to_numeric(table[key].iloc[:-2], errors="coerce")  # runs, not mean / std
            spread = f" +- {vals.std(ddof=1):.4f}" if len(vals) > 1 else ""
            say(f"\n{key[5:]}: {vals.mean():.4f}{spread} over {len(vals)} run(s)")
            say(f"runs: {self.root}/<run>/ (test_metrics.json, confusion.png, curves.png, best/)")
            say(f"summary: {self.root / RUN_SUMMARY}")
            for name, n in self.skipped_per_run.items():
                say(
                    f"{name}: skipped {n} unreadable file(s), reasons in"
                    f" {self.root / name / 'skipped.csv'}"
                )
        return 0

    def train_run(self, plan: RunPlan) -> dict[str, Any] | None:
        """Train (or resume) one run, then write its test metrics and plots. None if interrupted."""
        cfg = self.cfg
        run_dir = self.root / plan.name
        max_steps, eval_every, save_every, log_every = self.steps(plan)
        train_ds, val_ds, groups = self.datasets(plan)
        best = None
        if val_ds is not None and cfg.best_metric:
            best = cfg.best_metric
            if best == "auto":
                best = "eval/mAP" if self.multi_label else "eval/accuracy"
        loop = TrainConfig.for_run(
            cfg,
            out_dir=run_dir,
            seed=plan.seed,
            max_steps=max_steps,
            warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else max_steps // 10,
            eval_every=eval_every if val_ds is not None else 0,
            save_every=save_every,
            log_every=log_every,
            best_metric=best,
            early_stopping=cfg.early_stopping if best else 0,
        )
        run_config = {
            "command": self.command,
            "options": to_dict(cfg),
            "run": {
                "name": plan.name,
                "seed": plan.seed,
                "fold": plan.fold,
                "n_train": len(train_ds),
                "n_val_clips": len(plan.val),
                "n_test_clips": len(plan.test),
                "manifest": str(self.manifest.resolve()),
                "feature_cache": str(self.cache.root) if self.cache is not None else None,
                "stats_file": str(self.stats_file) if self.stats_file else None,
                "class_names": self.class_names,
                "multi_label": self.multi_label,
                "frontend": to_dict(self.frontend),
            },
            "provenance": {
                "seeds": {"seed": plan.seed, "split_seed": cfg.split_seed},
                "data": self.data_fingerprint(),
            },
        }
        model = self.build_model(plan.seed)
        trainer = Trainer(
            loop,
            model,
            self.task(plan, groups),
            train_ds,
            val_ds,
            collate_fn=collate_batch,
            optimizer=self.param_groups(model) if self.param_groups else None,
            run_config=run_config,
            identity=self._identity_extra,
            sample_weights=self.sample_weights(train_ds),
        )
        say(f"\n== {plan.name}: {len(train_ds)} training items, {max_steps} steps -> {run_dir}")
        summary = trainer.fit()
        self._record_skips(plan, (train_ds, val_ds), summary, trainer.accelerator)
        if summary["status"] != "completed":
            return None
        record = self.write_artifacts(plan, summary, trainer.accelerator)
        test_skipped = record.pop("test_skipped", None)
        if test_skipped:  # unreadable test files: listed with the others, left out of the metrics
            self._record_skips(plan, (), summary, trainer.accelerator, extra=test_skipped)
        return record

    def _check_same_data(self, run_dir: Path) -> None:
        """A finished run is reused only for the data it was trained on: ConfigError when the
        manifest's content changed since (its results would be reported for other data)."""
        cfg = read_json_object(run_dir / "config.json") or {}
        old = ((cfg.get("provenance") or {}).get("training") or {}).get("data") or {}
        new = self.data_fingerprint()
        if old.get("sha256") and new.get("sha256") and old["sha256"] != new["sha256"]:
            raise ConfigError(
                f"{run_dir} is a finished run on other data ({old.get('path')}, "
                f"{old.get('rows')} rows; now {new.get('path')}, {new.get('rows')} rows, content "
                "changed): its results would be reported for this manifest; choose another --out"
            )

    def data_fingerprint(self) -> dict[str, Any]:
        """The manifest's rows, total duration and sha256 (computed once)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = runinfo.data_fingerprint(self.manifest, self.df)
        return self._fingerprint

    def write_artifacts(
        self, plan: RunPlan, summary: dict[str, Any], accelerator: Any
    ) -> dict[str, Any]:
        """Test metrics of the best model, predictions, confusion, curves, report.md."""
        return write_run_artifacts(self, plan, summary, accelerator)

    def summary(self) -> pd.DataFrame:
        """One row per run, then mean and std rows (see `artifacts.run_summary`)."""
        return run_summary(self)

    # ---- sanity check

    def sanity_overfit(self) -> int:
        """Memorise one fixed batch (no augmentation) through the Trainer: a quick check that
        data, labels, model, loss and optimiser fit together. 0 when the batch is learnt within
        --sanity_steps, else 1. Writes RUN_ROOT/sanity_overfit/ (history.csv, result.json)."""
        cfg = self.cfg
        plan = self.plans[0]
        train_ds, _, _ = self.datasets(plan, augment=False)
        order = np.random.default_rng(plan.seed).permutation(len(train_ds))
        items = []
        for i in order:
            item = train_ds[int(i)]
            if self.multi_label or int(item["target"]) >= 0:
                items.append(item)
            if len(items) == cfg.batch_size:
                break
        out = self.root / "sanity_overfit"
        runlog.attach(self.root / "log.txt")
        metric = "eval/subset_accuracy" if self.multi_label else "eval/accuracy"
        loop = TrainConfig.for_run(
            cfg,
            out_dir=out / "run",
            seed=plan.seed,
            max_steps=cfg.sanity_steps,
            batch_size=len(items),
            grad_accum=1,
            weight_decay=0.0,
            warmup_steps=0,
            min_lr_ratio=1.0,  # constant learning rate: the check is about fitting, not schedules
            shuffle=False,
            num_workers=0,
            eval_every=1,
            save_every=0,
            log_every=1,
            best_metric=metric,
            stop_at=1.0,
            resume=None,
            report_to="none",
        )
        if is_main_process() and out.exists():
            import shutil

            shutil.rmtree(out)  # our own previous check
        model = self.build_model(plan.seed)
        task = ClassificationTask(self.class_names, self.multi_label, seed=plan.seed)
        trainer = Trainer(
            loop, model, task, _Items(items), _Items(items), collate_fn=collate_batch,
            run_config={"command": self.command, "sanity_overfit": True},
        )  # fmt: skip
        summary = trainer.fit()
        history = pd.read_csv(out / "run" / "metrics.csv")
        history = history.rename(columns={metric: "batch_accuracy"})
        last = history.iloc[-1]
        solved = summary["best"] is not None and summary["best"]["value"] >= 1.0
        result = {
            "passed": bool(solved),
            "steps": int(summary["steps"]),
            "batch": len(items),
            "final_loss": float(last["loss"]),
            "final_batch_accuracy": float(last["batch_accuracy"]),
            "lr": cfg.lr,
            "seconds": summary["train_time_s"],
        }
        if is_main_process():
            cols = [c for c in ("step", "loss", "batch_accuracy") if c in history.columns]
            write_csv_atomic(history[cols], out / "history.csv")
            save_json_atomic(out / "result.json", result)
        what = self.name
        if solved:
            say(
                f"sanity check passed: {what} memorised a batch of {len(items)} clips in"
                f" {result['steps']} steps (loss {result['final_loss']:.4g}); details in {out}"
            )
            return 0
        say(
            f"sanity check FAILED: {what} reached {result['final_batch_accuracy']:.1%} on one"
            f" fixed batch of {len(items)} clips after {result['steps']} steps (loss"
            f" {result['final_loss']:.4g}); check labels, --lr, features; details in {out}"
        )
        return 1


class _Items(torch.utils.data.Dataset):
    """A fixed list of dataset items."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


__all__ = [
    "Experiment",
    "ExperimentOptions",
    "LoopOptions",
    "RunPlan",
    "format_summary",
    "is_finished",
    "read_history",
]
