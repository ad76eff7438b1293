"""Evaluate a trained classifier on a labelled manifest (`bioaudio evaluate`), and the test
outputs every evaluation writes, here and in the experiment layer's run directories:

    test_metrics.json         accuracy, balanced accuracy, macro-F1, mAP, AUROC, per-class
                              precision / recall / F1 (single-label) or mAP, AUROC, F1 (multi-label)
    test_predictions.csv      one row per clip: path, start, end, labels, predicted, probability,
                              p_<class> per class
    confusion_counts.csv, confusion_normalised.csv, confusion.png, confusion_counts.png
                              (single-label)
    pr_curves.png             one-vs-rest precision-recall curve per class
    report.md                 what was evaluated and the numbers
    class_names.json          the model's classes, in the order of the p_<class> columns

`bioaudio evaluate` never replaces a file it did not write: its test_metrics.json says
`"written_by": "bioaudio evaluate"` (and is written first, so an interrupted evaluation is
recognised too), and an --out holding any other file of the list above, or a training run / export
folder (config.json, summary.json), is refused before any work unless --overwrite.

Clips are classified by windows of the model's training clip length (`predict_clips`): the
window probabilities of a clip are averaged, exactly as `bioaudio infer` and the experiment's
test evaluation do. Under `accelerate launch` the windows are split over the processes and
gathered, so N processes give the 1-process numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bioaudio.data.manifest import read_manifest, split_labels
from bioaudio.errors import CheckpointError, ConfigError, DataError
from bioaudio.fileio import check_writable, save_json_atomic, write_csv_atomic, write_text_atomic
from bioaudio.inference.metrics import classification_report, row_normalised
from bioaudio.inference.predict import ClipPredictions, predict_clips, resolve_export_dir
from bioaudio.inference.runner import WindowOptions, training_window, window_option

TEST_METRICS = "test_metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"
WRITTEN_BY = "bioaudio evaluate"  # test_metrics.json's "written_by": the folder is evaluate's
EVALUATE_FILES = (TEST_METRICS, TEST_PREDICTIONS, "class_names.json", "confusion_counts.csv",
                  "confusion_normalised.csv", "confusion.png", "confusion_counts.png",
                  "pr_curves.png", "report.md", "test_skipped.csv")  # fmt: skip
RUN_FILES = ("config.json", "summary.json")  # a training run's (or an export's) own files


# ----------------------------------------------------------------------------------------------
# The files of a test evaluation (shared with bioaudio.training.artifacts)


def prediction_table(
    df: pd.DataFrame,
    clips: ClipPredictions,
    class_names: list[str],
    multi_label: bool,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """One row per predicted clip of `df`: path, start, end, labels, predicted (the top class;
    multi-label: every class at or above `threshold`), probability (the top one), p_<class>."""
    table = df.reset_index(drop=True).iloc[clips.rows][["path", "start", "end", "labels"]]
    table = table.reset_index(drop=True)
    if multi_label:
        table["predicted"] = [
            ",".join(n for n, p in zip(class_names, row) if p >= threshold) for row in clips.scores
        ]
    else:
        table["predicted"] = [class_names[i] for i in clips.scores.argmax(axis=1)]
    table["probability"] = clips.scores.max(axis=1)
    for c, name in enumerate(class_names):
        table[f"p_{name}"] = clips.scores[:, c]
    return table


def multi_hot(targets: np.ndarray, n_classes: int, multi_label: bool) -> np.ndarray:
    """(N, C) 0/1 targets: multi-label targets as they are, class indices one-hot (unlabelled
    rows, index < 0, all zero)."""
    targets = np.asarray(targets)
    if multi_label:
        return targets.astype(int)
    valid = targets >= 0
    onehot = np.zeros((len(targets), n_classes), dtype=int)
    onehot[np.flatnonzero(valid), targets[valid]] = 1
    return onehot


def write_test_outputs(
    out_dir: Path,
    df: pd.DataFrame,
    clips: ClipPredictions,
    class_names: list[str],
    multi_label: bool,
    report: dict[str, Any],
    title: str,
) -> pd.DataFrame:
    """Write test_predictions.csv, the confusion matrices (single-label: counts and row-normalised
    CSV + PNG) and pr_curves.png into `out_dir`; returns the predictions table. `report` is
    `classification_report` of the same predictions; `title` heads the plots."""
    from bioaudio.inference.plots import plot_confusion, plot_pr_curves

    out_dir = Path(out_dir)
    table = prediction_table(df, clips, class_names, multi_label)
    write_csv_atomic(table, out_dir / TEST_PREDICTIONS)
    if not multi_label:
        cm = np.asarray(report["confusion"])
        for name, values, fmt in (
            ("confusion_counts.csv", cm, None),
            ("confusion_normalised.csv", row_normalised(cm), "%.6g"),
        ):
            frame = pd.DataFrame(values, index=class_names, columns=class_names)
            frame.index.name = "true \\ predicted"
            write_csv_atomic(frame, out_dir / name, index=True, float_format=fmt)
        heading = f"{title}: test accuracy {report['accuracy']:.3f}"
        plot_confusion(cm, class_names, out_dir / "confusion.png", normalise=True, title=heading)
        plot_confusion(cm, class_names, out_dir / "confusion_counts.png", normalise=False)
    targets = multi_hot(np.asarray(clips.targets), len(class_names), multi_label)
    plot_pr_curves(targets, clips.scores, class_names, out_dir / "pr_curves.png", title)
    return table


def metrics_markdown(record: dict[str, Any], multi_label: bool) -> list[str]:
    """Markdown lines: the table of test metrics, then (single-label) per-class precision,
    recall, F1 and support."""
    keys = (
        ("mAP", "auroc", "macro_f1", "micro_f1", "subset_accuracy")
        if multi_label
        else ("accuracy", "balanced_accuracy", "macro_f1", "mAP", "auroc")
    )
    lines = [
        "| metric | test |",
        "|---|---|",
        *[f"| {k} | {record[k]:.4f} |" for k in keys if isinstance(record.get(k), float)],
    ]
    if not multi_label:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, r in record.get("per_class", {}).items():
            lines.append(
                f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | "
                f"{int(r['support'])} |"
            )
    return lines


# ----------------------------------------------------------------------------------------------
# bioaudio evaluate


@dataclass
class EvaluateOptions(WindowOptions):
    """Options of `bioaudio evaluate` (and of `evaluate`)."""

    out: Path | None = field(
        default=None, metadata={"help": "output folder (default: ./eval_<MANIFEST name>)"}
    )
    window: float | None = window_option(
        "window", "window seconds (default: the model's training clip)"
    )
    hop: float | None = window_option("hop")
    batch_size: int = window_option("batch_size", "windows per forward pass per process")
    num_workers: int = window_option("num_workers")
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "write into --out even when it holds files evaluate did not write (a "
            "training run's test results, your own report.md): they are replaced"
        },
    )
    cpu: bool = window_option("cpu")
    progress: bool = window_option("progress")


def written_by_evaluate(out: str | Path) -> bool:
    """True when an earlier `bioaudio evaluate` wrote into the folder `out` (its
    test_metrics.json carries our "written_by")."""
    try:
        record = json.loads((Path(out) / TEST_METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def check_evaluate_out(out: str | Path, overwrite: bool = False) -> Path:
    """One-line ConfigError, before any work, when evaluate cannot write its files into `out`:
    a file, not writable, a training run or export folder, or holding a file of
    `EVALUATE_FILES` that an earlier evaluate did not write; `overwrite` allows the last two."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_writable(out)
    if overwrite or not out.is_dir():
        return out
    hint = "; pass --overwrite to write there anyway, or choose another --out"
    own = [n for n in RUN_FILES if (out / n).exists()]
    if own:
        raise ConfigError(
            f"--out {out} is a training run or export folder (it holds {', '.join(own)}); "
            f"refusing to write evaluation files over its own{hint}"
        )
    if written_by_evaluate(out):
        return out
    clash = [n for n in EVALUATE_FILES if (out / n).exists() or (out / n).is_symlink()]
    if clash:
        shown = ", ".join(clash[:4]) + (" ..." if len(clash) > 4 else "")
        raise ConfigError(
            f"--out {out} holds {shown}, not written by bioaudio evaluate; refusing to "
            f"replace {'it' if len(clash) == 1 else 'them'}{hint}"
        )
    return out


