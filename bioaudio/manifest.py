"""Manifests: one CSV row per audio segment, the common currency of every command.

Columns (in this order; extra columns such as `split`, `fold`, `group` are kept as they are):
    path         audio file, relative to the manifest's folder when under it, else absolute
    sample_rate  native rate (Hz)
    frames       native length in samples
    duration     native length in seconds
    channels     channel count
    start, end   the segment in seconds (0 and duration for a whole file)
    labels       comma-separated label names (CSV-quoted); empty = unlabelled
    recording    id of the source recording (segments of one file share it; used for grouping)
    source       where the labels came from: none, csv, folder, raven, audacity, pairs
`read_manifest` returns absolute paths; `write_manifest` writes atomically with relative paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import DataError

COLUMNS = [
    "path",
    "sample_rate",
    "frames",
    "duration",
    "channels",
    "start",
    "end",
    "labels",
    "recording",
    "source",
]
SKIPPED_COLUMNS = ["path", "reason"]


def split_labels(value: object) -> list[str]:
    """'a, b' -> ['a', 'b']; empty / NaN -> []."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [s.strip() for s in str(value).split(",") if s.strip()]


def join_labels(labels: list[str] | tuple[str, ...]) -> str:
    """['b', 'a', 'a'] -> 'a,b' (sorted, unique)."""
    return ",".join(sorted(set(labels)))


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV; `path` becomes absolute; missing required columns are an error."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest not found: {p}")
    try:
        df = pd.read_csv(p, dtype={"labels": str, "recording": str, "source": str, "path": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse manifest {p}: {str(e).splitlines()[0]}") from e
    missing = [c for c in ("path", "sample_rate", "frames", "duration") if c not in df.columns]
    if missing:
        raise DataError(f"{p} is not a manifest: missing column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise DataError(f"manifest {p} has no rows")
    base = p.resolve().parent
    df["path"] = [str(q) if os.path.isabs(q) else str(base / q) for q in df["path"]]
    if "start" not in df.columns:
        df["start"] = 0.0
    if "end" not in df.columns:
        df["end"] = df["duration"]
    df["start"] = df["start"].fillna(0.0).astype(float)
    df["end"] = df["end"].fillna(df["duration"]).astype(float)
    for col in ("labels", "recording", "source"):
        if col not in df.columns:
            df[col] = "" if col != "recording" else df["path"]
        df[col] = df[col].fillna("")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` to `path` atomically, paths relative to the manifest's folder when possible."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.resolve().parent
    out = df.copy()

    def rel(q: str) -> str:
        try:
            return str(Path(q).resolve().relative_to(base))
        except ValueError:
            return str(Path(q).resolve())

    out["path"] = [rel(q) for q in out["path"]]
    ordered = [c for c in COLUMNS if c in out.columns] + [
        c for c in out.columns if c not in COLUMNS
    ]
    tmp = p.with_name(f".{p.name}.tmp")
    out[ordered].to_csv(tmp, index=False)
    tmp.replace(p)
    return p


def class_names_of(df: pd.DataFrame) -> list[str]:
    """Sorted unique label names present in a manifest."""
    names: set[str] = set()
    for v in df["labels"]:
        names.update(split_labels(v))
    return sorted(names)
