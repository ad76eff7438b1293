"""`bioaudio infer`: one file (prediction, top-k, PNG, per-window CSV = the file's windows), a
folder (one CSV row per readable file, unreadable ones in skipped.csv, probabilities summing to
1, bar chart), agreement with the test-set evaluation of train-baseline, multi-label output, and
one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from test_classify import (
    CLASSES,
    FRONTEND_FLAGS,
    SR,
    TINY_FRONTEND,
    one_thread,  # noqa: F401  (autouse fixture)
    reset_accelerate,
    write_tone_dataset,
)

from bioaudio.cli import main
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export

NAMES = sorted(CLASSES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A TinyMelCNN trained on tones by train-baseline: (manifest, run directory)."""
    root = tmp_path_factory.mktemp("infer")
    manifest = write_tone_dataset(root / "data", n_per_class=8)
    reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-level one_thread
    argv = [
        "train-baseline", str(manifest), "--out", str(root / "runs"), "--seeds", "0",
        "--max_steps", "30", "--lr", "3e-3", "--batch_size", "8", "--clip_seconds", "1", "--eval_every", "10",
        "--num_workers", "0", "--no-progress", "--save_every", "0", *FRONTEND_FLAGS,
    ]  # fmt: skip
    assert main(argv) == 0
    torch.set_num_threads(threads)
    reset_accelerate()
    return manifest, root / "runs" / "seed_0"


def infer(capsys, *argv) -> tuple[int, str, str]:
    code = main(["infer", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def test_one_file(trained, tmp_path, capsys):
    _, run = trained
    wav = tmp_path / "long_mid.wav"
    t = np.arange(int(2.6 * SR)) / SR
    sf.write(wav, (0.4 * np.sin(2 * np.pi * CLASSES["mid"] * t)).astype(np.float32), SR)
    out = tmp_path / "out"
    code, stdout, err = infer(capsys, run, wav, "--out", out, "--top_k", "2")
    assert code == 0, err
    record = json.loads((out / "long_mid.json").read_text())
    probs = record["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)  # softmax: single-label
    assert record["predicted"] == max(probs, key=probs.get)
    assert record["probability"] == pytest.approx(max(probs.values()))
    assert [c["class"] for c in record["top_k"]] == sorted(probs, key=probs.get, reverse=True)[:2]
    assert f"{record['predicted']} (probability {record['probability']:.3f})" in stdout
    # 1 s windows (the training clip): 0-1, 1-2, and the 0.6 s tail; the file = their mean
    windows = pd.read_csv(out / "long_mid_windows.csv")
    assert list(windows["start"]) == [0.0, 1.0, 2.0] and record["windows"] == 3
    np.testing.assert_allclose(
        windows[NAMES].mean().to_numpy(), [probs[n] for n in NAMES], atol=1e-5
    )
    image = mpimg.imread(out / "long_mid.png")
    assert image.shape[0] > 200  # spectrogram plus the per-window strip


def test_a_folder_with_unreadable_files(trained, tmp_path, capsys):
    manifest, run = trained
    folder = tmp_path / "folder"
    sources = sorted((manifest.parent / "mid").glob("*.wav"))[:3]
    sources += sorted((manifest.parent / "low").glob("*.wav"))[:2]
    for i, src in enumerate(sources):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, sub / src.name)
    (folder / "broken.wav").write_bytes(b"RIFF....not audio at all")
    (folder / "empty.flac").write_bytes(b"")
    (folder / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    code, stdout, err = infer(capsys, run, folder, "--out", out)
    assert code == 0, err
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == len(sources)
    assert sorted(table["file"]) == sorted(
        f"{'a' if i % 2 else 'b'}/{s.name}" for i, s in enumerate(sources)
    )
    p = table[[f"p_{n}" for n in NAMES]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (np.array(NAMES)[p.argmax(1)] == table["predicted"]).all()
    assert table["top_k"].str.count(":").eq(3).all()
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(Path(x).name for x in skipped["path"]) == ["broken.wav", "empty.flac"]
    assert skipped["reason"].str.len().gt(0).all()
    assert "skipped 2 unreadable" in stdout
    assert mpimg.imread(out / "predicted_classes.png").shape[0] > 50


def test_infer_agrees_with_the_test_set_evaluation(trained, tmp_path, capsys):
    _, run = trained
    tested = pd.read_csv(run / "test_predictions.csv")
    folder = tmp_path / "test_clips"
    folder.mkdir()
    for path in tested["path"]:
        shutil.copy(path, folder / Path(path).name)
    code, _, err = infer(capsys, run, folder, "--out", tmp_path / "out")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("file")
    for _, row in tested.iterrows():
        mine = table.loc[Path(row["path"]).name]
        assert mine["predicted"] == row["predicted"]
        assert mine["probability"] == pytest.approx(row["probability"], abs=1e-5)


def test_multi_label_model_lists_classes_over_the_threshold(tmp_path, capsys):
    model = BaselineClassifier.build("mlp", TINY_FRONTEND, NAMES, multi_label=True)
    save_export(model, tmp_path / "model", provenance={"clip_seconds": 0.5})
    wav = tmp_path / "x.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32), SR)
    code, _, err = infer(capsys, tmp_path / "model", wav, "--out", tmp_path / "o",
                         "--threshold", "0.3")  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "x.json").read_text())
    probs = record["probabilities"]
    assert record["multi_label"] and record["windows"] == 2  # the model's 0.5 s clip
    assert not sum(probs.values()) == pytest.approx(1.0)  # sigmoid per class
    assert record["predicted"] == ",".join(n for n in NAMES if probs[n] >= 0.3)


@pytest.mark.parametrize("which", ["model", "input", "not_a_model"])
def test_missing_model_or_input_is_a_one_line_error(trained, tmp_path, capsys, which):
    manifest, run = trained
    wav = sorted((manifest.parent / "mid").glob("*.wav"))[0]
    model, source = run, wav
    if which == "model":
        model = tmp_path / "nope"
    elif which == "input":
        source = tmp_path / "missing.wav"
    else:
        model = manifest.parent  # a folder of audio, not an export
    code, _, err = infer(capsys, model, source, "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and err.startswith("bioaudio infer: error:")
    assert not (tmp_path / "o").exists()
