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

`prepare_manifest` builds a manifest from a folder tree in any layout of `data/README.md`
(headers read in parallel, unreadable files listed in `skipped.csv` with their reason).
With `source` none the labels are unknown; with any other source an empty `labels` cell is a
negative (e.g. a window of an annotated recording with no call in it).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import soundfile as sf

from bioaudio.data.audio import AudioInfo, is_url
from bioaudio.data.audio import info as audio_info
from bioaudio.data.labels import (
    Annotation,
    folder_labels,
    join_labels,
    pair_labels,
    read_audacity_labels,
    read_labels_csv,
    read_raven_table,
    sniff_label_file,
    split_labels,
    window_labels,
)
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.fileio import AUDIO_EXTENSIONS, guard_output, is_audio_path, write_csv_atomic

__all__ = [
    "COLUMNS",
    "SKIPPED_COLUMNS",
    "PrepareConfig",
    "PrepareResult",
    "build_manifest",
    "class_names_of",
    "detect_layout",
    "find_audio_files",
    "guard_manifest_output",
    "is_manifest_file",
    "join_labels",
    "prepare_manifest",
    "probe_audio",
    "read_manifest",
    "scan_audio",
    "skipped_path_for",
    "split_labels",
    "write_manifest",
]

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
REQUIRED_COLUMNS = ("path", "sample_rate", "frames", "duration")


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV file's first line ([] when it cannot be read as text)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def is_manifest_file(path: str | Path) -> bool:
    """True for a CSV with a manifest's columns (what `write_manifest` writes)."""
    return set(REQUIRED_COLUMNS) <= set(_csv_header(Path(path)))


def is_skipped_file(path: str | Path) -> bool:
    """True for a skip list (`path,reason` columns) as `prepare` writes beside a manifest."""
    return set(SKIPPED_COLUMNS) <= set(_csv_header(Path(path)))


