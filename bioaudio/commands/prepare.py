"""Scan a folder of audio into a manifest: labels from any layout of data/README.md, unreadable
files listed with their reason in skipped.csv beside the manifest."""

from __future__ import annotations

import argparse

from bioaudio.config import add_dataclass_args, config_from_args
from bioaudio.data.manifest import PrepareConfig, prepare_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder of audio to scan (recursively)")
    parser.add_argument(
        "--out",
        metavar="MANIFEST",
        default=None,
        help="manifest to write (default: DIR/manifest.csv); skipped.csv goes beside it",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML / JSON file of the options below")
    add_dataclass_args(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PrepareConfig, args)
    result = prepare_manifest(args.dir, out=args.out, config=cfg)
    print(result.summary())
    return 0
