"""The README's demo command, end to end (short trainings), and its resume on a second run."""

from __future__ import annotations

import json

import pandas as pd
from test_classify import reset_accelerate

from bioaudio.cli import main
from bioaudio.models.checkpoint import load_model


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    reset_accelerate()
    args = ["demo", str(out), "--epochs", "2", "--pretrain_steps", "4", "--finetune_epochs", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "demo finished" in text and "bioaudio explore" in text
    runs = out / "runs"
    base = runs / "tiny_mel_cnn" / "seed_0"
    metrics = json.loads((base / "test_metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    for f in ("curves.png", "confusion.png", "class_names.json", "history.csv", "report.md"):
        assert (base / f).is_file(), f
    assert (out / "preview.png").is_file()
    # both pretrained encoders load; the finetuned one was trained from the EAT export
    assert load_model(runs / "pretrain_eat" / "export").model_type == "eat"
    assert load_model(runs / "pretrain_beats" / "export").model_type == "beats"
    tuned = runs / "finetune_eat" / "seed_0"
    prov = json.loads((tuned / "export" / "config.json").read_text())["provenance"]
    assert prov["finetuned_from"] == str(runs / "pretrain_eat" / "export")
    assert (tuned / "test_metrics.json").is_file()
    preds = (out / "predictions" / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + 3  # header + the three soundscapes
    assert (out / "detections" / "detections.csv").is_file()
    assert len(list((out / "detections").glob("*.selections.txt"))) == 3
    emb = pd.read_parquet(out / "embeddings.parquet")
    assert len(emb) > 0 and len(emb["embedding"].iloc[0]) == 64
    assert any((out / "maps").glob("*.png"))
    # second run: nothing is regenerated or retrained
    stamp = (base / "test_metrics.json").stat().st_mtime_ns
    reset_accelerate()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "already in" in text and "finished earlier, skipped" in text
    assert (base / "test_metrics.json").stat().st_mtime_ns == stamp