def guard_manifest_output(
    path: str | Path,
    inputs: tuple[str | Path, ...] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse to write a manifest over audio, over the command's input or over an existing file
    that is not a manifest (see `bioaudio.fileio.guard_output`); `overwrite` allows it."""
    return guard_output(
        path, what="manifest", ours=is_manifest_file, inputs=inputs, overwrite=overwrite, flag=flag
    )


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV; `path` becomes absolute; missing required columns are an error."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest not found: {p}")
    if is_audio_path(p):
        raise DataError(f"{p} is an audio file, not a manifest: give its folder, or a manifest "
                        "CSV made by `bioaudio prepare`")  # fmt: skip
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
    df["path"] = [str(q) if os.path.isabs(q) or is_url(q) else str(base / q) for q in df["path"]]
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
        if is_url(q):
            return str(q)  # object storage: kept as written
        # The path as found (a symbolic link stays a link under the folder), else resolved.
        for cand in (Path(os.path.abspath(q)), Path(q).resolve()):
            try:
                return str(cand.relative_to(base))
            except ValueError:
                pass
        return str(Path(q).resolve())

    out["path"] = [rel(q) for q in out["path"]]
    ordered = [c for c in COLUMNS if c in out.columns] + [
        c for c in out.columns if c not in COLUMNS
    ]
    return write_csv_atomic(out[ordered], p)


def class_names_of(df: pd.DataFrame) -> list[str]:
    """Sorted unique label names present in a manifest."""
    names: set[str] = set()
    for v in df["labels"]:
        names.update(split_labels(v))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# scanning a folder tree

LabelLayout = Literal["auto", "none", "csv", "folders", "selections", "pairs"]
Verify = Literal["header", "tail", "full"]


@dataclass
class PrepareConfig:
    """Options of `bioaudio prepare` (and of `prepare_manifest`)."""

    labels: LabelLayout = field(
        default="auto",
        metadata={
            "help": "label source: auto (detect), none (unlabelled), csv (labels.csv), folders "
            "(one folder per class), selections (Raven / Audacity tables beside audio, "
            "windowed), pairs (positive/ and negative/)"
        },
    )
    labels_csv: str | None = field(
        default=None, metadata={"help": "labels csv for --labels csv; None = DIR/labels.csv"}
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "label column of labels.csv (None = labels) or of Raven tables "
            "(None = the first of Species, Annotation, Label, Class, ...)"
        },
    )
    filename_column: str = field(
        default="filename", metadata={"help": "file name column of labels.csv"}
    )
    window: float = field(
        default=5.0, metadata={"help": "window length (s) for annotated long recordings"}
    )
    hop: float = field(default=2.5, metadata={"help": "hop between windows (s)"})
    min_overlap: float = field(
        default=0.5,
        metadata={
            "help": "a window carries a call's label when they overlap by at least "
            "min_overlap x min(call duration, window length)"
        },
    )
    verify: Verify = field(
        default="tail",
        metadata={
            "help": "how much of each file to check: header only, tail (also read the last "
            "0.1 s: catches truncated files), or full (decode everything: slow)"
        },
    )
    workers: int = field(
        default=8, metadata={"help": "threads reading headers in parallel (I/O bound)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace an existing --out (and its skip list) even when it is not a "
            "manifest written by bioaudio"
        },
    )

    def validate(self) -> None:
        if self.window <= 0:
            raise ConfigError(f"--window must be > 0, got {self.window}")
        if self.hop <= 0:
            raise ConfigError(f"--hop must be > 0, got {self.hop}")
        if not 0 < self.min_overlap <= 1:
            raise ConfigError(f"--min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(audio files, .txt files) under `root`, sorted, hidden files and folders left out.

    Symbolic links to folders are followed (a class folder may live elsewhere), each real folder
    once (a link back up the tree is not a loop); paths are as found in the tree, not resolved.
    """
    audio: list[Path] = []
    texts: list[Path] = []
    seen: set[str] = set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # reached again through a link: already scanned
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(
            x for x in dirs if not _hidden(x) and os.path.realpath(os.path.join(d, x)) not in seen
        )
        for name in sorted(files):
            if _hidden(name):
                continue
            p = Path(d) / name
            if is_audio_path(p):
                audio.append(p)
            elif name.lower().endswith(".txt"):
                texts.append(p)
    return audio, texts


def find_audio_files(root: str | Path) -> list[Path]:
    """Every audio file under `root` (by extension), sorted; hidden files and folders skipped."""
    return _walk(Path(root).resolve())[0]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    msg = msg.splitlines()[0] if msg else type(e).__name__
    return msg.split(": ", 1)[-1] if msg.startswith("Error opening") else msg


def _wav_declared_frames(path: str | Path, meta: AudioInfo) -> int | None:
    """The frame count a RIFF/WAVE header declares for its data chunk, or None when the file is
    not a plain WAV (or declares no usable size). libsndfile reads a truncated WAV up to its end
    without complaint, so the promise has to be read from the header itself."""
    if is_url(path) or not str(meta.format).upper().startswith("WAV"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block = 0
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) < 14:
                        return None
                    block = int.from_bytes(fmt[12:14], "little")  # bytes per frame
                    f.seek(size % 2, os.SEEK_CUR)
                elif cid == b"data":
                    if not block or size in (0, 0xFFFFFFFF):  # unfinished (streamed) headers
                        return None
                    return size // block
                else:
                    f.seek(size + size % 2, os.SEEK_CUR)
    except OSError:
        return None


def probe_audio(path: str | Path, verify: Verify = "tail") -> AudioInfo:
    """The header of `path`, checked as deep as `verify` asks; AudioDecodeError when unusable.

    'tail' seeks to the last 0.1 s and reads it: a truncated FLAC / OGG whose header promises
    more frames than the file holds fails here rather than in the middle of a training run.
    """
    meta = audio_info(path)
    declared = _wav_declared_frames(path, meta)
    if declared is not None and declared > meta.frames:
        raise AudioDecodeError(
            path,
            f"truncated: the header declares {declared} frames, the file holds {meta.frames}",
        )
    if verify == "header":
        return meta
    n = min(meta.frames, max(1, meta.sample_rate // 10))
    try:
        with sf.SoundFile(str(path)) as f:
            if verify == "tail":
                f.seek(meta.frames - n)
                got = f.read(n, dtype="float32", always_2d=True).shape[0]
            else:
                got = sum(b.shape[0] for b in f.blocks(blocksize=1 << 16, always_2d=True))
    except Exception as e:  # libsndfile raises several types for damaged files
        raise AudioDecodeError(path, f"truncated or corrupt data ({_first_line(e)})") from e
    want = n if verify == "tail" else meta.frames
    if got < want:
        raise AudioDecodeError(
            path, f"truncated: the header promises {meta.frames} frames, the data ends early"
        )
    return meta


def scan_audio(
    paths: list[Path], workers: int = 8, verify: Verify = "tail", progress: bool = True
) -> tuple[dict[Path, AudioInfo], dict[Path, str]]:
    """Probe `paths` in a thread pool: ({path: info} for good files, {path: reason} for bad)."""
    from tqdm.auto import tqdm

    def one(p: Path) -> AudioInfo | str:
        if p.is_symlink() and not p.exists():
            return f"dangling symbolic link (its target {os.readlink(p)} does not exist)"
        try:
            return probe_audio(p, verify)
        except AudioDecodeError as e:
            return e.reason
        except Exception as e:  # one odd file (permissions, I/O error) must not stop the scan
            return f"{type(e).__name__}: {_first_line(e)}"

    good: dict[Path, AudioInfo] = {}
    bad: dict[Path, str] = {}
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as ex,
        tqdm(
            total=len(paths), desc="reading audio headers", unit="file", disable=not progress
        ) as bar,
    ):
        for p, res in zip(paths, ex.map(one, paths)):
            if isinstance(res, str):
                bad[p] = res
            else:
                good[p] = res
            bar.update(1)
    return good, bad


def _subdirs(root: Path) -> dict[str, Path]:
    return {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not _hidden(d.name)}


def _table_stem(p: Path) -> str:
    """'rec.Table.1.selections.txt' -> 'rec'; 'rec.selections.txt' -> 'rec'; 'rec.txt' -> 'rec'."""
    name = p.name
    if name.lower().endswith(".selections.txt"):
        name = name[: -len(".selections.txt")]
        head, dot, tail = name.rpartition(".")
        if dot and tail.isdigit() and head.lower().endswith(".table"):
            name = head[: -len(".table")]
        return name
    return p.stem


def _label_files(texts: list[Path], audio: list[Path]) -> list[tuple[Path, str]]:
    """The .txt files that are label tables: (path, kind).

    Raven tables are recognised by their header wherever they are; an Audacity track (a bare
    `start<TAB>end...` file) only counts beside audio of the same stem, so a stray numeric
    .txt elsewhere is not mistaken for one.
    """
    stems = {(a.parent, a.stem) for a in audio}
    out = []
    for t in texts:
        kind = sniff_label_file(t)
        if kind is None and t.name.lower().endswith(".selections.txt"):
            kind = "raven"  # named like one: reading it reports what is wrong with it
        if kind == "raven" or (kind == "audacity" and (t.parent, t.stem) in stems):
            out.append((t, kind))
    return out


def detect_layout(root: str | Path) -> str:
    """The label layout of a folder tree (see data/README.md for the rules, checked in order)."""
    root = Path(root).resolve()
    audio, texts = _walk(root)
    return _detect(root, audio, texts)


def _detect(root: Path, audio: list[Path], texts: list[Path]) -> str:
    if (root / "labels.csv").is_file():
        return "csv"
    sub = _subdirs(root)
    if "positive" in sub and "negative" in sub:
        return "pairs"
    if _label_files(texts, audio):
        return "selections"
    rel = [a.relative_to(root).parts for a in audio]
    direct = {parts[0] for parts in rel if len(parts) == 2}
    if len(direct) >= 2 and not any(len(parts) == 1 for parts in rel):
        return "folders"
    return "none"


@dataclass
class PrepareResult:
    """What `prepare_manifest` found: the manifest (absolute paths), the skips, and notes."""

    root: Path
    layout: str
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    manifest_path: Path | None = None
    skipped_path: Path | None = None

    def summary(self) -> str:
        """A few lines for the terminal: counts, hours, rates, classes, skips, outputs."""
        df = self.manifest
        lines = [f"layout: {self.layout} ({self.root})"]
        if len(df):
            rec = df.drop_duplicates("path")
            hours = rec["duration"].sum() / 3600
            lines.append(
                f"{len(rec)} recording(s), {hours:.3f} h of audio, {len(df)} manifest row(s)"
            )
            rates = Counter(int(r) for r in rec["sample_rate"])
            lines.append(
                "sample rates: " + ", ".join(f"{r} Hz x {n}" for r, n in sorted(rates.items()))
            )
            multi = int((rec["channels"] > 1).sum())
            if multi:
                lines.append(f"multi-channel recordings: {multi}")
            counts: Counter[str] = Counter()
            for v in df["labels"]:
                counts.update(split_labels(v))
            if counts:
                lines.append(
                    f"classes ({len(counts)}): "
                    + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
                )
            unlab = int((df["source"] == "none").sum())
            neg = int(((df["source"] != "none") & (df["labels"] == "")).sum())
            if unlab:
                lines.append(f"unlabelled rows: {unlab}")
            if neg:
                lines.append(f"negative rows (labelled source, no label): {neg}")
        lines.extend(f"note: {n}" for n in self.notes)
        where = f", reasons in {self.skipped_path}" if self.skipped_path else ""
        lines.append(f"skipped: {len(self.skipped)} file(s){where}")
        if self.manifest_path:
            lines.append(f"manifest: {self.manifest_path}")
        return "\n".join(lines)


def _extra_columns(extra: dict[str, str]) -> dict[str, str]:
    """A labels.csv row's other columns; a name the manifest itself uses gets a `csv_` prefix."""
    return {(f"csv_{k}" if k in COLUMNS else k): v for k, v in extra.items()}


def _row(
    p: Path, meta: AudioInfo, root: Path, labels: list[str], source: str, start: float, end: float
) -> dict[str, object]:
    try:
        recording = p.relative_to(root).as_posix()
    except ValueError:
        recording = str(p)
    return {
        "path": str(p),
        "sample_rate": meta.sample_rate,
        "frames": meta.frames,
        "duration": meta.duration,
        "channels": meta.channels,
        "start": float(start),
        "end": float(end),
        "labels": join_labels(labels),
        "recording": recording,
        "source": source,
    }


def _selections(
    root: Path, audio: list[Path], texts: list[Path], cfg: PrepareConfig
) -> tuple[dict[Path, tuple[str, list[Annotation]]], dict[Path, str], list[str]]:
    """Annotations per audio file from the label tables in the tree.

    Returns ({audio: (kind, annotations)}, {path: skip reason}, notes). Raises DataError when
    there are label tables and none of them could be read (a wrong --label_column, usually).
    """
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    by_name: dict[str, list[Path]] = {}
    for a in audio:
        by_stem.setdefault((a.parent, a.stem), []).append(a)
        by_name.setdefault(a.name, []).append(a)
    found: dict[Path, dict[str, list[Annotation]]] = {}
    skips: dict[Path, str] = {}
    errors: list[str] = []
    files = _label_files(texts, audio)
    for t, kind in files:
        try:
            if kind == "raven":
                anns = read_raven_table(t, cfg.label_column)
            else:
                anns = read_audacity_labels(t)
        except DataError as e:
            errors.append(str(e))
            skips[t] = str(e)
            for a in by_stem.get((t.parent, _table_stem(t)), []):
                skips[a] = f"its label file {t.name} cannot be read"
            continue
        groups: dict[Path, list[Annotation]] = {}
        if kind == "raven" and any(a.file for a in anns):
            for ann in anns:
                name = Path(ann.file or "").name
                cands = [q for q in by_name.get(name, []) if q.parent == t.parent] or by_name.get(
                    name, []
                )
                if len(cands) != 1:
                    why = "was not found" if not cands else "is ambiguous (several files)"
                    skips.setdefault(t, f"Begin File {ann.file!r} {why}")
                    continue
                groups.setdefault(cands[0], []).append(ann)
        else:
            targets = by_stem.get((t.parent, _table_stem(t)), [])
            if not targets:
                skips[t] = f"{kind} label file with no audio named {_table_stem(t)}.* beside it"
                continue
            for a in targets:
                groups[a] = list(anns)
        for a, anns_a in groups.items():
            found.setdefault(a, {}).setdefault(kind, []).extend(anns_a)
    if files and len(errors) == len(files):
        more = f" (and {len(errors) - 1} more label file(s) like it)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    out: dict[Path, tuple[str, list[Annotation]]] = {}
    notes: list[str] = []
    both = 0
    for a, kinds in found.items():
        if "raven" in kinds:
            both += "audacity" in kinds
            out[a] = ("raven", kinds["raven"])
        else:
            out[a] = ("audacity", kinds["audacity"])
    if both:
        notes.append(
            f"{both} recording(s) have both a Raven table and an Audacity track; "
            "the Raven table was used"
        )
    return out, skips, notes


def build_manifest(root: str | Path, config: PrepareConfig | None = None) -> PrepareResult:
    """Scan `root` into a manifest in memory (nothing written). See `prepare_manifest`."""
    cfg = config or PrepareConfig()
    cfg.validate()
    root_in = Path(root).expanduser()
    if not root_in.exists():
        raise DataError(f"directory not found: {root_in}")
    if not root_in.is_dir():
        raise DataError(f"not a directory: {root_in}")
    root = root_in.resolve()
    audio, texts = _walk(root)
    layout = cfg.labels if cfg.labels != "auto" else _detect(root, audio, texts)
    notes: list[str] = []
    skips: dict[Path, str] = {}
    labels_of: dict[Path, list[str]] = {}
    source_of: dict[Path, str] = {}
    extra_of: dict[Path, dict[str, str]] = {}
    anns_of: dict[Path, tuple[str, list[Annotation]]] = {}
    exts = ", ".join(sorted(AUDIO_EXTENSIONS))

    if layout == "csv":
        csv_path = Path(cfg.labels_csv).expanduser() if cfg.labels_csv else root / "labels.csv"
        if not csv_path.is_file():
            raise DataError(f"--labels csv: labels file not found: {csv_path} (set --labels_csv)")
        entries = read_labels_csv(
            csv_path, label_column=cfg.label_column or "labels", filename_column=cfg.filename_column
        )
        todo = []
        for entry in entries:
            p = entry.path.resolve() if entry.path.exists() else entry.path
            if not entry.path.exists():
                skips[p] = f"listed in {csv_path.name} but the file does not exist"
                continue
            todo.append(p)
            labels_of[p] = entry.labels
            source_of[p] = "csv"
            extra_of[p] = _extra_columns(entry.extra)
        listed = set(todo)
        unlisted = [a for a in audio if a not in listed]
        if unlisted:
            notes.append(
                f"{len(unlisted)} audio file(s) under {root} are not listed in "
                f"{csv_path.name} and were left out"
            )
        audio = todo
    else:
        if not audio:
            raise DataError(f"no audio files in {root} (looked for {exts})")
        if layout == "folders":
            labels_of = folder_labels(audio, root)
            if not any(labels_of.values()):
                raise DataError(
                    f"--labels folders: {root} has no class folders with audio "
                    "(expected DIR/<class>/<file>)"
                )
            source_of = {a: "folder" if labels_of[a] else "none" for a in audio}
        elif layout == "pairs":
            sub = _subdirs(root)
            missing = [n for n in ("positive", "negative") if n not in sub]
            if missing:
                raise DataError(
                    f"--labels pairs: {root} has no {' or '.join(f'{m}/' for m in missing)} folder"
                )
            labels_of = pair_labels(audio, root)
            source_of = {a: "pairs" if labels_of[a] else "none" for a in audio}
        elif layout == "selections":
            anns_of, table_skips, more = _selections(root, audio, texts, cfg)
            if not anns_of and not table_skips:
                raise DataError(
                    f"--labels selections: no Raven selection table (*.selections.txt) or "
                    f"Audacity label track (<audio stem>.txt) in {root}"
                )
            skips.update({k: v for k, v in table_skips.items() if not is_audio_path(k)})
            bad_audio = {k: v for k, v in table_skips.items() if is_audio_path(k)}
            audio = [a for a in audio if a not in bad_audio]
            skips.update(bad_audio)
            notes.extend(more)
        elif layout != "none":
            raise ConfigError(f"--labels: unknown layout {layout!r}")

    good, bad = scan_audio(audio, cfg.workers, cfg.verify, cfg.progress)
    skips.update(bad)
    rows: list[dict[str, object]] = []
    past_end = 0
    for p in audio:
        meta = good.get(p)
        if meta is None:
            continue
        if p in anns_of:
            kind, anns = anns_of[p]
            past_end += sum(a.start >= meta.duration for a in anns)
            for s, e, labs in window_labels(
                anns, meta.duration, cfg.window, cfg.hop, cfg.min_overlap
            ):
                rows.append(_row(p, meta, root, labs, kind, s, e))
        else:
            src = source_of.get(p, "none")
            row = _row(p, meta, root, labels_of.get(p, []), src, 0.0, meta.duration)
            rows.append({**row, **extra_of.get(p, {})})
    if past_end:
        notes.append(f"{past_end} annotation(s) start after the end of their recording (ignored)")
    extra_cols = list(dict.fromkeys(c for e in extra_of.values() for c in e))
    if extra_cols:
        notes.append(f"kept the labels file's column(s) {', '.join(extra_cols)}")
    manifest = pd.DataFrame(rows, columns=COLUMNS + extra_cols)
    skipped = pd.DataFrame(
        [{"path": str(k), "reason": v} for k, v in sorted(skips.items())], columns=SKIPPED_COLUMNS
    )
    return PrepareResult(root, layout, manifest, skipped, notes)


def skipped_path_for(manifest_path: str | Path) -> Path:
    """The skip list beside a manifest: skipped.csv for manifest.csv, else <stem>.skipped.csv."""
    p = Path(manifest_path)
    return p.with_name("skipped.csv" if p.name == "manifest.csv" else f"{p.stem}.skipped.csv")


def prepare_manifest(
    root: str | Path, out: str | Path | None = None, config: PrepareConfig | None = None
) -> PrepareResult:
    """Scan `root` and write the manifest (default `root/manifest.csv`) and `skipped.csv` beside it.

    skipped.csv (path, reason) is always written, possibly with a header only; beside a manifest
    named other than manifest.csv it is `<stem>.skipped.csv`, so two manifests in one folder keep
    their own. Raises DataError when nothing usable remains (after writing the skip list, so the
    reasons can be read); an existing manifest is then left untouched. A file at either path
    that is not one of ours (audio, the labels file, anything else) is refused before the scan
    unless `config.overwrite`.
    """
    cfg = config or PrepareConfig()
    root_in = Path(root).expanduser()
    default = root_in.resolve() / "manifest.csv" if root_in.is_dir() else None
    manifest_path = Path(out).expanduser() if out else default
    skipped_path = None
    if manifest_path is not None:
        if manifest_path.is_dir():
            raise ConfigError(f"--out {manifest_path} is a directory; give a file name (.csv)")
        labels = Path(cfg.labels_csv).expanduser() if cfg.labels_csv else root_in / "labels.csv"
        guard_manifest_output(manifest_path, (labels,), cfg.overwrite)
        skipped_path = skipped_path_for(manifest_path)
        guard_output(
            skipped_path,
            what="skip list",
            ours=is_skipped_file,
            inputs=(labels,),
            overwrite=cfg.overwrite,
            flag="skip list",
        )
    result = build_manifest(root, config)
    if manifest_path is None or skipped_path is None:  # pragma: no cover - root checked above
        raise DataError(f"not a directory: {root_in}")
    write_manifest(result.skipped, skipped_path)
    result.skipped_path = skipped_path
    if len(result.manifest) == 0:
        raise DataError(
            f"no usable audio in {result.root}: {len(result.skipped)} file(s) skipped, "
            f"reasons in {skipped_path}"
        )
    write_manifest(result.manifest, manifest_path)
    result.manifest_path = manifest_path
    return result
