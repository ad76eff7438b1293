"""Detection over long recordings: sliding windows -> class probabilities -> events.

Rules (what `bioaudio detect` documents):

- Windows: `window` seconds every `hop` seconds (0 < hop <= window), read by seeking a batch of
  windows at a time (a file is never decoded whole). The last, partial window is scored (zero
  padded, the padding masked) when it holds at least `MIN_AUDIO_SECONDS` (or the whole window,
  for windows shorter than that). A recording shorter than one window but at least that long
  is scored as one padded window (and counted in a note); a shorter one is skipped.
- Probabilities: sigmoid per class for multi-label models, softmax over classes for
  single-label ones. A window is positive for class c when p_c >= threshold_c; on softmax
  outputs the threshold means "confident enough" (with thresholds under 0.5 several classes
  can be positive in one window).
- Events: positive windows of a class whose spans overlap or touch (consecutive windows always
  do, since hop <= window), or are at most `merge_gap` seconds apart, form one event: start =
  its first window's start, end = its last window's end; max_prob and mean_prob over those
  windows. Events shorter than `min_duration` are dropped. Ignored classes (a background
  class) never make events.

Outputs of `detect_to_folder` in OUT (per recording `<name>` = its path under the input folder
without the extension, or its file stem):
    <name>.selections.txt   Raven selection table (tab-separated; Raven Pro opens it and
                            `bioaudio prepare` reads it back as call-level labels)
    <name>.windows.csv      start, end, one probability column per class (--save_windows)
    detections.csv          file, class, start, end, max_prob, mean_prob of every recording
                            of the call
    skipped.csv             path, reason of every recording that could not be used
    .bioaudio_detect/       settings.json and one marker per recording, written after its
                            outputs: a re-run skips the finished ones
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bioaudio import runinfo, runlog
from bioaudio.config import to_dict
from bioaudio.data.audio import info
from bioaudio.data.datasets import segment_windows
from bioaudio.data.labels import RAVEN_BEGIN, RAVEN_END
from bioaudio.data.manifest import find_audio_files, scan_audio
from bioaudio.errors import ConfigError, DataError
from bioaudio.fileio import atomic_path, save_json_atomic, write_csv_atomic
from bioaudio.inference.metrics import probabilities
from bioaudio.inference.predict import resolve_export_dir
from bioaudio.inference.runner import (
    Embedder,
    WindowOptions,
    fresh_audio,
    iter_file_embeddings,
    window_option,
)
from bioaudio.models.checkpoint import load_model

MIN_AUDIO_SECONDS = 0.5  # less audio than this in a window is too little to score
EPS = 1e-6  # seconds; window times are rounded to microseconds
STATE_DIR = ".bioaudio_detect"
RAVEN_COLUMNS = [
    "Selection",
    "View",
    "Channel",
    RAVEN_BEGIN,
    RAVEN_END,
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Species",
    "Max Prob",
    "Mean Prob",
]
DETECTION_COLUMNS = ["file", "class", "start", "end", "max_prob", "mean_prob"]
# what must match for a re-run to extend an output folder
SETTING_KEYS = ("model_fingerprint", "window", "hop", "thresholds", "ignore", "merge_gap")
SETTING_KEYS += ("min_duration",)


@dataclass
class DetectConfig(WindowOptions):
    """Options of `bioaudio detect` (and of `detect_to_folder`)."""

    window: float | None = window_option("window")
    hop: float | None = window_option("hop", "hop between windows in seconds (default: window / 2)")
    threshold: float = field(
        default=0.5,
        metadata={"help": "a window is positive for a class when its probability >= this"},
    )
    thresholds: Path | None = field(
        default=None,
        metadata={"help": "CSV `class,threshold` of per-class thresholds (others: --threshold)"},
    )
    ignore: list[str] = field(
        default_factory=list,
        metadata={"help": "classes never reported as events, e.g. a background class"},
    )
    merge_gap: float = field(
        default=0.0, metadata={"help": "merge events of a class at most this many seconds apart"}
    )
    min_duration: float = field(
        default=0.0, metadata={"help": "drop events shorter than this many seconds"}
    )
    save_windows: bool = field(
        default=False, metadata={"help": "also write <name>.windows.csv (probability per window)"}
    )
    batch_size: int = window_option("batch_size")
    num_workers: int = window_option("num_workers")
    overwrite: bool = field(
        default=False,
        metadata={"help": "redo finished recordings and replace files detect did not write"},
    )
    cpu: bool = window_option("cpu")
    progress: bool = window_option("progress")
    status_every: float = window_option("status_every")

    def validate(self) -> None:
        super().validate()
        if self.window is not None and self.hop is not None and self.hop > self.window + EPS:
            raise ConfigError(
                f"--hop {self.hop:g} is longer than --window {self.window:g}: audio between "
                "windows would never be scored"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {self.threshold}")
        for name in ("merge_gap", "min_duration"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name} must be >= 0 seconds, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Event:
    """One detection: a class present from `start` to `end` seconds of its recording."""

    label: str
    start: float
    end: float
    max_prob: float
    mean_prob: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def merge_events(
    starts: np.ndarray,
    ends: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray | float,
    class_names: Sequence[str],
    merge_gap: float = 0.0,
    min_duration: float = 0.0,
) -> list[Event]:
    """Events of windows `starts`/`ends` (W,) sorted by start with probabilities `probs` (W, C):
    positive windows (p >= threshold, per class; np.inf never fires) that overlap, touch or are
    at most `merge_gap` apart are merged; events shorter than `min_duration` are dropped.
    Returns events sorted by start, then class order."""
    starts, ends = np.asarray(starts, float), np.asarray(ends, float)
    probs = np.asarray(probs, float).reshape(len(starts), len(class_names))
    thr = np.broadcast_to(np.asarray(thresholds, float), (len(class_names),))
    out: list[tuple[float, int, Event]] = []
    for c, name in enumerate(class_names):
        hits = np.flatnonzero(probs[:, c] >= thr[c])
        run: list[int] = []
        run_end = -np.inf
        for i in [*hits, None]:  # None closes the last run
            if i is not None and run and starts[i] <= run_end + merge_gap + EPS:
                run.append(int(i))
                run_end = max(run_end, ends[i])
                continue
            if run:
                start = float(starts[run[0]])
                if run_end - start >= min_duration - EPS:
                    p = probs[run, c]
                    ev = Event(name, start, float(run_end), float(p.max()), float(p.mean()))
                    out.append((start, c, ev))
            if i is not None:
                run, run_end = [int(i)], float(ends[i])
    return [ev for _, _, ev in sorted(out, key=lambda t: (t[0], t[1]))]


@dataclass(frozen=True)
class EventRule:
    """How window probabilities become events (`merge_events` with these settings)."""

    class_names: tuple[str, ...]
    thresholds: tuple[float, ...]
    ignore: frozenset[str] = frozenset()
    merge_gap: float = 0.0
    min_duration: float = 0.0

    def events(self, starts: np.ndarray, ends: np.ndarray, probs: np.ndarray) -> list[Event]:
        thr = [np.inf if n in self.ignore else t for n, t in zip(self.class_names, self.thresholds)]
        return merge_events(
            starts, ends, probs, np.array(thr), self.class_names, self.merge_gap, self.min_duration
        )


def _unknown(names: Sequence[str], class_names: Sequence[str], what: str) -> ConfigError:
    return ConfigError(
        f"{what}: unknown class(es) {', '.join(map(repr, names))}; the model's classes are "
        f"{', '.join(class_names)}"
    )


def read_thresholds(path: str | Path, class_names: Sequence[str]) -> dict[str, float]:
    """Per-class thresholds from a CSV `class,threshold` (a header line is optional)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--thresholds {p}: no such file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"--thresholds {p}: not a CSV file ({e})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["class", "threshold"]:
        rows = rows[1:]
    out: dict[str, float] = {}
    for row in rows:
        if len(row) < 2:
            raise ConfigError(f"--thresholds {p}: expected `class,threshold` rows, got {row!r}")
        name, value = row[0].strip(), row[1].strip()
        try:
            v = float(value)
        except ValueError:
            if row is rows[0] and name not in class_names:  # a header of other names
                raise ConfigError(
                    f"--thresholds {p}: the header must be `class,threshold` (got "
                    f"{','.join(c.strip() for c in row[:2])})"
                ) from None
            raise ConfigError(f"--thresholds {p}: {value!r} ({name}) is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--thresholds {p}: {name} threshold {v:g} is outside [0, 1]")
        if name in out:
            raise ConfigError(f"--thresholds {p}: class {name!r} is listed twice")
        out[name] = v
    if not out:
        raise ConfigError(f"--thresholds {p}: no `class,threshold` rows")
    unknown = [n for n in out if n not in class_names]
    if unknown:
        raise _unknown(unknown, class_names, f"--thresholds {p}")
    return out


