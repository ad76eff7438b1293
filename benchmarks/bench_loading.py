"""Data-loading throughput through the data path training uses, measured side by side in one run:

1. decode + resample + fbank with 2 DataLoader workers vs 1: `AudioDataset` items (FLAC at
   44.1 kHz decoded by soundfile, resampled to 16 kHz by soxr, random 10 s crops seeded per
   item) behind the Trainer's `SeededItems` and `collate_batch` in the workers, then the model's
   batched Kaldi fbank in the main process (`model.featurise`, which the pretraining and
   classification tasks call on each batch after the DataLoader);
2. the feature cache's read path vs that live featurisation: `FeatureDataset` over the cache
   that `bioaudio features` writes (`build_cache`, memmap format), as finetuning reads it,
   vs the live path of 1., both with the Trainer's default 2 workers;
3. for reference, building the cache (decode + resample + fbank all inside the workers,
   `bioaudio features --num_workers N`) with 2 workers vs 1.

Audio is generated into a temporary folder (tones, chirps and noise, 10 s at 44.1 kHz), so the
files sit in the page cache: the figures are CPU cost, not disk speed. Configurations alternate
(A B, B A, ...) over the repeats; each figure is the median clips/s over the repeats. A pass
reads a fixed number of items through a new DataLoader (worker start-up included, as every epoch
pays it); a cache pass reads each clip several times so that start-up weighs on it no more than
on an epoch of a few thousand clips. The main process keeps torch's default threads (the
workers run one each, as the DataLoader sets), so on a 2-core machine the fbank of the main
process competes with 2 workers for the same cores.

    .venv/bin/python benchmarks/bench_loading.py --quick     # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_loading.py             # ~3 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bioaudio.benchreport import Report, add_suite_arguments
from bioaudio.data.datasets import AudioDataset, collate_batch
from bioaudio.data.features import FeatureDataset, FeaturesConfig, build_cache, frames_for_seconds
from bioaudio.data.manifest import PrepareConfig, prepare_manifest, read_manifest
from bioaudio.models.audio_model import build_model
from bioaudio.training.sampling import SeededItems

FILE_SR = 44100


def write_audio(root: Path, n: int, seconds: float) -> Path:
    """n FLAC files of tones + chirp + noise at 44.1 kHz; returns the manifest path."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * FILE_SR)) / FILE_SR
    root.mkdir(parents=True)
    for i in range(n):
        f0, f1 = rng.uniform(200, 4000, size=2)
        x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(2 * np.pi * (f1 + 300 * t) * t)
        x += 0.05 * rng.standard_normal(t.shape)
        sf.write(root / f"clip_{i:04d}.flac", x.astype(np.float32), FILE_SR, subtype="PCM_16")
    return prepare_manifest(root, config=PrepareConfig()).manifest_path


def live_pass(
    model: torch.nn.Module, dataset: AudioDataset, order: list[int], batch: int, workers: int
) -> float:
    """Seconds to read `order` through the Trainer's data path and featurise every batch."""
    loader = DataLoader(
        SeededItems(dataset, seed=0),
        batch_size=batch,
        sampler=order,
        num_workers=workers,
        collate_fn=collate_batch,
    )
    t = time.perf_counter()
    with torch.no_grad():
        for b in loader:
            feats, _ = model.featurise(b["wav"], b["padding_mask"])
    assert feats.shape[-1] == 128
    return time.perf_counter() - t


def cache_pass(dataset: FeatureDataset, order: list[int], batch: int, workers: int) -> float:
    """Seconds to read `order` from the feature cache (features go to the model as they are)."""
    loader = DataLoader(
        SeededItems(dataset, seed=0),
        batch_size=batch,
        sampler=order,
        num_workers=workers,
        collate_fn=collate_batch,
    )
    t = time.perf_counter()
    for b in loader:
        feats = b["feats"]
    assert feats.shape[-1] == 128
    return time.perf_counter() - t


