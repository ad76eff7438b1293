"""Run the whole job end to end on generated demo audio, as a new user's first command.

Every step is an ordinary `bioaudio` command, printed before it runs, so you can repeat or adapt
it on your own data:
   1. demo-data       six synthetic "species" in every data layout        -> OUT/data
   2. prepare, split  folder-per-class layout -> manifest -> train/val/test -> manifest.split.csv
   3. preview         spectrograms of a few clips per class               -> OUT/preview.png
   4. features        log-mel feature cache (the baseline trains from it) -> OUT/features
   5. train-baseline  the TinyMelCNN reference model                      -> OUT/runs/tiny_mel_cnn
   6. pretrain        a tiny EAT encoder, self-supervised, on all the audio -> OUT/runs/pretrain_eat
   7. pretrain        a tiny BEATs encoder (masked tokens), a few steps   -> OUT/runs/pretrain_beats
   8. finetune        the pretrained EAT into a classifier, same split    -> OUT/runs/finetune_eat
   9. infer           classify the soundscapes by windows (baseline)      -> OUT/predictions
  10. detect          call events in the soundscapes (finetuned EAT)      -> OUT/detections
  11. embed           embeddings of labelled clips and soundscapes        -> OUT/embeddings.parquet
  12. plot-embeddings t-SNE / UMAP maps                                   -> OUT/maps
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
    parser.add_argument(
        "--pretrain_steps", type=int, default=150, help="EAT pretraining steps (default: 150)"
    )
    parser.add_argument(
        "--finetune_epochs", type=float, default=15, help="finetuning epochs (default: 15)"
    )


def _step(title: str, argv: list[object], done: Path | None = None) -> None:
    """Run `bioaudio ARGV` unless `done` exists (then say so)."""
    from bioaudio.cli import main

    if done is not None and done.exists():
        print(f"\n=== {title}: already in {done}")
        return
    argv = [str(a) for a in argv]
    print(f"\n=== {title}\n$ bioaudio {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise ConfigError(f"demo step failed: bioaudio {shlex.join(argv)} (exit {code})")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    data, runs, seed = out / "data", out / "runs", args.seed
    split = data / "by_class" / "manifest.split.csv"
    features = out / "features" / "logmel64"
    quiet = ["--num_workers", 0, "--no-progress"]
    tiny = ["--preset", "tiny", "--segment_duration", 3, "--batch_size", 16, *quiet]
    steps: list[tuple[str, list[object], Path | None]] = [
        ("1. generate demo data", ["demo-data", data, "--seed", seed, "--n_per_class", 30],
         data / ".bioaudio-demo-data.json"),
        ("2. scan the folder-per-class layout", ["prepare", data / "by_class", "--no-progress"],
         None),
        ("   seeded stratified split",
         ["split", split.with_name("manifest.csv"), "--val", 0.2, "--test", 0.2, "--seed", seed],
         None),
        ("3. preview spectrograms per class",
         ["preview", split, "--n", 3, "--frontend", "logmel", "--out", out / "preview.png"], None),
        ("4. cache log-mel features",
         ["features", split, "--frontend", "logmel", "--n_mels", 64, "--out", features,
          "--no-progress"], features / "cache.json"),
        ("5. train the TinyMelCNN baseline",
         ["train-baseline", split, "--out", runs / "tiny_mel_cnn", "--model", "tiny_mel_cnn",
          "--frontend", "logmel", "--n_mels", 64, "--features", features, "--clip_seconds", 3,
          "--epochs", args.epochs, "--batch_size", 16, "--spec_augment", "--seeds", seed,
          *quiet], None),
        ("6. pretrain a tiny EAT encoder on all the audio, labels unused (EAT + memory bank)",
         ["pretrain", data, "--out", runs / "pretrain_eat", "--model", "eat", *tiny,
          "--max_steps", args.pretrain_steps, "--lr", 1e-3, "--eat.clone_batch", 4,
          "--eat.ema_decay", 0.999, "--eat.ema_end_decay", 0.9999,
          "--eat.ema_anneal_end_step", args.pretrain_steps, "--seed", seed], None),
        ("7. pretrain a tiny BEATs encoder (masked acoustic tokens + memory bank)",
         ["pretrain", data, "--out", runs / "pretrain_beats", "--model", "beats", *tiny,
          "--max_steps", max(2, args.pretrain_steps // 5), "--lr", 1e-3, "--seed", seed], None),
        ("8. finetune the pretrained EAT on the same split as the baseline",
         ["finetune", split, "--model_path", runs / "pretrain_eat" / "export",
          "--out", runs / "finetune_eat", "--clip_seconds", 3, "--epochs", args.finetune_epochs,
          "--batch_size", 16, "--lr", 1e-3, "--seeds", seed, *quiet], None),
        ("9. classify the soundscapes with the baseline (3 s windows)",
         ["infer", runs / "tiny_mel_cnn" / f"seed_{seed}", data / "soundscapes",
          "--out", out / "predictions", "--window", 3, "--no-progress"], None),
        ("10. detect calls in the soundscapes with the finetuned EAT",
         ["detect", runs / "finetune_eat" / f"seed_{seed}", data / "soundscapes",
          "--out", out / "detections", "--window", 3, "--no-progress"], None),
        ("11. embed labelled clips with the pretrained EAT",
         ["embed", runs / "pretrain_eat" / "export", split, "--out",
          out / "embeddings.parquet", "--window", 3, "--no-progress"], None),
        ("12. draw t-SNE / UMAP maps of the embeddings",
         ["plot-embeddings", out / "embeddings.parquet", "--out", out / "maps",
          "--perplexities", "5,15,30", "--n_neighbors", "5,15,30"], out / "maps" / "umap_grid.png"),
    ]  # fmt: skip
    for title, argv, done in steps:
        _step(title, argv, done)

    base = json.loads((runs / "tiny_mel_cnn" / f"seed_{seed}" / "test_metrics.json").read_text())
    tuned = json.loads((runs / "finetune_eat" / f"seed_{seed}" / "test_metrics.json").read_text())
    print("\n" + "=" * 76)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Results in {out}/:")
    print(f"  data and manifests      {data}/  (layouts: data/README.md)")
    print(f"  spectrogram preview     {out / 'preview.png'}")
    for name, m in (("TinyMelCNN baseline", base), ("EAT tiny, pretrained", tuned)):
        print(
            f"  test accuracy           {m['accuracy']:.3f} {name} (balanced "
            f"{m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f})"
        )
    print(f"  runs                    {runs}/  (report.md, curves.png, confusion.png per run)")
    print(f"  pretrained encoders     {runs / 'pretrain_eat' / 'export'}, "
          f"{runs / 'pretrain_beats' / 'export'}")  # fmt: skip
    print(f"  soundscape predictions  {out / 'predictions'}/predictions.csv")
    print(f"  detections              {out / 'detections'}/  (Raven selection tables)")
    print(f"  embeddings and maps     {out / 'embeddings.parquet'}, {out / 'maps'}/")
    print(f"Explore the embeddings:   bioaudio explore {out / 'embeddings.parquet'} "
          f"--data_dir {data} --runs_dir {runs}")  # fmt: skip
    print("Next: the same commands on your own folders (README.md, data/README.md);")
    print("official BEATs / EAT weights: checkpoints/README.md.")
    return 0
