"""Embeddings of every window of a folder, a manifest or one recording, written to Parquet.

One row per window (`--window` seconds every `--hop` seconds, read by seeking). Columns:

    path          str        the audio file (absolute)
    recording     str        the file relative to the scanned folder (manifest `recording`)
    start, end    float64    the window in seconds of the file (end < start + window at the end)
    window_index  int32      position of the window in its segment
    labels        str|null   comma-separated labels from a labelled input; null when unknown
    duration      float64    the whole file's duration (s)
    sample_rate   int32      the file's native rate (Hz)
    channels      int16      the file's channel count
    site          str|null   the file-name prefix before a date (SITE_20240501_053000.wav)
    datetime      timestamp  when the window starts: the file name's date-time + start
                             (midnight for a date-only name); null without a date in the name
    date          date32     its date
    month         int8       1..12
    hour          int8|null  hour of day (null for a date-only name)
    season        str|null   meteorological season (northern hemisphere unless --hemisphere)
    embedding     fixed_size_list<float32>[D]

The Parquet key-value metadata `bioaudio` holds the provenance as JSON (model path, type and
fingerprint, layer, pooling, frontend, window, hop, embedding dim, bioaudio version).

Resuming: rows are written in parts (whole files only) into a hidden folder beside the output
and merged into it at the end, so a re-run (after a kill, or on a folder with new files) embeds
only the files not yet in the output or in a part. With `accelerate launch` each process embeds
its share of the files into its own parts and process 0 merges. Unreadable files are listed in
`skipped.csv` beside the output with the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from bioaudio import runinfo, runlog
from bioaudio.config import to_dict
from bioaudio.data.audio import is_audio_path
from bioaudio.data.datasets import AudioDataset, collate_batch, segment_windows
from bioaudio.data.manifest import (
    COLUMNS,
    LabelLayout,
    PrepareConfig,
    build_manifest,
    read_manifest,
    scan_audio,
)
from bioaudio.errors import AudioDecodeError, CheckpointError, ConfigError, DataError
from bioaudio.fileio import atomic_path, write_csv_atomic
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import is_export_dir, load_model

EMBEDDINGS_FORMAT = "bioaudio.embeddings"
EMBEDDINGS_VERSION = 1
META_KEY = b"bioaudio"
DEFAULT_WINDOW = 5.0
MIN_WINDOW_SECONDS = 0.2  # one 16-frame patch of a 10 ms fbank, with margin
PART_ROWS, PART_SECONDS = 4096, 60.0  # a part is written after this many rows or seconds
SKIPPED_COLUMNS = ["path", "reason", "embeddings"]
Progress = Callable[[float, str], None]

METADATA_FIELDS: list[tuple[str, pa.DataType]] = [
    ("path", pa.string()),
    ("recording", pa.string()),
    ("start", pa.float64()),
    ("end", pa.float64()),
    ("window_index", pa.int32()),
    ("labels", pa.string()),
    ("duration", pa.float64()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int16()),
    ("site", pa.string()),
    ("datetime", pa.timestamp("ms")),
    ("date", pa.date32()),
    ("month", pa.int8()),
    ("hour", pa.int8()),
    ("season", pa.string()),
]


@dataclass
class EmbedConfig:
    """Options of `bioaudio embed` (and of `embed_to_parquet`)."""

    window: float | None = field(
        default=None,
        metadata={"help": "window seconds (default: the model's training clip, else 5)"},
    )
    hop: float | None = field(
        default=None, metadata={"help": "hop between windows in seconds (default: --window)"}
    )
    pooling: Literal["mean", "cls", "max"] = field(
        default="mean",
        metadata={"help": "token pooling: mean, cls (encoders with a CLS token only), max"},
    )
    layer: int | None = field(
        default=None,
        metadata={"help": "transformer block whose output is pooled: 0 = first, -1 = last"},
    )
    labels: LabelLayout = field(
        default="auto", metadata={"help": "label layout of a folder (as bioaudio prepare)"}
    )
    hemisphere: Literal["north", "south"] = field(
        default="north", metadata={"help": "hemisphere of the recordings, for the season column"}
    )
    batch_size: int = field(default=16, metadata={"help": "windows per forward pass"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the output even when it holds other embeddings or another file"},
    )
    cpu: bool = field(default=False, metadata={"help": "run on CPU even when a GPU is available"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    status_every: float = field(
        default=30.0,
        metadata={"help": "seconds between status lines when the output is not a terminal"},
    )

    def validate(self) -> None:
        for name in ("window", "hop"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"--{name} must be positive seconds, got {v}")
        if not self.status_every >= 0:
            raise ConfigError(f"--status_every must be >= 0 seconds, got {self.status_every}")
        if self.window is not None and self.window < MIN_WINDOW_SECONDS:
            raise ConfigError(f"--window must be at least {MIN_WINDOW_SECONDS} s")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("--batch_size must be >= 1 and --num_workers >= 0")


# ----------------------------------------------------------------------------------------------
# Time and place from file names

_DATE_TIME = re.compile(
    r"(?<!\d)(?P<y>(?:19|20)\d{2})(?P<s1>[-_.]?)(?P<m>0[1-9]|1[0-2])(?P=s1)"
    r"(?P<d>0[1-9]|[12]\d|3[01])"
    r"(?:[T_\- ]?(?P<H>[01]\d|2[0-3])(?P<s2>[-_:.h]?)(?P<M>[0-5]\d)(?:(?P=s2)(?P<S>[0-5]\d))?)?"
    r"(?!\d)"
)


@dataclass(frozen=True)
class FileTime:
    """What a recorder file name says: site (text before the date), start time, and whether
    the name had a time of day or only a date."""

    site: str | None
    start: dt.datetime | None
    has_time: bool


def parse_file_time(name: str | Path) -> FileTime:
    """`SITE_20240501_053000.wav` -> (SITE, 2024-05-01 05:30:00); `20240501.wav` -> date only.

    Dates are YYYYMMDD or YYYY-MM-DD, optionally followed by HHMMSS, HHMM, HH-MM-SS or HH:MM
    (AudioMoth, Song Meter and most recorders); invalid dates (20240231) are not dates.
    """
    stem = Path(str(name)).stem
    for m in _DATE_TIME.finditer(stem):
        try:
            day = dt.date(int(m["y"]), int(m["m"]), int(m["d"]))
        except ValueError:
            continue
        has_time = m["H"] is not None
        t = dt.time(int(m["H"]), int(m["M"]), int(m["S"] or 0)) if has_time else dt.time()
        site = stem[: m.start()].rstrip("_-. ") or None
        return FileTime(site, dt.datetime.combine(day, t), has_time)
    return FileTime(None, None, False)


_SEASONS_NORTH = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring"}
_SEASONS_NORTH.update({6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn"})
_SEASONS_NORTH[11] = "autumn"
_OPPOSITE = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}


def season_of(month: int, hemisphere: str = "north") -> str:
    """Meteorological season of a month (Dec-Feb winter in the north, summer in the south)."""
    s = _SEASONS_NORTH[int(month)]
    return s if hemisphere == "north" else _OPPOSITE[s]


def time_columns(windows: pd.DataFrame, hemisphere: str = "north") -> pd.DataFrame:
    """site, datetime, date, month, hour, season of every window (path, start) of a table."""
    parsed = {p: parse_file_time(p) for p in windows["path"].unique()}
    base = pd.to_datetime(pd.Series([parsed[p].start for p in windows["path"]], dtype=object))
    has_time = np.array([parsed[p].has_time for p in windows["path"]], dtype=bool)
    offset = pd.to_timedelta(np.where(has_time, windows["start"].to_numpy(float), 0.0), unit="s")
    when = (base + offset).dt.round("ms")
    month = when.dt.month.astype("Int8")
    hour = when.dt.hour.astype("Int8").where(has_time, pd.NA)
    season = [season_of(m, hemisphere) if not pd.isna(m) else None for m in month]
    return pd.DataFrame(
        {
            "site": [parsed[p].site for p in windows["path"]],
            "datetime": when,
            "date": [d.date() if not pd.isna(d) else None for d in when],
            "month": month,
            "hour": hour,
            "season": season,
        },
        index=windows.index,
    )


# ----------------------------------------------------------------------------------------------
# Models


def _resolve_model_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model not found: {p}")
    if p.is_dir() and not is_export_dir(p):
        for name in ("best", "export"):  # a run directory
            if is_export_dir(p / name):
                return p / name
    return p


def model_fingerprint(path: Path) -> str:
    """Content hash of a model file or folder (size plus the first and last MiB of each file):
    a retrained or replaced model never silently extends embeddings of the old one. An export's
    config.json is hashed without its provenance (a re-export of the same weights and settings,
    e.g. by a resumed finished run, is the same model)."""
    h = hashlib.sha256()
    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    for q in files:
        if q.name == "config.json" and path.is_dir():
            try:
                cfg = json.loads(q.read_text())
            except (OSError, ValueError):
                cfg = None
            if isinstance(cfg, dict) and cfg.get("format") == "bioaudio.export":
                cfg.pop("provenance", None)
                h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
                continue
        size = q.stat().st_size
        h.update(f"{q.relative_to(path) if path.is_dir() else q.name}:{size}".encode())
        with open(q, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def _n_layers(model: Any) -> int | None:
    cfg = getattr(model.encoder, "cfg", None)
    for name in ("depth", "encoder_layers"):
        if isinstance(getattr(cfg, name, None), int):
            return int(getattr(cfg, name))
    return None


class Embedder:
    """A loaded model (transformer or CNN baseline) and how its clip embeddings are taken."""

    def __init__(self, model: torch.nn.Module, source: Path, pooling: str, layer: int | None):
        self.model = model.eval()
        self.source = source
        self.baseline = isinstance(model, BaselineClassifier)
        if self.baseline:
            if pooling == "cls" or pooling == "max":
                raise ConfigError(
                    f"--pooling {pooling}: {source} is a CNN baseline without tokens or CLS; its"
                    " embedding is the penultimate activation (use --pooling mean)"
                )
            if layer is not None:
                raise ConfigError(
                    f"--layer: {source} is a CNN baseline, not a transformer; its embedding is"
                    " the penultimate activation"
                )
        else:
            if pooling == "cls" and not model.has_cls:
                raise ConfigError(
                    f"--pooling cls: {source} ({model.model_type}) has no CLS token (official "
                    "BEATs weights have none); use --pooling mean"
                )
            n = _n_layers(model)
            if layer is not None and n is not None and not -n <= layer < n:
                raise ConfigError(
                    f"--layer {layer}: the encoder has {n} blocks (0..{n - 1}, or -1..-{n})"
                )
        self.pooling = "penultimate" if self.baseline else pooling
        self.layer = layer
        self.fingerprint = model_fingerprint(source)

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def sample_rate(self) -> int:
        return int(self.model.frontend_cfg.sample_rate)

    @property
    def model_type(self) -> str:
        if self.baseline:
            return f"baseline:{self.model.baseline.config.get('name')}"
        return str(self.model.model_type)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def default_window(self) -> float:
        clip = (getattr(self.model, "provenance", None) or {}).get("clip_seconds")
        return float(clip) if clip else DEFAULT_WINDOW

    def check_window(self, window: float) -> None:
        max_frames = getattr(getattr(self.model, "encoder", None), "max_frames", None)
        if max_frames:
            longest = max_frames / self.model.frontend_cfg.frame_rate
            if window > longest + 1e-6:
                raise ConfigError(
                    f"--window {window:g} s is longer than this model's longest input "
                    f"({longest:.2f} s); use a shorter window"
                )

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, S) -> embeddings (B, D) float32."""
        if self.baseline:
            return self.model.embed(wav, padding_mask).float()
        return self.model.embed(wav, padding_mask, pooling=self.pooling, layer=self.layer).float()

    def provenance(self, window: float, hop: float, hemisphere: str) -> dict[str, Any]:
        """Everything the embeddings depend on (resuming checks it matches)."""
        return {
            "model_path": str(self.source.resolve()),
            "model_type": self.model_type,
            "model_fingerprint": self.fingerprint,
            "layer": self.layer,
            "pooling": self.pooling,
            "frontend": to_dict(self.model.frontend_cfg),
            "embedding_dim": self.dim,
            "window": float(window),
            "hop": float(hop),
            "hemisphere": hemisphere,
        }


