"""Finetuning on real audio, every variant under one protocol and one stated compute budget:

  ESC-10          the 5 official folds (`--cv`: each fold in turn is the test set, the next one
                  validates, the other three train)
  spoken digits   split by speaker: one speaker validates, one is the test set, four train

Rows: EAT and BEATs (the CPU-sized `small` preset) from our own self-supervised pretraining
(`benchmarks/ssl_probe.py` exports) and from random weights (the same architecture, its own
initialisation), each as a linear probe (frozen encoder, `--linear_probe`) and fully finetuned;
and the CNN baselines (TinyMelCNN, DroneCNN; `--baselines`) trained under the same splits and
epochs. Every run is an ordinary
`bioaudio finetune` / `train-baseline` command (printed before it runs, logged under OUT), with
the toolkit's default hyper-parameters except the budget flags below; nothing is tuned on the
test folds.

    python benchmarks/finetune_table.py --pretrained runs/ssl_probe --out runs/finetune_table
    python benchmarks/finetune_table.py ... --tasks digits --models eat --epochs 5   # a part

Re-running skips finished runs (each command resumes). Writes OUT/results.json and
OUT/results.md (the README table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bioaudio.benchreport import Report, add_suite_arguments, run_bioaudio  # noqa: E402
from bioaudio.data.manifest import read_manifest, write_manifest  # noqa: E402
from bioaudio.models.audio_model import build_model  # noqa: E402
from bioaudio.models.checkpoint import save_export  # noqa: E402

BENCH_SUITE = {
    "long": "hours: every finetuning run of the table",
    "needs": ["../shared/data", "runs/ssl_probe"],
}
EXPORTS = {"eat": "pretrain_eat", "beats": "pretrain_beats"}  # ssl_probe run names
BASELINE_NAMES = {
    "tiny_mel_cnn": "TinyMelCNN",
    "drone_cnn": "DroneCNN",
    "genre_cnn": "KerasGenreCNN",
}


def bioaudio(*args: object, log: Path | None = None) -> float:
    return run_bioaudio(*args, log=log, cwd=ROOT)


def manifests(data: Path, out: Path) -> dict[str, Path]:
    """Labelled manifests: ESC-10 with its official folds, digits with a by-speaker split."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"esc10": out / "esc10.csv", "digits": out / "digits.csv"}
    if not paths["esc10"].is_file():
        raw = out / "esc10_raw.csv"
        bioaudio("prepare", data / "esc10", "--out", raw, "--no-progress", log=out / "prepare.log")
        bioaudio("split", raw, "--method", "esc", "--out", paths["esc10"], log=out / "prepare.log")
    if not paths["digits"].is_file():
        raw = out / "digits_raw.csv"
        bioaudio("prepare", data / "fsdd", "--labels", "none", "--out", raw, "--no-progress",
                 log=out / "prepare.log")  # fmt: skip
        t = read_manifest(raw)
        names = [Path(p).name for p in t["path"]]
        t["labels"] = [n.split("_")[0] for n in names]
        t["source"] = "csv"  # labels from the file names (DIGIT_SPEAKER_TAKE.wav)
        speakers = [n.split("_")[1] for n in names]
        order = sorted(set(speakers))  # fixed rule: the last two speakers by name validate/test
        role = {s: "train" for s in order[:-2]} | {order[-2]: "val", order[-1]: "test"}
        t["split"] = [role[s] for s in speakers]
        write_manifest(t, paths["digits"])
    return paths


def random_export(model_type: str, preset: str, seed: int, out: Path) -> Path:
    """Our export of the encoder at its initialisation (what pretraining started from)."""
    path = out / f"random_{model_type}_{preset}"
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        save_export(build_model(model_type, encoder={"preset": preset}), path)
    return path


