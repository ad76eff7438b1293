"""What the explorer reads and writes, without Streamlit: embeddings files and their
fingerprints, embeddings computed from a data folder + checkpoint (cached on disk), window audio
and spectrograms, uploaded recordings, and labels.csv exports that `bioaudio prepare` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from bioaudio.data import audio
from bioaudio.data.manifest import write_manifest
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.inference.embed import EmbedConfig, Progress, embed_to_parquet, input_table
from bioaudio.inference.embeddings import EmbeddingSet, read_embeddings
from bioaudio.inference.runner import model_fingerprint

UPLOAD_TYPES = ("wav", "flac", "ogg", "mp3", "opus", "aif", "aiff")


def file_fingerprint(path: str | Path, *extra: object) -> str:
    """A short key that changes when the file changes (path, size, mtime) or `extra` does."""
    p = Path(path).resolve()
    st = p.stat()
    key = json.dumps([str(p), st.st_size, st.st_mtime_ns, *map(str, extra)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_embedding_set(path: str | Path, max_rows: int | None = None) -> EmbeddingSet:
    """An embeddings file with a few derived columns the app shows (file name, window)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"embeddings file not found: {p}")
    es = read_embeddings(p, max_rows=max_rows)
    if len(es) < 1:
        raise DataError(f"{p} holds no embeddings")
    rows = es.rows
    rows.insert(0, "file", [Path(q).name for q in rows["path"]])
    rows["window"] = [f"{a:.2f}-{b:.2f} s" for a, b in zip(rows["start"], rows["end"])]
    return es


def colour_columns(rows: pd.DataFrame) -> list[str]:
    """Metadata columns worth colouring by: those with 2+ distinct non-null values."""
    skip = {"path", "recording", "file", "window", "embedding"}
    out = []
    for c in rows.columns:
        if c in skip:
            continue
        if rows[c].nunique(dropna=True) >= 2:
            out.append(c)
    return out


def is_categorical(values: pd.Series) -> bool:
    """Colour by category (legend) rather than by a colour scale."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return True
    return values.nunique(dropna=True) <= 24  # months, hours, clusters


def labels_of(rows: pd.DataFrame) -> pd.Series | None:
    """The labels column when any row has a label, else None."""
    if "labels" not in rows or not rows["labels"].fillna("").astype(str).str.len().gt(0).any():
        return None
    return rows["labels"]


# ----------------------------------------------------------------------------------------------
# Embeddings computed by the app (seed mode: --data_dir + --checkpoint_path)


def compute_cached(
    data_dir: str | Path,
    checkpoint: str | Path,
    cache_dir: str | Path,
    max_samples: int | None = None,
    window: float | None = None,
    progress: Progress | None = None,
) -> Path:
    """Embeddings of (at most `max_samples` seeded-random files of) `data_dir` by `checkpoint`,
    computed once into `cache_dir` and reused (resumed when interrupted, extended when files
    are added). Returns the Parquet path."""
    data, ckpt = Path(data_dir).expanduser().resolve(), Path(checkpoint).expanduser().resolve()
    if not ckpt.exists():
        raise ConfigError(f"checkpoint not found: {ckpt}")
    key = hashlib.sha256(
        json.dumps([str(data), str(ckpt), model_fingerprint(ckpt), max_samples, window]).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / key
    cache.mkdir(parents=True, exist_ok=True)
    table, skipped = input_table(data, progress=False)
    if len(table) == 0:
        raise DataError(f"no readable audio in {data} ({len(skipped)} file(s) skipped)")
    files = np.array(sorted(table["path"].unique()))
    if max_samples is not None and max_samples < len(files):
        keep = np.random.default_rng(0).choice(len(files), max_samples, replace=False)
        table = table[table["path"].isin(set(files[np.sort(keep)]))]
    manifest = cache / "manifest.csv"
    write_manifest(table, manifest)
    out = cache / "embeddings.parquet"
    cfg = EmbedConfig(window=window, progress=False)
    embed_to_parquet(ckpt, manifest, out, cfg, progress=progress)
    return out


# ----------------------------------------------------------------------------------------------
# Audio of one window


def window_audio(path: str | Path, start: float, end: float) -> tuple[np.ndarray, int]:
    """(mono samples, native sample rate) of [start, end) s of a file, read by seeking."""
    sr = audio.info(path).sample_rate
    wav = audio.load(path, sample_rate=None, offset=float(start), duration=float(end - start))
    return wav, sr


def spectrogram(wav: np.ndarray, sr: int, n_mels: int = 96) -> tuple[np.ndarray, float, float]:
    """(log-mel dB (F, T), seconds per frame, top frequency in Hz) of a mono clip."""
    import torch

    from bioaudio.data.frontend import FrontendConfig, build_frontend

    hop = max(1, sr // 100)
    n_fft = 1 << int(np.ceil(np.log2(max(hop * 4, 256))))
    cfg = FrontendConfig(kind="logmel", sample_rate=sr, n_mels=n_mels, n_fft=n_fft, hop_length=hop)
    feats = build_frontend(cfg).clip_features(torch.from_numpy(np.ascontiguousarray(wav)))
    return feats.numpy().T, hop / sr, sr / 2


def wav_bytes(wav: np.ndarray, sr: int) -> bytes:
    """A WAV file in memory (16-bit), for st.audio."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1), int(sr), format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Uploads