def load_embedder(
    path: str | Path,
    pooling: str = "mean",
    layer: int | None = None,
    device: str | torch.device | None = None,
) -> Embedder:
    """Any model `load_model` reads (an export, a run directory, official BEATs / EAT files,
    CNN baselines), ready to embed."""
    p = _resolve_model_path(path)
    return Embedder(load_model(p, device=device), p, pooling, layer)


# ----------------------------------------------------------------------------------------------
# Input: a folder, a manifest or one audio file -> a manifest table


def input_table(
    source: str | Path, labels: LabelLayout = "auto", progress: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest table with absolute paths, skipped files (path, reason)) of the input."""
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(f"input not found: {src}")
    if src.is_dir():
        res = build_manifest(src, PrepareConfig(labels=labels, progress=progress))
        table, skipped = res.manifest, res.skipped
    elif src.suffix.lower() == ".csv":
        table = read_manifest(src)
        good, bad = scan_audio(
            [Path(p) for p in table["path"].unique()], verify="header", progress=progress
        )
        table = table[table["path"].isin({str(p) for p in good})]
        skipped = pd.DataFrame([{"path": str(p), "reason": r} for p, r in bad.items()])
    elif is_audio_path(src):
        good, bad = scan_audio([src.resolve()], workers=1, progress=False)
        rows = [
            {"path": str(p), "sample_rate": m.sample_rate, "frames": m.frames}
            | {"duration": m.duration, "channels": m.channels, "start": 0.0, "end": m.duration}
            | {"labels": "", "recording": p.name, "source": "none"}
            for p, m in good.items()
        ]
        table = pd.DataFrame(rows, columns=COLUMNS)
        skipped = pd.DataFrame([{"path": str(p), "reason": r} for p, r in bad.items()])
    else:
        raise DataError(f"{src}: not a folder, a manifest (.csv) or an audio file")
    skipped = skipped.reindex(columns=["path", "reason"])
    return table.reset_index(drop=True), skipped.reset_index(drop=True)


def window_table(
    table: pd.DataFrame, window: float, hop: float | None = None, hemisphere: str = "north"
) -> pd.DataFrame:
    """Every window of every row, with the output's metadata columns (no embeddings)."""
    # one contiguous run of windows per file (a manifest may list a file's segments apart)
    w = segment_windows(table.sort_values("path", kind="stable"), window, hop)
    w = w[(w["end"] - w["start"]) >= MIN_WINDOW_SECONDS - 1e-9].reset_index(drop=True)
    source = w["source"] if "source" in w else pd.Series("none", index=w.index)
    labelled = source.fillna("none") != "none"
    out = pd.DataFrame(
        {
            "path": w["path"].astype(str),
            "recording": w.get("recording", w["path"]).astype(str),
            "start": w["start"].astype(float),
            "end": w["end"].astype(float),
            "window_index": w["window_index"].astype(np.int32),
            "labels": w["labels"].fillna("").astype(str).where(labelled, None),
            "duration": w["duration"].astype(float),
            "sample_rate": w["sample_rate"].astype(np.int32),
            "channels": w.get("channels", pd.Series(1, index=w.index)).astype(np.int16),
        }
    )
    return pd.concat([out, time_columns(out, hemisphere)], axis=1)


