"""Export embeddings of every window of a folder, a manifest or one recording to Parquet.

MODEL is anything `load_model` reads: an export folder or a run directory (its best/, else
export/), an official BEATs / EAT checkpoint, or a CNN baseline (its embedding is the
penultimate activation). INPUT is a folder (scanned like `bioaudio prepare`: labels come from
its layout), a manifest CSV or an audio file. Long recordings are cut into --window second
windows every --hop seconds, read by seeking.

OUT (.parquet) gets one row per window: path, recording, start, end, window_index, labels,
duration, sample_rate, channels, site, datetime, date, month, hour, season (from recorder file
names like SITE_20240501_053000.wav) and `embedding` (list<float32>[D]); the provenance (model,
layer, pooling, frontend, window, bioaudio version) is in the Parquet metadata. Unreadable files
are listed in skipped.csv beside OUT with the reason.

Re-running the same command resumes: files already in OUT are skipped, new files are added.
Several processes or GPUs: `accelerate launch [--multi_gpu] --num_processes N -m bioaudio embed
...` (each process embeds its share, process 0 merges).

Examples:
  bioaudio embed runs/finetune/export recordings/ --out runs/emb.parquet
  bioaudio embed checkpoints/eat_base data/manifest.csv --out emb.parquet --pooling cls --layer 8
  bioaudio explore runs/emb.parquet          (the explorer app on the result)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import add_options, config_from_args
from bioaudio.distributed import start_accelerator
from bioaudio.inference.embed import EmbedConfig, embed_to_parquet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="export folder, run directory or checkpoint")
    parser.add_argument("input", type=Path, help="a folder of audio, a manifest CSV or a file")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output .parquet (default: ./embeddings_<INPUT name>.parquet)",
    )
    add_options(parser, EmbedConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(EmbedConfig, args)
    source = Path(args.input).expanduser()
    out = args.out or Path.cwd() / f"embeddings_{source.stem or source.name}.parquet"
    accelerator = start_accelerator(cpu=cfg.device().type == "cpu")
    result = embed_to_parquet(args.model, source, out, cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        print(result.summary())
        print(f"explore it: bioaudio explore {result.out}")
    return 0
