"""What an experiment writes beside each run and over all runs: test metrics of the chosen
model (clip level), predictions, confusion matrices, precision-recall curves, training curves, a
short Markdown report, and run_summary.csv (mean +- std over seeds and folds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bioaudio.errors import DataError
from bioaudio.fileio import save_json_atomic, write_csv_atomic
from bioaudio.inference.evaluate import TEST_METRICS, metrics_markdown, write_test_outputs
from bioaudio.inference.metrics import classification_report
from bioaudio.inference.predict import load_classifier, predict_clips
from bioaudio.training.rundir import identity_differences, read_json_object

RUN_SUMMARY = "run_summary.csv"


def write_run_artifacts(
    exp: Any, plan: Any, summary: dict[str, Any], accelerator: Any
) -> dict[str, Any]:
    """Test metrics of the best model (clip level), predictions, confusion matrices,
    precision-recall curves, training curves and report.md (the test files are written by
    `bioaudio.inference.evaluate.write_test_outputs`, as `bioaudio evaluate` writes them)."""
    from bioaudio.inference.plots import plot_history

    cfg, run_dir, names = exp.cfg, exp.root / plan.name, exp.class_names
    chosen = "best" if (run_dir / "best" / "config.json").is_file() else "export"
    model = load_classifier(run_dir / chosen)
    test_df = exp.df.iloc[plan.test].reset_index(drop=True)
    clips = predict_clips(
        model,
        test_df,
        window=cfg.clip_seconds,
        hop=cfg.eval_hop,
        batch_size=cfg.eval_batch_size or max(1, cfg.batch_size // accelerator.num_processes),
        num_workers=cfg.num_workers,
        accelerator=accelerator,
        progress=cfg.progress and accelerator.is_main_process,
        desc="test",
        # an unreadable test file is left out of the metrics and listed in the run's skipped.csv
        skip_errors=True,
    )
    skipped = {str(test_df["path"].iloc[row]): reason for row, reason in clips.errors.items()}
    if len(clips.rows) == 0:
        raise DataError(f"{plan.name}: none of the {len(test_df)} test clips could be read")
    report = classification_report(clips.scores, clips.targets, names, exp.multi_label)
    if accelerator.is_main_process:
        save_json_atomic(run_dir / "class_names.json", names)
        write_test_outputs(
            run_dir, test_df, clips, names, exp.multi_label, report, f"{exp.name} {plan.name}"
        )
        history = read_history(run_dir)
        if history is not None:
            write_csv_atomic(history, run_dir / "history.csv")
            plot_history(history, run_dir / "curves.png", title=f"{exp.name} {plan.name}")
        record = {
            **report,
            "model": chosen,
            "best": summary.get("best"),
            "steps": summary.get("steps"),
            "run": plan.name,
            "seed": plan.seed,
            "fold": plan.fold,
            "clip_seconds": cfg.clip_seconds,
            "eval_hop": cfg.eval_hop or cfg.clip_seconds,
            "windows": len(clips.windows),
            "test_skipped_files": len(skipped),
        }
        write_report(exp, plan, record, run_dir)
        save_json_atomic(run_dir / TEST_METRICS, record)  # last: marks the run finished
    accelerator.wait_for_everyone()
    return {**report, "test_skipped": skipped}


def write_report(exp: Any, plan: Any, record: dict[str, Any], run_dir: Path) -> Path:
    """report.md: what was trained, on what, the test numbers, the plots."""
    cfg = exp.cfg
    n = {k: len(getattr(plan, k)) for k in ("train", "val", "test")}
    lines = [
        f"# {exp.name}: {plan.name}",
        "",
        f"- command: `{exp.command}`; manifest: `{exp.manifest}`",
        f"- classes ({'multi-label' if exp.multi_label else 'single-label'}): "
        + ", ".join(exp.class_names),
        f"- clips: {n['train']} train, {n['val']} validation, {n['test']} test"
        + (f" (test fold {plan.fold})" if plan.fold is not None else ""),
        f"- seed {plan.seed}; {record.get('steps')} steps of batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}; clips of {cfg.clip_seconds:g} s",
        f"- evaluated model: `{record.get('model')}/`"
        + (
            f" (best {record['best']['metric']} {record['best']['value']:.4f} at step "
            f"{record['best']['step']})"
            if record.get("best")
            else ""
        ),  # fmt: skip
        "",
        *metrics_markdown(record, exp.multi_label),
    ]
    lines += ["", "![training curves](curves.png)", "", "![precision-recall](pr_curves.png)"]
    if not exp.multi_label:
        lines += ["", "![confusion matrix](confusion.png)"]
    path = run_dir / "report.md"
    from bioaudio.fileio import write_text_atomic

    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def finished_runs(exp: Any) -> list[tuple[str, int | None, Any]]:
    """(name, seed, fold) of every run of RUN_ROOT: this command's plans, and the finished runs
    of earlier commands into the same root (other seeds, other folds) of the same model and
    frontend, so run_summary.csv covers them all. Sorted by fold, then seed."""
    runs = {p.name: (p.name, p.seed, p.fold) for p in exp.plans}
    for metrics in [*exp.root.glob(f"seed_*/{TEST_METRICS}"), *exp.root.glob(f"fold_*/seed_*/{TEST_METRICS}")]:  # fmt: skip
        d = metrics.parent
        name = d.relative_to(exp.root).as_posix()
        summary, tm = read_json_object(d / "summary.json") or {}, read_json_object(metrics) or {}
        if name in runs or summary.get("status") != "completed" or "seed" not in tm:
            continue
        old = (read_json_object(d / "config.json") or {}).get("identity")
        if isinstance(old, dict) and identity_differences(old, exp.identity):
            continue  # a run of another model / frontend under the same root: not comparable
        runs[name] = (name, tm.get("seed"), tm.get("fold"))

    def order(run: tuple[str, int | None, Any]) -> tuple:
        fold = run[2]
        return (fold is not None, str(type(fold)), fold if fold is not None else 0, run[1] or 0)

    return sorted(runs.values(), key=order)


def run_summary(exp: Any) -> pd.DataFrame:
    """One row per finished run of RUN_ROOT (from its test_metrics.json and summary.json; see
    `finished_runs`), then mean and std rows (sample standard deviation, ddof=1) of every
    metric column."""
    metric_keys = (
        ["mAP", "auroc", "macro_f1", "micro_f1"]
        if exp.multi_label
        else ["accuracy", "balanced_accuracy", "macro_f1"]
    )
    rows = []
    runs = finished_runs(exp)
    for name, seed, fold in runs:
        d = exp.root / name
        tm, sm = (
            read_json_object(d / TEST_METRICS) or {},
            read_json_object(d / "summary.json") or {},
        )
        best = sm.get("best") or {}
        row: dict[str, Any] = {"run": name, "fold": fold, "seed": seed}
        row.update({f"test_{k}": tm.get(k) for k in metric_keys})
        row["best_val"] = best.get("value")
        row["best_step"] = best.get("step")
        row["steps"] = sm.get("steps")
        row["n_test"] = tm.get("n")
        row["train_time_s"] = sm.get("train_time_s")
        rows.append(row)
    table = pd.DataFrame(rows)
    if all(fold is None for _, _, fold in runs):
        table = table.drop(columns="fold")
    stat_cols = [f"test_{k}" for k in metric_keys] + ["best_val", "train_time_s"]
    values = table[stat_cols].apply(pd.to_numeric, errors="coerce")
    mean = {"run": "mean", **values.mean().to_dict()}
    spread = values.std(ddof=1) if len(values) > 1 else values.iloc[0] * np.nan
    std = {"run": "std", **spread.to_dict()}
    table = pd.concat([table, pd.DataFrame([mean, std])], ignore_index=True)
    for c in ("fold", "seed", "best_step", "steps", "n_test"):
        if c in table and pd.api.types.is_numeric_dtype(table[c]):
            table[c] = table[c].astype("Int64")
    return table


def read_history(run_dir: Path) -> pd.DataFrame | None:
    """metrics.csv reshaped for people: step, epoch, lr, train loss/accuracy, val_* metrics."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    m = pd.read_csv(path)
    keep = ["step", "epoch", "lr", "loss", "train_accuracy"]
    cols = [c for c in keep if c in m.columns] + [c for c in m.columns if c.startswith("eval/")]
    h = m[cols].rename(columns={c: "val_" + c[5:] for c in cols if c.startswith("eval/")})
    return h.groupby("step", as_index=False).first()


def format_summary(table: pd.DataFrame) -> str:
    """run_summary.csv as an aligned text table."""
    shown = table.astype(object).where(table.notna(), "")
    for c in shown.columns:
        if c.startswith("test_") or c == "best_val":
            shown[c] = [f"{v:.4f}" if v != "" else "" for v in shown[c]]
        elif c == "train_time_s":
            shown[c] = [f"{v:.0f}" if v != "" else "" for v in shown[c]]
    return shown.to_string(index=False)
