"""Metrics: hand-checked small cases and equivalence with scikit-learn's reference functions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from bioaudio.inference import metrics, plots


def test_single_label_hand_example():
    y = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]]  # predictions 0 1 1 1 2 0
    m = metrics.single_label_metrics(y, scores, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    np.testing.assert_allclose(metrics.row_normalised(np.array(m["confusion"])).sum(1), 1.0)


def test_single_label_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    scores = rng.standard_normal((200, 5)) + 1.5 * np.eye(5)[y]
    m = metrics.single_label_metrics(y, scores, list("abcde"))
    pred = scores.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_multi_label_matches_sklearn_and_skips_empty_classes():
    rng = np.random.default_rng(1)
    y = (rng.random((100, 4)) < 0.3).astype(int)
    y[:, 3] = 0  # a class with no positives must not drag mAP to 0
    p = np.clip(0.6 * y + 0.5 * rng.random((100, 4)), 0, 1)
    m = metrics.multi_label_metrics(y, p, list("abcd"))
    expected = np.mean([skm.average_precision_score(y[:, c], p[:, c]) for c in range(3)])
    assert m["mAP"] == pytest.approx(expected)
    assert m["per_class"]["d"]["ap"] is None
    assert 0.5 < m["auroc"] <= 1.0
    scalars = {k for k, v in m.items() if isinstance(v, float)}
    assert scalars == {"mAP", "auroc", "macro_f1", "micro_f1", "subset_accuracy"}
    assert m["subset_accuracy"] == pytest.approx(((p >= 0.5) == y).all(1).mean())


def test_plots_write_pngs(tmp_path):
    import pandas as pd

    hist = pd.DataFrame(
        {"step": [1, 2, 3], "train_loss": [1.0, 0.5, 0.3], "val_accuracy": [0.2, None, 0.7]}
    )
    for p in [
        plots.plot_history(hist, tmp_path / "curves.png"),
        plots.plot_confusion(np.array([[3, 1], [0, 4]]), ["x", "y"], tmp_path / "cm.png"),
        plots.plot_spectrogram(np.random.rand(50, 16), tmp_path / "spec.png", "pred"),
        plots.plot_spectrogram_grid({"x": [(np.random.rand(20, 8), "1")]}, tmp_path / "grid.png"),
        plots.plot_bar({"a": 3, "b": 1}, tmp_path / "bar.png"),
    ]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("multi_label", [False, True])
def test_non_finite_scores_are_a_clear_error_not_a_metric(multi_label):
    from bioaudio.errors import DataError
    from bioaudio.inference.metrics import classification_report

    scores = np.full((4, 3), 1 / 3)
    scores[2, 1] = np.nan  # what a diverged model predicts
    targets = np.eye(3)[[0, 1, 2, 0]] if multi_label else np.array([0, 1, 2, 0])
    with pytest.raises(DataError, match="not finite .* for 1 of 4 clip"):
        classification_report(scores, targets, ["a", "b", "c"], multi_label)
