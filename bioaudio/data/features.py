"""Feature cache: frontend features computed once, read by `FeatureDataset` instead of audio.

`build_cache` (the `bioaudio features` command) runs the frontend over every manifest row (or
every window of `segment_windows`) and stores the UN-normalised features of each item, so one
cache serves any normalisation statistics. Layout of a cache directory:

    cache.json      frontend config, manifest path + SHA-256 of its bytes, window / hop, format,
                    counts, creating version. Written last: a directory without it is not a cache.
    metadata.csv    one row per item: the manifest columns (path, start, end, labels,
                    recording, ...) plus manifest_row, n_frames and `file` (npz) or `offset`
    skipped.csv     rows that could not be read, with the reason
    clips/NNNN/*.npz   format npz: one file per item holding `spectrogram` (T, F) float32, as
                    the seed projects stored them
    features.f32    format memmap: every item's frames back to back, float32 (total_frames, F);
                    item i is rows offset[i] : offset[i] + n_frames[i] (read with np.memmap)

The cache is built in a temporary directory renamed into place at the end, so a crash never
leaves a half cache that looks complete.

What a cache cannot do (the trade-off for skipping feature extraction, ~16 % of a small model's
step): waveform augmentations (gain, time roll, background noise) cannot apply to cached
features; SpecAugment and mixup still can, they act on feature batches. A random crop of cached
frames equals the features of the cropped waveform for the Kaldi fbanks (BEATs, EAT) only when
the crop starts on a 10 ms hop boundary (frame k covers samples [160 k, 160 k + 400) at 16 kHz):
then BEATs' frames are identical, and EAT's agree to float rounding (its clip-mean subtraction
is cancelled by Kaldi's per-frame DC removal). The dB frontends (logmel, stft) are relative to
the whole item's maximum and their centred edge frames see audio outside a crop, so crops of
them differ from featurising the cropped audio. Items cached with `--window` are exact for their window.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from bioaudio.config import to_dict
from bioaudio.data.datasets import (
    AudioDataset,
    EpochState,
    EvalCrop,
    _label_indices,
    _SharedEpoch,
    class_target,
    crop_start,
    resolve_classes,
    segment_windows,
)
from bioaudio.data.frontend import (
    FrontendConfig,
    FrontendOptions,
    build_frontend,
)
from bioaudio.data.manifest import read_manifest
from bioaudio.data.stats import apply_stats, resolve_stats
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.fileio import (
    check_writable,
    replace_dir,
    save_json_atomic,
    temp_dir_beside,
)
from bioaudio.runinfo import bioaudio_version, sha256_file

__all__ = [
    "CACHE_FILE",
    "FeatureCache",
    "FeatureDataset",
    "FeaturesConfig",
    "build_cache",
    "cache_mismatch",
    "default_cache_dir",
    "find_cache",
    "frames_for_seconds",
    "manifest_fingerprint",
    "open_cache",
]

CACHE_FILE = "cache.json"
METADATA_FILE = "metadata.csv"
SKIPPED_FILE = "skipped.csv"
MEMMAP_FILE = "features.f32"
CACHE_VERSION = 1
FILES_PER_FOLDER = 1000  # npz files per sub-folder: no directory of a million entries
CacheFormat = Literal["npz", "memmap"]

# FrontendConfig fields that change the cached (un-normalised) values, per frontend kind.
# mean / std / pad_to_multiple / target_frames are applied when the cache is read.
_FEATURE_KEYS: dict[str, tuple[str, ...]] = {
    "beats_fbank": ("kind", "sample_rate", "n_mels"),
    "eat_fbank": ("kind", "sample_rate", "n_mels"),
    "logmel": ("kind", "sample_rate", "n_mels", "n_fft", "hop_length", "top_db"),
    "stft": ("kind", "sample_rate", "n_fft", "hop_length", "top_db"),
    "mfcc": ("kind", "sample_rate", "n_mels", "n_fft", "hop_length", "n_mfcc"),
}


# --------------------------------------------------------------------------- config


@dataclass
class FeaturesConfig(FrontendOptions):
    """Options of `bioaudio features` (and of `build_cache`)."""

    out: Path | None = field(
        default=None,
        metadata={"help": "cache directory; unset: features/<manifest>-<frontend> beside it"},
    )
    stats: Path | None = field(
        default=None,
        metadata={
            "help": "normalisation stats recorded as the cache's default (features are stored"
            " un-normalised); unset: stats.json beside MANIFEST when present, else official"
        },
    )
    window: float | None = field(
        default=None,
        metadata={"help": "cache windows of this many seconds instead of whole manifest rows"},
    )
    hop: float | None = field(
        default=None, metadata={"help": "hop between windows in seconds; unset: --window"}
    )
    format: CacheFormat = field(
        default="memmap",
        metadata={
            "help": "memmap: one float32 array of all frames (fast); npz: one .npz per item"
            " holding `spectrogram` (T, F)"
        },
    )
    num_workers: int | None = field(
        default=None, metadata={"help": "DataLoader worker processes; unset: min(4, CPUs)"}
    )
    force: bool = field(default=False, metadata={"help": "replace an existing cache at --out"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        if self.window is not None and not self.window > 0:
            raise ConfigError(f"--window must be > 0 seconds, got {self.window}")
        if self.hop is not None and self.window is None:
            raise ConfigError("--hop needs --window")
        if self.hop is not None and not self.hop > 0:
            raise ConfigError(f"--hop must be > 0 seconds, got {self.hop}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        self.validate_frontend()

    @property
    def effective_hop(self) -> float | None:
        return None if self.window is None else (self.hop or self.window)


# --------------------------------------------------------------------------- identity


def manifest_fingerprint(path: str | Path) -> str:
    """SHA-256 of the manifest file's bytes: any edit to it invalidates caches made from it."""
    return sha256_file(path)