def event_rule(cfg: DetectConfig, class_names: Sequence[str]) -> EventRule:
    """The event settings of a config for a model's classes (unknown names are errors)."""
    per_class = read_thresholds(cfg.thresholds, class_names) if cfg.thresholds else {}
    unknown = [n for n in cfg.ignore if n not in class_names]
    if unknown:
        raise _unknown(unknown, class_names, "--ignore")
    return EventRule(
        tuple(class_names),
        tuple(per_class.get(n, cfg.threshold) for n in class_names),
        frozenset(cfg.ignore),
        cfg.merge_gap,
        cfg.min_duration,
    )


# ----------------------------------------------------------------------------------------------
# Raven selection tables


def write_raven_table(path: str | Path, events: Sequence[Event], high_freq: float) -> Path:
    """A Raven selection table of `events` (one Spectrogram 1 row each, Low Freq 0, High Freq
    `high_freq`, usually the recording's Nyquist), written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(RAVEN_COLUMNS)
            for i, ev in enumerate(sorted(events, key=lambda e: (e.start, e.label)), start=1):
                w.writerow(
                    [i, "Spectrogram 1", 1, f"{ev.start:.6f}", f"{ev.end:.6f}", 0, f"{high_freq:g}"]
                    + [ev.label, f"{ev.max_prob:.6f}", f"{ev.mean_prob:.6f}"]
                )
    return Path(path)


def read_raven_events(path: str | Path) -> list[Event]:
    """The events of a table written by `write_raven_table` (with their probabilities)."""
    try:
        df = pd.read_csv(path, sep="\t", dtype={"Species": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read selection table {path}: {e}") from None
    missing = [c for c in RAVEN_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a bioaudio detect table (no {', '.join(missing)})")
    cols = [df[c].to_numpy() for c in (RAVEN_BEGIN, RAVEN_END, "Max Prob", "Mean Prob")]
    return [
        Event(str(label), float(b), float(e), float(mx), float(mn))
        for label, b, e, mx, mn in zip(df["Species"], *cols)
    ]


# ----------------------------------------------------------------------------------------------
# Scoring windows


class Scorer(Embedder):
    """A classifier driven by the shared window runner (`iter_file_embeddings`): class
    probabilities instead of embeddings."""

    def __init__(self, model: torch.nn.Module, source: Path):
        names = list(getattr(model, "class_names", None) or [])
        if not names or getattr(model, "head", True) is None:
            raise ConfigError(
                f"{source}: this model has no classification head (an encoder export?); "
                "detect needs a classifier: finetune first"
            )
        super().__init__(model, source, pooling="mean", layer=None)
        self.class_names = names
        self.multi_label = bool(getattr(model, "multi_label", False))

    @property
    def dim(self) -> int:
        return len(self.class_names)

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """wav (B, S) -> probabilities (B, C): sigmoid (multi-label) or softmax."""
        return probabilities(self.model(wav, padding_mask), self.multi_label)


def load_scorer(path: str | Path, device: str | torch.device | None = None) -> Scorer:
    """A classifier export or run directory (best/, else export/), ready to score windows."""
    p = resolve_export_dir(path)
    return Scorer(load_model(p, device=device), p)


def min_audio(window: float) -> float:
    """Seconds of audio a window needs to be scored."""
    return min(MIN_AUDIO_SECONDS, window)


def recording_windows(
    recordings: Sequence[tuple[str, float]], window: float, hop: float
) -> pd.DataFrame:
    """Windows (path, start, end) of (path, duration) recordings, file by file (see the rules
    in the module doc)."""
    table = pd.DataFrame(recordings, columns=["path", "end"]).assign(start=0.0)
    if table.empty:
        return pd.DataFrame(columns=["path", "start", "end"])
    w = segment_windows(table, window, hop, min_last=min_audio(window))
    return w[["path", "start", "end"]]


@dataclass
class FileDetections:
    """One recording: its windows (start, end, one probability column per class) and events,
    or the reason it could not be scored."""

    path: str
    windows: pd.DataFrame
    events: list[Event]
    error: str | None = None


def iter_detections(
    scorer: Scorer,
    windows: pd.DataFrame,
    rule: EventRule,
    batch_size: int = 16,
    num_workers: int = 0,
    on_audio: Callable[[float], None] | None = None,
) -> Iterator[FileDetections]:
    """Score `windows` (`recording_windows`) in batches across files; yield each recording once
    all its windows are scored. `on_audio(seconds)` reports the new audio of each batch."""
    names = scorer.class_names
    for f in iter_file_embeddings(scorer, windows, batch_size, num_workers, on_audio):
        rows = f.rows[["start", "end"]].reset_index(drop=True)
        if f.error is not None or f.embeddings is None:
            yield FileDetections(f.path, rows, [], f.error or "not scored")
            continue
        probs = f.embeddings
        scores = pd.concat([rows, pd.DataFrame(probs, columns=names)], axis=1)
        yield FileDetections(f.path, scores, rule.events(rows["start"], rows["end"], probs))


def detect_file(
    scorer: Scorer,
    path: str | Path,
    rule: EventRule,
    window: float,
    hop: float | None = None,
    batch_size: int = 16,
) -> FileDetections:
    """Detect the events of one recording in memory (hop default: window / 2)."""
    hop = window / 2 if hop is None else hop
    meta = info(path)
    if meta.duration < min_audio(window) - EPS:
        raise DataError(f"{path}: too short to score ({meta.duration:.3f} s)")
    windows = recording_windows([(str(path), meta.duration)], window, hop)
    det = next(iter_detections(scorer, windows, rule, batch_size))
    if det.error is not None:
        raise DataError(f"{path}: {det.error}")
    return det


# ----------------------------------------------------------------------------------------------
# The command's job: many recordings into one output folder, resumable


@dataclass
class Recording:
    """An input recording: its file, how it is named in tables and outputs, its header."""

    path: Path  # absolute
    file: str  # as shown in detections.csv (the path as given, or under the given folder)
    key: str  # output name without suffix, relative to OUT
    duration: float = 0.0
    sample_rate: int = 0
    size: int = 0

    def outputs(self, out: Path, save_windows: bool) -> list[Path]:
        base = [out / f"{self.key}.selections.txt"]
        return base + ([out / f"{self.key}.windows.csv"] if save_windows else [])


def collect_recordings(inputs: Sequence[str | Path]) -> tuple[list[Recording], list[dict]]:
    """Audio files of files and folders (folders: every audio file under them), with unique
    output names; the second of two recordings with the same output name is skipped."""
    recs: list[Recording] = []
    skipped: list[dict] = []
    seen_paths: set[Path] = set()
    by_key: dict[str, Recording] = {}
    for given in inputs:
        src = Path(given).expanduser()
        if not src.exists():
            raise DataError(f"input not found: {src}")
        if src.is_dir():
            root = src.resolve()
            found = [
                (p, str(src / p.relative_to(root)), p.relative_to(root))
                for p in find_audio_files(root)
            ]
            if not found:
                skipped.append({"path": str(src), "reason": "no audio files in this folder"})
        else:
            found = [(src.resolve(), str(src), Path(src.name))]
        for path, shown, rel in found:
            if path in seen_paths:
                continue
            seen_paths.add(path)
            key = rel.with_suffix("").as_posix()
            if key in by_key:
                reason = f"same output name {key!r} as {by_key[key].file}; run it separately"
                skipped.append({"path": shown, "reason": reason})
                continue
            by_key[key] = Recording(path, shown, key)
            recs.append(by_key[key])
    return recs, skipped


@dataclass
class DetectResult:
    """What `detect_to_folder` did."""

    out: Path
    recordings: int
    new: int
    already_done: int
    skipped: int
    short: int
    audio_seconds: float
    new_audio_seconds: float
    seconds: float
    events: dict[str, int]
    window: float
    hop: float

    def summary(self) -> str:
        rate = self.new_audio_seconds / max(self.seconds, 1e-9)
        total = sum(self.events.values())
        per_class = ", ".join(f"{n} {c}" for n, c in self.events.items())
        lines = [
            f"detected {total} event(s) in {self.recordings} recording(s), "
            f"{self.audio_seconds / 3600:.3f} h of audio ({self.new} processed now at "
            f"{rate:.0f}x real time, {self.already_done} already done); per class: {per_class}",
        ]
        if self.short:
            lines.append(
                f"note: {self.short} recording(s) shorter than one {self.window:g} s window were"
                " scored as one zero-padded window"
            )
        if self.skipped:
            lines.append(f"skipped {self.skipped} file(s), reasons in {self.out / 'skipped.csv'}")
        lines.append(
            f"wrote {self.out / 'detections.csv'} and a Raven selection table per recording"
            f" (<name>.selections.txt) in {self.out}"
        )
        return "\n".join(lines)


def _settings(scorer: Scorer, rule: EventRule, window: float, hop: float) -> dict:
    return {
        "model_path": str(scorer.source.resolve()),
        "model_fingerprint": scorer.fingerprint,
        "model_type": scorer.model_type,
        "multi_label": scorer.multi_label,
        "frontend": to_dict(scorer.model.frontend_cfg),
        "window": float(window),
        "hop": float(hop),
        "thresholds": dict(zip(rule.class_names, rule.thresholds)),
        "ignore": sorted(rule.ignore),
        "merge_gap": float(rule.merge_gap),
        "min_duration": float(rule.min_duration),
    }


def _settings_id(settings: dict) -> str:
    """What a recording's marker must match to count as finished with these settings."""
    text = json.dumps({k: settings[k] for k in SETTING_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(state: Path, rec: Recording) -> Path:
    return state / f"{rec.key}.json"


def _read_marker(state: Path, rec: Recording) -> dict | None:
    try:
        return json.loads(_marker(state, rec).read_text())
    except (OSError, ValueError):
        return None


def _is_done(state: Path, rec: Recording, out: Path, settings_id: str, windows: bool) -> bool:
    """Finished by an earlier run: same settings, the same recording (file name and size: a
    moved folder still counts) and every output present."""
    m = _read_marker(state, rec)
    return (
        m is not None
        and m.get("status") == "done"
        and m.get("settings_id") == settings_id
        and m.get("size") == rec.size
        and Path(str(m.get("source"))).name == rec.path.name
        and all(p.is_file() for p in rec.outputs(out, windows))
    )


def _check_out(out: Path, recs: list[Recording], settings: dict, cfg: DetectConfig) -> None:
    """Refuse to touch files another program wrote, or results of other settings."""
    if cfg.overwrite:
        return
    state = out / STATE_DIR
    saved = state / "settings.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = {}
        diff = [k for k in SETTING_KEYS if old.get(k) != settings[k]]
        if diff:
            raise ConfigError(
                f"--out {out} holds detections made with other settings ({', '.join(diff)}); "
                "use --overwrite to redo them, or another --out"
            )
    else:
        for name in ("detections.csv", "skipped.csv"):
            if (out / name).exists():
                raise ConfigError(
                    f"{out / name} exists and was not written by bioaudio detect; use "
                    "--overwrite to replace it, or another --out"
                )
    for rec in recs:
        if _read_marker(state, rec) is None:
            for p in rec.outputs(out, True):
                if p.exists():
                    raise ConfigError(
                        f"{p} exists and was not written by bioaudio detect; use --overwrite "
                        "to replace it, or another --out"
                    )


def _write_outputs(
    out: Path, state: Path, rec: Recording, det: FileDetections, settings_id: str, windows: bool
) -> None:
    """A recording's outputs, between a "started" and a "done" marker: a kill in between
    leaves a recording that the next run redoes, never a table taken as finished."""
    marker = {"file": rec.file, "source": str(rec.path), "size": rec.size}
    marker["settings_id"] = settings_id
    save_json_atomic(_marker(state, rec), {**marker, "status": "started"})
    write_raven_table(out / f"{rec.key}.selections.txt", det.events, rec.sample_rate / 2)
    if windows:
        write_csv_atomic(det.windows.round(6), out / f"{rec.key}.windows.csv")
    save_json_atomic(_marker(state, rec), {**marker, "status": "done", "events": len(det.events)})


def _progress_bar(
    total: float, enabled: bool, status_every: float = 30.0
) -> tuple[Callable[[float], None], Callable[[], None]]:
    """(on_audio(seconds), close()): a bar over audio seconds showing the real-time factor on a
    terminal; plain status lines (audio h/s, ETA) in a file or a SLURM log."""
    if total <= 0:
        return (lambda _s: None), (lambda: None)
    bar = runlog.Progress.audio(total, desc="detect", enabled=enabled, status_every=status_every)
    return bar.update, bar.close


def detect_to_folder(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    cfg: DetectConfig | None = None,
) -> DetectResult:
    """Detect events in every recording of `inputs` (files and folders) into the folder `out`
    (see the module doc). Recordings finished by an earlier run with the same settings are
    kept; bad input raises before anything is written."""
    cfg = cfg or DetectConfig()
    cfg.validate()
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    recs, skipped = collect_recordings(inputs)  # before the (slow) model load
    scorer = load_scorer(model, cfg.device())
    window = float(cfg.window or scorer.default_window())
    hop = float(cfg.hop or window / 2)
    if hop > window + EPS:
        raise ConfigError(f"--hop {hop:g} is longer than the window ({window:g} s)")
    scorer.check_window(window)
    rule = event_rule(cfg, scorer.class_names)

    good, bad = scan_audio([r.path for r in recs], verify="header", progress=False)
    usable: list[Recording] = []
    for r in recs:
        if r.path in bad:
            skipped.append({"path": r.file, "reason": bad[r.path]})
            continue
        meta = good[r.path]
        r.duration, r.sample_rate, r.size = meta.duration, meta.sample_rate, r.path.stat().st_size
        if r.duration < min_audio(window) - EPS:
            reason = (
                f"too short: {r.duration:.3f} s (detect needs at least {min_audio(window):g} s)"
            )
            skipped.append({"path": r.file, "reason": reason})
            continue
        usable.append(r)
    if not usable:
        first = f"{skipped[0]['path']}: {skipped[0]['reason']}" if skipped else "no audio files"
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise DataError(f"no recording can be used: {first}{more}")
    settings = _settings(scorer, rule, window, hop)
    _check_out(out, usable, settings, cfg)

    state = out / STATE_DIR
    runlog.attach(out / "log.txt")  # input checked: the output so far, then on
    save_json_atomic(state / "settings.json", settings)
    save_json_atomic(state / "provenance.json", runinfo.environment())
    sid = _settings_id(settings)
    todo = [
        r for r in usable if cfg.overwrite or not _is_done(state, r, out, sid, cfg.save_windows)
    ]
    t0 = time.perf_counter()
    windows = recording_windows([(str(r.path), r.duration) for r in todo], window, hop)
    on_audio, close = _progress_bar(
        float(fresh_audio(windows).sum()), cfg.progress, cfg.status_every
    )
    by_path = {str(r.path): r for r in todo}
    failed: set[str] = set()
    try:
        for det in iter_detections(
            scorer, windows, rule, cfg.batch_size, cfg.num_workers, on_audio
        ):
            rec = by_path[det.path]
            if det.error is not None:
                skipped.append({"path": rec.file, "reason": det.error})
                failed.add(det.path)
                continue
            _write_outputs(out, state, rec, det, sid, cfg.save_windows)
    finally:
        close()
    seconds = time.perf_counter() - t0

    finished = [r for r in usable if str(r.path) not in failed]
    rows = []
    counts = {n: 0 for n in scorer.class_names if n not in rule.ignore}
    for r in finished:
        for ev in read_raven_events(out / f"{r.key}.selections.txt"):
            rows.append([r.file, ev.label, ev.start, ev.end, ev.max_prob, ev.mean_prob])
            counts[ev.label] = counts.get(ev.label, 0) + 1
    write_csv_atomic(pd.DataFrame(rows, columns=DETECTION_COLUMNS), out / "detections.csv")
    write_csv_atomic(pd.DataFrame(skipped, columns=["path", "reason"]), out / "skipped.csv")
    if not finished:
        raise DataError(
            f"none of the {len(usable)} recording(s) could be read; reasons in "
            f"{out / 'skipped.csv'}"
        )
    new = [r for r in todo if str(r.path) not in failed]
    return DetectResult(
        out=out,
        recordings=len(finished),
        new=len(new),
        already_done=len(usable) - len(todo),
        skipped=len(skipped),
        short=sum(r.duration < window - EPS for r in finished),
        audio_seconds=sum(r.duration for r in finished),
        new_audio_seconds=sum(r.duration for r in new),
        seconds=seconds,
        events=counts,
        window=window,
        hop=hop,
    )
