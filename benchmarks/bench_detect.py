"""Detection throughput vs the bare model forward on the same windows, side by side.

Writes a long noisy recording (default 10 min, 16 kHz WAV, cached in a temp folder), exports
two untrained classifiers (speed does not depend on the weights): `tiny` = TinyMelCNN on 64
log-mel bins, `small` = a tiny-preset EAT encoder with a mean-pool head (Kaldi fbank). For
each it times, alternately, `repeats` times:

  detect  `detect_to_folder` end to end: header scan, windows read by seeking, batched forward,
          events, Raven table, detections.csv (a fresh output folder each time);
  bare    the model's forward + softmax on the same windows pre-loaded as padded tensors.

and prints audio seconds per wall second of each (best of the repeats) and detect / bare
(target >= 0.8: the I/O and bookkeeping around the forward cost at most a fifth).

Figures (`--json`, `bioaudio bench`): detect / bare for each model (target >= 0.8).
Usage: python benchmarks/bench_detect.py [--minutes 10] [--window 5] [--threads 1]
       [--quick] (a 2 min recording, 2 repeats) [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bioaudio.benchreport import Report, add_suite_arguments
from bioaudio.data import audio
from bioaudio.data.frontend import FrontendConfig
from bioaudio.inference.detect import DetectConfig, detect_to_folder, recording_windows
from bioaudio.inference.metrics import probabilities
from bioaudio.models.audio_model import build_model
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import load_model, save_export

CLASSES = ["call_a", "call_b", "noise"]


def make_recording(path: Path, minutes: float, sr: int = 16000) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for _ in range(int(round(minutes))):
            t = np.arange(sr * 60) / sr
            x = 0.05 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 1000 * t)
            f.write(x.astype(np.float32))


def models(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    tiny = BaselineClassifier.build(
        "tiny_mel_cnn", FrontendConfig(kind="logmel", n_mels=64), CLASSES
    )
    small = build_model(
        "eat",
        encoder="tiny",
        head={"pooling": "mean", "num_classes": len(CLASSES)},
        class_names=CLASSES,
    )
    return {
        "tiny (TinyMelCNN)": save_export(tiny, root / "tiny"),
        "small (EAT tiny + head)": save_export(small, root / "small"),
    }


def preload(path: Path, window: float, hop: float, batch: int, sr: int) -> list[tuple]:
    """The windows detect scores, as padded (wav, padding_mask) batches in memory."""
    w = recording_windows([(str(path), audio.info(path).duration)], window, hop)
    n = int(round(window * sr))
    wavs, masks = [], []
    for s, e in zip(w["start"], w["end"]):
        x = audio.load(path, sr, offset=float(s), duration=float(e - s))
        y, m = audio.pad_or_crop(x, n)
        wavs.append(torch.from_numpy(y))
        masks.append(torch.from_numpy(m))
    return [
        (torch.stack(wavs[i : i + batch]), torch.stack(masks[i : i + batch]))
        for i in range(0, len(wavs), batch)
    ]


@torch.inference_mode()
def bare(model: torch.nn.Module, batches: list[tuple]) -> float:
    t0 = time.perf_counter()
    for wav, mask in batches:
        probabilities(model(wav, mask), model.multi_label)
    return time.perf_counter() - t0


def detect(model: Path, wav: Path, out: Path, cfg: DetectConfig) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    detect_to_folder(model, [wav], out, cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--hop", type=float, default=None, help="default: window / 2")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    add_suite_arguments(ap)
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.repeats = min(args.minutes, 2.0), min(args.repeats, 2)
    torch.set_num_threads(args.threads)
    hop = args.hop or args.window / 2

    tmp = Path(tempfile.gettempdir())
    wav = tmp / f"bioaudio_bench_detect_{args.minutes:g}min.wav"
    if not wav.exists():
        # under a temporary name: a killed run must not leave a short file to be reused
        part = wav.with_name(f".{wav.stem}.tmp.wav")
        make_recording(part, args.minutes)
        part.replace(wav)
    seconds = audio.info(wav).duration
    cfg = DetectConfig(
        window=args.window, hop=hop, batch_size=args.batch_size, cpu=True, progress=False
    )
    print(
        f"{seconds / 60:.1f} min recording, {args.window:g} s windows every {hop:g} s, batch"
        f" {args.batch_size}, {args.threads} thread(s), best of {args.repeats}"
    )
    print(f"{'model':26s} {'detect (audio s/s)':>19s} {'bare forward':>13s} {'ratio':>7s}")
    report = Report(
        "detect",
        "`detect_to_folder` end to end (seek + read windows, batched forward, events, Raven "
        "table, CSV) vs the bare model forward + softmax on the same windows pre-loaded",
    )
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as d:
        root = Path(d)
        for name, path in models(root).items():
            model = load_model(path, device="cpu")
            batches = preload(wav, args.window, hop, args.batch_size, 16000)
            bare(model, batches[:2])  # warm-up (allocator, kernels)
            t_det, t_bare = [], []
            for _ in range(args.repeats):  # alternate, so machine load hits both alike
                t_det.append(detect(path, wav, root / "out", cfg))
                t_bare.append(bare(model, batches))
            det_rate, bare_rate = seconds / min(t_det), seconds / min(t_bare)
            print(f"{name:26s} {det_rate:19.0f} {bare_rate:13.0f} {det_rate / bare_rate:7.2f}")
            report.add(
                f"detect / bare forward throughput, {name}",
                det_rate / bare_rate,
                "x",
                target=0.8,
                note=f"{det_rate:.0f} vs {bare_rate:.0f} audio s/s; {seconds / 60:.0f} min "
                f"recording, {args.window:g} s windows, best of {args.repeats}, "
                f"{args.threads} thread(s)",
            )
    report.write(args.json)


if __name__ == "__main__":
    main()
