"""How much cheaper is reading a 10 s window of a long recording than decoding it whole?

Generates a long FLAC (default one hour at 22.05 kHz, cached in a temp folder), then times in
the same run: (a) a full decode, what a naive loader pays for every window it cuts from a
recording, and (b) `bioaudio.audio.load(..., offset, duration)` windows at random offsets (seek +
read), checking that a seeked window equals the same slice of the full decode. Prints the ratios.

Figures (`--json`, `bioaudio bench`): full decode / seeked window (how many times cheaper a
window is; no target) and the seeked window's cost relative to the share of the audio it reads
(1.0 = exactly proportional; no target).

Usage: python benchmarks/bench_audio_window.py [--hours 1] [--window 10] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bioaudio.benchreport import Report, add_suite_arguments
from bioaudio.data import audio


def make_long_flac(path: Path, hours: float, sr: int) -> None:
    rng = np.random.default_rng(0)
    chunk = sr * 60
    # written under a temporary name: a killed run must not leave a short file to be reused
    tmp = path.with_name(f".{path.name}.tmp")
    with sf.SoundFile(tmp, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        for minute in range(int(round(hours * 60))):
            t = np.arange(chunk) / sr
            x = 0.05 * rng.standard_normal(chunk) + 0.2 * np.sin(
                2 * np.pi * (800 + 10 * minute) * t
            )
            f.write(x.astype(np.float32))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--window", type=float, default=10.0, help="window length in seconds")
    ap.add_argument("--reads", type=int, default=20, help="number of random windows")
    ap.add_argument("--sr", type=int, default=22050)
    add_suite_arguments(ap)
    args = ap.parse_args()
    if args.quick:  # a 15 min recording, 10 windows: seconds, not a minute
        args.hours, args.reads = min(args.hours, 0.25), min(args.reads, 10)

    path = Path(tempfile.gettempdir()) / f"bioaudio_bench_{args.hours:g}h_{args.sr}.flac"
    if not path.exists():
        print(f"writing {args.hours:g} h test recording to {path} ...", flush=True)
        make_long_flac(path, args.hours, args.sr)
    meta = audio.info(path)
    print(f"file: {path} ({meta.duration / 3600:.2f} h, {path.stat().st_size / 1e6:.0f} MB FLAC)")

    rng = np.random.default_rng(1)
    offsets = rng.uniform(0, meta.duration - args.window, size=args.reads)

    t0 = time.perf_counter()
    full = audio.load(path, sample_rate=None)
    t_full = time.perf_counter() - t0

    t0 = time.perf_counter()
    for off in offsets:
        audio.load(path, sample_rate=None, offset=float(off), duration=args.window)
    t_window = (time.perf_counter() - t0) / args.reads

    # correctness in the same run: a seeked window equals the slice of the full decode
    off = float(offsets[0])
    win = audio.load(path, sample_rate=None, offset=off, duration=args.window)
    start = int(round(off * meta.sample_rate))
    assert np.array_equal(win, full[start : start + len(win)]), "window != slice of full decode"

    fraction = args.window / meta.duration
    print(f"full decode:            {t_full * 1000:9.1f} ms")
    print(f"one {args.window:g} s window (seek): {t_window * 1000:9.2f} ms  (mean of {args.reads})")
    print(f"window / full decode:   {t_window / t_full:9.5f}  ({t_full / t_window:.0f}x cheaper)")
    print(f"audio fraction read:    {fraction:9.5f}")

    report = Report(
        "audio_window",
        f"a {args.window:g} s window of a {meta.duration / 3600:.2g} h FLAC read by seeking "
        "(bioaudio.data.audio.load with offset) vs decoding the whole file",
    )
    shape = f"{args.window:g} s windows of a {meta.duration / 3600:.2g} h {args.sr} Hz FLAC"
    report.add(
        "full decode / seeked window (time)",
        t_full / t_window,
        "x",
        note=f"{shape}, mean of {args.reads} random offsets",
    )
    report.add(
        "seeked window cost / audio share read",
        (t_window / t_full) / fraction,
        "x",
        higher_is_better=False,
        note=f"1.0 = a window costs exactly its share ({fraction:.2g}) of the full decode",
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
