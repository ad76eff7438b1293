"""A grid PNG of spectrograms: up to N seeded random clips per class (one row per class), captioned
with the file name and start time, to check data and labels by eye before training.

An unlabelled manifest gives one row of N random clips; rows of a labelled manifest without a
label get a "(no label)" row. Features are the un-normalised frontend output (low frequencies at
the bottom); a clip shorter than --seconds is shown with a blank tail.

Examples:
  bioaudio preview data/manifest.csv
  bioaudio preview data/manifest.csv --n 6 --classes owl,wren --frontend beats_fbank --out owls.png
"""

from __future__ import annotations

import argparse
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from bioaudio.config import add_options, config_from_args
from bioaudio.data.datasets import AudioDataset
from bioaudio.data.frontend import (
    FrontendKind,
    FrontendOptions,
    build_frontend,
)
from bioaudio.data.manifest import class_names_of, read_manifest, split_labels
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.fileio import check_writable

UNLABELLED = "(unlabelled)"
NO_LABEL = "(no label)"


@dataclass
class PreviewConfig(FrontendOptions):
    """Options of `bioaudio preview`."""

    n: int = field(default=4, metadata={"help": "clips per class (columns of the grid)"})
    classes: list[str] | None = field(
        default=None, metadata={"help": "comma-separated classes to show; unset: all"}
    )
    max_classes: int = field(
        default=30,
        metadata={
            "help": "at most this many classes (rows), most frequent first, unless --classes"
        },
    )
    seconds: float = field(default=5.0, metadata={"help": "seconds shown per clip"})
    crop: Literal["start", "center", "random"] = field(
        default="start", metadata={"help": "which part of a longer clip to show"}
    )
    seed: int = field(default=0, metadata={"help": "random seed of the clip choice (and crops)"})
    out: Path = field(default=Path("preview.png"), metadata={"help": "PNG to write"})
    frontend: FrontendKind = field(
        default="logmel", metadata={"help": "logmel | beats_fbank | eat_fbank | stft | mfcc"}
    )

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")
        if self.max_classes < 1:
            raise ConfigError(f"--max_classes must be >= 1, got {self.max_classes}")
        if not self.seconds > 0:
            raise ConfigError(f"--seconds must be > 0, got {self.seconds}")
        if self.out.suffix.lower() != ".png":
            raise ConfigError(f"--out {self.out}: the preview is a PNG; name it *.png")
        self.validate_frontend()


@dataclass
class PreviewResult:
    """What `make_preview` drew: per row, the dataset rows shown; plus notes for the terminal."""

    path: Path
    shown: dict[str, list[int]]
    notes: list[str]


def class_rows(df: pd.DataFrame, cfg: PreviewConfig) -> dict[str, np.ndarray]:
    """Grid row name -> candidate manifest rows (classes, then the unlabelled rows)."""
    labels = [split_labels(v) for v in df["labels"]]
    names = class_names_of(df)
    if cfg.classes:
        unknown = [c for c in cfg.classes if c not in names]
        if unknown:
            known = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ConfigError(
                f"--classes: {', '.join(unknown)} not in the manifest"
                + (f" (classes: {known})" if names else " (it has no labels)")
            )
        names = list(dict.fromkeys(cfg.classes))
    groups = {n: np.array([i for i, lab in enumerate(labels) if n in lab]) for n in names}
    if not cfg.classes:
        if len(groups) > cfg.max_classes:  # most frequent first; ties by name
            keep = sorted(groups, key=lambda n: (-len(groups[n]), n))[: cfg.max_classes]
            groups = {n: groups[n] for n in names if n in keep}
        empty = np.array([i for i, lab in enumerate(labels) if not lab])
        if len(empty):
            groups[NO_LABEL if names else UNLABELLED] = empty
    return groups


