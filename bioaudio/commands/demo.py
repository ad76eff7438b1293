"""Run the whole job end to end on generated demo audio, as a new user's first command.

Every step is an ordinary `bioaudio` command (printed before it runs, so you can repeat or adapt
it on your own data):
  1. demo-data     six synthetic "species" in every data layout          -> OUT/data
  2. prepare       folder-per-class layout -> manifest (+ skipped.csv)    -> OUT/data/by_class
  3. split         seeded stratified train / val / test                   -> manifest.split.csv
  4. preview       spectrograms of a few clips per class                  -> OUT/preview.png
  5. features      log-mel feature cache (training reads it)              -> OUT/features
  6. train-baseline  TinyMelCNN, best model by validation, test metrics   -> OUT/runs/tiny_mel_cnn
  7. infer         classify the long soundscape recordings by windows     -> OUT/predictions
  8. convert       a tiny EAT encoder exported and reloaded (the format official checkpoints
                   convert to; see checkpoints/README.md)                 -> OUT/models/eat_tiny
Re-running resumes: finished steps are kept (generated data, manifests, finished runs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from bioaudio.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", nargs="?", default="demo_out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, split and training")
    parser.add_argument(
        "--epochs", type=float, default=40, help="training epochs of the baseline (default: 40)"
    )


def _step(title: str, argv: list[str]) -> None:
    from bioaudio.cli import main

    print(f"\n=== {title}\n$ bioaudio {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise ConfigError(f"demo step failed: bioaudio {shlex.join(argv)} (exit {code})")


def _export_tiny_eat(out: Path) -> Path:
    """A randomly initialised tiny EAT encoder (no head), as an export folder."""
    import torch

    from bioaudio.models.audio_model import build_model
    from bioaudio.models.checkpoint import save_export

    torch.manual_seed(0)
    model = build_model("eat", encoder="tiny")
    return save_export(model, out, provenance={"source": "bioaudio demo (random init)"})


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    seed = str(args.seed)
    if not (data / ".bioaudio-demo-data.json").is_file():
        _step(
            "1. generate demo data",
            ["demo-data", str(data), "--seed", seed, "--n_per_class", "30"],
        )
    else:
        print(f"\n=== 1. demo data already in {data} (delete it to regenerate)")
    manifest = data / "by_class" / "manifest.csv"
    split = manifest.with_name("manifest.split.csv")
    _step(
        "2. scan the folder-per-class layout", ["prepare", str(data / "by_class"), "--no-progress"]
    )
    _step(
        "3. seeded stratified split",
        ["split", str(manifest), "--val", "0.2", "--test", "0.2", "--seed", seed],
    )
    _step(
        "4. preview spectrograms per class",
        [
            "preview",
            str(split),
            "--n",
            "3",
            "--frontend",
            "logmel",
            "--out",
            str(out / "preview.png"),
        ],
    )
    features = out / "features" / "logmel64"
    if not (features / "cache.json").is_file():
        _step(
            "5. cache log-mel features",
            [
                "features",
                str(split),
                "--frontend",
                "logmel",
                "--n_mels",
                "64",
                "--out",
                str(features),
                "--no-progress",
            ],
        )
    else:
        print(f"\n=== 5. feature cache already in {features}")
    run_root = out / "runs" / "tiny_mel_cnn"
    _step(
        "6. train the TinyMelCNN baseline",
        [
            "train-baseline", str(split), "--out", str(run_root), "--model", "tiny_mel_cnn",
            "--frontend", "logmel", "--n_mels", "64", "--features", str(features),
            "--clip_seconds", "3", "--epochs", str(args.epochs), "--batch_size", "16",
            "--spec_augment", "--seeds", seed, "--num_workers", "0", "--no-progress",
        ],
    )  # fmt: skip
    run_dir = run_root / f"seed_{seed}"
    _step(
        "7. classify the soundscapes (3 s windows)",
        [
            "infer",
            str(run_dir),
            str(data / "soundscapes"),
            "--out",
            str(out / "predictions"),
            "--window",
            "3",
            "--no-progress",
        ],
    )
    eat_dir = out / "models" / "eat_tiny_random"
    print(f"\n=== 8. export a tiny EAT encoder -> {eat_dir}")
    _export_tiny_eat(eat_dir)
    _step(
        "   reload and re-export it (verifies outputs)",
        ["convert", str(eat_dir), str(out / "models" / "eat_tiny"), "--force"],
    )

    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    print("\n" + "=" * 72)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Results in {out}/:")
    print(f"  data and manifests     {data}/  (layouts: data/README.md)")
    print(f"  spectrogram preview    {out / 'preview.png'}")
    print(f"  baseline run           {run_dir}/  (curves.png, confusion.png, test_metrics.json)")
    print(
        f"  test accuracy          {metrics['accuracy']:.3f}  (balanced {metrics['balanced_accuracy']:.3f},"
        f" macro-F1 {metrics['macro_f1']:.3f})"
    )
    print(f"  soundscape predictions {out / 'predictions'}/predictions.csv, predicted_classes.png")
    print(f"  encoder export         {out / 'models' / 'eat_tiny'}/  (bioaudio.load_model)")
    print("Next: run the same commands on your own folders (README.md, data/README.md);")
    print("official BEATs / EAT weights: checkpoints/README.md.")
    return 0
