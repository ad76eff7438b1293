"""Precompute frontend features of every manifest row (or window) into a cache that training reads
instead of decoding audio: worth it for small models, where feature extraction is a large part of
a step.

Features are stored UN-normalised (any stats apply when reading): one float32 array of all frames
read through np.memmap (--format memmap, fast) or one .npz per item holding `spectrogram` (T, F)
(--format npz, as the seed projects did), plus metadata.csv (one row per item) and cache.json
(frontend, manifest fingerprint, window/hop, counts). Built in a temporary folder renamed at the
end: an interrupted run leaves no half cache. Unreadable rows are listed in skipped.csv.

Trade-offs of training from a cache:
  - waveform augmentations (gain, time roll, background noise) cannot apply; SpecAugment and
    mixup still do (they act on feature batches);
  - a random crop of cached frames equals the features of the cropped audio only for the Kaldi
    fbanks and only on 10 ms hop boundaries (BEATs: identical; EAT: to float rounding); the dB
    frontends (logmel, stft) are relative to the whole item's maximum, so their crops differ
    from featurising the crop. --window caches are exact per window.

Examples:
  bioaudio features data/manifest.csv
  bioaudio features data/manifest.csv --frontend eat_fbank --window 10 --hop 5 --out cache/eat
  bioaudio features data/manifest.csv --format npz --num_workers 8 --force
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import add_options, config_from_args
from bioaudio.data.features import SKIPPED_FILE, FeaturesConfig, build_cache, open_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="manifest CSV (from `bioaudio prepare`)")
    add_options(parser, FeaturesConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(FeaturesConfig, args)
    out = build_cache(args.manifest, cfg)
    cache = open_cache(out)
    meta = cache.meta
    hours = meta["total_frames"] / meta["frame_rate"] / 3600
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    what = "rows" if meta["window"] is None else f"{meta['window']:g} s windows"
    print(
        f"{meta['frontend']['kind']}: {meta['n_items']} {what}, {meta['total_frames']} frames"
        f" x {meta['n_features']} bins ({hours:.2f} h), {size:.1f} MiB, format {meta['format']}"
    )
    if meta.get("stats_file"):
        print(f"default normalisation: {meta['stats_file']}")
    if meta["n_skipped"]:
        print(f"skipped {meta['n_skipped']} unreadable item(s), reasons in {out / SKIPPED_FILE}")
    print(f"wrote {out}")
    return 0
