"""The window runner of the window commands (infer, evaluate, detect, embed): their shared
flags, the model whose windows they run (`Embedder`; detect's `Scorer` is one), and the loop that
reads windows by seeking, runs them in padded batches and yields each file once all its windows
are done (an unreadable window fails its file, not the run)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from bioaudio.config import to_dict
from bioaudio.data.datasets import collate_batch, unlabelled_clips
from bioaudio.errors import AudioDecodeError, CheckpointError, ConfigError, DataError
from bioaudio.inference.predict import device_of, run_export
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import is_export_dir, load_model

DEFAULT_WINDOW = 5.0  # seconds, for a model that does not record its training clip

# ----------------------------------------------------------------------------------------------
# Flags

# Default and help of the flags every window command has: declared here once, placed by each
# command's options dataclass where they belong in its --help (`window_option`).
_SHARED_FLAGS: dict[str, tuple[Any, str]] = {
    "window": (None, "window seconds (default: the model's training clip, else 5)"),
    "hop": (None, "hop between windows in seconds (default: --window)"),
    "batch_size": (16, "windows per forward pass"),
    "num_workers": (0, "DataLoader worker processes"),
    "cpu": (False, "run on CPU even when a GPU is available"),
    "progress": (True, "show a progress bar"),
    "status_every": (30.0, "seconds between status lines when the output is not a terminal"),
}


def window_option(name: str, help: str | None = None) -> Any:
    """The dataclass field of the shared flag `name` (its default and help; `help` replaces the
    help text where a command words it its own way)."""
    default, text = _SHARED_FLAGS[name]
    return field(default=default, metadata={"help": help or text})


def training_window(provenance: Mapping[str, Any] | None) -> float:
    """The clip length a model was trained on (its provenance's clip_seconds), else 5 s."""
    clip = (provenance or {}).get("clip_seconds")
    return float(clip) if clip else DEFAULT_WINDOW


class WindowOptions:
    """What the options of every window command share: the flags (each dataclass declares them
    with `window_option`, in the order of its --help), their checks and the device."""

    window: float | None
    hop: float | None
    batch_size: int
    num_workers: int
    cpu: bool
    progress: bool

    def validate(self) -> None:
        for name in ("window", "hop"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"--{name} must be positive seconds, got {v}")
        status_every = getattr(self, "status_every", 0.0)  # commands that print status lines
        if not status_every >= 0:
            raise ConfigError(f"--status_every must be >= 0 seconds, got {status_every}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("--batch_size must be >= 1 and --num_workers >= 0")

    def device(self) -> torch.device:
        """CUDA when there is a GPU and --cpu is not given, else the CPU."""
        return torch.device("cuda" if torch.cuda.is_available() and not self.cpu else "cpu")


# ----------------------------------------------------------------------------------------------
# Models


def _resolve_model_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model not found: {p}")
    if p.is_dir() and not is_export_dir(p):
        return run_export(p) or p
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
        return device_of(self.model)

    def default_window(self) -> float:
        return training_window(getattr(self.model, "provenance", None))

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
# Running windows


class _Windows(Dataset):
    """Windows read by seeking; an unreadable one becomes {"index", "error"} instead of raising.

    Neighbouring windows of one file in one batch (overlapping, or apart by less than half a
    window) are decoded in one read (`AudioDataset.read_span`): a hop of half a window decodes
    each stretch once, not twice, and a batch opens its file once. Items are the same as read
    one by one; when a group cannot be read whole, its windows are read one by one (so each
    unreadable one gets its own reason)."""

    def __init__(self, windows: pd.DataFrame, sample_rate: int, batch_size: int = 1):
        # clip_seconds None: each item is exactly its window (no padding when alone)
        self.ds = unlabelled_clips(windows[["path", "start", "end"]], sample_rate)
        self.group_start, self.group_end = read_groups(windows, batch_size)
        self._pending: dict[int, dict[str, Any]] = {}  # read with an earlier window of its group

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self._pending.pop(i, None)
        if item is not None:
            return item
        a, b = int(self.group_start[i]), int(self.group_end[i])
        if b - a > 1:
            try:
                items = self.ds.read_span(range(a, b))
            except AudioDecodeError:
                pass  # one by one below
            else:
                self._pending = {a + k: it for k, it in enumerate(items) if a + k != i}
                return items[i - a]
        try:
            return self.ds[i]
        except AudioDecodeError as e:
            return {"index": int(i), "error": e.reason or str(e)}


def read_groups(windows: pd.DataFrame, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row, row after the last) of the read group of each row of `windows` (path, start,
    end): runs of rows of one file, in time order, each starting at most half a window after
    the previous one ends, never across a batch of `batch_size` rows (a DataLoader worker reads
    whole batches)."""
    n = len(windows)
    if n == 0:
        return np.zeros(0, int), np.zeros(0, int)
    paths = windows["path"].to_numpy()
    s = windows["start"].to_numpy(float)
    e = windows["end"].to_numpy(float)
    k = np.arange(1, n)
    new = np.ones(n, bool)
    new[1:] = (
        (paths[1:] != paths[:-1])
        | (s[1:] < s[:-1])
        | (s[1:] > e[:-1] + 0.5 * (e[1:] - s[1:]))
        | (k % max(1, batch_size) == 0)
    )
    first = np.flatnonzero(new)
    size = np.diff(np.r_[first, n])
    start = np.repeat(first, size)
    return start, start + np.repeat(size, size)


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
        _Windows(windows, embedder.sample_rate, batch_size),
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
            out = embedder(batch["wav"].to(dev), batch["padding_mask"].to(dev)).cpu().numpy()
            if not np.isfinite(out).all():  # a broken model, not a broken file: stop, say so
                raise DataError(
                    f"the model's embeddings are not finite (NaN / inf) for {paths[idx[0]]}: "
                    "its weights are broken (a diverged training run?)"
                )
            emb[idx] = out
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
