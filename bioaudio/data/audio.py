"""Audio decoding: soundfile for every container, soxr for resampling, windows read by seeking.

Everything returns float32 numpy arrays in [-1, 1] (float files may exceed it; we do not clip).
Long recordings are never decoded whole when a window is asked for: we seek to the first frame
and read only the frames of the window.

Paths may also be fsspec URLs (`s3://bucket/site/rec.flac`, `gs://...`, `https://...`,
`memory://...`; the protocol's package must be installed, e.g. s3fs): they are opened as
seekable file objects, so a window of a recording in object storage is read by seeking too.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from bioaudio.errors import AudioDecodeError
from bioaudio.fileio import AUDIO_EXTENSIONS, atomic_path, is_audio_path  # noqa: F401 (audio API)

DEFAULT_SAMPLE_RATE = 16000


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def is_url(path: str | Path) -> bool:
    """True for an fsspec URL (`s3://...`, `memory://...`), not for a local path."""
    return bool(_URL.match(str(path)))


@contextlib.contextmanager
def _opened(path: str | Path) -> Iterator[Any]:
    """What soundfile should read: the path itself, or a seekable fsspec file object."""
    if not is_url(path):
        yield str(path)
        return
    import fsspec

    with fsspec.open(str(path), "rb") as fh:
        yield fh


def _stat(path: str | Path) -> tuple[bool, bool, int]:
    """(exists, is a directory, size in bytes) of a local path or an fsspec URL."""
    if not is_url(path):
        p = Path(path)
        if not p.exists():
            return False, False, 0
        return True, p.is_dir(), p.stat().st_size if p.is_file() else 0
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(str(path))
        if not fs.exists(inner):
            return False, False, 0
        if fs.isdir(inner):
            return True, True, 0
        return True, False, int(fs.size(inner) or 0)
    except (ImportError, ValueError) as e:  # an unknown protocol, a missing backend package
        raise AudioDecodeError(path, f"cannot open this URL ({e})") from e


@dataclass(frozen=True)
class AudioInfo:
    """What the header says about a file (no samples decoded)."""

    path: str
    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # soundfile prefixes messages with "Error opening '<path>': "; the path is already in ours.
    if msg.startswith("Error opening"):
        msg = msg.split(": ", 1)[-1]
    return msg


def info(path: str | Path) -> AudioInfo:
    """Read the header of an audio file (a path or an fsspec URL). Raises AudioDecodeError for
    missing, empty or corrupt files."""
    p = _checked(path)
    try:
        with _opened(p) as src:
            i = sf.info(src)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(p, _reason(e)) from e
    _check_header(p, i.samplerate, i.frames)
    return AudioInfo(str(p), int(i.samplerate), int(i.frames), int(i.channels), i.format, i.subtype)


def _checked(path: str | Path) -> str | Path:
    """The path (a str for a URL); AudioDecodeError when it is missing, a folder or empty."""
    p = str(path) if is_url(path) else Path(path)
    exists, is_dir, size = _stat(p)
    if not exists:
        raise AudioDecodeError(p, "no such file")
    if is_dir:
        raise AudioDecodeError(p, "is a directory")
    if size == 0:
        raise AudioDecodeError(p, "empty file (0 bytes)")
    return p


def _check_header(p: str | Path, sample_rate: int, frames: int) -> None:
    if sample_rate <= 0:
        raise AudioDecodeError(p, f"invalid sample rate {sample_rate}")
    if frames <= 0:
        raise AudioDecodeError(p, "no audio frames (zero-length)")


def to_mono(x: np.ndarray) -> np.ndarray:
    """Down-mix (frames, channels) to (frames,) by averaging channels; 1-D input passes through."""
    if x.ndim == 1:
        return x
    if x.shape[1] == 1:
        return x[:, 0]
    return x.mean(axis=1, dtype=np.float32)


def resample(x: np.ndarray, orig_sr: int, target_sr: int, quality: str = "HQ") -> np.ndarray:
    """Resample (frames,) or (frames, channels) float audio with soxr (any ratio, e.g. 500k -> 16k)."""
    if orig_sr == target_sr or x.shape[0] == 0:
        return x.astype(np.float32, copy=False)
    import soxr

    y = soxr.resample(
        np.ascontiguousarray(x, dtype=np.float32), orig_sr, target_sr, quality=quality
    )
    return y.astype(np.float32, copy=False)


def load(
    path: str | Path,
    sample_rate: int | None = DEFAULT_SAMPLE_RATE,
    offset: float = 0.0,
    duration: float | None = None,
    mono: bool = True,
) -> np.ndarray:
    """Decode `path` (or the window [offset, offset + duration) seconds of it) as float32.

    Returns (samples,) when `mono`, else (channels, samples). `sample_rate=None` keeps the file's
    rate. A window past the end of the file is returned short (callers pad); seeking means a
    10-second window of a 10-hour FLAC costs about as much as a 10-second file.
    """
    p = _checked(path)
    _check_window(p, offset, duration)
    try:  # one open for the header and the samples (a window read costs one open, not two)
        with _opened(p) as src, sf.SoundFile(src) as f:
            sr, frames = int(f.samplerate), int(f.frames)
            _check_header(p, sr, frames)
            start, n = _frame_span(p, sr, frames, offset, duration)
            if start:
                f.seek(start)
            data = f.read(n, dtype="float32", always_2d=True)
    except AudioDecodeError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(p, _reason(e)) from e
    return _finish(p, data, sr, sample_rate, duration, mono)


def load_windows(
    path: str | Path, sample_rate: int | None, windows: Sequence[tuple[float, float]]
) -> list[np.ndarray]:
    """Mono windows (offset, duration in seconds) of one file from one read of the stretch
    they cover: each equals `load(path, sample_rate, offset, duration)` sample for sample (the
    same frames, down-mixed and resampled window by window). Overlapping sliding windows (detect,
    embed) so decode each stretch of a recording once instead of once per window. Raises
    AudioDecodeError as `load` would for the first window that cannot be read."""
    p = _checked(path)
    for offset, duration in windows:
        _check_window(p, offset, duration)
    if not windows:
        return []
    try:
        with _opened(p) as src, sf.SoundFile(src) as f:
            sr, frames = int(f.samplerate), int(f.frames)
            _check_header(p, sr, frames)
            spans = [_frame_span(p, sr, frames, o, d) for o, d in windows]
            first = min(s for s, _ in spans)
            last = max(s + n for s, n in spans)
            if first:
                f.seek(first)
            block = f.read(last - first, dtype="float32", always_2d=True)
    except AudioDecodeError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(p, _reason(e)) from e
    return [  # copies: overlapping windows must not share (and mutate) one buffer
        np.array(_finish(p, block[s - first : s - first + n], sr, sample_rate, d, mono=True))
        for (s, n), (_, d) in zip(spans, windows)
    ]


def _check_window(p: str | Path, offset: float, duration: float | None) -> None:
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioDecodeError(p, f"invalid window offset={offset} duration={duration}")


def _frame_span(
    p: str | Path, sr: int, frames: int, offset: float, duration: float | None
) -> tuple[int, int]:
    """(first frame, frame count) of the window [offset, offset + duration) s in the file."""
    start = int(round(offset * sr))
    if start >= frames:
        raise AudioDecodeError(p, f"offset {offset:.3f}s is past the end ({frames / sr:.3f}s)")
    if duration is None:
        return start, frames - start
    return start, min(int(math.ceil(duration * sr)), frames - start)


def _finish(
    p: str | Path,
    data: np.ndarray,
    sr: int,
    sample_rate: int | None,
    duration: float | None,
    mono: bool,
) -> np.ndarray:
    """Decoded (frames, channels) -> what `load` returns: finite, down-mixed, resampled."""
    if data.shape[0] == 0:
        raise AudioDecodeError(p, "decoded no samples")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    if mono:
        data = to_mono(data)
    if sample_rate is not None and sample_rate != sr:
        data = resample(data, sr, sample_rate)
        if duration is not None:  # soxr may return one sample more or less than the exact window
            data = data[: int(round(duration * sample_rate))]
    return data if mono else np.ascontiguousarray(data.T)


def pad_or_crop(x: np.ndarray, length: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Take `length` samples of 1-D `x` from `start`, zero-padding at the end.

    Returns (y, padding_mask) where padding_mask is True on padded samples.
    """
    y = np.zeros(length, dtype=np.float32)
    seg = x[start : start + length]
    y[: seg.shape[0]] = seg
    mask = np.ones(length, dtype=bool)
    mask[: seg.shape[0]] = False
    return y, mask


def save(path: str | Path, x: np.ndarray, sample_rate: int, subtype: str | None = None) -> None:
    """Write audio ((samples,) or (channels, samples)) atomically through a temporary file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = x.T if x.ndim == 2 else x
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}.get(p.suffix.lower())
    with atomic_path(p) as tmp:
        sf.write(str(tmp), data, sample_rate, subtype=subtype, format=fmt)


def decode_failure_reason(path: str) -> str:
    """Why a file that failed during training cannot be read (it is read again, briefly)."""
    try:
        load(path, sample_rate=None, duration=0.1)
    except AudioDecodeError as e:
        return e.reason or str(e)
    return "could not be read during training"
