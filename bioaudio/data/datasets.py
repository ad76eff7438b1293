"""Datasets over manifests: fixed windows, random crops, padding masks, targets, streaming.

Items are dicts, the same for every dataset here:
    wav           float32 (S,)   mono waveform at `sample_rate`
    padding_mask  bool (S,)      True on zero padding (short clips padded up to `clip_seconds`)
    target        float32 (C,) multi-hot when multi-label, else int64 () class index; -100 (the
                  torch cross-entropy `ignore_index`) for an unlabelled row of a labelled
                  single-label set. Absent when there are no classes (pretraining).
    index         int            row position in the dataset (after `min_seconds` filtering)
    path          str            the audio file
    start         float          second of the file where `wav` begins

`bioaudio.features.FeatureDataset` (a feature cache) gives the same items with `feats` (T, F) and
`frame_mask` (T,) instead of `wav` and `padding_mask`; `collate_batch` pads either kind.

Randomness (training crops, `wave_augment`) is drawn from a generator seeded by
(seed, epoch, index): the same item is the same clip whatever the worker, process count or resume
point, and two workers never share a random stream. The epoch lives in a shared-memory tensor,
so `set_epoch` reaches DataLoader workers even when they are persistent.

Cropping rule: with `clip_seconds` set, a segment longer than the clip is cropped (training: a
uniformly random crop; evaluation: the first `clip_seconds`, or the centre with
`eval_crop="center"`), a shorter one is zero-padded at the end with `padding_mask` set.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from bioaudio.data.audio import DEFAULT_SAMPLE_RATE, is_url, load, load_windows, pad_or_crop
from bioaudio.data.manifest import class_names_of, read_manifest, split_labels
from bioaudio.errors import AudioDecodeError, ConfigError, DataError

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss default: unlabelled single-label rows
WaveAugment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
EvalCrop = Literal["start", "center"]


# --------------------------------------------------------------------------- classes and labels


def is_multi_label(df: pd.DataFrame) -> bool:
    """True when any row of the manifest carries more than one label."""
    return any(len(split_labels(v)) > 1 for v in df["labels"])


def resolve_classes(
    df: pd.DataFrame, class_names: Sequence[str] | None = None, multi_label: bool | None = None
) -> tuple[list[str], bool]:
    """(class names, multi-label flag): given ones win, else sorted unique labels / detection."""
    names = list(class_names) if class_names is not None else class_names_of(df)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"class names are not unique: {', '.join(dup)}")
    return names, is_multi_label(df) if multi_label is None else bool(multi_label)


def _label_indices(
    labels: str, lookup: dict[str, int], multi_label: bool, where: str
) -> tuple[int, ...]:
    names = split_labels(labels)
    out = []
    for n in names:
        if n not in lookup:
            known = ", ".join(list(lookup)[:20]) + (", ..." if len(lookup) > 20 else "")
            raise DataError(f"{where}: label {n!r} is not one of the classes ({known})")
        out.append(lookup[n])
    if len(out) > 1 and not multi_label:
        raise DataError(
            f"{where}: {len(out)} labels ({', '.join(names)}) in a single-label dataset"
            " (use multi_label=True)"
        )
    return tuple(sorted(set(out)))


def _with_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """A hand-made table gets what read_manifest guarantees: start, end, labels."""
    if "path" not in df.columns or not ({"end", "duration"} & set(df.columns)):
        raise DataError("a manifest table needs a path column and an end or duration column")
    if {"start", "end", "labels"} <= set(df.columns):
        return df
    df = df.copy()
    if "start" not in df.columns:
        df["start"] = 0.0
    if "end" not in df.columns:
        df["end"] = df["duration"]
    if "labels" not in df.columns:
        df["labels"] = ""
    return df


# --------------------------------------------------------------------------- windows


def segment_windows(
    df: pd.DataFrame, window: float, hop: float | None = None, min_last: float | None = None
) -> pd.DataFrame:
    """Expand each row's [start, end) into windows of `window` seconds every `hop` seconds.

    Rule for the tail: windows start at start + k * hop; every full window is kept; the first
    window that runs past `end` is kept (read short, padded by the dataset) when it is the
    segment's only window or when it holds at least `min_last` seconds (default: half a window);
    later partial windows would only repeat its audio and are never made. A segment shorter than
    `window` therefore gives exactly one padded window.

    Returns a new manifest (index reset) with `start`/`end` set to each window's valid audio,
    plus `segment_index` (the source row's position) and `window_index` (k); labels and every
    other column are carried over from the source row.
    """
    df = _with_defaults(df)
    if not window > 0:
        raise ConfigError(f"window must be positive seconds, got {window}")
    hop = window if hop is None else hop
    if not hop > 0:
        raise ConfigError(f"hop must be positive seconds, got {hop}")
    min_last = window / 2 if min_last is None else min_last
    start = df["start"].to_numpy(dtype=float)
    end = df["end"].to_numpy(dtype=float)
    bad = np.flatnonzero(~(end > start))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"manifest row {i} ({df['path'].iloc[i]}): segment end {end[i]} is not after"
            f" start {start[i]}"
        )
    eps = 1e-6  # seconds; absorbs float error in sums of hops like 0.1 + 0.2
    seg = end - start
    n_full = np.where(seg >= window - eps, np.floor((seg - window) / hop + eps) + 1, 0).astype(int)
    last_full_end = start + (n_full - 1) * hop + window
    next_start = start + n_full * hop
    tail = end - next_start
    has_partial = (
        (next_start < end - eps)
        & ((n_full == 0) | (last_full_end < end - eps))
        & ((n_full == 0) | (tail >= min_last - eps))
    )
    n = n_full + has_partial.astype(int)
    rows = np.repeat(np.arange(len(df)), n)
    # k = position of each window inside its segment: a running count reset at every segment
    k = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
    out = df.iloc[rows].reset_index(drop=True).copy()
    w_start = start[rows] + k * hop
    out["start"] = np.round(w_start, 6)
    out["end"] = np.round(np.minimum(w_start + window, end[rows]), 6)
    out["segment_index"] = rows
    out["window_index"] = k
    return out


# --------------------------------------------------------------------------- reading one clip


def _rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, epoch, index, stream): crop = 0, wave_augment = 1."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), stream])


def class_target(idx: tuple[int, ...], n_classes: int, multi_label: bool) -> torch.Tensor:
    """An item's target from its class indices: multi-hot (C,) float32 when multi-label, else
    the class index (IGNORE_INDEX for an unlabelled row)."""
    if multi_label:
        t = torch.zeros(n_classes, dtype=torch.float32)
        t[list(idx)] = 1.0
        return t
    return torch.tensor(idx[0] if idx else IGNORE_INDEX, dtype=torch.long)


def crop_start(
    n: int, n_clip: int, train: bool, eval_crop: EvalCrop, seed: int, epoch: int, index: int
) -> int:
    """Where a clip of `n_clip` samples (or frames) starts in a segment of `n`: a random place in
    training (drawn per seed, epoch and item), else the start or the centre (`eval_crop`)."""
    if n <= n_clip:
        return 0
    if train:
        return int(_rng(seed, epoch, index, 0).integers(0, n - n_clip + 1))
    return (n - n_clip) // 2 if eval_crop == "center" else 0


class _ClipReader:
    """Turns (path, start, end, labels) into an item dict; shared by both datasets."""

    def __init__(
        self,
        class_names: list[str],
        multi_label: bool,
        sample_rate: int,
        clip_seconds: float | None,
        train: bool,
        seed: int,
        eval_crop: EvalCrop,
        wave_augment: WaveAugment | None,
    ):
        if clip_seconds is not None and not clip_seconds > 0:
            raise ConfigError(f"clip_seconds must be positive, got {clip_seconds}")
        if eval_crop not in ("start", "center"):
            raise ConfigError(f"eval_crop must be 'start' or 'center', got {eval_crop!r}")
        self.class_names = class_names
        self.lookup = {n: i for i, n in enumerate(class_names)}
        self.multi_label = multi_label
        self.sample_rate = int(sample_rate)
        self.clip_seconds = clip_seconds
        self.train = train
        self.seed = seed
        self.eval_crop = eval_crop
        self.wave_augment = wave_augment

    def target(self, idx: tuple[int, ...]) -> torch.Tensor:
        return class_target(idx, len(self.class_names), self.multi_label)

    def window(self, index: int, epoch: int, start: float, end: float) -> tuple[float, int, int]:
        """(first second, samples to read, samples of the item) of a row's item."""
        sr = self.sample_rate
        n_seg = max(1, int(round((end - start) * sr)))
        n_clip = n_seg if self.clip_seconds is None else int(round(self.clip_seconds * sr))
        # samples into the segment
        offset = crop_start(n_seg, n_clip, self.train, self.eval_crop, self.seed, epoch, index)
        return start + offset / sr, min(n_seg, n_clip), n_clip

    def read(
        self,
        index: int,
        epoch: int,
        path: str,
        start: float,
        end: float,
        label_idx: tuple[int, ...] | None,
    ) -> dict[str, Any]:
        t0, n_read, n_clip = self.window(index, epoch, start, end)
        x = load(path, sample_rate=self.sample_rate, offset=t0, duration=n_read / self.sample_rate)
        return self.item(index, epoch, path, t0, x, n_read, n_clip, label_idx)

    def item(
        self,
        index: int,
        epoch: int,
        path: str,
        t0: float,
        x: np.ndarray,
        n_read: int,
        n_clip: int,
        label_idx: tuple[int, ...] | None,
    ) -> dict[str, Any]:
        """The item of decoded samples `x` of a row's window (`window`)."""
        x = x[:n_read]  # a segment running past the file's end comes back short: padded below
        if self.wave_augment is not None:
            # augment the valid samples only, so gain / roll / noise never touch the padding
            x = np.asarray(self.wave_augment(x, _rng(self.seed, epoch, index, 1)), np.float32)
            x = x[:n_read]
        wav, mask = pad_or_crop(x, n_clip)
        item: dict[str, Any] = {
            "wav": torch.from_numpy(wav),
            "padding_mask": torch.from_numpy(mask),
            "index": int(index),
            "path": path,
            "start": float(t0),
        }
        if self.class_names:
            item["target"] = self.target(label_idx or ())
        return item


class _SharedEpoch:
    """An int in shared memory: `set_epoch` in the main process is seen by running workers."""

    def __init__(self) -> None:
        self.value = torch.zeros((), dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self.value)

    def set(self, epoch: int) -> None:
        self.value.fill_(int(epoch))


class EpochState:
    """The epoch shared with DataLoader workers (`_SharedEpoch`): `set_epoch` in the main process
    is seen by running workers; random crops and augmentations are drawn per (seed, epoch, item)."""

    _epoch: _SharedEpoch

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops / augmentations (and stream order) items use."""
        self._epoch.set(epoch)


class ReaderDataset(EpochState):
    """Class names and multi-label of the `_ClipReader` that turns rows into items."""

    reader: _ClipReader

    @property
    def class_names(self) -> list[str]:
        return self.reader.class_names

    @property
    def multi_label(self) -> bool:
        return self.reader.multi_label


# --------------------------------------------------------------------------- map-style


class AudioDataset(ReaderDataset, Dataset):
    """Map-style dataset over manifest rows; reads only each item's window by seeking.

    `df` is a manifest DataFrame (or a manifest path). `class_names=None` takes the manifest's
    sorted labels; `[]` gives items without targets (pretraining on a labelled set). Rows shorter than `min_seconds`
    (default one 25 ms fbank frame) are dropped at construction with a warning. With
    `skip_errors`, an unreadable file is reported once as a warning, counted in `n_skipped`
    (per process), marked in `failed_paths()` (shared with DataLoader workers) and replaced by
    the next readable row, so batches keep their size; without it, AudioDecodeError names the
    file. `wave_augment(wav, rng)` is applied whenever given (pass
    None for evaluation).
    """

    def __init__(
        self,
        df: pd.DataFrame | str | Path,
        class_names: Sequence[str] | None = None,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        clip_seconds: float | None = None,
        train: bool = False,
        seed: int = 0,
        multi_label: bool | None = None,
        min_seconds: float = 0.025,
        wave_augment: WaveAugment | None = None,
        eval_crop: EvalCrop = "start",
        skip_errors: bool = False,
    ):
        df = read_manifest(df) if not isinstance(df, pd.DataFrame) else _with_defaults(df)
        names, multi = resolve_classes(df, class_names, multi_label)
        keep = (df["end"] - df["start"]).to_numpy() >= min_seconds
        if not keep.all():
            warnings.warn(
                f"dropping {int((~keep).sum())} of {len(df)} segments shorter than"
                f" min_seconds={min_seconds}",
                stacklevel=2,
            )
        self.df = df[keep].reset_index(drop=True)
        if len(self.df) == 0:
            raise DataError(f"no segments of at least {min_seconds} s in the manifest")
        self.reader = _ClipReader(
            names, multi, sample_rate, clip_seconds, train, seed, eval_crop, wave_augment
        )
        # plain lists: cheap to index and to send to workers (no pandas row access per item)
        self._paths = [str(p) for p in self.df["path"]]
        self._start = self.df["start"].to_numpy(dtype=float)
        self._end = self.df["end"].to_numpy(dtype=float)
        self._labels = [
            _label_indices(v, self.reader.lookup, multi, f"manifest row {i} ({self._paths[i]})")
            if names
            else ()
            for i, v in enumerate(self.df["labels"])
        ]
        self.skip_errors = skip_errors
        self.n_skipped = 0
        # Rows that failed, in shared memory: workers mark them, the main process reads them.
        self._failed = (
            torch.zeros(len(self._paths), dtype=torch.bool).share_memory_() if skip_errors else None
        )
        self._epoch = _SharedEpoch()

    def __len__(self) -> int:
        return len(self._paths)

    def failed_paths(
        self, combine: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[str]:
        """Files that could not be read so far (in this process and its workers), in row order.
        `combine` maps this process's per-row failure flags (bool) to those of every process
        (e.g. a sum over processes > 0); under several processes each must call it."""
        if self._failed is None:
            return []
        flags = combine(self._failed.clone()) if combine is not None else self._failed
        return list(dict.fromkeys(self._paths[i] for i in torch.nonzero(flags).flatten()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        tries = min(len(self), 50) if self.skip_errors else 1
        last: Exception | None = None
        for k in range(tries):
            i = (index + k) % len(self)
            try:
                return self.reader.read(
                    i, self.epoch, self._paths[i], self._start[i], self._end[i], self._labels[i]
                )
            except AudioDecodeError as e:
                if not self.skip_errors:
                    raise
                self.n_skipped += 1
                if self._failed is not None:
                    self._failed[i] = True
                warnings.warn(f"skipping unreadable audio: {e}", stacklevel=2)
                last = e
        files = len({self._paths[(index + k) % len(self)] for k in range(tries)})
        raise DataError(
            f"no readable audio in {tries} row(s) ({files} file(s)) from row {index} of "
            f"{len(self)}, e.g. {last}; check the data"
        )

    def read_span(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """The items of `rows` (all of one file), decoded in one read of the stretch they cover
        (`audio.load_windows`): each equals `self[i]` exactly. Raises AudioDecodeError without
        skipping (a caller falls back to `self[i]`, which skips and records)."""
        rows = [int(i) for i in rows]
        if len({self._paths[i] for i in rows}) > 1:
            raise ValueError("read_span: rows of more than one file")
        r, epoch, sr = self.reader, self.epoch, self.reader.sample_rate
        wins = [r.window(i, epoch, self._start[i], self._end[i]) for i in rows]
        path = self._paths[rows[0]]
        xs = load_windows(path, sr, [(t0, n_read / sr) for t0, n_read, _ in wins])
        return [
            r.item(i, epoch, path, t0, x, n_read, n_clip, self._labels[i])
            for i, x, (t0, n_read, n_clip) in zip(rows, xs, wins)
        ]


def unlabelled_clips(
    df: pd.DataFrame, sample_rate: int, clip_seconds: float | None = None
) -> AudioDataset:
    """Every row of a table (path, start, end) as an item without a target, read by seeking at
    `sample_rate` (no row is dropped for being short): what inference runs a model over."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AudioDataset(
            df.assign(labels=""),
            class_names=[],
            sample_rate=sample_rate,
            clip_seconds=clip_seconds,
            min_seconds=0.0,
        )


