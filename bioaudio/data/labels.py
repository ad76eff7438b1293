"""Label sources and the window rule that turns call-level annotations into clip labels.

Every layout of `data/README.md` has a reader here:
    labels.csv          `read_labels_csv`      filename,labels (labels comma-separated, quoted)
    one folder / class  `folder_labels`        <root>/<class>/.../file.wav
    positive/negative   `pair_labels`          <root>/positive/..., <root>/negative/...
    Audacity labels     `read_audacity_labels` start<TAB>end<TAB>label (+ `\\` frequency lines)
    Raven selections    `read_raven_table`     Selection, View, Begin Time (s), End Time (s), ...
Call-level annotations (Audacity, Raven) become fixed windows with `window_labels`: a window
carries a call's label when they overlap by at least `min_overlap * min(call, window)` seconds.
Label strings never contain commas: a comma separates labels (`split_labels`, `join_labels`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal, NamedTuple

import numpy as np

from bioaudio.errors import DataError

# Raven label columns tried in order when none is given (case-insensitive).
RAVEN_LABEL_CANDIDATES = (
    "Species",
    "Annotation",
    "Label",
    "Class",
    "Species Code",
    "Call Type",
    "Sound Type",
    "Tags",
)
RAVEN_BEGIN = "Begin Time (s)"
RAVEN_END = "End Time (s)"
PAIR_LABELS = ("positive", "negative")

LabelFileKind = Literal["raven", "audacity"]


def split_labels(value: object) -> list[str]:
    """'a, b' -> ['a', 'b']; empty / NaN / None -> []."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [s.strip() for s in str(value).split(",") if s.strip()]


def join_labels(labels: Iterable[str]) -> str:
    """['b', 'a', 'a'] -> 'a,b' (sorted, unique)."""
    return ",".join(sorted(set(labels)))


@dataclass(frozen=True)
class Annotation:
    """One call-level annotation (seconds from the start of its recording)."""

    start: float
    end: float
    label: str
    low_freq: float | None = None
    high_freq: float | None = None
    file: str | None = None  # Raven `Begin File`: the recording this call is in, when given
    channel: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


class LabelledFile(NamedTuple):
    """A file and its clip-level labels (an empty list is a negative / unlabelled clip), plus
    the other columns of its labels.csv row (a dataset's own split, fold, site, date, ...)."""

    path: Path
    labels: list[str]
    extra: dict[str, str] = {}  # noqa: RUF012 (never mutated: a fresh dict per row)


# ---------------------------------------------------------------------------------------------
# labels.csv


def _resolve_listed(base: Path, name: str) -> Path:
    """A `filename` cell -> absolute path; relative names are relative to the csv's folder."""
    name = name.strip()
    if "\\" in name and "/" not in name:  # a Windows-made csv: sub\\file.wav
        name = PurePosixPath(*PureWindowsPath(name).parts).as_posix()
    p = Path(name).expanduser()
    return p if p.is_absolute() else base / p


