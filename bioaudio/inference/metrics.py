"""Classification metrics on gathered predictions (numpy in, plain dicts out).

Rank-awareness lives in the caller: evaluation loops gather scores and targets from every
process (`accelerator.gather_for_metrics`) and call these functions once on the main process,
so a 2-process evaluation gives exactly the 1-process numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import Tensor

from bioaudio.data.datasets import IGNORE_INDEX
from bioaudio.errors import DataError


def _as_index(y_true: np.ndarray) -> np.ndarray:
    return y_true.argmax(axis=1) if y_true.ndim == 2 else y_true.astype(int)


def single_label_metrics(
    y_true: np.ndarray, scores: np.ndarray, class_names: list[str]
) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest mAP and macro AUROC (probabilities
    only), per-class report and confusion matrix.

    `y_true` (N,) class indices (or one-hot (N, C)); `scores` (N, C) logits or probabilities.
    """
    y = _as_index(np.asarray(y_true))
    pred = np.asarray(scores).argmax(axis=1)
    onehot = np.eye(len(class_names), dtype=int)[y] if len(y) else np.zeros((0, len(class_names)))
    ranking = multi_label_metrics(onehot, np.asarray(scores), class_names) if len(y) else {}
    labels = list(range(len(class_names)))
    cm = skm.confusion_matrix(y, pred, labels=labels)
    report = skm.classification_report(
        y, pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )
    present = np.unique(y)
    return {
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "balanced_accuracy": float(np.mean([(pred[y == c] == c).mean() for c in present]))
        if len(y)
        else 0.0,
        # over the classes present in the truth or the predictions: a class absent from a small
        # test set would otherwise count as F1 = 0
        "macro_f1": float(
            skm.f1_score(y, pred, labels=np.union1d(y, pred), average="macro", zero_division=0)
        )
        if len(y)
        else 0.0,
        "mAP": float(ranking.get("mAP", 0.0)),
        "auroc": float(ranking.get("auroc", 0.0)),
        "per_class": {c: report[c] for c in class_names},
        "confusion": cm.tolist(),
    }


def multi_label_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], threshold: float = 0.5
) -> dict[str, object]:
    """mAP and macro AUROC over classes that have positives, plus F1 at `threshold`."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    has_pos = y.sum(axis=0) > 0
    has_both = has_pos & (y.sum(axis=0) < len(y))
    ap = [skm.average_precision_score(y[:, c], p[:, c]) for c in np.flatnonzero(has_pos)]
    auc = [skm.roc_auc_score(y[:, c], p[:, c]) for c in np.flatnonzero(has_both)]
    pred = (p >= threshold).astype(int)
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = {
            "support": int(y[:, c].sum()),
            "ap": float(skm.average_precision_score(y[:, c], p[:, c])) if has_pos[c] else None,
            "f1": float(skm.f1_score(y[:, c], pred[:, c], zero_division=0)),
        }
    return {
        "mAP": float(np.mean(ap)) if ap else 0.0,
        "auroc": float(np.mean(auc)) if auc else 0.0,
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "micro_f1": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
        "subset_accuracy": float((pred == y).all(axis=1).mean()) if len(y) else 0.0,
        "per_class": per_class,
    }


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """Confusion matrix with each true-class row summing to 1 (rows with no samples stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


def probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """Sigmoid per class (multi-label) or softmax over classes (single-label), in float32."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else logits.softmax(dim=-1)


def aggregate_windows(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of `scores` (N, C) per group id -> (sorted unique groups, (G, C))."""
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(uniq), scores.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, scores)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    return uniq, (sums / counts).astype(np.float32)


def first_per_group(values: np.ndarray, groups: np.ndarray, uniq: np.ndarray) -> np.ndarray:
    first = {}
    for i, g in enumerate(groups.tolist()):
        first.setdefault(g, i)
    return values[[first[g] for g in uniq.tolist()]]


def _labelled(targets: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return np.ones(len(targets), dtype=bool)
    return np.asarray(targets) != IGNORE_INDEX


def classification_report(
    scores: np.ndarray, targets: np.ndarray, class_names: list[str], multi_label: bool
) -> dict[str, Any]:
    """`bioaudio.metrics` on the labelled rows: accuracy, balanced accuracy, macro-F1, per-class
    report and confusion (single-label) or mAP, AUROC, F1 (multi-label); plus n."""
    keep = _labelled(targets, multi_label)
    scores, targets = np.asarray(scores)[keep], np.asarray(targets)[keep]
    if len(targets) == 0:
        raise DataError("no labelled clips to score")
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64)).all(axis=1)
    if bad.any():
        raise DataError(
            f"the model's scores are not finite (NaN / inf) for {int(bad.sum())} of "
            f"{len(bad)} clip(s): its weights are broken (a diverged training run?)"
        )
    if multi_label:
        out = multi_label_metrics(targets, scores, class_names)
    else:
        out = single_label_metrics(targets, scores, class_names)
    out["n"] = int(len(targets))
    return out


def score_logits(
    logits: Tensor,
    targets: Tensor,
    class_names: list[str],
    multi_label: bool,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Scalar evaluation metrics: the loss over labelled windows, then clip-level metrics on the
    mean window probabilities per group (no groups: every row is a clip)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits, targets.float()).item()
    else:
        valid = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits[valid], targets[valid]).item() if valid.any() else math.nan
    probs = probabilities(logits, multi_label).numpy()
    y = targets.numpy()
    if groups is not None:
        groups = np.asarray(groups)
        uniq, probs = aggregate_windows(probs, groups)
        y = first_per_group(y, groups, uniq)
    report = classification_report(probs, y, class_names, multi_label)
    out = {"loss": loss}
    out.update({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
    out.pop("n", None)
    return out
