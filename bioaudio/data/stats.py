"""Feature normalisation statistics: compute them over a manifest sample, save, load, apply.

`bioaudio stats` writes `stats.json` beside the manifest; training commands take `--stats PATH`
or pick up that file next to their training manifest (`resolve_stats`) and write the values into
the run's resolved FrontendConfig, whose normalisation is (x - mean) / (2 * std) as in the
official BEATs / EAT code. The statistics are one scalar mean and one population std over every
valid (non-padding) frame and bin of the un-normalised features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bioaudio.data.datasets import AudioDataset
from bioaudio.data.frontend import (
    FrontendConfig,
    FrontendOptions,
    build_frontend,
)
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.fileio import guard_output, save_json_atomic

STATS_FILE = "stats.json"


@dataclass
class StatsConfig(FrontendOptions):
    """Options of `bioaudio stats`."""

    max_clips: int = field(default=500, metadata={"help": "rows sampled from the manifest"})
    max_seconds: float | None = field(
        default=10.0,
        metadata={"help": "seconds read per clip (seeded random crop of longer ones; none: all)"},
    )
    seed: int = field(default=0, metadata={"help": "random seed of the sample and crops"})
    out: Path | None = field(
        default=None, metadata={"help": f"output JSON; unset: {STATS_FILE} beside MANIFEST"}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace --out even when it is not a stats file written by bioaudio"},
    )

    def validate(self) -> None:
        if self.max_clips < 1:
            raise ConfigError(f"--max_clips must be at least 1, got {self.max_clips}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"--max_seconds must be positive, got {self.max_seconds}")
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        self.validate_frontend()


class _ClipMoments(Dataset):
    """Per clip (count, mean, M2) of its valid feature values, computed inside the worker."""

    def __init__(self, clips: AudioDataset, cfg: FrontendConfig):
        self.clips = clips
        self.cfg = cfg
        self.frontend: torch.nn.Module | None = None  # built lazily, once per worker

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[int, int, float, float, str | None]:
        try:
            item = self.clips[i]
        except AudioDecodeError as e:
            return 0, 0, 0.0, 0.0, str(e)
        if self.frontend is None:
            self.frontend = build_frontend(self.cfg)
        with torch.no_grad():
            feats, frame_mask = self.frontend.raw(item["wav"][None], item["padding_mask"][None])
        valid = feats[0] if frame_mask is None else feats[0][~frame_mask[0]]  # (T_valid, F)
        if valid.numel() == 0:
            return 0, 0, 0.0, 0.0, None
        x = valid.double()
        mean = float(x.mean())
        return int(valid.shape[0]), int(x.numel()), mean, float(((x - mean) ** 2).sum()), None


def _as_is(x: Any) -> Any:
    return x  # a module-level function: picklable for spawned workers, unlike a lambda


def _combine(
    acc: tuple[int, float, float], n: int, mean: float, m2: float
) -> tuple[int, float, float]:
    """Chan et al.'s pairwise update of (count, mean, M2): stable over millions of frames."""
    na, ma, m2a = acc
    if n == 0:
        return acc
    total = na + n
    delta = mean - ma
    return total, ma + delta * n / total, m2a + m2 + delta * delta * na * n / total


