"""Pretraining data: unlabelled audio (a folder or a manifest) cut into segments, optional
positive / negative folders for the contrastive term, optional labelled clips for the supervised
term, and a second augmented view of every clip.

Every source becomes manifest rows. Rows longer than `segment_duration` are cut into windows of
that length (read by seeking, never decoded whole: hours-long recordings are fine); each window is
an item, and shorter rows are padded. Clips shorter than one 16-frame patch are dropped and
counted. `pair_group` is 0 for clips of the positive folder (they are positives of each other in
the memory-bank term), -1 for everything else (negatives included: only ever negatives).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from bioaudio.data.augment import WaveAugment, WaveAugmentConfig
from bioaudio.data.datasets import AudioDataset, segment_windows
from bioaudio.data.manifest import PrepareConfig, build_manifest, read_manifest, split_labels
from bioaudio.errors import ConfigError, DataError

# One 16 x 16 patch needs 16 fbank frames: 25 ms + 15 x 10 ms of audio.
MIN_PATCH_SECONDS = 0.175
PAIR_POSITIVE, PAIR_NONE = 0, -1


def view2_defaults() -> WaveAugmentConfig:
    """The second view's waveform augmentations: time roll, gain and noise, each likely."""
    return WaveAugmentConfig(
        roll_p=0.8, roll_max=0.3, gain_p=0.8, gain_db=(-6.0, 6.0), noise_p=0.5,
        noise_snr_db=(10.0, 30.0),
    )  # fmt: skip


@dataclass
class PretrainDataConfig:
    """Where the pretraining audio comes from and how it is cut."""

    segment_duration: float = field(
        default=5.0, metadata={"help": "seconds per training clip (random crops / windows)"}
    )
    positive_dir: Path | None = field(
        default=None,
        metadata={"help": "folder of clips that are positives of each other (contrastive term)"},
    )
    negative_dir: Path | None = field(
        default=None, metadata={"help": "folder of clips that are only ever negatives"}
    )
    labeled_dir: Path | None = field(
        default=None,
        metadata={"help": "labelled clips (any labelled layout) for the supervised term"},
    )
    view2: WaveAugmentConfig = field(default_factory=view2_defaults)

    def validate(self) -> None:
        if not self.segment_duration >= MIN_PATCH_SECONDS:
            raise ConfigError(
                f"--segment_duration must be at least {MIN_PATCH_SECONDS} s (one 16-frame "
                f"patch), got {self.segment_duration}"
            )


@dataclass
class PretrainData:
    """The resolved pretraining table and what happened while building it."""

    table: pd.DataFrame  # manifest rows (windows) + pair_group
    class_names: list[str]
    multi_label: bool
    skipped: pd.DataFrame  # path, reason
    notes: list[str]

    @property
    def hours(self) -> float:
        return float((self.table["end"] - self.table["start"]).sum() / 3600)


def _scan(root: Path, labels: str, what: str, skipped: list[pd.DataFrame]) -> pd.DataFrame:
    if not root.exists():
        raise DataError(f"{what} {root}: no such folder or manifest")
    if root.is_file():
        return read_manifest(root)
    cfg = PrepareConfig(labels=labels, progress=False)  # type: ignore[arg-type]
    result = build_manifest(root, cfg)
    if len(result.skipped):
        skipped.append(result.skipped)
    if len(result.manifest) == 0:
        raise DataError(f"{what} {root}: no usable audio ({len(result.skipped)} file(s) skipped)")
    return result.manifest