@contextlib.contextmanager
def private_upload(name: str, content: bytes, max_mb: float) -> Iterator[Path]:
    """The upload written into a new private (0700) temporary folder, removed on exit; checked
    for type (extension and decodable audio) and size first."""
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in UPLOAD_TYPES:
        raise DataError(
            f"{name}: not an accepted audio type ({', '.join(UPLOAD_TYPES)}); upload a recording"
        )
    if len(content) > max_mb * 1024 * 1024:
        raise DataError(f"{name}: {len(content) / 2**20:.1f} MB is over the {max_mb:g} MB limit")
    folder = Path(tempfile.mkdtemp(prefix="bioaudio-upload-"))  # mode 0700
    try:
        # the name is ours: an uploaded name never becomes a path (no ../ or absolute tricks)
        path = folder / f"upload.{ext}"
        with open(path, "wb") as f:
            f.write(content)
        try:
            audio.info(path)
        except AudioDecodeError as e:
            raise DataError(f"{name}: not a readable recording ({e.reason})") from None
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# labels.csv export


def labels_table(rows: pd.DataFrame, labels: pd.Series, root: str | Path | None) -> pd.DataFrame:
    """`filename,labels` (data/README.md) from per-window labels: a file gets the union of its
    windows' labels; names are relative to `root` when under it, else absolute."""
    base = Path(root).resolve() if root is not None else None
    per_file: dict[str, set[str]] = {}
    for path, lab in zip(rows["path"], labels):
        if lab is None or (isinstance(lab, float) and np.isnan(lab)) or str(lab) == "":
            continue
        per_file.setdefault(str(path), set()).update(
            s.strip() for s in str(lab).split(",") if s.strip()
        )
    out = []
    for path, labs in sorted(per_file.items()):
        p = Path(path)
        name = p.relative_to(base).as_posix() if base and p.is_relative_to(base) else str(p)
        out.append({"filename": name, "labels": ",".join(sorted(labs))})
    return pd.DataFrame(out, columns=["filename", "labels"])


def save_labels_csv(table: pd.DataFrame, path: Path, overwrite: bool = False) -> Path:
    """Write a labels.csv atomically; an existing file only with `overwrite`."""
    from bioaudio.fileio import write_csv_atomic

    if path.is_dir():
        path = path / "labels.csv"
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; tick 'overwrite' to replace it")
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"{path}: a labels file must end in .csv")
    return write_csv_atomic(table, path)


def safe_label(text: str) -> str:
    """A label name for the export (commas separate labels, so they are not allowed)."""
    name = " ".join(str(text).split())
    if not name or "," in name:
        raise ConfigError("a label name must be non-empty and hold no comma")
    return name


def env_with_numba_cache() -> dict[str, str]:
    """The environment for a child process, with the persistent numba cache folder."""
    from bioaudio.explorer.projections import ensure_numba_cache

    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(ensure_numba_cache())
    return env