def compute_stats(
    df: pd.DataFrame,
    cfg: StatsConfig | None = None,
    manifest: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean and std of un-normalised features over a seeded sample of `df`'s rows.

    Rows are sampled without replacement (all rows when there are at most `max_clips`); each is
    read as a seeded random crop of at most `max_seconds`; padded frames are ignored. Unreadable
    files are skipped with a warning and counted in `skipped`. Returns the JSON-ready record.
    """
    cfg = cfg or StatsConfig()
    cfg.validate()
    rng = np.random.default_rng(int(cfg.seed) % 2**32)
    rows = np.arange(len(df))
    if len(df) > cfg.max_clips:
        rows = np.sort(rng.choice(len(df), size=cfg.max_clips, replace=False))
    fcfg = cfg.frontend_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the short-segment note: counted below
        clips = AudioDataset(
            df.iloc[rows].reset_index(drop=True),
            class_names=[],
            sample_rate=fcfg.sample_rate,
            clip_seconds=cfg.max_seconds,
            train=True,  # seeded random crops of long segments, not always their first seconds
            seed=cfg.seed,
            min_seconds=0.0,
        )
    loader = DataLoader(
        _ClipMoments(clips, fcfg),
        batch_size=None,
        num_workers=cfg.num_workers,
        collate_fn=_as_is,
    )
    acc, n_clips, n_frames, skipped = (0, 0.0, 0.0), 0, 0, []
    for frames, count, mean, m2, error in tqdm(
        loader, total=len(clips), desc=f"{cfg.frontend} stats", unit="clip", disable=not progress
    ):
        if error is not None:
            skipped.append(error)
            warnings.warn(f"skipping unreadable audio: {error}", stacklevel=2)
            continue
        if frames:
            acc = _combine(acc, count, mean, m2)
            n_clips += 1
            n_frames += frames
    if acc[0] == 0:
        raise DataError(
            f"no feature frames from {len(clips)} sampled clips"
            f"{f' ({len(skipped)} unreadable)' if skipped else ''}; are the clips shorter than"
            " one 25 ms frame?"
        )
    std = math.sqrt(acc[2] / acc[0])
    return {
        "frontend": cfg.frontend,
        "mean": acc[1],
        "std": std,
        "n_clips": n_clips,
        "n_frames": n_frames,
        "manifest": str(Path(manifest).resolve()) if manifest is not None else None,
        "skipped": len(skipped),
        "seed": cfg.seed,
        "max_clips": cfg.max_clips,
        "max_seconds": cfg.max_seconds,
        "frontend_config": dataclasses.asdict(fcfg),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def default_stats_path(manifest_path: str | Path) -> Path:
    """Where `bioaudio stats` writes by default and training looks: stats.json beside it."""
    return Path(manifest_path).resolve().parent / STATS_FILE


def save_stats(record: dict[str, Any], path: str | Path) -> Path:
    """Write a stats record atomically (temporary file + rename)."""
    save_json_atomic(path, record)
    return Path(path)


def is_stats_file(path: str | Path) -> bool:
    """True for a JSON object with a stats file's keys (what `save_stats` writes)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"frontend", "mean", "std"} <= set(data)


def guard_stats_output(
    path: str | Path, inputs: tuple[str | Path, ...] = (), overwrite: bool = False
) -> Path:
    """Refuse to write statistics over audio, the input or a file that is not a stats file."""
    return guard_output(
        path, what="stats file", ours=is_stats_file, inputs=inputs, overwrite=overwrite
    )


def find_stats_for(manifest_path: str | Path) -> Path | None:
    """The stats.json beside a manifest, when there is one."""
    p = default_stats_path(manifest_path)
    return p if p.is_file() else None


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"stats file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"stats file {p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"stats file {p} must hold a JSON object")
    missing = [k for k in ("frontend", "mean", "std") if k not in data]
    if missing:
        raise ConfigError(f"stats file {p} lacks {', '.join(missing)}")
    try:
        mean, std = float(data["mean"]), float(data["std"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"stats file {p}: mean and std must be numbers") from e
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ConfigError(
            f"stats file {p}: need a finite mean and a positive std, got {mean}, {std}"
        )
    data["mean"], data["std"] = mean, std
    return data


def load_stats(path: str | Path) -> tuple[str, float, float]:
    """(frontend kind, mean, std) from a stats file; ConfigError when it is unusable."""
    data = _read(path)
    return str(data["frontend"]), data["mean"], data["std"]


def apply_stats(cfg: FrontendConfig, path: str | Path) -> FrontendConfig:
    """A copy of `cfg` normalised with the stats file's mean and std.

    The file must describe the same features: same kind, and (when it records them) the same
    sample rate and mel / MFCC / FFT settings.
    """
    data = _read(path)
    if data["frontend"] != cfg.kind:
        raise ConfigError(
            f"stats file {path} was computed for {data['frontend']} features but the frontend is"
            f" {cfg.kind}; recompute with `bioaudio stats --frontend {cfg.kind}`"
        )
    recorded = data.get("frontend_config") or {}
    keys = ["sample_rate", "n_mels"]
    if cfg.kind in ("logmel", "stft", "mfcc"):
        keys += ["n_fft", "hop_length"] + (["n_mfcc"] if cfg.kind == "mfcc" else [])
    for key in keys:
        if key in recorded and recorded[key] != getattr(cfg, key):
            raise ConfigError(
                f"stats file {path} was computed with {key}={recorded[key]} but the frontend"
                f" uses {key}={getattr(cfg, key)}; recompute with `bioaudio stats`"
            )
    return dataclasses.replace(cfg, mean=data["mean"], std=data["std"])


def resolve_stats(
    cfg: FrontendConfig,
    stats_path: str | Path | None = None,
    manifest_path: str | Path | None = None,
) -> tuple[FrontendConfig, Path | None]:
    """For training commands: `--stats PATH` when given (errors are fatal), else stats.json next
    to the training manifest when present and matching (a mismatch only warns), else `cfg`.

    Returns the frontend config to store in the run and the stats file used (or None).
    """
    if stats_path is not None:
        return apply_stats(cfg, stats_path), Path(stats_path)
    found = find_stats_for(manifest_path) if manifest_path is not None else None
    if found is None:
        return cfg, None
    try:
        return apply_stats(cfg, found), found
    except ConfigError as e:
        warnings.warn(f"ignoring {found}: {e}", stacklevel=2)
        return cfg, None
