"""PNG plots for runs and previews (matplotlib, headless Agg backend, atomic writes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bioaudio.fileio import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_history(history: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Loss and accuracy curves: every `*loss*` column on the left, other metrics on the right."""
    x = history["step"] if "step" in history else np.arange(len(history))
    loss_cols = [c for c in history.columns if "loss" in c]
    metric_cols = [
        c
        for c in history.columns
        if c not in loss_cols
        and any(k in c for k in ("acc", "f1", "map", "mAP", "auroc"))
        and history[c].notna().any()
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c in loss_cols:
        s = history[c]
        if s.notna().any():
            axes[0].plot(
                x[s.notna()], s.dropna(), label=c, marker="." if s.notna().sum() < 30 else None
            )
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_title("loss")
    for c in metric_cols:
        s = history[c]
        axes[1].plot(x[s.notna()], s.dropna(), label=c, marker=".")
    axes[1].set_xlabel("step")
    axes[1].set_title("validation metrics")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    normalise: bool = True,
    title: str = "",
) -> Path:
    """Confusion matrix heat map (rows: true class); counts written in every cell."""
    cm = np.asarray(cm, dtype=np.float64)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    n = len(class_names)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            txt = f"{shown[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(
                j,
                i,
                txt,
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[i, j] > 0.5 * shown.max() else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(
        title or ("confusion matrix (row-normalised)" if normalise else "confusion matrix")
    )
    return _save(fig, path)


def _show_spec(ax: plt.Axes, feats: np.ndarray, frame_rate: float, title: str) -> None:
    # feats (T, F): time on x, frequency bins upwards
    extent = (0.0, feats.shape[0] / frame_rate, 0, feats.shape[1])
    ax.imshow(feats.T, origin="lower", aspect="auto", extent=extent, cmap="magma")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("s", fontsize=7)
    ax.tick_params(labelsize=6)


def plot_spectrogram(
    feats: np.ndarray, path: str | Path, title: str = "", frame_rate: float = 100.0
) -> Path:
    """One spectrogram (T, F) with a title (e.g. the prediction)."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    _show_spec(ax, np.asarray(feats), frame_rate, title)
    ax.set_ylabel("feature bin")
    return _save(fig, path)


def plot_spectrogram_grid(
    rows: dict[str, list[tuple[np.ndarray, str]]], path: str | Path, frame_rate: float = 100.0
) -> Path:
    """Grid: one row per class name, each with (feats (T, F), caption) items."""
    n_rows = max(1, len(rows))
    n_cols = max(1, max((len(v) for v in rows.values()), default=1))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.0 * n_rows), squeeze=False)
    for r, (name, items) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            if c < len(items):
                feats, caption = items[c]
                _show_spec(ax, np.asarray(feats), frame_rate, caption)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_bar(
    counts: dict[str, float], path: str | Path, title: str = "", ylabel: str = "count"
) -> Path:
    """A bar chart of e.g. predicted classes over a folder."""
    names = list(counts)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), [counts[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_pr_curves(
    targets: np.ndarray, scores: np.ndarray, names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Precision-recall curve per class (one-vs-rest; `targets` (N, C) multi-hot), average
    precision in the legend; classes without a positive are left out."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y = np.asarray(targets).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for c, name in enumerate(names):
        if y[:, c].sum() == 0:
            continue
        precision, recall, _ = precision_recall_curve(y[:, c], s[:, c])
        ap = average_precision_score(y[:, c], s[:, c])
        ax.plot(recall, precision, lw=1.2, label=f"{name} (AP {ap:.2f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=1 + len(names) // 12)
    return _save(fig, path)
