"""Seeded stratified / grouped / k-fold / ESC-fold splits of a manifest.

Writes a copy of MANIFEST with a `split` column (train / val / test) or a `fold` column
(0..k-1), by default beside it as <stem>.split.csv, and prints the clips per class and split.

Examples:
  bioaudio split data/manifest.csv --val 0.1 --test 0.1
  bioaudio split data/manifest.csv --method group --group_column site
  bioaudio split fsdd.csv --method group --group_pattern '^\\d+_([a-z]+)_\\d+'
  bioaudio split esc10.csv --method esc
  bioaudio split data/manifest.csv --method kfold --folds 5 --group_column recording
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bioaudio.config import add_options, config_from_args
from bioaudio.data.manifest import guard_manifest_output, read_manifest, write_manifest
from bioaudio.data.splits import SplitConfig, split_manifest, split_table

MAX_TABLE_ROWS = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", type=Path, help="manifest CSV (from `bioaudio prepare`)")
    add_options(parser, SplitConfig)


def default_out(manifest: Path) -> Path:
    """<stem>.split.csv beside the manifest."""
    return manifest.with_name(f"{manifest.stem}.split.csv")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SplitConfig, args)
    out = Path(cfg.out) if cfg.out is not None else default_out(Path(args.manifest))
    guard_manifest_output(out, (args.manifest,), cfg.overwrite)
    df = read_manifest(args.manifest)
    result = split_manifest(df, cfg)
    write_manifest(result.df, out)

    table = split_table(result.df, result.column)
    shown = table
    if len(table) > MAX_TABLE_ROWS + 1:  # keep the totals row, elide the middle classes
        shown = pd.concat([table.iloc[:MAX_TABLE_ROWS], table.iloc[[-1]]])
    print(table_title(cfg, result.groups))
    print(shown.to_string())
    if len(shown) < len(table):
        print(f"({len(table) - len(shown)} more classes not shown)")
    if result.groups is not None:
        per = pd.Series(result.groups).groupby(result.df[result.column].to_numpy()).nunique()
        per = per.reindex([c for c in table.columns if c in per.index])  # train, val, test order
        print("groups: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(result.df)} rows with a {result.column!r} column to {out}")
    return 0


def table_title(cfg: SplitConfig, groups: object) -> str:
    if cfg.method == "esc":
        what = f"folds from file names ({cfg.fold_pattern})"
    elif cfg.method == "kfold":
        what = f"{cfg.folds}-fold stratified"
    else:
        what = f"stratified train/val/test ({1 - cfg.val - cfg.test:g}/{cfg.val:g}/{cfg.test:g})"
    if groups is not None and cfg.method != "esc":
        source = cfg.group_pattern or cfg.group_column or "recording"
        what += f", grouped by {source}"
    return f"{what}, seed {cfg.seed}; clips per class:"