def _feature_identity(cfg: FrontendConfig | dict[str, Any]) -> dict[str, Any]:
    d = dataclasses.asdict(cfg) if isinstance(cfg, FrontendConfig) else dict(cfg)
    kind = d.get("kind", "")
    return {k: d.get(k) for k in _FEATURE_KEYS.get(kind, ("kind",))}


def default_cache_dir(
    manifest_path: str | Path, kind: str, window: float | None = None, hop: float | None = None
) -> Path:
    """features/<manifest stem>-<kind>[-w<window>-h<hop>] beside the manifest."""
    m = Path(manifest_path).resolve()
    name = f"{m.stem}-{kind}"
    if window is not None:
        name += f"-w{window:g}-h{(hop or window):g}"
    return m.parent / "features" / name


# --------------------------------------------------------------------------- building


class _Featurise(Dataset):
    """Item i -> (i, features (T, F) or None, reason); npz files are written in the worker."""

    def __init__(self, clips: AudioDataset, cfg: FrontendConfig, npz_dir: Path | None):
        self.clips = clips
        # pure per-clip features: frame padding and normalisation are applied when reading
        self.cfg = dataclasses.replace(
            cfg, mean=None, std=None, pad_to_multiple=0, target_frames=None
        )
        self.npz_dir = npz_dir
        self.frontend: torch.nn.Module | None = None  # built lazily, once per worker

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | int | None, str]:
        try:
            item = self.clips[i]
        except AudioDecodeError as e:
            return i, None, e.reason or str(e)
        if self.frontend is None:
            if get_worker_info() is not None:
                torch.set_num_threads(1)  # parallelism comes from the workers: no oversubscription
            self.frontend = build_frontend(self.cfg)
        try:
            with torch.no_grad():
                feats, _ = self.frontend.raw(item["wav"][None])  # (1, T, F)
        except RuntimeError as e:  # e.g. a clip shorter than the STFT's reflect padding
            return i, None, f"{self.cfg.kind} failed: {str(e).splitlines()[0]}"
        x = np.ascontiguousarray(feats[0].numpy(), dtype=np.float32)
        if x.shape[0] == 0:
            return i, None, "shorter than one feature frame"
        if not np.isfinite(x).all():
            return i, None, "non-finite features (corrupt audio?)"
        if self.npz_dir is None:
            return i, x, ""
        p = self.npz_dir / _npz_name(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, spectrogram=x)
        return i, int(x.shape[0]), ""