def read_labels_csv(
    path: str | Path, label_column: str = "labels", filename_column: str = "filename"
) -> list[LabelledFile]:
    """Read `filename,labels` rows; paths resolved against the csv's folder, in file order.

    Other columns are kept per file in `extra` (the first non-empty value when a file is listed
    twice). A file listed twice gets the union of its labels. The file's existence is not
    checked here (`bioaudio prepare` reports missing files in skipped.csv).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot parse {p}: {str(e).splitlines()[0]}") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{p} is empty (expected a header `{filename_column},{label_column}`)")
    header = [c.strip() for c in rows[0]]
    for col, flag in ((filename_column, "--filename_column"), (label_column, "--label_column")):
        if col not in header:
            raise DataError(
                f"{p}: no column {col!r} (columns: {', '.join(header)}); choose one with {flag}"
            )
    fi, li = header.index(filename_column), header.index(label_column)
    others = [(i, c) for i, c in enumerate(header) if i not in (fi, li) and c]
    base = p.resolve().parent
    merged: dict[Path, list[str]] = {}
    extras: dict[Path, dict[str, str]] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        name = row[fi].strip() if fi < len(row) else ""
        if not name:
            raise DataError(f"{p} line {lineno}: empty {filename_column!r}")
        labels = split_labels(row[li]) if li < len(row) else []
        target = _resolve_listed(base, name)
        merged.setdefault(target, [])
        merged[target] = sorted(set(merged[target]) | set(labels))
        extra = extras.setdefault(target, {})
        for i, col in others:
            value = row[i].strip() if i < len(row) else ""
            if value and not extra.get(col):
                extra[col] = value
    if not merged:
        raise DataError(f"{p} has a header but no rows")
    return [LabelledFile(k, v, extras[k]) for k, v in merged.items()]


# ---------------------------------------------------------------------------------------------
# folder layouts


def _parts_under(q: Path, root: Path) -> tuple[str, ...]:
    """The parts of `q` below `root`, taking the path as found in the tree: a symbolic link to a
    file elsewhere stays under its folder. Paths outside `root` give ()."""
    for base, path in (
        (Path(os.path.abspath(root)), Path(os.path.abspath(q))),
        (root.resolve(), Path(os.path.abspath(q))),
        (root.resolve(), q.resolve()),
    ):
        try:
            return path.relative_to(base).parts
        except ValueError:
            continue
    return ()


def folder_labels(paths: Sequence[str | Path], root: str | Path) -> dict[Path, list[str]]:
    """One folder per class: the first folder under `root` is the label; files at `root` get [].
    Keys are the paths as given (absolute); symbolic links are not resolved."""
    root = Path(root)
    out: dict[Path, list[str]] = {}
    for q in paths:
        q = Path(os.path.abspath(q))
        parts = _parts_under(q, root)
        if len(parts) < 2:
            out[q] = []
            continue
        name = parts[0].strip()
        if "," in name:
            raise DataError(
                f"class folder {root / parts[0]!s}: a comma separates labels in manifests; "
                "rename the folder"
            )
        out[q] = [name]
    return out


def pair_labels(paths: Sequence[str | Path], root: str | Path) -> dict[Path, list[str]]:
    """`positive/` and `negative/` under `root` become labels 'positive' / 'negative'.

    Files outside both folders get [] (they are unlabelled). Folder names match case-insensitively.
    Keys are the paths as given (absolute); symbolic links are not resolved.
    """
    root = Path(root)
    out: dict[Path, list[str]] = {}
    for q in paths:
        q = Path(os.path.abspath(q))
        parts = _parts_under(q, root)
        top = parts[0].lower() if len(parts) > 1 else ""
        out[q] = [top] if top in PAIR_LABELS else []
    return out


# ---------------------------------------------------------------------------------------------
# Audacity label tracks


def _float(text: str, where: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{where}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: {what} {text.strip()!r} is not finite")
    return v


def read_audacity_labels(path: str | Path) -> list[Annotation]:
    """Parse an Audacity label track export (`start<TAB>end<TAB>label` per line).

    A line starting with `\\` holds the low / high frequency (Hz) of the label above it; it is
    attached to that label, never read as a label itself. Point labels have start == end.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a text file ({e.reason})") from e
    out: list[Annotation] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p} line {lineno}"
        fields = line.split("\t")
        if fields[0].strip() == "\\":
            if not out:
                raise DataError(f"{where}: frequency line before any label")
            if len(fields) < 3:
                raise DataError(f"{where}: expected `\\<TAB>low<TAB>high`")
            lo = _float(fields[1], where, "low frequency")
            hi = _float(fields[2], where, "high frequency")
            prev = out[-1]
            out[-1] = Annotation(prev.start, prev.end, prev.label, lo, hi, prev.file)
            continue
        if len(fields) < 2:
            raise DataError(
                f"{where}: expected `start<TAB>end<TAB>label` (tab-separated), got {line[:60]!r}"
            )
        start = _float(fields[0], where, "start")
        end = _float(fields[1], where, "end")
        if end < start:
            raise DataError(f"{where}: end {end} is before start {start}")
        label = "\t".join(fields[2:]).strip() if len(fields) > 2 else ""
        out.append(Annotation(start, end, label))
    return out