def length_sorted_batches(df: pd.DataFrame, batch_size: int) -> list[list[int]]:
    """Row positions in batches of similar duration (end - start), shortest first: a
    padding-aware model wastes little compute on padding (its outputs do not depend on the
    batch). A DataLoader's `batch_sampler`."""
    order = np.argsort((df["end"] - df["start"]).to_numpy(), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- collate


# (data key, its padding-mask key): waveform items and cached-feature items
_PADDED = (("wav", "padding_mask"), ("feats", "frame_mask"))


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch item dicts: waveforms or features zero-padded to the longest (mask True there).

    Returns wav (B, S) float32 + padding_mask (B, S) bool for AudioDataset items, or feats
    (B, T, F) float32 + frame_mask (B, T) bool for FeatureDataset items; target (B, C) or (B,)
    when items have one, index (B,) int64, start (B,) float64, path list[str]; other keys are
    stacked when they are same-shape tensors or numbers and kept as lists otherwise.
    """
    if not items:
        raise DataError("cannot collate an empty batch")
    padded = [(k, m) for k, m in _PADDED if k in items[0]]
    if not padded:
        raise DataError("batch items hold neither 'wav' nor 'feats'")
    out: dict[str, Any] = {}
    for key, mask_key in padded:
        if not all(key in it for it in items):
            raise DataError(f"a batch mixes items with and without {key!r}")
        n = max(int(it[key].shape[0]) for it in items)
        data = torch.zeros((len(items), n, *items[0][key].shape[1:]), dtype=torch.float32)
        mask = torch.ones(len(items), n, dtype=torch.bool)
        for b, it in enumerate(items):
            s = it[key].shape[0]
            data[b, :s] = it[key]
            mask[b, :s] = it[mask_key]
        out[key], out[mask_key] = data, mask
    has_target = ["target" in it for it in items]
    if any(has_target) and not all(has_target):
        raise DataError("a batch mixes items with and without targets")
    skip = {k for pair in padded for k in pair}
    for key in items[0]:
        if key in skip:
            continue
        values = [it[key] for it in items]
        if key == "index":
            out[key] = torch.tensor(values, dtype=torch.long)
        elif key == "start":
            out[key] = torch.tensor(values, dtype=torch.float64)
        elif all(isinstance(v, torch.Tensor) for v in values) and (
            len({tuple(v.shape) for v in values}) == 1
        ):
            out[key] = torch.stack(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


# --------------------------------------------------------------------------- streaming


_REQUIRED = ("path", "sample_rate", "frames", "duration")


def _float(value: str | None, default: float) -> float:
    if value is None or value.strip() == "":
        return default
    return float(value)


def _iter_manifest_rows(path: Path) -> Iterator[tuple[str, float, float, str]]:
    """(absolute path, start, end, labels) per CSV row, one line at a time (never whole)."""
    base = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} is not a manifest: missing column(s) {', '.join(missing)}")
            for line, rec in enumerate(reader, start=2):
                try:
                    duration = float(rec["duration"])
                    start = _float(rec.get("start"), 0.0)
                    end = _float(rec.get("end"), duration)
                except (TypeError, ValueError) as e:
                    raise DataError(f"{path} line {line}: bad number ({e})") from e
                p = rec["path"] or ""
                yield (
                    p if os.path.isabs(p) or is_url(p) else str(base / p),
                    start,
                    end,
                    rec.get("labels") or "",
                )
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot parse manifest {path}: {e}") from e


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingAudioDataset(ReaderDataset, IterableDataset):
    """Iterable dataset that streams a manifest CSV too large to hold in memory.

    Memory: the CSV is read one line at a time; each DataLoader worker holds at most
    `shuffle_buffer` rows (a path, two floats and a label string each) and the clip it is
    decoding. Construction makes one streaming pass to count rows and, when `class_names` is not
    given, to collect the label set (memory proportional to the number of classes).

    Sharding: rows (after dropping segments shorter than `min_seconds`) are numbered in file
    order; row i goes to rank i % world_size. Rank and world size come from the arguments, else
    from torch.distributed when it is initialised (read when iteration starts). With
    `even_shards` every rank yields exactly N // world_size rows (the last < world_size rows of
    the file are dropped) so distributed training never waits on a rank with one batch more;
    turn it off for evaluation. Do not also let `accelerate` shard this dataset
    (`accelerator.prepare` on its DataLoader would split it again): the Trainer builds the
    DataLoader itself and every process keeps all of its own items.

    Order: a rank's rows are put in one order per (seed, epoch, rank) (a seeded shuffle buffer
    in training; a manifest sorted by class should be shuffled once on disk, as `bioaudio split`
    keeps row order), and position j of that order goes to DataLoader worker j % num_workers.
    The DataLoader takes workers in turn, so it yields the rank's order whatever the number of
    workers. `set_position(n)` makes the next iteration start at position n without decoding
    the n items before it (exact resume of a stream). Items, crops and augmentations are the
    same as `AudioDataset` at the same seed and epoch, keyed by the global row number.
    """

    def __init__(
        self,
        manifest_path: str | Path,
        class_names: Sequence[str] | None = None,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        clip_seconds: float | None = None,
        train: bool = False,
        seed: int = 0,
        multi_label: bool | None = None,
        min_seconds: float = 0.025,
        wave_augment: WaveAugment | None = None,
        eval_crop: EvalCrop = "start",
        shuffle: bool | None = None,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        even_shards: bool = True,
        skip_errors: bool = False,
    ):
        self.manifest_path = Path(manifest_path)
        if not self.manifest_path.is_file():
            raise DataError(f"manifest not found: {self.manifest_path}")
        if shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        self.min_seconds = min_seconds
        # one streaming pass: row count, label set, multi-label detection, and with given
        # classes a label check, so a bad row fails here rather than inside a worker
        n_rows, names, multi = 0, set(), False
        lookup = {n: i for i, n in enumerate(class_names or [])}
        for path, start, end, labels in _iter_manifest_rows(self.manifest_path):
            if end - start < min_seconds:
                continue
            lab = split_labels(labels)
            if lookup:
                strict = bool(multi_label) if multi_label is not None else True
                where = f"{self.manifest_path} row {n_rows} ({path})"
                _label_indices(labels, lookup, strict, where)
            n_rows += 1
            names.update(lab)
            multi = multi or len(lab) > 1
        if n_rows == 0:
            raise DataError(f"manifest {self.manifest_path} has no segments of >= {min_seconds} s")
        self.n_rows = n_rows
        names_list = list(class_names) if class_names is not None else sorted(names)
        self.reader = _ClipReader(
            names_list,
            multi if multi_label is None else bool(multi_label),
            sample_rate,
            clip_seconds,
            train,
            seed,
            eval_crop,
            wave_augment,
        )
        self.shuffle = train if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.even_shards = even_shards
        self.skip_errors = skip_errors
        self.n_skipped = 0
        self._epoch = _SharedEpoch()
        self._position = 0

    def set_position(self, position: int) -> None:
        """Start the next iteration at item `position` of this rank's epoch order (the items
        before it are not read or decoded)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self._position = int(position)

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return int(self.rank), int(self.world_size)  # type: ignore[arg-type]
        return _dist_rank_world()

    def __len__(self) -> int:
        """Rows this process yields per epoch (over all its workers)."""
        rank, world = self._rank_world()
        if self.even_shards:
            return self.n_rows // world
        return len(range(rank, self.n_rows, world))

    def _rank_rows(self) -> Iterator[tuple[int, str, float, float, str]]:
        """(global row number, path, start, end, labels) of this rank's rows, in file order."""
        rank, world = self._rank_world()
        limit = self.n_rows // world if self.even_shards else math.inf
        i = -1
        for path, start, end, labels in _iter_manifest_rows(self.manifest_path):
            if end - start < self.min_seconds:
                continue  # the same filter as the counting pass, so numbering agrees
            i += 1
            if i % world != rank:
                continue
            if i // world >= limit:  # position among this rank's rows
                break
            yield i, path, start, end, labels

    def _shuffled(
        self, rows: Iterator[tuple[int, str, float, float, str]]
    ) -> Iterator[tuple[int, str, float, float, str]]:
        rank, _ = self._rank_world()
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, rank, 2])
        buf: list[tuple[int, str, float, float, str]] = []
        for row in rows:
            if len(buf) < self.shuffle_buffer:
                buf.append(row)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], row = row, buf[j]
            yield row
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self._rank_rows()
        if self.shuffle:
            rows = self._shuffled(rows)
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, first = self.epoch, self._position
        lookup, multi = self.reader.lookup, self.reader.multi_label
        for pos, (i, path, start, end, labels) in enumerate(rows):
            if pos < first or pos % n_workers != worker:
                continue  # before the resume position, or another worker's item: not decoded
            where = f"{self.manifest_path} row {i} ({path})"
            label_idx = _label_indices(labels, lookup, multi, where) if lookup else ()
            try:
                yield self.reader.read(i, epoch, path, start, end, label_idx)
            except AudioDecodeError as e:
                if not self.skip_errors:
                    raise
                self.n_skipped += 1
                warnings.warn(f"skipping unreadable audio: {e}", stacklevel=2)