def _npz_name(i: int) -> str:
    return f"clips/{i // FILES_PER_FOLDER:04d}/{i:08d}.npz"


def _as_is(x: Any) -> Any:
    return x  # module level: picklable for spawned workers, unlike a lambda


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if not force:
        raise ConfigError(f"--out {out} already exists; pass --force to replace it")
    # --force only ever deletes a feature cache or an empty folder, never a user's data
    if not (out / CACHE_FILE).is_file() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} is a non-empty folder that is not a feature cache; refusing to replace it"
        )


def build_cache(
    manifest_path: str | Path, cfg: FeaturesConfig | None = None, out: str | Path | None = None
) -> Path:
    """Compute the un-normalised features of every manifest row (or window) into a cache.

    Returns the cache directory. Unreadable rows are skipped and listed in skipped.csv.
    """
    cfg = cfg or FeaturesConfig()
    cfg.validate()
    manifest_path = Path(manifest_path)
    df = read_manifest(manifest_path)
    fingerprint = manifest_fingerprint(manifest_path)
    fcfg = cfg.frontend_config()
    fcfg, stats_used = resolve_stats(fcfg, cfg.stats, manifest_path)
    hop = cfg.effective_hop
    items = segment_windows(df, cfg.window, hop) if cfg.window is not None else df.copy()
    items = items.reset_index(drop=True)
    items["manifest_row"] = items["segment_index"] if cfg.window is not None else items.index
    out_dir = Path(out or cfg.out or default_cache_dir(manifest_path, fcfg.kind, cfg.window, hop))
    out_dir = out_dir.resolve()
    check_writable(out_dir)
    _check_out(out_dir, cfg.force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)
    try:
        meta = _fill(tmp, items, fcfg, cfg)
        meta.update(
            {
                "manifest": str(manifest_path.resolve()),
                "manifest_sha256": fingerprint,
                "manifest_rows": int(len(df)),
                "stats_file": str(stats_used) if stats_used else None,
            }
        )
        save_json_atomic(tmp / CACHE_FILE, meta)  # last: a folder without it is no cache
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fill(
    tmp: Path, items: pd.DataFrame, fcfg: FrontendConfig, cfg: FeaturesConfig
) -> dict[str, Any]:
    """Write the features, metadata.csv and skipped.csv into `tmp`; return cache.json's body."""
    from tqdm.auto import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clips = AudioDataset(
            items, class_names=[], sample_rate=fcfg.sample_rate, clip_seconds=None, min_seconds=0.0
        )
    if len(clips) != len(items):  # segments with end < start: AudioDataset dropped them
        raise DataError("the manifest has segments whose end is before their start")
    long_items = int(((items["end"] - items["start"]) > 600).sum())
    if long_items and cfg.window is None:
        warnings.warn(
            f"{long_items} item(s) are longer than 10 minutes and are featurised whole;"
            " consider --window",
            stacklevel=3,
        )
    workers = cfg.num_workers if cfg.num_workers is not None else min(4, os.cpu_count() or 1)
    npz = cfg.format == "npz"
    loader = DataLoader(
        _Featurise(clips, fcfg, tmp if npz else None),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
    )
    n_frames = np.zeros(len(items), dtype=np.int64)
    reasons: dict[int, str] = {}
    n_features = fcfg.n_features
    total = 0
    mm = None if npz else open(tmp / MEMMAP_FILE, "wb")
    try:
        bar = tqdm(
            loader,
            total=len(items),
            desc=f"{fcfg.kind} features",
            unit="item",
            disable=not cfg.progress,
        )
        for i, res, reason in bar:
            if res is None:
                reasons[i] = reason
                continue
            if isinstance(res, np.ndarray):  # memmap format: frames come back to be appended
                if res.shape[1] != n_features:
                    raise DataError(f"item {i}: {res.shape[1]} feature bins, expected {n_features}")
                res.tofile(mm)
                res = res.shape[0]
            n_frames[i] = int(res)
            total += int(res)
    finally:
        if mm is not None:
            mm.close()
    ok = np.array([i not in reasons for i in range(len(items))], dtype=bool)
    if not ok.any():
        first = next(iter(reasons.values()), "no items")
        raise DataError(f"no readable items in the manifest (first reason: {first})")
    meta_df = items[ok].copy()
    meta_df["n_frames"] = n_frames[ok]
    if npz:
        meta_df["file"] = [_npz_name(i) for i in np.flatnonzero(ok)]
    else:
        meta_df["offset"] = np.concatenate([[0], np.cumsum(n_frames[ok])[:-1]])
    meta_df.to_csv(tmp / METADATA_FILE, index=False)
    skipped = pd.DataFrame(
        {
            "path": [items["path"].iloc[i] for i in sorted(reasons)],
            "start": [items["start"].iloc[i] for i in sorted(reasons)],
            "end": [items["end"].iloc[i] for i in sorted(reasons)],
            "reason": [reasons[i] for i in sorted(reasons)],
        }
    )
    skipped.to_csv(tmp / SKIPPED_FILE, index=False)
    return {
        "format_version": CACHE_VERSION,
        "created_by": f"bioaudio {bioaudio_version()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": cfg.format,
        "frontend": to_dict(fcfg),
        "frame_rate": fcfg.frame_rate,
        "n_features": n_features,
        "dtype": "float32",
        "window": cfg.window,
        "hop": cfg.effective_hop,
        "n_items": int(ok.sum()),
        "n_skipped": len(reasons),
        "total_frames": int(total),
        "data_file": None if npz else MEMMAP_FILE,
    }


