"""`bioaudio preview`: N clips per class, seeded, panels = frontend features, valid PNG, errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from bioaudio.cli import main
from bioaudio.commands.preview import NO_LABEL, UNLABELLED, PreviewConfig, make_preview
from bioaudio.data import audio
from bioaudio.data.datasets import AudioDataset
from bioaudio.data.frontend import build_frontend
from bioaudio.data.manifest import read_manifest, split_labels, write_manifest
from bioaudio.inference import plots

SR = 16000
FREQ = {"owl": 400.0, "wren": 6000.0, "frog": 1500.0, "": 3000.0}


def make_manifest(root: Path, labels: list[str], tone, seconds: float = 0.8) -> Path:
    rows = []
    for i, lab in enumerate(labels):
        p = root / f"clip{i:02d}.wav"
        freq = FREQ[split_labels(lab)[0] if lab else ""]
        sec = seconds * (0.5 if i % 3 == 0 else 1.0)  # some clips shorter than --seconds
        sf.write(p, tone(sec, SR, freq, seed=i), SR)
        meta = audio.info(p)
        rows.append(
            {
                "path": str(p),
                "sample_rate": SR,
                "frames": meta.frames,
                "duration": meta.duration,
                "channels": 1,
                "start": 0.0,
                "end": meta.duration,
                "labels": lab,
                "recording": p.stem,
                "source": "test",
            }
        )
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


LABELS = ["owl"] * 5 + ["wren"] * 2 + ["frog", ""]


@pytest.fixture
def manifest(tmp_path, tone):
    return make_manifest(tmp_path, LABELS, tone)


@pytest.fixture
def captured(monkeypatch):
    """The grid handed to plot_spectrogram_grid (the PNG is still written)."""
    seen: dict = {}
    real = plots.plot_spectrogram_grid

    def spy(rows, path, frame_rate=100.0):
        seen.update(rows=rows, frame_rate=frame_rate)
        return real(rows, path, frame_rate=frame_rate)

    monkeypatch.setattr(plots, "plot_spectrogram_grid", spy)
    return seen


@pytest.fixture
def no_render(monkeypatch):
    """For tests of the clip choice only: skip drawing the PNG (the slow part)."""
    monkeypatch.setattr(plots, "plot_spectrogram_grid", lambda rows, path, frame_rate=100.0: path)


def preview(manifest: Path, out: Path, **kw):
    cfg = PreviewConfig(out=out, seconds=1.0, **kw)
    return make_preview(read_manifest(manifest), cfg, progress=False)


def test_n_per_class_with_small_classes_and_a_valid_png(manifest, tmp_path, captured):
    out = tmp_path / "grid.png"
    res = preview(manifest, out, n=3)
    df = read_manifest(manifest)
    counts = {k: len(v) for k, v in res.shown.items()}
    assert counts == {"frog": 1, "owl": 3, "wren": 2, NO_LABEL: 1}
    for name, rows in res.shown.items():
        assert len(set(rows)) == len(rows)
        want = "" if name == NO_LABEL else name
        assert all(df["labels"][r] == want for r in rows)
    assert any("wren: 2 clip(s)" in n for n in res.notes)
    assert any("frog: 1 clip(s)" in n for n in res.notes)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300  # 4 rows x 3 columns of panels
    assert list(captured["rows"]) == ["frog", "owl", "wren", NO_LABEL]


def test_panels_are_the_frontend_features_with_a_blank_tail(manifest, tmp_path, captured):
    res = preview(manifest, tmp_path / "g.png", n=5, frontend="beats_fbank")
    df = read_manifest(manifest)
    ds = AudioDataset(df, class_names=[], sample_rate=SR, clip_seconds=1.0)
    frontend = build_frontend(PreviewConfig(frontend="beats_fbank").frontend_config())
    assert captured["frame_rate"] == 100.0
    peaks = {}
    for name, rows in res.shown.items():
        for (panel, caption), r in zip(captured["rows"][name], rows):
            with torch.no_grad():
                ref, _ = frontend.raw(ds[r]["wav"][None], ds[r]["padding_mask"][None])
            ref = ref[0].numpy()
            assert panel.shape == (98, 128)  # 1 s of 25 ms frames every 10 ms
            np.testing.assert_array_equal(panel[: len(ref)], ref)
            assert np.isnan(panel[len(ref) :]).all()
            assert caption.startswith(Path(df["path"][r]).name) and "@ 0.0 s" in caption
            peaks.setdefault(name, []).append(int(np.argmax(ref.mean(axis=0))))
    # (T, F) with bins rising in frequency: the 6 kHz wren above the 1.5 kHz frog above the owl
    assert min(peaks["wren"]) > max(peaks["frog"]) > max(peaks["owl"])


def test_seeded_choice_stable_under_class_filter(manifest, tmp_path, no_render):
    a = preview(manifest, tmp_path / "a.png", n=2, seed=1)
    b = preview(manifest, tmp_path / "b.png", n=2, seed=1)
    assert a.shown == b.shown
    only = preview(manifest, tmp_path / "c.png", n=2, seed=1, classes=["owl"])
    assert only.shown == {"owl": a.shown["owl"]}
    others = [preview(manifest, tmp_path / "d.png", n=2, seed=s).shown["owl"] for s in range(2, 6)]
    assert any(o != a.shown["owl"] for o in others)


def test_unlabelled_manifest_gives_one_row(tmp_path, tone):
    m = make_manifest(tmp_path, [""] * 6, tone)
    res = preview(m, tmp_path / "u.png", n=4, frontend="eat_fbank")
    assert list(res.shown) == [UNLABELLED] and len(res.shown[UNLABELLED]) == 4


def test_unreadable_clips_are_replaced_and_noted(manifest, tmp_path):
    df = read_manifest(manifest)
    for r in (0, 6):  # an owl clip and one of the two wren clips
        Path(df["path"][r]).write_bytes(b"not audio at all")
    res = preview(manifest, tmp_path / "x.png", n=4)
    assert sorted(res.shown["owl"]) == [1, 2, 3, 4] and res.shown["wren"] == [5]
    assert sum(df["path"][6] in n for n in res.notes) == 1


def test_max_classes_keeps_the_most_frequent(manifest, tmp_path, no_render):
    res = preview(manifest, tmp_path / "m.png", n=1, max_classes=2)
    assert list(res.shown) == ["owl", "wren", NO_LABEL]
    assert any("2 most frequent of 3 classes" in n for n in res.notes)


def test_cli_writes_the_png_and_says_where(manifest, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["preview", str(manifest), "--n", "2", "--seconds", "0.5", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert matplotlib.image.imread(out).ndim == 3


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--classes", "owl,bat"], "--classes: bat not in the manifest"),
        (["--n", "0"], "--n must be >= 1"),
        (["--out", "x.jpg"], "name it *.png"),
        (["--seconds", "-2"], "--seconds must be > 0"),
        (["--frontend", "wavelet"], "--frontend"),
    ],
)
def test_cli_bad_input_exit_2_with_one_line(manifest, tmp_path, capsys, extra, match):
    code = main(["preview", str(manifest), "--out", str(tmp_path / "p.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1


def test_cli_empty_manifest_exit_2(tmp_path, capsys):
    m = tmp_path / "empty.csv"
    m.write_text("path,sample_rate,frames,duration,labels\n")
    assert main(["preview", str(m), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "has no rows" in err and err.count("\n") == 1
    assert not (tmp_path / "p.png").exists()
