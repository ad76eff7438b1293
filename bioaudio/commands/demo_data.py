"""Generate the small synthetic bioacoustic demo dataset (six species, every data layout).

The same --seed always gives the same files. OUT must be new, empty, or a previous demo-data
output (the files it wrote are replaced, files you added are kept); anything else needs
--force.
"""

from __future__ import annotations

import argparse
import time

from bioaudio.config import add_dataclass_args, config_from_args
from bioaudio.data.demo import DemoDataConfig, generate_demo_data
from bioaudio.fileio import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to write the dataset into")
    parser.add_argument("--config", metavar="FILE", help="YAML / JSON file of the options below")
    add_dataclass_args(parser, DemoDataConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DemoDataConfig, args)
    check_writable(args.out, "OUT")
    t0 = time.perf_counter()
    summary = generate_demo_data(
        args.out,
        seed=cfg.seed,
        n_per_class=cfg.n_per_class,
        n_unlabelled=cfg.n_unlabelled,
        soundscapes=cfg.soundscapes,
        force=cfg.force,
        progress=True,
    )
    print(summary.format())
    print(
        f"written in {time.perf_counter() - t0:.1f} s; next: bioaudio prepare {args.out}/by_class"
    )
    return 0