# --------------------------------------------------------------------------- reading


@dataclass
class FeatureCache:
    """An opened, validated cache: its cache.json, its items table and frontend."""

    root: Path
    meta: dict[str, Any]
    items: pd.DataFrame
    frontend: FrontendConfig

    @property
    def format(self) -> str:
        return str(self.meta["format"])

    @property
    def n_features(self) -> int:
        return int(self.meta["n_features"])

    def __len__(self) -> int:
        return len(self.items)


def _corrupt(root: Path, problem: str) -> DataError:
    return DataError(
        f"feature cache {root} is incomplete or corrupt: {problem}; rebuild it with"
        " `bioaudio features MANIFEST --out DIR --force`"
    )


def open_cache(cache_dir: str | Path) -> FeatureCache:
    """Open a cache directory and check that it is complete (DataError when it is not)."""
    from bioaudio.config import from_dict

    root = Path(cache_dir)
    if not root.is_dir():
        raise DataError(f"feature cache not found: {root}")
    cj = root / CACHE_FILE
    if not cj.is_file():
        raise _corrupt(root, f"no {CACHE_FILE}")
    try:
        meta = json.loads(cj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(root, f"{CACHE_FILE} is not valid JSON ({e})") from e
    need = ("format_version", "format", "frontend", "n_items", "n_features", "total_frames")
    missing = [k for k in need if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise _corrupt(root, f"{CACHE_FILE} lacks {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > CACHE_VERSION:
        raise DataError(
            f"feature cache {root} has format version {meta['format_version']}, newer than this"
            " bioaudio reads; upgrade bioaudio or rebuild the cache"
        )
    if meta["format"] not in ("npz", "memmap"):
        raise _corrupt(root, f"unknown format {meta['format']!r}")
    try:
        frontend = from_dict(FrontendConfig, meta["frontend"], where=f"{cj} frontend")
    except ConfigError as e:
        raise _corrupt(root, str(e)) from e
    md = root / METADATA_FILE
    if not md.is_file():
        raise _corrupt(root, f"no {METADATA_FILE}")
    try:
        items = pd.read_csv(
            md, dtype={"labels": str, "recording": str, "source": str, "path": str, "file": str}
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise _corrupt(root, f"cannot parse {METADATA_FILE} ({str(e).splitlines()[0]})") from e
    key = "file" if meta["format"] == "npz" else "offset"
    missing = [c for c in ("path", "start", "end", "n_frames", key) if c not in items.columns]
    if missing:
        raise _corrupt(root, f"{METADATA_FILE} lacks column(s) {', '.join(missing)}")
    if len(items) != int(meta["n_items"]):
        raise _corrupt(
            root, f"{METADATA_FILE} has {len(items)} rows but {CACHE_FILE} says {meta['n_items']}"
        )
    n_frames = items["n_frames"].to_numpy(dtype=np.int64)
    if int(n_frames.sum()) != int(meta["total_frames"]) or (n_frames < 0).any():
        raise _corrupt(root, f"frame counts in {METADATA_FILE} do not add up to total_frames")
    for col in ("labels", "recording", "source"):
        if col in items.columns:
            items[col] = items[col].fillna("")
    if "labels" not in items.columns:
        items["labels"] = ""
    if meta["format"] == "memmap":
        data = root / str(meta.get("data_file") or MEMMAP_FILE)
        want = int(meta["total_frames"]) * int(meta["n_features"]) * 4
        size = data.stat().st_size if data.is_file() else -1
        if size != want:
            got = "missing" if size < 0 else f"{size} bytes"
            raise _corrupt(root, f"{data.name} is {got}, expected {want} bytes")
        offsets = items["offset"].to_numpy(dtype=np.int64)
        if len(items) and (
            offsets[0] != 0 or not np.array_equal(offsets[1:], np.cumsum(n_frames)[:-1])
        ):
            raise _corrupt(root, f"offsets in {METADATA_FILE} are not contiguous")
    elif len(items):
        # a cheap check of the ends; every file is checked again when it is read
        for name in (items["file"].iloc[0], items["file"].iloc[-1]):
            if not (root / name).is_file():
                raise _corrupt(root, f"missing {name}")
    return FeatureCache(root=root, meta=meta, items=items, frontend=frontend)


def _frontend_mismatch(meta: dict[str, Any], frontend_cfg: FrontendConfig) -> str | None:
    want, have = _feature_identity(frontend_cfg), _feature_identity(meta.get("frontend") or {})
    if want == have:
        return None
    diff = [f"{k}={have.get(k)} (need {want.get(k)})" for k in want if want[k] != have.get(k)]
    return "it holds other features: " + ", ".join(diff)


def _meta_mismatch(
    meta: dict[str, Any],
    manifest_path: Path,
    fingerprint: str,
    frontend_cfg: FrontendConfig,
    window: float | None,
    hop: float | None,
) -> str | None:
    if meta.get("manifest_sha256") != fingerprint:
        made = meta.get("manifest") or "another manifest"
        if Path(made) == manifest_path.resolve():
            return f"{manifest_path} has changed since the cache was made"
        return f"it was made from {made}, not from {manifest_path}"
    why = _frontend_mismatch(meta, frontend_cfg)
    if why:
        return why
    want_hop = None if window is None else (hop or window)
    if meta.get("window") != window or meta.get("hop") != want_hop:

        def what(w: float | None, h: float | None) -> str:
            return "whole manifest rows" if w is None else f"{w:g} s windows every {h:g} s"

        return f"it holds {what(meta.get('window'), meta.get('hop'))}, not {what(window, want_hop)}"
    return None


def cache_mismatch(
    cache: FeatureCache,
    manifest_path: str | Path,
    frontend_cfg: FrontendConfig,
    window: float | None = None,
    hop: float | None = None,
) -> str | None:
    """Why `cache` does not hold `frontend_cfg`'s features of `manifest_path`'s rows (or of its
    windows of `window` s every `hop` s); None when it does. Normalisation statistics and frame
    padding do not matter: they are applied when the cache is read."""
    m = Path(manifest_path)
    if not m.is_file():
        return f"manifest not found: {m}"
    return _meta_mismatch(cache.meta, m, manifest_fingerprint(m), frontend_cfg, window, hop)


def find_cache(
    manifest_path: str | Path,
    frontend_cfg: FrontendConfig,
    cache_dir: str | Path | None = None,
    window: float | None = None,
    hop: float | None = None,
) -> Path | None:
    """A cache holding `frontend_cfg`'s features of `manifest_path` (rows or windows), or None.

    With `cache_dir` (the user's `--features DIR`) the cache must match: ConfigError says why
    not. Without it, the caches under features/ beside the manifest are searched and the first
    complete, matching one is returned (caches that do not match are ignored).
    """
    m = Path(manifest_path)
    if cache_dir is not None:
        try:
            cache = open_cache(cache_dir)
        except DataError as e:
            raise ConfigError(f"--features {cache_dir}: {e}") from e
        why = cache_mismatch(cache, m, frontend_cfg, window, hop)
        if why:
            flags = f" --frontend {frontend_cfg.kind}"
            if window is not None:
                flags += f" --window {window:g} --hop {(hop or window):g}"
            raise ConfigError(
                f"--features {cache_dir} cannot be used: {why}; rebuild it with"
                f" `bioaudio features {m}{flags} --out {cache_dir} --force`"
            )
        return Path(cache_dir)
    base = m.resolve().parent / "features"
    if not base.is_dir() or not m.is_file():
        return None
    fingerprint = manifest_fingerprint(m)
    for d in sorted(base.iterdir()):
        try:  # cache.json alone first: opening a cache reads its whole metadata.csv
            meta = json.loads((d / CACHE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        if _meta_mismatch(meta, m, fingerprint, frontend_cfg, window, hop) is not None:
            continue
        try:
            open_cache(d)
        except DataError as e:
            warnings.warn(f"ignoring feature cache {d}: {e}", stacklevel=2)
            continue
        return d
    return None


# --------------------------------------------------------------------------- dataset


def frames_for_seconds(cfg: FrontendConfig, seconds: float) -> int:
    """Feature frames the frontend makes from `seconds` of audio (e.g. `clip_frames` of a clip).

    Kaldi fbank: 25 ms frames every 10 ms, edges snipped; the other frontends centre their
    frames (torch.stft `center=True`): one frame per hop plus one.
    """
    n = int(round(seconds * cfg.sample_rate))
    if cfg.kind in ("beats_fbank", "eat_fbank"):
        size, shift = int(cfg.sample_rate * 0.025), int(cfg.sample_rate * 0.010)
        return 0 if n < size else 1 + (n - size) // shift
    return 0 if n <= 0 else 1 + n // cfg.hop_length


class FeatureDataset(EpochState, Dataset):
    """Map-style dataset over a feature cache; items mirror AudioDataset's with features.

    Items: feats (T, F) float32 (normalised as (x - mean) / (2 * std) unless `normalise=False`),
    frame_mask (T,) bool (True on padding), index, path, start (second of the source file where
    `feats` begins), and target with AudioDataset's conventions (multi-hot float, class index,
    -100 for an unlabelled row of a single-label set; absent without classes).

    `frontend` gives the normalisation, frame padding (`pad_to_multiple`, `target_frames`) and
    must describe the cached features (ConfigError otherwise); default: the cache's own config.
    `stats` (a stats.json) overrides its mean / std. `rows` selects cache items, e.g. one split:
    `np.flatnonzero(open_cache(d).items["split"] == "train")`.
    With `clip_frames`, longer items are cropped (training: random, from (seed, epoch, index);
    evaluation: `eval_crop`) and shorter ones zero-padded with `frame_mask` set.
    """

    def __init__(
        self,
        cache_dir: str | Path | FeatureCache,
        class_names: Sequence[str] | None = None,
        multi_label: bool | None = None,
        clip_frames: int | None = None,
        train: bool = False,
        seed: int = 0,
        frontend: FrontendConfig | None = None,
        stats: str | Path | None = None,
        normalise: bool = True,
        eval_crop: EvalCrop = "start",
        rows: Sequence[int] | np.ndarray | None = None,
    ):
        cache = cache_dir if isinstance(cache_dir, FeatureCache) else open_cache(cache_dir)
        if clip_frames is not None and clip_frames < 1:
            raise ConfigError(f"clip_frames must be >= 1, got {clip_frames}")
        if eval_crop not in ("start", "center"):
            raise ConfigError(f"eval_crop must be 'start' or 'center', got {eval_crop!r}")
        cfg = frontend or cache.frontend
        why = _frontend_mismatch(cache.meta, cfg)
        if why:
            raise ConfigError(f"feature cache {cache.root} cannot serve this frontend: {why}")
        if stats is not None:
            cfg = apply_stats(cfg, stats)
        self.root = cache.root
        self.format = cache.format
        self.frontend = cfg
        self.n_features = cache.n_features
        self.frame_rate = float(cfg.frame_rate)
        items = cache.items
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= len(items)):
                raise ConfigError(f"rows must index the cache's {len(items)} items")
            items = items.iloc[rows].reset_index(drop=True)
        if len(items) == 0:
            raise DataError(f"feature cache {cache.root}: no items selected")
        self.items = items
        names, multi = resolve_classes(items, class_names, multi_label)
        self.class_names, self.multi_label = names, multi
        self.lookup = {n: i for i, n in enumerate(names)}
        self._paths = [str(p) for p in items["path"]]
        self._start = items["start"].to_numpy(dtype=float)
        self._n = items["n_frames"].to_numpy(dtype=np.int64)
        if self.format == "npz":
            self._files = [str(cache.root / f) for f in items["file"]]
        else:
            self._offset = items["offset"].to_numpy(dtype=np.int64)
            self._total = int(cache.meta["total_frames"])
            self._data_file = cache.root / str(cache.meta.get("data_file") or MEMMAP_FILE)
        self._labels = [
            _label_indices(v, self.lookup, multi, f"{cache.root} item {i} ({self._paths[i]})")
            if names
            else ()
            for i, v in enumerate(items["labels"])
        ]
        self.clip_frames = clip_frames
        self.train = train
        self.seed = seed
        self.eval_crop = eval_crop
        stats_pair = cfg.normalisation() if normalise else None
        self._stats = None if stats_pair is None else (float(stats_pair[0]), float(stats_pair[1]))
        self._mm: np.memmap | None = None
        self._epoch = _SharedEpoch()

    def __getstate__(self) -> dict[str, Any]:
        # a memmap would be pickled as a full copy of the array: workers reopen the file instead
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __len__(self) -> int:
        return len(self._paths)

    def _frames(self, i: int, a: int, n: int) -> np.ndarray:
        """Frames [a, a + n) of item i, (n, F) float32 (only those frames are read)."""
        if self.format == "memmap":
            if self._mm is None:
                self._mm = np.memmap(
                    self._data_file,
                    dtype=np.float32,
                    mode="r",
                    shape=(self._total, self.n_features),
                )
            o = int(self._offset[i]) + a
            return np.array(self._mm[o : o + n])
        f = self._files[i]
        try:
            with np.load(f, allow_pickle=False) as z:
                x = z["spectrogram"]
        except FileNotFoundError as e:
            raise DataError(f"feature cache {self.root}: missing {f}; rebuild the cache") from e
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read cached features {f}: {e}") from e
        if x.shape != (int(self._n[i]), self.n_features):
            raise DataError(
                f"cached features {f} have shape {x.shape}, expected"
                f" ({int(self._n[i])}, {self.n_features}); rebuild the cache"
            )
        return np.ascontiguousarray(x[a : a + n], dtype=np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        n = int(self._n[i])
        m = n if self.clip_frames is None else min(n, self.clip_frames)
        a = crop_start(n, m, self.train, self.eval_crop, self.seed, self.epoch, i)
        x = torch.from_numpy(self._frames(i, a, m))  # (m, F)
        cfg = self.frontend
        # frame padding as the frontend does it: zero frames before normalisation, valid input
        if cfg.pad_to_multiple > 1:
            x = torch.nn.functional.pad(x, (0, 0, 0, (-x.shape[0]) % cfg.pad_to_multiple))
        if cfg.target_frames:
            t = cfg.target_frames
            x = torch.nn.functional.pad(x[:t], (0, 0, 0, t - min(t, x.shape[0])))
        if self._stats is not None:
            x = (x - self._stats[0]) / (2.0 * self._stats[1])
        valid = x.shape[0]
        total = max(valid, self.clip_frames or 0)
        feats = torch.zeros(total, self.n_features, dtype=torch.float32)
        feats[:valid] = x
        mask = torch.ones(total, dtype=torch.bool)
        mask[:valid] = False
        item: dict[str, Any] = {
            "feats": feats,
            "frame_mask": mask,
            "index": i,
            "path": self._paths[i],
            "start": float(self._start[i] + a / self.frame_rate),
        }
        if self.class_names:
            item["target"] = class_target(self._labels[i], len(self.class_names), self.multi_label)
        return item
