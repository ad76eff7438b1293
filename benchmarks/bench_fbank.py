"""Kaldi fbank throughput: our batched `kaldi_fbank_batch` versus torchaudio's
`compliance.kaldi.fbank` called clip by clip (as both official preprocessors do), measured side by
side in one run on batches of 10 s clips, with the largest difference between the two outputs;
then where the time goes in each (torch.profiler, self time per op).

Both run the official settings (BEATs: wav * 2**15, povey; EAT: wav - mean, hanning, htk_compat)
on the same audio, device and thread count, interleaved so machine drift hits both alike.

Figures (`--json`, `bioaudio bench`): batched / per-clip speed for each setting at the largest
batch and each thread count (target >= 2x) and the largest |difference| from torchaudio over
every run (target <= 1e-4).

    .venv/bin/python benchmarks/bench_fbank.py                       # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_fbank.py --quick --json fbank.json   # ~20 s
    .venv/bin/python benchmarks/bench_fbank.py --batches 8,32,128 --devices cuda
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torchaudio.compliance import kaldi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bioaudio.benchreport import Report, add_suite_arguments, interleaved_times  # noqa: E402
from bioaudio.benchreport import sync as _sync  # noqa: E402
from bioaudio.data.fbank import KaldiFbankOptions, kaldi_fbank_batch  # noqa: E402

SR = 16000
OPTIONS = {"beats": KaldiFbankOptions.beats(), "eat": KaldiFbankOptions.eat()}


def official_clipwise(kind: str, wav: torch.Tensor) -> list[torch.Tensor]:
    """The official preprocessors' calls, one clip at a time (BEATs.preprocess; EAT)."""
    out = []
    for clip in wav:
        if kind == "beats":
            out.append(
                kaldi.fbank(
                    clip[None] * 2**15,
                    num_mel_bins=128,
                    sample_frequency=16000,
                    frame_length=25,
                    frame_shift=10,
                )
            )
        else:
            out.append(
                kaldi.fbank(
                    (clip - clip.mean())[None],
                    htk_compat=True,
                    sample_frequency=16000,
                    use_energy=False,
                    window_type="hanning",
                    num_mel_bins=128,
                    dither=0.0,
                    frame_shift=10,
                )
            )
    return out


def time_pair(
    ours: Callable[[], object], ref: Callable[[], object], device: torch.device, iters: int
) -> tuple[float, float]:
    """Median seconds per call for (ours, reference), one untimed warm-up round, ABBA order."""
    times = interleaved_times({"ours": ours, "ref": ref}, iters, warmup=1, device=device)
    return statistics.median(times["ours"]), statistics.median(times["ref"])


def test_audio(batch: int, seconds: float, device: torch.device) -> torch.Tensor:
    """(B, S) tones + chirp + 1e-2 white noise: realistic dynamic range, no bin at the floor."""
    g = torch.Generator().manual_seed(0)
    n = int(seconds * SR)
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 100.0 + 2000.0 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    x = 0.4 * torch.sin(2 * math.pi * f0 * t) + 0.2 * torch.sin(2 * math.pi * (300 + 200 * t) * t)
    x = x + 1e-2 * torch.randn(batch, n, generator=g, dtype=torch.float64)
    return x.float().to(device)


def profile(fn: Callable[[], object], device: torch.device, top: int) -> list[tuple[str, float]]:
    """(op, share of total self time) for the `top` most expensive ops of one call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, float(getattr(e, attr))) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    events.sort(key=lambda e: -e[1])
    return [(k, t / total) for k, t in events[:top]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--iters", type=int, default=7, help="timed calls per configuration")
    parser.add_argument(
        "--threads", default=f"1,{torch.get_num_threads()}", help="CPU thread counts to run"
    )
    parser.add_argument(
        "--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu", help="devices"
    )
    parser.add_argument("--top", type=int, default=6, help="ops listed per profile")
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:  # one batch size, fewer repeats: ~20 s on 2 CPU cores
        args.batches, args.iters = args.batches.split(",")[0], min(args.iters, 5)

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    devices = [torch.device(d.strip()) for d in args.devices.split(",") if d.strip()]
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"clips of {args.seconds:g} s at {SR} Hz, median of {args.iters} interleaved calls; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (others' work skews both)"
    )
    header = (
        f"{'device':<6} {'thr':>3} {'setting':<6} {'batch':>5} {'torchaudio ms/clip':>18} "
        f"{'batched ms/clip':>15} {'speedup':>7} {'max |diff|':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    report = Report(
        "fbank",
        "batched exact Kaldi fbank (kaldi_fbank_batch) vs torchaudio.compliance.kaldi.fbank "
        "called clip by clip, as both official preprocessors do",
    )
    max_diff = {kind: 0.0 for kind in OPTIONS}
    for device in devices:
        for n_threads in threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(n_threads)
            for kind, options in OPTIONS.items():
                for batch in batches:
                    wav = test_audio(batch, args.seconds, device)

                    def ours(wav=wav, options=options):
                        return kaldi_fbank_batch(wav, None, options)

                    def ref(wav=wav, kind=kind):
                        return official_clipwise(kind, wav)

                    t_ours, t_ref = time_pair(ours, ref, device, args.iters)
                    diff = (ours()[0] - torch.stack(ref())).abs().max().item()
                    max_diff[kind] = max(max_diff[kind], diff)
                    if batch == max(batches):
                        report.add(
                            f"batched / per-clip speed, {kind} ({device.type}, {n_threads} thr)",
                            t_ref / t_ours,
                            "x",
                            target=2.0,
                            note=f"batch {batch} x {args.seconds:g} s clips, median of "
                            f"{args.iters} interleaved calls",
                        )
                    print(
                        f"{device.type:<6} {n_threads:>3} {kind:<6} {batch:>5} "
                        f"{t_ref / batch * 1e3:>18.3f} {t_ours / batch * 1e3:>15.3f} "
                        f"{t_ref / t_ours:>6.2f}x {diff:>10.2e}"
                    )
    print(
        "\nspeedup = torchaudio time / batched time per clip (same audio, device, threads, run); "
        "max |diff| over log-mel values (float32 rounding; see tests/test_fbank.py)."
    )
    for kind, diff in max_diff.items():
        report.add(
            f"max |batched - torchaudio|, {kind}",
            diff,
            target=1e-4,
            higher_is_better=False,
            note="log-mel values, over every batch size, thread count and device run",
        )

    # Where the time goes: self time per op of one call at the largest batch, BEATs setting, with
    # the fewest threads (the steadiest measurement on a shared machine).
    device, batch = devices[0], max(batches)
    torch.set_num_threads(threads[0])
    wav = test_audio(batch, args.seconds, device)
    options = OPTIONS["beats"]
    for name, fn in (
        ("batched", lambda: kaldi_fbank_batch(wav, None, options)),
        ("torchaudio clip by clip", lambda: official_clipwise("beats", wav)),
    ):
        fn()  # warm up (mel-bank cache, allocator)
        ops = ", ".join(
            f"{k.removeprefix('aten::')} {share:.0%}" for k, share in profile(fn, device, args.top)
        )
        print(
            f"\n{name} ({device.type}, {threads[0]} threads, batch {batch}), top ops by self time:\n  {ops}"
        )
        report.notes.append(f"{name}: top ops by self time ({threads[0]} thread): {ops}")
    report.write(args.json)


if __name__ == "__main__":
    main()
