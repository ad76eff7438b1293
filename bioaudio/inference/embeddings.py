"""The embeddings file that `bioaudio embed` writes and the explorer reads: one Parquet row per
window (`--window` seconds every `--hop` seconds). Columns:

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
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bioaudio.errors import DataError

EMBEDDINGS_FORMAT = "bioaudio.embeddings"
EMBEDDINGS_VERSION = 1
META_KEY = b"bioaudio"

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
