"""The synthetic demo dataset: deterministic bytes, every layout readable, distinct species."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bioaudio.cli import main
from bioaudio.data import audio
from bioaudio.data.demo import (
    LAYOUTS,
    MARKER,
    PAIR_TARGET,
    SPECIES,
    generate_demo_data,
    make_scene,
    synth_call,
)
from bioaudio.data.labels import read_audacity_labels, read_raven_table, split_labels
from bioaudio.data.manifest import PrepareConfig, build_manifest, class_names_of
from bioaudio.errors import ConfigError

TINY = dict(seed=3, n_per_class=2, n_unlabelled=3, soundscapes=1)
QUIET = PrepareConfig(progress=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    generate_demo_data(out, **TINY)
    return out


def test_same_seed_same_bytes(demo: Path, tmp_path: Path) -> None:
    again = generate_demo_data(tmp_path / "again", **TINY)
    a, b = tree_digest(demo), tree_digest(tmp_path / "again")
    assert a == b and len(a) > 20
    assert again.files == sum(k.endswith((".wav", ".flac", ".ogg")) for k in a)


def test_different_seed_different_audio(tmp_path: Path) -> None:
    opts = dict(n_per_class=1, n_unlabelled=1, soundscapes=0)
    a = tree_digest(generate_demo_data(tmp_path / "a", seed=0, **opts).out)
    b = tree_digest(generate_demo_data(tmp_path / "b", seed=1, **opts).out)
    assert a.keys() == b.keys()
    audio_files = [k for k in a if k.endswith((".wav", ".flac", ".ogg"))]
    assert all(a[k] != b[k] for k in audio_files)


def test_layouts_and_files(demo: Path) -> None:
    for name in LAYOUTS:
        assert (demo / name).is_dir()
    assert "trill_wren" in (demo / "README.txt").read_text()
    assert json.loads((demo / MARKER).read_text())["classes"] == list(SPECIES)
    assert sorted(d.name for d in (demo / "by_class").iterdir()) == sorted(SPECIES)
    files = [p for p in demo.rglob("*") if audio.is_audio_path(p)]
    infos = [audio.info(p) for p in files]
    assert len({i.sample_rate for i in infos}) >= 2
    assert {p.suffix for p in files} == {".wav", ".flac", ".ogg"}
    assert any(i.channels > 1 for i in infos)
    short = [i.duration for i, p in zip(infos, files) if "soundscapes" not in p.parts]
    assert 1.0 <= min(short) and max(short) <= 8.0
    long = [i.duration for i, p in zip(infos, files) if "soundscapes" in p.parts]
    assert len(long) == 1 and 60 <= long[0] <= 90
    for p in files:  # every file decodes, nothing silent or clipped
        x = audio.load(p, sample_rate=None, mono=False)
        assert np.isfinite(x).all() and 0 < np.abs(x).max() < 1.0


def test_labels_csv_is_multilabel_and_matches_prepare(demo: Path) -> None:
    text = (demo / "labelled" / "labels.csv").read_text()
    with open(demo / "labelled" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(len(split_labels(r["labels"])) == 2 for r in rows)
    assert '"' in text  # multi-label cells are quoted
    res = build_manifest(demo / "labelled", QUIET)
    assert res.layout == "csv" and len(res.skipped) == 0
    got = {
        r: set(split_labels(lab))
        for r, lab in zip(res.manifest["recording"], res.manifest["labels"])
    }
    assert got == {r["filename"]: set(split_labels(r["labels"])) for r in rows}


def test_each_layout_prepares(demo: Path) -> None:
    want = {
        "unlabelled": "none",
        "labelled": "csv",
        "by_class": "folders",
        "soundscapes": "selections",
        "pairs": "pairs",
    }
    for name, layout in want.items():
        res = build_manifest(demo / name, QUIET)
        assert res.layout == layout, name
        assert len(res.skipped) == 0, res.skipped
    by_class = build_manifest(demo / "by_class", QUIET).manifest
    assert class_names_of(by_class) == sorted(SPECIES)
    assert all(Path(p).parent.name == lab for p, lab in zip(by_class["path"], by_class["labels"]))
    pairs = build_manifest(demo / "pairs", QUIET).manifest
    assert set(pairs["labels"]) == {"positive", "negative"}
    ss = build_manifest(demo / "soundscapes", QUIET).manifest
    assert set(ss["source"]) == {"raven"}  # Raven wins over the Audacity copy
    assert (ss["labels"] != "").any() and (ss["labels"] == "").any()  # calls and quiet windows


def test_raven_table_and_audacity_track_agree(demo: Path) -> None:
    folder = demo / "soundscapes"
    raven = read_raven_table(folder / "soundscape_01.Table.1.selections.txt")
    lines = (folder / "soundscape_01.Table.1.selections.txt").read_text().splitlines()
    assert len(lines) == 1 + 2 * len(raven)  # each selection listed for Waveform and Spectrogram
    auda = read_audacity_labels(folder / "soundscape_01.txt")
    key = [(a.start, a.end, a.label, a.low_freq, a.high_freq) for a in raven]
    assert key == [(a.start, a.end, a.label, a.low_freq, a.high_freq) for a in auda]
    assert {a.label for a in raven} <= set(SPECIES) and len(raven) > 3
    dur = audio.info(folder / "soundscape_01.wav").duration
    assert all(0 <= a.start < a.end <= dur for a in raven)


def test_annotated_calls_are_audible() -> None:
    """A scene's events are where the calls are: band power in the event's box rises in its span."""
    sr = 16000
    rng = np.random.default_rng(0)
    for sp in SPECIES:
        for _ in range(3):
            x, events = make_scene(rng, sr, 6.0, [sp], bouts=(1, 1), distractor_p=0.0)
            e = events[0]
            assert e.species == sp and 0 <= e.start < e.end <= 6.0
            spec = np.abs(np.fft.rfft(x.reshape(-1, 400), axis=1)) ** 2  # (frames, bins), 25 ms
            f = np.fft.rfftfreq(400, 1 / sr)
            band = spec[:, (f >= e.low_freq) & (f <= e.high_freq)].sum(1)
            t = (np.arange(len(band)) + 0.5) * 400 / sr
            inside = band[(t > e.start) & (t < e.end)].mean()
            outside = band[(t < e.start - 0.05) | (t > e.end + 0.05)].mean()
            assert inside > 1.5 * outside, (sp, e)


def test_species_are_distinct_and_variable() -> None:
    """Nearest-centroid on a crude spectral profile separates the species (leave-one-out)."""
    sr, n = 16000, 8
    edges = np.geomspace(150, 7500, 25)
    feats, labels = [], []
    for k, sp in enumerate(SPECIES):
        rng = np.random.default_rng(100 + k)
        durations = []
        for _ in range(n):
            c = synth_call(sp, rng, sr)
            durations.append(len(c.wave))
            spec = np.abs(np.fft.rfft(c.wave, 1 << 15)) ** 2
            f = np.fft.rfftfreq(1 << 15, 1 / sr)
            bands = [spec[(f >= lo) & (f < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])]
            env = np.abs(c.wave)
            frames = env[: len(env) // 160 * 160].reshape(-1, 160).mean(1)  # 10 ms frames
            fluct = np.std(frames) / (np.mean(frames) + 1e-9)
            v = np.log(np.asarray(bands) / np.sum(bands) + 1e-6)
            feats.append(np.append(v, 3 * fluct))
            labels.append(k)
            assert 0 < c.low_freq < c.high_freq <= sr / 2
        assert len(set(durations)) > 1, f"{sp}: every call has the same length"
    X, y = np.array(feats), np.array(labels)
    correct = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cents = np.stack([X[keep & (y == c)].mean(0) for c in range(len(SPECIES))])
        correct += int(np.argmin(((cents - X[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) >= 0.9


def test_refuses_foreign_folder_and_replaces_own(tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("precious")
    code = main(["demo-data", str(mine), "--n_per_class", "1", "--soundscapes", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--force" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["thesis.docx"]
    with pytest.raises(ConfigError):
        generate_demo_data(mine, n_per_class=1, soundscapes=0)

    opts = ["--n_per_class", "1", "--n_unlabelled", "1", "--soundscapes", "0"]
    assert main(["demo-data", str(mine), *opts, "--force"]) == 0
    out = capsys.readouterr().out
    assert (mine / "thesis.docx").read_text() == "precious"
    assert "by_class" in out and str(mine / "labelled") in out
    # a previous output is regenerated without --force; files the user added to our folders
    # stay (only the files demo-data wrote, listed in its marker, are replaced)
    added = mine / "by_class" / "hoot_owl" / "old.wav"
    added.write_bytes(b"")
    before = tree_digest(mine)
    assert main(["demo-data", str(mine), *opts]) == 0
    capsys.readouterr()
    assert added.exists() and (mine / "thesis.docx").read_text() == "precious"
    after = tree_digest(mine)
    assert after == before
    assert not any(p.name.startswith(".mine.partial") for p in tmp_path.iterdir())


def test_pairs_target(demo: Path) -> None:
    readme = (demo / "README.txt").read_text()
    assert f"positive/ (2 clips with {PAIR_TARGET})" in readme
    assert len(list((demo / "pairs" / "positive").iterdir())) == 2
    assert len(list((demo / "pairs" / "negative").iterdir())) == 2