# ----------------------------------------------------------------------------------------------
# Embedding windows


class _Windows(Dataset):
    """Windows read by seeking; an unreadable one becomes {"index", "error"} instead of raising."""

    def __init__(self, windows: pd.DataFrame, sample_rate: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.ds = AudioDataset(
                windows[["path", "start", "end"]].assign(labels=""),
                class_names=[],
                sample_rate=sample_rate,
                clip_seconds=None,  # each item is exactly its window: no padding when alone
                min_seconds=0.0,
            )

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.ds[i]
        except AudioDecodeError as e:
            return {"index": int(i), "error": e.reason or str(e)}


def _collate(items: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[tuple[int, str]]]:
    good = [it for it in items if "error" not in it]
    errors = [(it["index"], it["error"]) for it in items if "error" in it]
    return (collate_batch(good) if good else None), errors


@dataclass
class FileEmbeddings:
    """All windows of one file: its rows and embeddings (N, D), or the reason it failed."""

    path: str
    rows: pd.DataFrame
    embeddings: np.ndarray | None
    error: str | None = None


def fresh_audio(windows: pd.DataFrame) -> np.ndarray:
    """Seconds of audio each window adds to the windows before it in its file (overlapping
    hops count once): the audio-hours of a progress rate."""
    prev_end = windows.groupby("path", sort=False)["end"].shift(1).fillna(-np.inf).to_numpy()
    return np.clip(windows["end"].to_numpy() - np.maximum(windows["start"], prev_end), 0, None)


def iter_file_embeddings(
    embedder: Embedder,
    windows: pd.DataFrame,
    batch_size: int = 16,
    num_workers: int = 0,
    on_audio: Callable[[float], None] | None = None,
) -> Iterator[FileEmbeddings]:
    """Embed `windows` (sorted by file) in padded batches; yield each file once all its windows
    are done. `on_audio(seconds)` reports the new audio each batch covered (progress)."""
    windows = windows.reset_index(drop=True)
    if windows.empty:
        return
    paths = windows["path"].to_numpy()
    fresh = fresh_audio(windows)
    starts = np.flatnonzero(np.r_[True, paths[1:] != paths[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(paths)]))
    emb = np.zeros((len(windows), embedder.dim), np.float32)
    errors: dict[int, str] = {}
    done = np.zeros(len(windows), bool)
    loader = DataLoader(
        _Windows(windows, embedder.sample_rate),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    dev = embedder.device
    next_file = 0
    for batch, bad in loader:
        for i, reason in bad:
            errors[i] = reason
            done[i] = True
        if batch is not None:
            idx = batch["index"].numpy()
            out = embedder(batch["wav"].to(dev), batch["padding_mask"].to(dev))
            emb[idx] = out.cpu().numpy()
            done[idx] = True
            if on_audio is not None:
                on_audio(float(fresh[idx].sum()))
        while next_file < len(bounds) and done[bounds[next_file][1] - 1]:
            a, b = bounds[next_file]
            failed = [errors[i] for i in range(a, b) if i in errors]
            rows = windows.iloc[a:b]
            if failed:
                yield FileEmbeddings(str(paths[a]), rows, None, failed[0])
            else:
                yield FileEmbeddings(str(paths[a]), rows, emb[a:b].copy())
            next_file += 1


def embed_table(
    embedder: Embedder,
    table: pd.DataFrame,
    window: float,
    hop: float | None = None,
    hemisphere: str = "north",
    batch_size: int = 16,
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """In memory: (window rows, embeddings (N, D), skipped (path, reason)) of a manifest table."""
    embedder.check_window(window)
    windows = window_table(table, window, hop, hemisphere)
    rows, embs, skipped = [], [], []
    for f in iter_file_embeddings(embedder, windows, batch_size):
        if f.error is not None:
            skipped.append({"path": f.path, "reason": f.error})
        else:
            rows.append(f.rows)
            embs.append(f.embeddings)
    if not rows:
        return windows.iloc[:0], np.zeros((0, embedder.dim), np.float32), pd.DataFrame(skipped)
    out = pd.concat(rows, ignore_index=True)
    return out, np.concatenate(embs), pd.DataFrame(skipped, columns=["path", "reason"])


# ----------------------------------------------------------------------------------------------
# Parquet


def schema(dim: int, provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The embeddings table schema (see module doc), with the provenance as metadata."""
    fields = [pa.field(n, t) for n, t in METADATA_FIELDS]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
    meta = None
    if provenance is not None:
        meta = {META_KEY: json.dumps(provenance, default=str).encode()}
    return pa.schema(fields, metadata=meta)


def to_arrow(rows: pd.DataFrame, embeddings: np.ndarray) -> pa.Table:
    """Window rows (`window_table` columns) + (N, D) embeddings -> an Arrow table."""
    dim = int(embeddings.shape[1])
    arrays = []
    for name, typ in METADATA_FIELDS:
        col = rows[name]
        if name == "datetime":
            col = pd.to_datetime(col).astype("datetime64[ms]")
        arrays.append(pa.array(col, type=typ, from_pandas=True))
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1), pa.float32())
    arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    return pa.Table.from_arrays(arrays, schema=schema(dim))


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance of an embeddings file; DataError when it is not one."""
    p = Path(path)
    try:
        sch = pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p} is not a Parquet file ({str(e).splitlines()[0]})") from e
    raw = (sch.metadata or {}).get(META_KEY)
    try:
        prov = json.loads(raw) if raw else None
    except ValueError:
        prov = None
    if not isinstance(prov, dict) or prov.get("format") != EMBEDDINGS_FORMAT:
        raise DataError(f"{p} is a Parquet file but not bioaudio embeddings (no provenance)")
    if "embedding" not in sch.names or not pa.types.is_fixed_size_list(sch.field("embedding").type):
        raise DataError(f"{p}: no fixed-size 'embedding' column")
    return prov


@dataclass
class EmbeddingSet:
    """An embeddings file in memory: metadata rows, embeddings (N, D) float32, provenance."""

    rows: pd.DataFrame
    vectors: np.ndarray
    provenance: dict[str, Any]

    def __len__(self) -> int:
        return len(self.rows)


def read_embeddings(path: str | Path, max_rows: int | None = None, seed: int = 0) -> EmbeddingSet:
    """Read an embeddings file; with `max_rows`, a seeded random sample of that many rows (in
    file order)."""
    prov = read_provenance(path)
    table = pq.read_table(path)
    if max_rows is not None and max_rows < table.num_rows:
        keep = np.random.default_rng(seed).choice(table.num_rows, max_rows, replace=False)
        table = table.take(np.sort(keep))
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    vectors = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    rows = table.drop_columns(["embedding"]).to_pandas()
    return EmbeddingSet(rows, vectors, prov)


# ----------------------------------------------------------------------------------------------
# The command's job: resumable, multi-process, merged into one Parquet file


@dataclass
class EmbedResult:
    """What `embed_to_parquet` did."""

    out: Path
    skipped_path: Path
    rows: int
    files: int
    new_files: int
    already_done: int
    skipped: int
    dim: int
    processes: int
    audio_seconds: float
    seconds: float

    def summary(self) -> str:
        rate = self.audio_seconds / max(self.seconds, 1e-9)
        lines = [
            f"embedded {self.new_files} file(s) ({self.audio_seconds / 3600:.3f} h of audio,"
            f" {rate / 3600:.3g} audio h/s = {rate:.0f}x real time) on {self.processes}"
            f" process(es); {self.already_done} already done",
            f"{self.out}: {self.rows} window(s) of {self.files} file(s), embedding dim {self.dim}",
        ]
        lines.append(f"skipped {self.skipped} file(s), reasons in {self.skipped_path}")
        return "\n".join(lines)


def parts_dir(out: Path) -> Path:
    """The hidden folder of not-yet-merged parts beside `out`."""
    return out.with_name(f".{out.name}.parts")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {out}: give a file name ending in .parquet")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .parquet")
    if out.exists() and not overwrite:
        try:
            read_provenance(out)
        except DataError as e:
            raise ConfigError(
                f"--out {out} exists and is not a bioaudio embeddings file ({e}); "
                "use --overwrite to replace it"
            ) from None
    skipped = out.with_name("skipped.csv")
    if skipped.exists() and not overwrite:
        try:
            cols = list(pd.read_csv(skipped, nrows=0).columns)
        except Exception:  # any unreadable file is not ours
            cols = []
        if cols != SKIPPED_COLUMNS:
            raise ConfigError(
                f"{skipped} exists and was not written by bioaudio embed (another command's "
                "skipped.csv?); choose another --out folder or use --overwrite"
            )


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = ["model_fingerprint", "layer", "pooling", "window", "hop", "frontend"]
    keys += ["embedding_dim", "hemisphere"]
    return [k for k in keys if a.get(k) != b.get(k)]


def _done_paths(out: Path, settings: dict[str, Any], overwrite: bool) -> set[str]:
    """Files already in the output or in a part, after checking they used the same settings."""
    if overwrite:
        return set()
    done: set[str] = set()
    if out.exists():
        diff = _same_settings(read_provenance(out), settings)
        if diff:
            raise ConfigError(
                f"--out {out} holds embeddings made with other settings ({', '.join(diff)});"
                " use --overwrite to replace it, or another --out"
            )
        done.update(pq.read_table(out, columns=["path"]).column("path").to_pylist())
    parts = parts_dir(out)
    if parts.is_dir():
        saved = parts / "settings.json"
        if saved.is_file() and _same_settings(json.loads(saved.read_text()), settings):
            raise ConfigError(
                f"{parts} holds an interrupted run with other settings; use --overwrite to"
                " discard it"
            )
        for f in sorted(parts.glob("part-*.parquet")):
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
    return done


def _shard(table: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """This process's files: longest first to the least-loaded process (deterministic)."""
    if world == 1:
        return table
    per_file = table.assign(_len=table["end"] - table["start"]).groupby("path")["_len"].sum()
    load = [0.0] * world
    owner: dict[str, int] = {}
    for path, seconds in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[path] = r
        load[r] += seconds
    return table[table["path"].map(owner) == rank]


class _PartWriter:
    """Whole files' rows -> parquet parts (atomic), every PART_ROWS rows or PART_SECONDS."""

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank
        self.max_rows, self.max_seconds = PART_ROWS, PART_SECONDS
        self.rows: list[pd.DataFrame] = []
        self.embs: list[np.ndarray] = []
        self.skipped: list[dict[str, str]] = []
        self.n = 0
        self.seq = 0
        self.last = time.monotonic()
        # unique per writer: a rerun in the same process and second must not reuse a name
        self.tag = f"r{rank:03d}-{uuid.uuid4().hex[:12]}"

    def add(self, f: FileEmbeddings) -> None:
        if f.error is not None:
            self.skipped.append({"path": f.path, "reason": f.error})
        else:
            self.rows.append(f.rows)
            self.embs.append(f.embeddings)  # type: ignore[arg-type]
            self.n += len(f.rows)
        if self.n >= self.max_rows or time.monotonic() - self.last > self.max_seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.skipped:
            name = self.folder / f"skipped-{self.tag}-{self.seq:05d}.csv"
            write_csv_atomic(pd.DataFrame(self.skipped, columns=["path", "reason"]), name)
        if self.rows:
            table = to_arrow(pd.concat(self.rows, ignore_index=True), np.concatenate(self.embs))
            with atomic_path(self.folder / f"part-{self.tag}-{self.seq:05d}.parquet") as tmp:
                pq.write_table(table, tmp)
        if self.skipped or self.rows:
            self.seq += 1
        self.rows, self.embs, self.skipped, self.n = [], [], [], 0


def _merge(
    out: Path, provenance: dict[str, Any], input_skipped: pd.DataFrame, overwrite: bool
) -> tuple[int, int, int]:
    """Existing output + parts -> the output (sorted by path and time); skipped.csv beside it.
    Returns (rows, files, skipped files)."""
    parts = parts_dir(out)
    part_files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    tables = []
    if out.exists() and not overwrite:
        tables.append(pq.read_table(out))
    tables += [pq.read_table(f) for f in part_files]
    seen: set[str] = set()
    kept = []
    for t in tables:  # a file is taken from the first table holding it (a crash between the
        # merged write and the parts' removal leaves it in both)
        paths = t.column("path")
        if seen:
            t = t.filter(pc.invert(pc.is_in(paths, pa.array(sorted(seen)))))
        seen.update(t.column("path").unique().to_pylist())
        kept.append(t.replace_schema_metadata(None))
    skipped = [input_skipped]
    if parts.is_dir():
        skipped += [pd.read_csv(f, dtype=str) for f in sorted(parts.glob("skipped-*.csv"))]
    sk = pd.concat(skipped, ignore_index=True).reindex(columns=["path", "reason"]).fillna("")
    sk = sk[~sk["path"].isin(seen)].drop_duplicates("path", keep="last").sort_values("path")
    sk_path = out.with_name("skipped.csv")
    others = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if sk_path.exists() and not overwrite:
        old = pd.read_csv(sk_path, dtype=str).reindex(columns=SKIPPED_COLUMNS)
        others = old[old["embeddings"] != out.name]  # rows of other outputs in this folder
    sk = pd.concat([others, sk.assign(embeddings=out.name)], ignore_index=True)
    write_csv_atomic(sk[SKIPPED_COLUMNS], sk_path)
    n_skipped = int((sk["embeddings"] == out.name).sum())
    if not kept:
        return 0, 0, n_skipped
    merged = pa.concat_tables(kept).sort_by([("path", "ascending"), ("start", "ascending")])
    merged = merged.replace_schema_metadata(
        schema(provenance["embedding_dim"], provenance).metadata
    )
    if part_files or overwrite or not out.exists():
        with atomic_path(out) as tmp:
            pq.write_table(merged, tmp)
    shutil.rmtree(parts, ignore_errors=True)
    return merged.num_rows, len(seen), n_skipped


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("bioaudio")
    except Exception:
        return "unknown"


def embed_to_parquet(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    cfg: EmbedConfig | None = None,
    *,
    accelerator: Any = None,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every window of `source` (folder, manifest or audio file) with `model` into the
    Parquet file `out` (see the module doc). With an `accelerator` of several processes each
    embeds its share and process 0 merges; every process returns the same result.
    `progress(fraction, text)` is called as files finish (for a UI)."""
    cfg = cfg or EmbedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = rank == 0
    if not Path(source).expanduser().exists():  # before the (slow) model load
        raise DataError(f"input not found: {Path(source).expanduser()}")
    _check_out(out, cfg.overwrite)
    if accelerator is not None:
        device = accelerator.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    embedder = load_embedder(model, cfg.pooling, cfg.layer, device)
    window = float(cfg.window or embedder.default_window())
    hop = float(cfg.hop or window)
    embedder.check_window(window)
    table, input_skipped = input_table(source, cfg.labels, progress=cfg.progress and main)
    # Input, model and options checked: the log starts (with what was printed so far).
    runlog.attach(out.with_suffix(".log.txt"))
    settings = embedder.provenance(window, hop, cfg.hemisphere)
    done = _done_paths(out, settings, cfg.overwrite)
    files = table["path"].unique()
    todo = table[~table["path"].isin(done)]
    parts = parts_dir(out)
    _barrier(accelerator)  # every process has read the state before anyone writes
    if main:
        if cfg.overwrite:
            shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        (parts / "settings.json").write_text(json.dumps(settings, default=str))
    _barrier(accelerator)
    mine = _shard(todo, rank, world)
    windows = window_table(mine, window, hop, cfg.hemisphere)
    total = float(fresh_audio(windows).sum())
    audio_done = [0.0]
    bar = None
    if main and len(windows):
        # A bar on a terminal, plain status lines (audio h/s, ETA) in a file or a SLURM log.
        bar = runlog.Progress.audio(
            total,
            desc="embed" + (f" (process 0 of {world})" if world > 1 else ""),
            enabled=cfg.progress,
            status_every=cfg.status_every,
            unit_scale=1 / 3600,  # counts seconds, shows hours
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio h "
            "[{elapsed}<{remaining}{postfix}]",
        )

    def on_audio(seconds: float) -> None:
        audio_done[0] += seconds
        if bar is not None:
            bar.update(seconds)
        if progress is not None and main:
            progress(min(audio_done[0] / max(total, 1e-9), 1.0), f"{audio_done[0] / 3600:.3f} h")

    writer = _PartWriter(parts, rank)
    new_files = 0
    for f in iter_file_embeddings(embedder, windows, cfg.batch_size, cfg.num_workers, on_audio):
        writer.add(f)
        new_files += f.error is None
    writer.flush()
    if bar is not None:
        bar.close()
    _barrier(accelerator)
    counts = [0, 0, 0]
    if main:
        prov = {
            "format": EMBEDDINGS_FORMAT,
            "format_version": EMBEDDINGS_VERSION,
            **settings,
            "bioaudio_version": _version(),
            "processes": world,
            "input": str(Path(source).expanduser().resolve()),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": runinfo.environment(),  # command line, versions, machine
        }
        counts = list(_merge(out, prov, input_skipped, cfg.overwrite))
    counts, new_files, audio = _share(accelerator, counts, new_files, audio_done[0])
    if counts[0] == 0:
        raise DataError(
            f"none of the {len(files)} file(s) could be embedded; reasons in "
            f"{out.with_name('skipped.csv')}"
        )
    return EmbedResult(
        out=out,
        skipped_path=out.with_name("skipped.csv"),
        rows=counts[0],
        files=counts[1],
        new_files=new_files,
        already_done=len(set(files) & done),
        skipped=counts[2],
        dim=embedder.dim,
        processes=world,
        audio_seconds=audio,
        seconds=time.perf_counter() - t0,
    )


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _share(
    accelerator: Any, counts: list[int], new_files: int, audio: float
) -> tuple[list[int], int, float]:
    """Process 0's merge counts, and the sums of every process's files and audio."""
    if accelerator is None or accelerator.num_processes == 1:
        return counts, new_files, audio
    from accelerate.utils import broadcast_object_list, gather_object

    counts = broadcast_object_list([counts])[0]
    mine = gather_object([(new_files, audio)])
    return counts, sum(n for n, _ in mine), sum(a for _, a in mine)