def make_preview(df: pd.DataFrame, cfg: PreviewConfig, progress: bool = True) -> PreviewResult:
    """Pick up to `cfg.n` readable clips per class (seeded), featurise them, draw the grid."""
    from tqdm.auto import tqdm

    from bioaudio.inference.plots import plot_spectrogram_grid

    cfg.validate()
    fcfg = cfg.frontend_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = AudioDataset(
            df,
            class_names=[],
            sample_rate=fcfg.sample_rate,
            clip_seconds=cfg.seconds,
            train=cfg.crop == "random",
            seed=cfg.seed,
            min_seconds=0.0,
            eval_crop="center" if cfg.crop == "center" else "start",
        )
    groups = class_rows(ds.df, cfg)
    total_classes = len(class_names_of(ds.df))
    frontend = build_frontend(fcfg)
    n_clip = int(round(cfg.seconds * fcfg.sample_rate))
    try:
        with torch.no_grad():  # frames of a full-length clip: every panel gets the same time axis
            full_frames = frontend.raw(torch.zeros(1, n_clip))[0].shape[1]
    except RuntimeError as e:
        raise ConfigError(f"--seconds {cfg.seconds:g} is too short for {cfg.frontend}") from e
    if full_frames == 0:
        raise ConfigError(f"--seconds {cfg.seconds:g} is shorter than one {cfg.frontend} frame")
    grid: dict[str, list[tuple[np.ndarray, str]]] = {}
    shown: dict[str, list[int]] = {}
    notes: list[str] = []
    bad = 0
    bar = tqdm(total=sum(min(cfg.n, len(r)) for r in groups.values()), desc="preview",
               unit="clip", disable=not progress)  # fmt: skip
    for name, rows in groups.items():
        # one generator per class name: a class's clips do not change with --classes
        rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
        panels, used = [], []
        for i in rng.permutation(rows):
            if len(panels) == cfg.n:
                break
            try:
                item = ds[int(i)]
            except AudioDecodeError as e:
                bad += 1
                notes.append(f"skipped {e}")
                continue
            try:
                with torch.no_grad():
                    feats, _ = frontend.raw(item["wav"][None], item["padding_mask"][None])
                valid = feats[0].numpy()[:full_frames]
            except RuntimeError:  # a clip shorter than the STFT's padding: nothing to draw
                valid = np.zeros((0, fcfg.n_features), dtype=np.float32)
            x = np.full((full_frames, fcfg.n_features), np.nan, dtype=np.float32)
            x[: valid.shape[0]] = valid  # NaN tail: drawn blank where the clip has no audio
            name_ = Path(item["path"]).name
            name_ = name_ if len(name_) <= 30 else name_[:13] + "..." + name_[-14:]
            empty = " (too short)" if valid.shape[0] == 0 else ""
            panels.append((x, f"{name_} @ {item['start']:.1f} s{empty}"))
            used.append(int(i))
            bar.update(1)
        if len(panels) < cfg.n:
            notes.append(f"{name}: {len(panels)} clip(s), fewer than --n {cfg.n}")
        if panels:
            grid[name] = panels
            shown[name] = used
    bar.close()
    if not grid:
        raise DataError(f"no readable clips to preview ({bad} unreadable)")
    if not cfg.classes and total_classes > cfg.max_classes:
        notes.append(
            f"showing the {cfg.max_classes} most frequent of {total_classes} classes"
            " (choose others with --classes)"
        )
    path = plot_spectrogram_grid(grid, cfg.out, frame_rate=fcfg.frame_rate)
    return PreviewResult(path=path, shown=shown, notes=notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="manifest CSV (from `bioaudio prepare`)")
    add_options(parser, PreviewConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PreviewConfig, args)
    cfg.validate()
    check_writable(cfg.out)
    df = read_manifest(args.manifest)
    result = make_preview(df, cfg)
    for note in result.notes:
        print(f"note: {note}")
    rows = len(result.shown)
    clips = sum(len(v) for v in result.shown.values())
    print(f"{clips} clip(s) in {rows} row(s), {cfg.frontend} features, {cfg.seconds:g} s each")
    print(f"wrote {result.path}")
    return 0