def build_pretraining_data(source: Path, cfg: PretrainDataConfig) -> PretrainData:
    """Rows of every source, cut into segments (see the module docstring)."""
    cfg.validate()
    skipped: list[pd.DataFrame] = []
    notes: list[str] = []
    main = _scan(Path(source), "none", "data", skipped)
    main = main.assign(pair_group=PAIR_NONE)
    if "source" in main.columns and (main["source"] == "pairs").any():
        # a manifest in the pairs layout: its positive/ rows form one group
        is_pos = main["labels"].map(lambda v: "positive" in split_labels(v))
        main.loc[is_pos.to_numpy(), "pair_group"] = PAIR_POSITIVE
        main.loc[main["source"] == "pairs", "labels"] = ""
        notes.append(f"pairs layout: {int(is_pos.sum())} positive clip(s)")
    parts = [main]
    for folder, group, what in (
        (cfg.positive_dir, PAIR_POSITIVE, "--positive_dir"),
        (cfg.negative_dir, PAIR_NONE, "--negative_dir"),
    ):
        if folder is not None:
            df = _scan(Path(folder), "none", what, skipped).assign(pair_group=group, labels="")
            parts.append(df)
            notes.append(f"{what}: {len(df)} clip(s)")
    labelled_rows = 0
    if cfg.labeled_dir is not None:
        df = _scan(Path(cfg.labeled_dir), "auto", "--labeled_dir", skipped)
        df = df.assign(pair_group=PAIR_NONE)
        labelled_rows = int(df["labels"].map(lambda v: bool(split_labels(v))).sum())
        if labelled_rows == 0:
            raise DataError(f"--labeled_dir {cfg.labeled_dir}: no labelled clips found")
        parts.append(df)
    table = pd.concat(parts, ignore_index=True)
    if cfg.labeled_dir is None and "labels" in table:
        # without a supervised source the main data's labels (if any) are not used
        labelled_rows = int(table["labels"].map(lambda v: bool(split_labels(v))).sum())
    names = sorted({n for v in table["labels"] for n in split_labels(v)})
    multi = bool(table["labels"].map(lambda v: len(split_labels(v)) > 1).any())
    seg = cfg.segment_duration
    long_rows = (table["end"] - table["start"]) > seg
    if long_rows.any():
        windows = segment_windows(table[long_rows], seg, seg)
        table = pd.concat([table[~long_rows], windows], ignore_index=True)
        notes.append(f"{int(long_rows.sum())} long recording(s) cut into {len(windows)} segments")
    short = (table["end"] - table["start"]) < MIN_PATCH_SECONDS
    if short.any():
        notes.append(
            f"{int(short.sum())} clip(s) shorter than one patch ({MIN_PATCH_SECONDS} s) left out"
        )
        skipped.append(
            pd.DataFrame(
                {"path": table.loc[short, "path"], "reason": "shorter than one 16-frame patch"}
            )
        )
        table = table[~short].reset_index(drop=True)
    if len(table) == 0:
        raise DataError(
            f"{source}: nothing to pretrain on: every clip is shorter than one 16-frame patch "
            f"({MIN_PATCH_SECONDS} s)"
        )
    cols = ["path", "sample_rate", "frames", "duration", "channels", "start", "end", "labels",
            "recording", "pair_group"]  # fmt: skip
    table = table[[c for c in cols if c in table.columns]].reset_index(drop=True)
    if labelled_rows:
        notes.append(f"{labelled_rows} labelled clip(s), {len(names)} class(es)")
    skipped_df = (
        pd.concat(skipped, ignore_index=True)
        if skipped
        else pd.DataFrame(columns=["path", "reason"])
    )
    return PretrainData(table, names if labelled_rows else [], multi, skipped_df, notes)


class PretrainDataset(Dataset):
    """Items of the pretraining table: the clip (a random crop of `segment_duration` for longer
    rows), its `pair_group`, the class target when labelled (-100 / zeros otherwise), and with
    `view2` a second augmented view `wav2` of the same samples (same length and padding)."""

    def __init__(
        self,
        data: PretrainData,
        segment_duration: float,
        sample_rate: int,
        seed: int = 0,
        view2: WaveAugmentConfig | None = None,
        skip_errors: bool = True,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # short rows were removed already
            self.clips = AudioDataset(
                data.table,
                class_names=data.class_names,
                multi_label=data.multi_label if data.class_names else None,
                sample_rate=sample_rate,
                clip_seconds=segment_duration,
                train=True,
                seed=seed,
                min_seconds=MIN_PATCH_SECONDS,
                skip_errors=skip_errors,
            )
        self.groups = data.table["pair_group"].to_numpy(dtype=np.int64)
        self.view2 = None
        if view2 is not None:
            self.view2 = WaveAugment(
                WaveAugmentConfig(**{**view2.__dict__, "sample_rate": sample_rate})
            )
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    @property
    def n_skipped(self) -> int:
        return self.clips.n_skipped

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.clips[index]
        item["pair_group"] = int(self.groups[item["index"]])
        if self.view2 is not None:
            wav, pad = item["wav"], item["padding_mask"]
            n = int((~pad).sum())
            # Seeded by (seed, epoch, index) like the crop, so resumed runs draw the same view.
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.clips.epoch, index, 7])
            x = self.view2(wav[:n].numpy(), rng)
            wav2 = torch.zeros_like(wav)
            wav2[:n] = torch.from_numpy(np.asarray(x[:n], dtype=np.float32))
            item["wav2"] = wav2
        return item