def summary(run_root: Path) -> dict:
    table = pd.read_csv(run_root / "run_summary.csv")
    table = table[~table["run"].isin(["mean", "std"])]  # the summary rows the file ends with
    acc = table["test_accuracy"] if "test_accuracy" in table else table["test/accuracy"]
    f1 = next((table[c] for c in ("test_macro_f1", "test/macro_f1") if c in table), None)
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "runs": int(len(acc)),
        "macro_f1": float(f1.mean()) if f1 is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--pretrained", type=Path, default=ROOT / "runs" / "ssl_probe",
        help="ssl_probe output folder holding pretrain_eat/export and pretrain_beats/export",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune_table")
    parser.add_argument("--tasks", default="esc10,digits")
    parser.add_argument("--models", default="eat,beats")
    parser.add_argument("--modes", default="linear,full", help="linear (probe) and/or full")
    parser.add_argument("--inits", default="pretrained,random")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--baselines", default="tiny_mel_cnn,drone_cnn",
        help="comma-separated `train-baseline --model` names (CNN baselines of the table)",
    )  # fmt: skip
    parser.add_argument("--preset", default="small")
    parser.add_argument("--epochs", type=float, default=10, help="full finetuning epochs")
    parser.add_argument("--probe_epochs", type=float, default=30, help="linear-probe epochs")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    add_suite_arguments(parser)
    args = parser.parse_args()
    if args.quick:  # a smoke run of the pipeline, not a result
        args.tasks, args.models, args.modes, args.epochs, args.probe_epochs = (
            "digits", "eat", "linear,full", 1, 3)  # fmt: skip
    if not (args.data / "esc10").is_dir():
        raise SystemExit(f"{args.data} does not hold esc10/ and fsdd/")
    torch.set_num_threads(2)
    paths = manifests(args.data, args.out)
    clip = {"esc10": 5.0, "digits": 1.0}
    protocol = {"esc10": ["--cv"], "digits": []}
    rows: list[dict] = []
    results_path = args.out / "results.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def record(key: str, what: dict, run_root: Path, seconds: float) -> None:
        res = {**what, **summary(run_root), "minutes": round(seconds / 60, 1)}
        prev = done.get(key, {})
        res["minutes"] = prev.get("minutes", res["minutes"]) if seconds < 1 else res["minutes"]
        done[key] = res
        rows.append(res)
        results_path.write_text(json.dumps(done, indent=2))

    for task in args.tasks.split(","):
        common = [paths[task], "--clip_seconds", clip[task], "--batch_size", args.batch_size,
                  "--seeds", args.seed, "--no-progress", "--num_workers", 2, *protocol[task]]  # fmt: skip
        for model_type in [m for m in args.models.split(",") if m]:  # --models "": CNNs only
            for init in args.inits.split(","):
                if init == "pretrained":
                    model_path = args.pretrained / EXPORTS[model_type] / "export"
                    if not (model_path / "config.json").is_file():
                        print(f"skipped {model_type} pretrained: no export at {model_path}")
                        continue
                else:
                    model_path = random_export(model_type, args.preset, args.seed, args.out)
                for mode in args.modes.split(","):
                    key = f"{task}/{model_type}/{init}/{mode}"
                    run_root = args.out / re.sub(r"/", "_", key)
                    budget = (["--linear_probe", "--epochs", args.probe_epochs, "--lr", "1e-3"]
                              if mode == "linear" else ["--epochs", args.epochs])  # fmt: skip
                    seconds = 0.0
                    if not (run_root / "run_summary.csv").is_file():
                        seconds = bioaudio("finetune", *common, "--model_path", model_path,
                                           *budget, "--out", run_root,
                                           log=args.out / f"{run_root.name}.log")  # fmt: skip
                    what = {"task": task, "model": f"{model_type} {args.preset}", "init": init,
                            "mode": "linear probe" if mode == "linear" else "full finetune"}  # fmt: skip
                    record(key, what, run_root, seconds)
        for base in args.baselines.split(",") if args.baseline else []:
            key = f"{task}/{base}"
            run_root = args.out / f"{task}_{base}"
            seconds = 0.0
            if not (run_root / "run_summary.csv").is_file():
                seconds = bioaudio("train-baseline", *common, "--model", base,
                                   "--frontend", "logmel", "--n_mels", 128, "--epochs", args.epochs,
                                   "--out", run_root, log=args.out / f"{run_root.name}.log")  # fmt: skip
            what = {"task": task, "model": f"{BASELINE_NAMES.get(base, base)} (log-mel 128)",
                    "init": "random", "mode": "supervised"}  # fmt: skip
            record(key, what, run_root, seconds)

    lines = [
        f"Budget: full finetuning and the CNN {args.epochs:g} epochs, linear probes "
        f"{args.probe_epochs:g} epochs; batch {args.batch_size}; otherwise default flags.",
        "",
        "| task | model | weights | training | test accuracy | macro-F1 | runs | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f1 = f"{r['macro_f1']:.3f}" if r.get("macro_f1") is not None else "-"
        lines.append(
            f"| {r['task']} | {r['model']} | {r['init']} | {r['mode']} | "
            f"**{100 * r['mean']:.1f} +- {100 * r['std']:.1f} %** | {f1} | {r['runs']} | "
            f"{r['minutes']} min |"
        )
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)
    report = Report("finetune_table", "test accuracy of finetuned / probed encoders vs random "
                    "weights and the CNN baseline, same splits and budget")  # fmt: skip
    for r in rows:
        report.add(f"{r['task']} {r['model']} {r['init']} {r['mode']}", 100 * r["mean"], "%",
                   note=f"+- {100 * r['std']:.1f}, {r['runs']} run(s)")  # fmt: skip
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
