"""The README's demo command, end to end (short training), and its resume on a second run."""

from __future__ import annotations

import json

from bioaudio.cli import main
from bioaudio.models.checkpoint import load_model


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "demo finished" in text
    run = out / "runs" / "tiny_mel_cnn" / "seed_0"
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    for f in ("curves.png", "confusion.png", "class_names.json", "history.csv"):
        assert (run / f).is_file(), f
    assert (out / "preview.png").is_file()
    preds = (out / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + 3  # header + the three soundscapes
    assert load_model(out / "models" / "eat_tiny").model_type == "eat"
    # second run: nothing is regenerated or retrained
    stamp = (run / "test_metrics.json").stat().st_mtime_ns
    assert main(["demo", str(out), "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "already in" in text and "finished earlier, skipped" in text
    assert (run / "test_metrics.json").stat().st_mtime_ns == stamp