def alternate(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every configuration `repeats` times, the order rotating each round; seconds each."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(fns[name]())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(parser)
    parser.add_argument("--clips", type=int, default=None, help="audio files (96; --quick 48)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--batch", type=int, default=8, help="clips per batch")
    parser.add_argument("--repeats", type=int, default=None, help="passes per config (5; 3)")
    parser.add_argument(
        "--cache_reads", type=int, default=10, help="times a cache pass reads each clip"
    )
    parser.add_argument("--model", default="eat", help="frontend of this model type's official")
    args = parser.parse_args(argv)
    n = args.clips or (48 if args.quick else 96)
    repeats = args.repeats or (3 if args.quick else 5)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads in the main process; "
        f"{n} FLAC clips of {args.seconds:g} s at {FILE_SR} Hz -> 16 kHz, batch {args.batch}, "
        f"median of {repeats} alternating passes; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs (others' work slows 2 workers more than 1)"
    )
    report = Report(
        "loading",
        "clips/s of decode + resample (DataLoader workers) + batched fbank (main process) with 2 "
        "workers vs 1, and of the feature-cache read path vs that live featurisation",
    )
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_audio(Path(tmp) / "audio", n, args.seconds)
        torch.manual_seed(0)
        model = build_model(args.model, "tiny").eval()  # only its frontend runs
        dataset = AudioDataset(
            read_manifest(manifest),
            class_names=[],
            sample_rate=model.frontend_cfg.sample_rate,
            clip_seconds=args.seconds,
            train=True,
        )
        order = list(range(n))

        # Where the time goes, one clip at a time in this process (context for the ratios).
        t = time.perf_counter()
        items = [dataset[i] for i in range(min(n, 16))]
        decode_ms = (time.perf_counter() - t) / len(items) * 1e3
        wav = torch.stack([it["wav"] for it in items[: args.batch]])
        mask = torch.stack([it["padding_mask"] for it in items[: args.batch]])
        threads = torch.get_num_threads()
        fbank_ms = {}
        for k in sorted({1, threads}, reverse=True):
            torch.set_num_threads(k)
            with torch.no_grad():
                model.featurise(wav, mask)  # warm up (mel bank cache)
                t = time.perf_counter()
                for _ in range(3):
                    model.featurise(wav, mask)
            fbank_ms[k] = (time.perf_counter() - t) / (3 * len(wav)) * 1e3
        torch.set_num_threads(threads)
        fbank_text = ", ".join(f"{v:.1f} ms with {k} thread(s)" for k, v in fbank_ms.items())
        print(
            f"\none clip in this process: decode + resample {decode_ms:.1f} ms; batched fbank "
            f"{fbank_text}"
        )

        # The cache (built once here; its build is timed below)
        cache_dir = Path(tmp) / "cache"

        def build(workers: int) -> float:
            cfg = FeaturesConfig(
                frontend=model.frontend_cfg.kind,
                out=cache_dir,
                num_workers=workers,
                force=True,
                progress=False,
            )
            t = time.perf_counter()
            build_cache(manifest, cfg)
            return time.perf_counter() - t

        build(2)
        cached = FeatureDataset(
            cache_dir,
            class_names=[],
            clip_frames=frames_for_seconds(model.frontend_cfg, args.seconds),
            train=True,
            frontend=model.frontend_cfg,
        )
        reads = order * args.cache_reads
        # 1. + 2.: live with 1, 2 (and 0: all in the main process) workers, and the cache read,
        # all alternating in one loop.
        passes = {
            f"live {w}": lambda w=w: live_pass(model, dataset, order, args.batch, w)
            for w in (1, 2, 0)
        }
        passes["cache 2"] = lambda: cache_pass(cached, reads, args.batch, 2)
        runs = alternate(passes, repeats)
        # 3. building the cache, 2 workers vs 1
        builds = alternate({f"build {w}": lambda w=w: build(w) for w in (1, 2)}, repeats)

    def rate(seconds: list[float], items: int) -> float:
        return statistics.median(items / s for s in seconds)

    rates = {k: rate(v, len(reads) if k.startswith("cache") else n) for k, v in runs.items()}
    rates.update({k: rate(v, n) for k, v in builds.items()})
    rows = [
        ("live (train path)", 1, rates["live 1"]),
        ("live (train path)", 2, rates["live 2"]),
        ("live (train path)", 0, rates["live 0"]),
        ("cache read", 2, rates["cache 2"]),
        ("cache build", 1, rates["build 1"]),
        ("cache build", 2, rates["build 2"]),
    ]
    header = f"{'path':<18} {'workers':>7} {'clips/s':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for path, workers, r in rows:
        print(f"{path:<18} {workers:>7} {r:>9.1f}")
    scale = rates["live 2"] / rates["live 1"]
    build_scale = rates["build 2"] / rates["build 1"]
    cache_speed = rates["cache 2"] / rates["live 2"]
    print(
        f"\n2 workers / 1 worker (train path): {scale:.2f}x (target >= 1.6x); cache build "
        f"{build_scale:.2f}x; cache read / live, 2 workers each: {cache_speed:.1f}x "
        f"(target >= 10x); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    clip = f"{n} x {args.seconds:g} s FLAC 44.1 kHz, batch {args.batch}"
    report.add("live loading, 1 worker", rates["live 1"], "clips/s", note=clip)
    report.add("live loading, 2 workers", rates["live 2"], "clips/s", note=clip)
    report.add(
        "2 workers / 1 worker (decode + resample + fbank)",
        scale,
        "x",
        target=1.6,
        note=f"{os.cpu_count()} CPUs; fbank in the main process as in training",
    )
    report.add("cache build: 2 workers / 1 worker", build_scale, "x", note="bioaudio features")
    report.add("feature cache read", rates["cache 2"], "clips/s", note=f"{clip}, 2 workers")
    report.add(
        "cache read / live featurisation", cache_speed, "x", target=10.0, note="2 workers each"
    )
    report.notes.append(
        f"one clip in one process: decode + resample {decode_ms:.1f} ms, batched fbank "
        f"{fbank_text}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