def find_classifier(path: str | Path) -> Path:
    """The export folder of a classifier: an export, a run directory (its best/, else export/),
    or a finetune / train-baseline RUN_ROOT holding a single run."""
    p = Path(path).expanduser()
    try:
        return resolve_export_dir(p)
    except CheckpointError:
        if not p.is_dir():
            raise
        runs = sorted(q.parent for q in [*p.glob("*/summary.json"), *p.glob("*/*/summary.json")])
        if len(runs) == 1:
            return resolve_export_dir(runs[0])
        if len(runs) > 1:
            names = ", ".join(str(r.relative_to(p)) for r in runs[:4])
            raise CheckpointError(
                f"{p} holds {len(runs)} runs ({names}{' ...' if len(runs) > 4 else ''}); "
                "name one of them"
            ) from None
        raise


def classifier_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(export folder, its config.json) of a classifier, without loading weights; a one-line
    error when the model has no classes (an encoder-only export, an official checkpoint)."""
    export = find_classifier(path)
    if not export.is_dir():
        raise CheckpointError(
            f"{path}: a checkpoint file, not a classifier export (finetune it first)"
        )
    config = json.loads((export / "config.json").read_text())
    if not config.get("class_names"):
        raise CheckpointError(
            f"{export}: the model has no classes (a pretrained encoder?); evaluate a finetuned "
            "export or run directory"
        )
    return export, config


def check_labelled(df: pd.DataFrame, class_names: list[str], multi_label: bool) -> None:
    """One-line DataError unless every row's file exists, every label is a class of the model,
    single-label rows carry one label each, and at least one row is labelled."""
    missing = [p for p in dict.fromkeys(df["path"]) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} listed file(s) do not exist, e.g. {missing[0]}"
            + (f", {missing[1]}" if len(missing) > 1 else "")
        )
    labels = [split_labels(v) for v in df["labels"]]
    known = set(class_names)
    unknown = sorted({n for labs in labels for n in labs} - known)
    if unknown:
        shown = ", ".join(class_names[:12]) + (" ..." if len(class_names) > 12 else "")
        raise DataError(
            f"label(s) the model does not know: {', '.join(unknown[:6])}"
            f"{' ...' if len(unknown) > 6 else ''} (the model's classes: {shown})"
        )
    if not multi_label:
        several = [df["path"].iloc[i] for i, labs in enumerate(labels) if len(labs) > 1]
        if several:
            raise DataError(
                f"{len(several)} clip(s) carry several labels (e.g. {Path(several[0]).name}) but"
                " the model is single-label"
            )
    if not any(labels):
        raise DataError("no labelled clips to evaluate")


def _report(record: dict[str, Any], class_names: list[str], multi_label: bool, out: Path) -> Path:
    lines = [
        f"# Evaluation of `{record['model']}`",
        "",
        f"- manifest: `{record['manifest']}`",
        f"- classes ({'multi-label' if multi_label else 'single-label'}): "
        + ", ".join(class_names),
        f"- {record['n']} labelled clip(s) scored, {record['windows']} window(s) of "
        f"{record['window']:g} s every {record['hop']:g} s"
        + (
            f"; {record['not_predicted']} clip(s) too short to predict"
            if record["not_predicted"]
            else ""
        )
        + (
            f"; {record['unreadable']} unreadable (test_skipped.csv)"
            if record["unreadable"]
            else ""
        )
        + (
            f"; {record['unlabelled']} unlabelled (predicted, not scored)"
            if record["unlabelled"]
            else ""
        ),  # fmt: skip
        "",
        *metrics_markdown(record, multi_label),
        "",
        "![precision-recall](pr_curves.png)",
    ]
    if not multi_label:
        lines += ["", "![confusion matrix](confusion.png)"]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def evaluate(
    model_path: str | Path,
    manifest: str | Path,
    cfg: EvaluateOptions,
    *,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Classify every clip of a labelled manifest by windows, score the clips and write the
    test outputs (module docstring) into `cfg.out`. With `accelerator` the windows are split
    over its processes and only the main process writes. Returns the test_metrics.json record."""
    from bioaudio.inference.predict import load_classifier

    cfg.validate()
    out = Path(cfg.out) if cfg.out is not None else Path.cwd() / f"eval_{Path(manifest).stem}"
    check_evaluate_out(out, cfg.overwrite)
    export, config = classifier_config(model_path)
    names, multi = list(config["class_names"]), bool(config.get("multi_label", False))
    df = read_manifest(manifest)
    check_labelled(df, names, multi)
    window = float(cfg.window or training_window(config.get("provenance")))
    hop = float(cfg.hop or window)
    device = cfg.device() if accelerator is None else None
    model = load_classifier(export, device=device)
    main = accelerator is None or accelerator.is_main_process
    clips = predict_clips(
        model,
        df,
        window=window,
        hop=hop,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        accelerator=accelerator,
        device=device,
        progress=cfg.progress and main,
        desc="evaluate",
        skip_errors=True,  # an unreadable file is left out, listed in OUT/test_skipped.csv
    )
    if len(clips.rows) == 0:
        raise DataError(f"none of the {len(df)} clip(s) of {manifest} could be read")
    skipped = [{"path": str(df["path"].iloc[r]), "reason": why} for r, why in clips.errors.items()]
    report = classification_report(clips.scores, clips.targets, names, multi)
    record = {
        "written_by": WRITTEN_BY,
        **report,
        "model": str(export.resolve()),
        "out": str(out),
        "manifest": str(Path(manifest).resolve()),
        "multi_label": multi,
        "window": window,
        "hop": hop,
        "windows": len(clips.windows),
        "clips": int(len(df)),
        "not_predicted": int(len(df) - len(clips.rows) - len(skipped)),
        "unreadable": len(skipped),
        # single-label rows without a label are classified (test_predictions.csv) not scored
        "unlabelled": int(len(df) - len(skipped) - report["n"]) if not multi else 0,
        "processes": accelerator.num_processes if accelerator is not None else 1,
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # first: its "written_by" marks the folder as evaluate's even if we are interrupted
        save_json_atomic(out / TEST_METRICS, record)
        save_json_atomic(out / "class_names.json", names)
        title = export.name if export.name not in ("best", "export") else export.parent.name
        write_test_outputs(out, df, clips, names, multi, report, title=title)
        if skipped:
            write_csv_atomic(
                pd.DataFrame(skipped, columns=["path", "reason"]), out / "test_skipped.csv"
            )
        else:  # an earlier evaluation's list (the folder is evaluate's: checked above)
            (out / "test_skipped.csv").unlink(missing_ok=True)
        _report(record, names, multi, out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return record
