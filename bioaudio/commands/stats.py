"""Mean / std of un-normalised frontend features over a seeded sample of a manifest.

Writes JSON (default: stats.json beside the manifest, where training picks it up) with the
frontend kind, mean, std and how many clips and frames they came from. Normalised features are
(x - mean) / (2 * std), as in the official BEATs / EAT preprocessing.

Example:
  bioaudio stats data/train.csv --frontend eat_fbank --max_clips 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import add_options, config_from_args
from bioaudio.data.frontend import OFFICIAL_STATS
from bioaudio.data.manifest import read_manifest
from bioaudio.data.stats import (
    StatsConfig,
    compute_stats,
    default_stats_path,
    guard_stats_output,
    save_stats,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="manifest CSV (from `bioaudio prepare`)")
    add_options(parser, StatsConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(StatsConfig, args)
    out = Path(cfg.out) if cfg.out is not None else default_stats_path(args.manifest)
    guard_stats_output(out, (args.manifest,), cfg.overwrite)
    df = read_manifest(args.manifest)
    record = compute_stats(df, cfg, manifest=args.manifest)
    save_stats(record, out)
    print(
        f"{record['frontend']}: mean {record['mean']:.5f}  std {record['std']:.5f}"
        f"  over {record['n_clips']} clips ({record['n_frames']} frames)"
    )
    official = OFFICIAL_STATS.get(record["frontend"])
    if official is not None:
        print(f"official {record['frontend']} statistics: mean {official[0]}  std {official[1]}")
    if record["skipped"]:
        print(f"skipped {record['skipped']} unreadable files")
    print(f"wrote {out}")
    return 0