# ---------------------------------------------------------------------------------------------
# Raven selection tables


def _pick_column(columns: Sequence[str], wanted: str | None, where: str) -> str:
    lower = {c.lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise DataError(
            f"{where}: no label column {wanted!r} (columns: {', '.join(columns)}); "
            "choose one with --label_column"
        )
    for cand in RAVEN_LABEL_CANDIDATES:
        if cand.lower() in lower:
            return lower[cand.lower()]
    raise DataError(
        f"{where}: no label column found (tried {', '.join(RAVEN_LABEL_CANDIDATES)}; "
        f"columns: {', '.join(columns)}); choose one with --label_column"
    )


def read_raven_table(path: str | Path, label_column: str | None = None) -> list[Annotation]:
    """Parse a Raven selection table (tab-separated, one header line).

    Raven lists each selection once per view (Waveform 1, Spectrogram 1, ...); rows are
    deduplicated by `Selection` (the Spectrogram row wins, it carries the frequency box). Rows
    that share a Selection number but differ in begin, end, label or file are separate calls.
    With `Begin File` and `File Offset (s)` columns (a table spanning several files), times are
    taken relative to the file named in `Begin File`.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"selection table not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f, delimiter="\t") if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot parse selection table {p}: {str(e).splitlines()[0]}") from e
    if not rows:
        raise DataError(f"selection table {p} is empty")
    header = [c.strip() for c in rows[0]]
    for col in (RAVEN_BEGIN, RAVEN_END):
        if col not in header:
            raise DataError(
                f"{p}: not a Raven selection table, no {col!r} column (columns: {', '.join(header)})"
            )
    label_col = _pick_column(header, label_column, str(p))
    ix = {c: i for i, c in enumerate(header)}

    def cell(row: list[str], col: str) -> str:
        i = ix.get(col)
        return row[i].strip() if i is not None and i < len(row) else ""

    def same_call(row: list[str]) -> tuple[str, ...]:
        # The rows of one selection (one per view) share its times and label; rows numbered
        # alike that differ in them are different calls (tables merged or edited by hand).
        out = []
        for col in (RAVEN_BEGIN, RAVEN_END):
            text = cell(row, col)
            try:
                out.append(repr(float(text)))
            except ValueError:
                out.append(text)
        return (*out, cell(row, label_col), cell(row, "Begin File"))

    chosen: dict[tuple[str, ...], tuple[int, list[str]]] = {}
    order: list[tuple[str, ...]] = []
    for lineno, row in enumerate(rows[1:], start=2):
        sel = (cell(row, "Selection") or f"line{lineno}", *same_call(row))
        spectro = cell(row, "View").lower().startswith("spectrogram")
        if sel not in chosen:
            order.append(sel)
            chosen[sel] = (lineno, row)
        elif spectro:
            chosen[sel] = (lineno, row)
    out: list[Annotation] = []
    for sel in order:
        lineno, row = chosen[sel]
        where = f"{p} line {lineno}"
        begin = _float(cell(row, RAVEN_BEGIN), where, RAVEN_BEGIN)
        end = _float(cell(row, RAVEN_END), where, RAVEN_END)
        if end < begin:
            raise DataError(f"{where}: end {end} is before begin {begin}")
        file = cell(row, "Begin File") or None
        offset = cell(row, "File Offset (s)")
        if file and offset:  # times relative to the whole file list -> relative to Begin File
            start = _float(offset, where, "File Offset (s)")
            begin, end = start, start + (end - begin)
        lo = cell(row, "Low Freq (Hz)")
        hi = cell(row, "High Freq (Hz)")
        ch = cell(row, "Channel")
        out.append(
            Annotation(
                start=begin,
                end=end,
                label=cell(row, label_col),
                low_freq=_float(lo, where, "Low Freq (Hz)") if lo else None,
                high_freq=_float(hi, where, "High Freq (Hz)") if hi else None,
                file=file,
                channel=int(_float(ch, where, "Channel")) if ch else None,
            )
        )
    return out


def sniff_label_file(path: str | Path) -> LabelFileKind | None:
    """'raven' / 'audacity' from the first non-empty line of a .txt file, else None."""
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            for line in f:
                if line.strip():
                    break
            else:
                return None
    except (OSError, UnicodeDecodeError):
        return None
    fields = line.rstrip("\r\n").split("\t")
    if RAVEN_BEGIN in [c.strip() for c in fields]:
        return "raven"
    if len(fields) >= 2:
        try:
            float(fields[0])
            float(fields[1])
        except ValueError:
            return None
        return "audacity"
    return None


def read_label_file(
    path: str | Path, label_column: str | None = None
) -> tuple[LabelFileKind, list[Annotation]]:
    """Read a Raven table or an Audacity track, whichever `path` is."""
    kind = sniff_label_file(path)
    if kind == "raven":
        return kind, read_raven_table(path, label_column)
    if kind == "audacity":
        return kind, read_audacity_labels(path)
    raise DataError(
        f"{path}: neither a Raven selection table (header with {RAVEN_BEGIN!r}) nor an "
        "Audacity label track (start<TAB>end<TAB>label)"
    )


# ---------------------------------------------------------------------------------------------
# the window rule


def window_bounds(duration: float, window: float, hop: float) -> list[tuple[float, float]]:
    """Fixed windows over a recording: starts 0, hop, 2*hop, ... while a full window fits.

    When the last full window stops short of the end, one more window is aligned to the end,
    so every second is covered and every window is `window` long. A recording shorter than
    `window` is one window [0, duration].
    """
    if window <= 0 or hop <= 0:
        raise DataError(f"window ({window}) and hop ({hop}) must be positive")
    if duration <= 0:
        return []
    if duration <= window:
        return [(0.0, float(duration))]
    n = int(math.floor((duration - window) / hop + 1e-9)) + 1
    bounds = [(round(i * hop, 6), round(i * hop + window, 6)) for i in range(n)]
    if bounds[-1][1] < duration - 1e-6:
        bounds.append((round(duration - window, 6), float(duration)))
    return bounds


def overlap_rule(
    call_start: float, call_end: float, win_start: float, win_end: float, min_overlap: float
) -> bool:
    """True when the call counts for the window: overlap >= min_overlap * min(call, window).

    A point call (start == end) counts in every window that contains it.
    """
    if call_end <= call_start:
        return win_start <= call_start <= win_end
    ov = min(call_end, win_end) - max(call_start, win_start)
    need = min_overlap * min(call_end - call_start, win_end - win_start)
    return ov > 0 and ov >= need - 1e-9


def window_labels(
    annotations: Sequence[Annotation],
    duration: float,
    window: float = 5.0,
    hop: float = 2.5,
    min_overlap: float = 0.5,
) -> list[tuple[float, float, list[str]]]:
    """Windows of a recording with the labels of the calls they hold (see `overlap_rule`).

    Returns [(start, end, sorted labels)]; a window with no qualifying call has [] (a negative
    window). Annotations with an empty label are ignored; a label "a,b" means both.
    """
    if not 0 < min_overlap <= 1:
        raise DataError(f"min_overlap must be in (0, 1], got {min_overlap}")
    bounds = window_bounds(duration, window, hop)
    if not bounds:
        return []
    ws = np.array([b[0] for b in bounds])
    we = np.array([b[1] for b in bounds])
    hits: list[set[str]] = [set() for _ in bounds]
    for a in annotations:
        names = split_labels(a.label)
        if not names:
            continue
        # Windows are sorted by start and by end, so only a slice can touch the call.
        lo = int(np.searchsorted(we, a.start, side="left"))
        hi = int(np.searchsorted(ws, a.end, side="right"))
        for i in range(lo, hi):
            if overlap_rule(a.start, a.end, ws[i], we[i], min_overlap):
                hits[i].update(names)
    return [(float(s), float(e), sorted(h)) for (s, e), h in zip(bounds, hits)]
