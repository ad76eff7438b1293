"""`bioaudio prepare` / `prepare_manifest`: layouts, headers, skips, errors, real audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from bioaudio.cli import main
from bioaudio.data import audio
from bioaudio.data.labels import window_labels
from bioaudio.data.manifest import (
    COLUMNS,
    PrepareConfig,
    build_manifest,
    class_names_of,
    detect_layout,
    find_audio_files,
    prepare_manifest,
    read_manifest,
)
from bioaudio.errors import DataError

QUIET = PrepareConfig(progress=False)


def write(path: Path, seconds: float = 0.5, sr: int = 16000, channels: int = 1, seed: int = 0):
    """A short noisy tone at `path` (format from the extension); returns (frames, channels)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr) + 0.01 * rng.standard_normal(n)
    x = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), sr)
    return n, channels


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["prepare", *args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folders_tree(tmp_path: Path) -> Path:
    root = tmp_path / "birds"
    write(root / "owl" / "a.wav", 0.5, 16000)
    write(root / "owl" / "night" / "b.flac", 0.75, 22050, channels=2)
    write(root / "frog" / "c.ogg", 1.0, 32000)
    write(root / "frog" / ".hidden.wav")
    write(root / ".cache" / "owl" / "d.wav")
    (root / "frog" / "notes.txt").write_text("not audio\n")
    (root / "frog" / "._c.wav").write_bytes(b"\0" * 64)  # macOS resource fork
    return root


# ------------------------------------------------------------------------------- basics


def test_folders_manifest_matches_headers(folders_tree: Path, capsys) -> None:
    code, out, err = cli(capsys, str(folders_tree))
    assert code == 0, err
    df = read_manifest(folders_tree / "manifest.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    names = sorted(Path(p).relative_to(folders_tree.resolve()).as_posix() for p in df["path"])
    assert names == ["frog/c.ogg", "owl/a.wav", "owl/night/b.flac"]  # hidden files left out
    for row in df.itertuples():
        meta = audio.info(row.path)  # file header = manifest row
        assert (row.sample_rate, row.frames, row.channels) == (
            meta.sample_rate,
            meta.frames,
            meta.channels,
        )
        assert row.duration == pytest.approx(meta.frames / meta.sample_rate)
        assert (row.start, row.end) == (0.0, pytest.approx(row.duration))
        assert row.labels == Path(row.path).relative_to(folders_tree.resolve()).parts[0]
        assert row.source == "folder"
    assert class_names_of(df) == ["frog", "owl"]
    skipped = pd.read_csv(folders_tree / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason"] and len(skipped) == 0
    assert "layout: folders" in out and "manifest:" in out and "skipped: 0" in out
    # paths are stored relative to the manifest folder
    raw = pd.read_csv(folders_tree / "manifest.csv")
    assert not any(Path(p).is_absolute() for p in raw["path"])


def test_workers_do_not_change_the_manifest(folders_tree: Path) -> None:
    one = build_manifest(folders_tree, PrepareConfig(workers=1, progress=False)).manifest
    many = build_manifest(folders_tree, PrepareConfig(workers=4, progress=False)).manifest
    pd.testing.assert_frame_equal(one, many)


def test_written_manifest_reads_back_equal(folders_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "m.csv"
    res = prepare_manifest(folders_tree, out=out, config=QUIET)
    assert res.manifest_path == out and (out.parent / "m.skipped.csv").is_file()
    back = read_manifest(out)
    pd.testing.assert_frame_equal(
        back[COLUMNS].reset_index(drop=True),
        res.manifest[COLUMNS].reset_index(drop=True),
        check_dtype=False,
    )


def test_find_audio_files_skips_hidden(folders_tree: Path) -> None:
    got = [p.name for p in find_audio_files(folders_tree)]
    assert sorted(got) == ["a.wav", "b.flac", "c.ogg"]


# ------------------------------------------------------------------------------- bad audio


def test_corrupt_files_go_to_skipped_csv(tmp_path: Path, capsys) -> None:
    root = tmp_path / "rec"
    write(root / "good.wav")
    write(root / "good2.flac", 1.0)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" * 8)
    data = (root / "good2.flac").read_bytes()
    (root / "truncated.flac").write_bytes(data[: len(data) // 2])
    sf.write(str(root / "noframes.wav"), np.zeros((0,), np.float32), 16000)
    code, out, err = cli(capsys, str(root), "--labels", "none")
    assert code == 0, err
    df = read_manifest(root / "manifest.csv")
    assert sorted(Path(p).name for p in df["path"]) == ["good.wav", "good2.flac"]
    skipped = pd.read_csv(root / "skipped.csv")
    reasons = {Path(p).name: r for p, r in zip(skipped["path"], skipped["reason"])}
    assert set(reasons) == {"empty.wav", "garbage.wav", "truncated.flac", "noframes.wav"}
    assert "0 bytes" in reasons["empty.wav"]
    assert "zero-length" in reasons["noframes.wav"]
    assert "truncated" in reasons["truncated.flac"]
    assert "skipped: 4 file(s)" in out


def test_header_only_check_misses_truncation_tail_check_catches_it(tmp_path: Path) -> None:
    root = tmp_path / "rec"
    write(root / "ok.flac", 1.0)
    data = (root / "ok.flac").read_bytes()
    (root / "cut.flac").write_bytes(data[: len(data) // 2])
    header = build_manifest(root, PrepareConfig(verify="header", progress=False))
    tail = build_manifest(root, PrepareConfig(verify="tail", progress=False))
    full = build_manifest(root, PrepareConfig(verify="full", progress=False))
    assert len(header.manifest) == 2 and len(header.skipped) == 0
    for res in (tail, full):
        assert [Path(p).name for p in res.manifest["path"]] == ["ok.flac"]
        assert [Path(p).name for p in res.skipped["path"]] == ["cut.flac"]


def test_nothing_usable_exits_2_and_keeps_old_manifest(tmp_path: Path, capsys) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.wav").write_bytes(b"")
    (root / "b.wav").write_bytes(b"not audio at all")
    (root / "manifest.csv").write_text("path,sample_rate,frames,duration\nold.wav,1,1,1\n")
    before = (root / "manifest.csv").read_text()
    code, out, err = cli(capsys, str(root))
    assert code == 2
    assert err.count("\n") == 1 and "no usable audio" in err and "skipped.csv" in err
    assert (root / "manifest.csv").read_text() == before
    assert len(pd.read_csv(root / "skipped.csv")) == 2


def test_missing_and_empty_directories(tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, str(tmp_path / "nope"))
    assert code == 2 and "directory not found" in err and err.count("\n") == 1
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    code, _, err = cli(capsys, str(tmp_path / "empty"))
    assert code == 2 and "no audio files" in err and err.count("\n") == 1
    f = tmp_path / "file.wav"
    write(f)
    code, _, err = cli(capsys, str(f))
    assert code == 2 and "not a directory" in err


def test_bad_flags_are_one_line_errors(folders_tree: Path, capsys) -> None:
    code, _, err = cli(capsys, str(folders_tree), "--window", "0")
    assert code == 2 and "--window" in err and err.count("\n") == 1
    code, _, err = cli(capsys, str(folders_tree), "--labels", "csv")
    assert code == 2 and "labels.csv" in err and err.count("\n") == 1
    code, _, err = cli(capsys, str(folders_tree), "--labels", "pairs")
    assert code == 2 and "positive/" in err


# ------------------------------------------------------------------------------- labels.csv


def test_csv_layout_missing_files_are_skipped(tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    write(root / "audio" / "a.wav")
    write(root / "audio" / "b.flac", seed=1)
    write(root / "extra" / "unlisted.wav")
    (root / "labels.csv").write_text(
        'filename,labels\naudio/a.wav,"owl,frog"\naudio/b.flac,owl\naudio/gone.wav,wren\n'
    )
    code, out, err = cli(capsys, str(root))
    assert code == 0, err
    df = read_manifest(root / "manifest.csv")
    got = {Path(p).name: labs for p, labs in zip(df["path"], df["labels"])}
    assert got == {"a.wav": "frog,owl", "b.flac": "owl"}
    assert set(df["source"]) == {"csv"}
    skipped = pd.read_csv(root / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["gone.wav"]
    assert "does not exist" in skipped["reason"][0]
    assert "layout: csv" in out and "1 audio file(s)" in out and "not listed" in out


def test_csv_extra_columns_are_kept_and_its_split_is_used(tmp_path: Path, capsys) -> None:
    """A dataset's own split / fold / site columns survive `prepare` (a clash with a manifest
    column gets a csv_ prefix), and train-baseline uses that split as it is."""
    from test_classify import reset_accelerate

    root = tmp_path / "set"
    rows = ["filename,labels,split,fold,site,duration"]
    for i in range(12):
        cls = "owl" if i % 2 else "frog"
        write(root / f"{cls}_{i}.wav", seed=i)
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        rows.append(f"{cls}_{i}.wav,{cls},{split},{i % 3},site{i % 2},unknown")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    code, out, err = cli(capsys, str(root))
    assert code == 0, err
    assert "split, fold, site, csv_duration" in out
    df = read_manifest(root / "manifest.csv")
    names = [Path(p).name for p in df["path"]]
    assert df["split"].tolist() == [
        "train" if int(n.split("_")[1][:-4]) < 8 else "val" if int(n.split("_")[1][:-4]) < 10
        else "test" for n in names
    ]  # fmt: skip
    assert df["fold"].tolist() == [int(n.split("_")[1][:-4]) % 3 for n in names]
    assert set(df["site"]) == {"site0", "site1"} and set(df["csv_duration"]) == {"unknown"}
    assert (df["duration"] > 0).all()  # the manifest's own column is untouched

    reset_accelerate()
    out_dir = tmp_path / "run"
    code = main(["train-baseline", str(root / "manifest.csv"), "--out", str(out_dir),
                 "--max_steps", "2", "--batch_size", "4", "--num_workers", "0", "--no-progress",
                 "--clip_seconds", "0.5", "--n_mels", "16", "--n_fft", "256",
                 "--hop_length", "160"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "splits from the manifest's 'split' column" in captured.out
    tested = pd.read_csv(out_dir / "seed_42" / "test_predictions.csv")["path"]
    assert sorted(Path(p).name for p in tested) == sorted(
        n for n in names if int(n.split("_")[1][:-4]) >= 10
    )


def test_csv_layout_all_missing_is_an_error(tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    write(root / "x.wav")
    (root / "labels.csv").write_text("filename,labels\nmissing1.wav,owl\nmissing2.wav,frog\n")
    code, _, err = cli(capsys, str(root))
    assert code == 2 and "no usable audio" in err
    assert len(pd.read_csv(root / "skipped.csv")) == 2


def test_csv_unknown_label_column(tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    write(root / "x.wav")
    (root / "labels.csv").write_text("filename,species\nx.wav,owl\n")
    code, _, err = cli(capsys, str(root))
    assert code == 2 and err.count("\n") == 1
    assert "'labels'" in err and "filename, species" in err
    code, _, err = cli(capsys, str(root), "--label_column", "species")
    assert code == 0, err
    assert read_manifest(root / "manifest.csv")["labels"].tolist() == ["owl"]


def test_csv_elsewhere_with_config_file(tmp_path: Path, capsys) -> None:
    root = tmp_path / "set"
    write(root / "x.wav")
    write(root / "y.wav", seed=2)
    meta = tmp_path / "meta" / "tags.csv"
    meta.parent.mkdir()
    meta.write_text(f"file,tag\n{root / 'x.wav'},owl\n")
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"labels: csv\nlabels_csv: {meta}\nfilename_column: file\nlabel_column: tag\n")
    code, _, err = cli(capsys, str(root), "--config", str(cfg))
    assert code == 0, err
    df = read_manifest(root / "manifest.csv")
    assert [(Path(p).name, lab) for p, lab in zip(df["path"], df["labels"])] == [("x.wav", "owl")]


# ------------------------------------------------------------------------------- selections


def _soundscape(root: Path, seconds: float = 12.0, sr: int = 8000) -> Path:
    p = root / "rec.wav"
    write(p, seconds, sr)
    return p


RAVEN = (
    "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\tSpecies\n"
    "1\tWaveform 1\t1\t1.0\t1.5\t0\t4000\towl\n"
    "1\tSpectrogram 1\t1\t1.0\t1.5\t300\t900\towl\n"
    "2\tWaveform 1\t1\t6.0\t6.4\t0\t4000\tfrog\n"
    "2\tSpectrogram 1\t1\t6.0\t6.4\t800\t2000\tfrog\n"
)
AUDACITY = "1.0\t1.5\towl\n\\\t300\t900\n6.0\t6.4\tfrog\n\\\t800\t2000\n"


def test_raven_and_audacity_give_the_same_windows(tmp_path: Path) -> None:
    a, b = tmp_path / "raven", tmp_path / "audacity"
    _soundscape(a)
    _soundscape(b)
    (a / "rec.Table.1.selections.txt").write_text(RAVEN)
    (b / "rec.txt").write_text(AUDACITY)
    ra = build_manifest(a, QUIET)
    rb = build_manifest(b, QUIET)
    assert ra.layout == rb.layout == "selections"
    assert set(ra.manifest["source"]) == {"raven"} and set(rb.manifest["source"]) == {"audacity"}
    cols = ["start", "end", "labels", "recording"]
    pd.testing.assert_frame_equal(ra.manifest[cols], rb.manifest[cols])
    windows = list(zip(ra.manifest["start"], ra.manifest["end"], ra.manifest["labels"]))
    assert windows == [
        (0.0, 5.0, "owl"),
        (2.5, 7.5, "frog"),
        (5.0, 10.0, "frog"),
        (7.0, 12.0, ""),  # a negative window
    ]


def test_selection_options_change_windows(tmp_path: Path, capsys) -> None:
    _soundscape(tmp_path)
    (tmp_path / "rec.Table.1.selections.txt").write_text(RAVEN)
    code, _, err = cli(capsys, str(tmp_path), "--window", "2", "--hop", "1", "--min_overlap", "1")
    assert code == 0, err
    df = read_manifest(tmp_path / "manifest.csv")
    from bioaudio.data.labels import read_raven_table

    want = window_labels(read_raven_table(tmp_path / "rec.Table.1.selections.txt"), 12.0, 2, 1, 1)
    assert list(zip(df["start"], df["end"], df["labels"])) == [
        (s, e, ",".join(labs)) for s, e, labs in want
    ]
    assert len(df) == 11


def test_selection_bad_label_column_and_unmatched_tables(tmp_path: Path, capsys) -> None:
    root = tmp_path / "ss"
    _soundscape(root)
    write(root / "other.wav")  # no table: kept as a whole-file unlabelled row
    (root / "rec.Table.1.selections.txt").write_text(RAVEN)
    (root / "lost.Table.1.selections.txt").write_text(RAVEN)  # no lost.* audio
    code, _, err = cli(capsys, str(root), "--label_column", "Call")
    assert code == 2 and err.count("\n") == 1
    assert "'Call'" in err and "Species" in err and "Begin Time (s)" in err
    code, _, err = cli(capsys, str(root))
    assert code == 0, err
    df = read_manifest(root / "manifest.csv")
    other = df[df["recording"] == "other.wav"]
    assert len(other) == 1 and other["source"].item() == "none"
    skipped = pd.read_csv(root / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["lost.Table.1.selections.txt"]
    assert "no audio named lost" in skipped["reason"][0]


def test_unreadable_label_file_skips_its_recording(tmp_path: Path) -> None:
    root = tmp_path / "ss"
    _soundscape(root)
    write(root / "two.wav", 6.0, 8000)
    (root / "rec.txt").write_text(AUDACITY)
    (root / "two.txt").write_text("0.5\t0.1\towl\n")  # end before start
    res = build_manifest(root, QUIET)
    assert set(res.manifest["recording"]) == {"rec.wav"}
    reasons = {Path(p).name: r for p, r in zip(res.skipped["path"], res.skipped["reason"])}
    assert set(reasons) == {"two.txt", "two.wav"} and "before start" in reasons["two.txt"]


def test_begin_file_column_routes_calls(tmp_path: Path) -> None:
    root = tmp_path / "ss"
    write(root / "a.wav", 6.0, 8000)
    write(root / "b.wav", 6.0, 8000)
    (root / "all.selections.txt").write_text(
        "Selection\tView\tBegin Time (s)\tEnd Time (s)\tBegin File\tFile Offset (s)\tSpecies\n"
        "1\tSpectrogram 1\t1.0\t1.5\ta.wav\t1.0\towl\n"
        "2\tSpectrogram 1\t7.0\t7.5\tb.wav\t1.0\tfrog\n"
        "3\tSpectrogram 1\t20.0\t20.5\tc.wav\t1.0\twren\n"
    )
    res = build_manifest(root, QUIET)
    first = res.manifest.groupby("recording")["labels"].first().to_dict()
    assert first == {"a.wav": "owl", "b.wav": "frog"}
    assert "c.wav" in res.skipped["reason"][0]


# ------------------------------------------------------------------------------- layouts


def test_layout_detection(tmp_path: Path) -> None:
    csv_root = tmp_path / "csv"
    write(csv_root / "a.wav")
    (csv_root / "labels.csv").write_text("filename,labels\na.wav,owl\n")
    pairs = tmp_path / "pairs"
    write(pairs / "positive" / "p.wav")
    write(pairs / "negative" / "n.wav")
    sel = tmp_path / "sel"
    _soundscape(sel)
    (sel / "rec.txt").write_text(AUDACITY)
    folders = tmp_path / "folders"
    write(folders / "owl" / "1.wav")
    write(folders / "frog" / "2.wav")
    nested = tmp_path / "nested"  # recorder/site trees: audio two levels down is not classes
    write(nested / "site_A" / "2024-05-01" / "x.wav")
    write(nested / "site_B" / "2024-05-01" / "y.wav")
    mixed = tmp_path / "mixed"  # audio at the top level too: not a class-folder layout
    write(mixed / "owl" / "1.wav")
    write(mixed / "frog" / "2.wav")
    write(mixed / "3.wav")
    notes = tmp_path / "notes"  # a .txt that is not a label track
    write(notes / "a.wav")
    (notes / "a.txt").write_text("recorded by Ann\n")
    got = {d.name: detect_layout(d) for d in (csv_root, pairs, sel, folders, nested, mixed, notes)}
    assert got == {
        "csv": "csv",
        "pairs": "pairs",
        "sel": "selections",
        "folders": "folders",
        "nested": "none",
        "mixed": "none",
        "notes": "none",
    }
    res = build_manifest(pairs, QUIET)
    assert sorted(zip(res.manifest["recording"], res.manifest["labels"])) == [
        ("negative/n.wav", "negative"),
        ("positive/p.wav", "positive"),
    ]
    forced = build_manifest(folders, PrepareConfig(labels="none", progress=False))
    assert set(forced.manifest["labels"]) == {""} and set(forced.manifest["source"]) == {"none"}


# ------------------------------------------------------------------------------- real audio


@pytest.mark.shared_data
def test_shared_data_prepares_and_decodes(shared_data: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(verify="header", workers=8, progress=False)
    rng = np.random.default_rng(0)
    for name in ("esc10", "fsdd", "soundscapes"):
        root = shared_data / name
        if not root.is_dir():
            pytest.skip(f"{root} is absent")
        res = prepare_manifest(root, out=tmp_path / name / "manifest.csv", config=cfg)
        # compared resolved: the data folder may be reached through a symlink
        on_disk = sorted(str(p.resolve()) for p in root.rglob("*") if audio.is_audio_path(p))
        assert sorted(str(Path(p).resolve()) for p in set(res.manifest["path"])) == on_disk
        assert len(res.skipped) == 0
        rec = res.manifest.drop_duplicates("path")
        if name == "esc10":
            assert res.layout == "folders"
            folders = sorted(d.name for d in root.iterdir() if d.is_dir())
            assert class_names_of(res.manifest) == folders
            assert all(
                Path(p).parent.name == lab
                for p, lab in zip(res.manifest["path"], res.manifest["labels"])
            )
        if name == "soundscapes":
            assert res.layout == "selections"
            spin = res.manifest[res.manifest["recording"] == "spinetail.wav"]
            assert set(spin["source"]) == {"audacity"} and set(class_names_of(spin)) == {
                "SP",
                "CRER",
            }
        # full decode of a sample: the header's frame count is what decoding yields
        for i in rng.choice(len(rec), size=min(8, len(rec)), replace=False):
            row = rec.iloc[int(i)]
            x = audio.load(row["path"], sample_rate=None, mono=False)
            assert x.shape == (row["channels"], row["frames"])
            assert np.isfinite(x).all() and np.abs(x).max() > 0


def test_function_raises_typed_errors(tmp_path: Path) -> None:
    """The same bad inputs through `prepare_manifest` raise DataError (the CLI's exit 2)."""
    with pytest.raises(DataError, match="directory not found"):
        prepare_manifest(tmp_path / "nope", config=QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no audio files"):
        prepare_manifest(tmp_path / "empty", config=QUIET)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.flac").write_bytes(b"fLaC" + b"\0" * 40)
    with pytest.raises(DataError, match="no usable audio"):
        prepare_manifest(bad, config=QUIET)
    assert not (bad / "manifest.csv").exists() and (bad / "skipped.csv").is_file()
    lab = tmp_path / "lab"
    write(lab / "x.wav")
    (lab / "labels.csv").write_text("filename,tags\nx.wav,owl\n")
    with pytest.raises(DataError, match=r"no column 'labels' \(columns: filename, tags\)"):
        prepare_manifest(lab, config=QUIET)


def test_raven_found_by_header_and_broken_tables_reported(tmp_path: Path) -> None:
    root = tmp_path / "ss"
    _soundscape(root)
    write(root / "two.wav", 6.0, 8000)
    (root / "rec.txt").write_text(RAVEN)  # a Raven table without the usual name
    (root / "two.Table.1.selections.txt").write_text("Selection\tStart\tStop\n1\t0\t1\n")
    res = build_manifest(root, QUIET)
    assert res.layout == "selections"
    assert set(res.manifest["source"]) == {"raven"}
    assert set(res.manifest["recording"]) == {"rec.wav"}
    reasons = {Path(p).name: r for p, r in zip(res.skipped["path"], res.skipped["reason"])}
    assert set(reasons) == {"two.Table.1.selections.txt", "two.wav"}
    assert "Begin Time (s)" in reasons["two.Table.1.selections.txt"]
