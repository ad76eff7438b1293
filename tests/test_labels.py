"""Label sources (labels.csv, folders, pairs, Audacity, Raven) and the window overlap rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bioaudio.data.labels import (
    Annotation,
    folder_labels,
    join_labels,
    overlap_rule,
    pair_labels,
    read_audacity_labels,
    read_label_file,
    read_labels_csv,
    read_raven_table,
    sniff_label_file,
    split_labels,
    window_bounds,
    window_labels,
)
from bioaudio.errors import DataError

# ------------------------------------------------------------------------------- labels.csv


def test_labels_csv_multilabel_subfolders_and_duplicates(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "set"
    d.mkdir()
    (d / "labels.csv").write_text(
        "filename,labels\n"
        'a.wav,"owl, frog"\n'
        "sub/b.wav,frog\n"
        "sub\\deeper\\c.wav,wren\n"
        "a.wav,wren\n"
        "d.wav,\n"
    )
    monkeypatch.chdir(tmp_path)  # relative names resolve against the csv, not the cwd
    got = {e.path: e.labels for e in read_labels_csv(d / "labels.csv")}
    base = d.resolve()
    assert got == {
        base / "a.wav": ["frog", "owl", "wren"],
        base / "sub/b.wav": ["frog"],
        base / "sub/deeper/c.wav": ["wren"],
        base / "d.wav": [],
    }


def test_labels_csv_other_columns(tmp_path: Path) -> None:
    p = tmp_path / "meta.csv"
    p.write_text('file,species,site\nx.wav,owl,A\ny.wav,"owl,frog",B\n')
    got = read_labels_csv(p, label_column="species", filename_column="file")
    assert [(e.path.name, e.labels) for e in got] == [
        ("x.wav", ["owl"]),
        ("y.wav", ["frog", "owl"]),
    ]
    site = read_labels_csv(p, label_column="site", filename_column="file")
    assert [e.labels for e in site] == [["A"], ["B"]]


def test_labels_csv_unknown_column_lists_columns(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("filename,species\nx.wav,owl\n")
    with pytest.raises(DataError) as e:
        read_labels_csv(p)
    msg = str(e.value)
    assert "'labels'" in msg and "filename, species" in msg and "--label_column" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "text, needle",
    [("", "empty"), ("filename,labels\n", "no rows"), ("filename,labels\n,owl\n", "line 2")],
)
def test_labels_csv_bad_files(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(text)
    with pytest.raises(DataError, match=needle):
        read_labels_csv(p)


def test_label_string_round_trip() -> None:
    assert split_labels(" b, a ,,") == ["b", "a"]
    assert split_labels(float("nan")) == [] and split_labels(None) == []
    assert join_labels(["b", "a", "b"]) == "a,b"
    assert split_labels(join_labels(["z", "y"])) == ["y", "z"]


# ------------------------------------------------------------------------------- folders


def test_folder_and_pair_labels(tmp_path: Path) -> None:
    files = [
        tmp_path / "owl" / "1.wav",
        tmp_path / "owl" / "night" / "2.wav",
        tmp_path / "frog" / "3.wav",
        tmp_path / "loose.wav",
    ]
    got = folder_labels(files, tmp_path)
    assert [got[f.resolve()] for f in files] == [["owl"], ["owl"], ["frog"], []]
    pairs = [tmp_path / "Positive" / "a.wav", tmp_path / "negative" / "x" / "b.wav", files[3]]
    got = pair_labels(pairs, tmp_path)
    assert [got[f.resolve()] for f in pairs] == [["positive"], ["negative"], []]


def test_folder_with_comma_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="comma"):
        folder_labels([tmp_path / "owl, barn" / "1.wav"], tmp_path)


# ------------------------------------------------------------------------------- Audacity


def test_audacity_frequency_lines_and_point_labels(tmp_path: Path) -> None:
    p = tmp_path / "rec.txt"
    p.write_text(
        "0.5\t1.25\towl hoot\n"
        "\\\t300.5\t2400\n"
        "2.0\t2.0\tpoint\n"
        "\n"
        "3.0\t4.0\t\n"
        "4.5\t5.0\tfrog\n"
        "\\\t800\t3000\n"
    )
    got = read_audacity_labels(p)
    assert [(a.start, a.end, a.label) for a in got] == [
        (0.5, 1.25, "owl hoot"),
        (2.0, 2.0, "point"),
        (3.0, 4.0, ""),
        (4.5, 5.0, "frog"),
    ]
    assert (got[0].low_freq, got[0].high_freq) == (300.5, 2400.0)
    assert got[1].low_freq is None and got[3].high_freq == 3000.0
    assert sniff_label_file(p) == "audacity"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("\\\t100\t200\n", "before any label"),
        ("1.0\t0.5\tx\n", "before start"),
        ("one\t2\tx\n", "line 1"),
        ("0\t1\tx\n0 1 y\n", "line 2"),
    ],
)
def test_audacity_errors_name_the_line(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(DataError, match=needle) as e:
        read_audacity_labels(p)
    assert str(p) in str(e.value)


def test_audacity_real_file(shared_data: Path) -> None:
    p = shared_data / "soundscapes" / "spinetail.txt"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    n_labels = sum(not ln.startswith("\\") for ln in lines)
    n_freq = sum(ln.startswith("\\") for ln in lines)
    got = read_audacity_labels(p)
    assert len(got) == n_labels > 0
    assert {a.label for a in got} == {"SP", "CRER"}  # no '\' line was read as a label
    with_freq = [a for a in got if a.low_freq is not None]
    assert len(with_freq) == n_freq
    assert all(0 < a.low_freq < a.high_freq for a in with_freq)
    assert all(0 <= a.start < a.end for a in got)
    assert [a.start for a in got] == sorted(a.start for a in got)


# ------------------------------------------------------------------------------- Raven

RAVEN_HEADER = (
    "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\t"
    "Annotation\tNotes\n"
)


def test_raven_deduplicates_views(tmp_path: Path) -> None:
    p = tmp_path / "rec.Table.1.selections.txt"
    p.write_text(
        RAVEN_HEADER
        + "1\tWaveform 1\t1\t1.0\t2.0\t0\t11025\towl\t\n"
        + "1\tSpectrogram 1\t1\t1.0\t2.0\t300\t900\towl\tfaint\n"
        + "2\tWaveform 1\t1\t3.5\t3.9\t0\t11025\tfrog,wren\t\n"
        + "2\tSpectrogram 1\t1\t3.5\t3.9\t800\t4000\tfrog,wren\t\n"
        + "3\tSpectrogram 1\t2\t6.0\t6.5\t1000\t2000\towl\t\n"
    )
    got = read_raven_table(p)
    assert [(a.start, a.end, a.label, a.channel) for a in got] == [
        (1.0, 2.0, "owl", 1),
        (3.5, 3.9, "frog,wren", 1),
        (6.0, 6.5, "owl", 2),
    ]
    assert (got[0].low_freq, got[0].high_freq) == (300.0, 900.0)  # the Spectrogram row wins
    assert sniff_label_file(p) == "raven"
    assert read_label_file(p) == ("raven", got)


def test_raven_label_column_choice(tmp_path: Path) -> None:
    p = tmp_path / "t.selections.txt"
    p.write_text(RAVEN_HEADER + "1\tSpectrogram 1\t1\t0.1\t0.2\t10\t20\towl\tnote A\n")
    assert read_raven_table(p)[0].label == "owl"  # 'Annotation' is a default candidate
    assert read_raven_table(p, label_column="notes")[0].label == "note A"  # case-insensitive
    with pytest.raises(DataError) as e:
        read_raven_table(p, label_column="Species")
    msg = str(e.value)
    assert "'Species'" in msg and "Annotation, Notes" in msg and "\n" not in msg
    q = tmp_path / "nolabel.selections.txt"
    q.write_text("Selection\tView\tBegin Time (s)\tEnd Time (s)\tComments\n1\tW\t0\t1\tx\n")
    with pytest.raises(DataError, match="no label column found.*Comments"):
        read_raven_table(q)


def test_raven_begin_file_and_file_offset(tmp_path: Path) -> None:
    p = tmp_path / "multi.selections.txt"
    p.write_text(
        "Selection\tView\tBegin Time (s)\tEnd Time (s)\tBegin File\tFile Offset (s)\tSpecies\n"
        "1\tSpectrogram 1\t2.0\t3.0\ta.wav\t2.0\towl\n"
        "2\tSpectrogram 1\t62.5\t63.0\tb.wav\t2.5\tfrog\n"
    )
    got = read_raven_table(p)
    assert [(a.file, a.start, a.end, a.label) for a in got] == [
        ("a.wav", 2.0, 3.0, "owl"),
        ("b.wav", 2.5, 3.0, "frog"),
    ]


def test_raven_not_a_table(tmp_path: Path) -> None:
    p = tmp_path / "x.selections.txt"
    p.write_text("Selection\tView\tStart\tStop\tSpecies\n1\tW\t0\t1\towl\n")
    with pytest.raises(DataError, match="Begin Time"):
        read_raven_table(p)
    q = tmp_path / "notes.txt"
    q.write_text("field notes: owls at dawn\n")
    assert sniff_label_file(q) is None
    with pytest.raises(DataError, match="neither"):
        read_label_file(q)


# ------------------------------------------------------------------------------- windows


def test_window_bounds_cover_the_recording() -> None:
    assert window_bounds(12.0, 5.0, 2.5) == [(0.0, 5.0), (2.5, 7.5), (5.0, 10.0), (7.0, 12.0)]
    assert window_bounds(10.0, 5.0, 2.5) == [(0.0, 5.0), (2.5, 7.5), (5.0, 10.0)]
    assert window_bounds(3.2, 5.0, 2.5) == [(0.0, 3.2)]
    assert window_bounds(0.0, 5.0, 2.5) == []
    for dur in (5.01, 7.3, 61.7, 3600.2):
        b = window_bounds(dur, 5.0, 1.7)
        assert b[0][0] == 0.0 and b[-1][1] == pytest.approx(dur)
        assert all(e - s == pytest.approx(5.0) for s, e in b)
        assert all(b[i + 1][0] - b[i][0] <= 1.7 + 1e-6 for i in range(len(b) - 1))


def test_overlap_rule_worked_example() -> None:
    """The worked example of data/README.md (window 5 s, hop 2.5 s, min_overlap 0.5)."""
    anns = [
        Annotation(4.0, 4.6, "A"),  # short call inside two windows
        Annotation(4.8, 5.6, "B"),  # straddles 5 s: 0.2 s in [0,5] < 0.4 s needed
        Annotation(1.0, 9.0, "C"),  # longer than a window: needs 2.5 s of it
        Annotation(11.0, 11.0, "D"),  # point label
    ]
    got = {(s, e): labs for s, e, labs in window_labels(anns, 12.0, 5.0, 2.5, 0.5)}
    assert got == {
        (0.0, 5.0): ["A", "C"],
        (2.5, 7.5): ["A", "B", "C"],
        (5.0, 10.0): ["B", "C"],
        (7.0, 12.0): ["D"],
    }


def test_overlap_rule_threshold_and_point() -> None:
    # a 2 s call needs 1 s inside a 5 s window at min_overlap 0.5; 0.9 s is not enough
    assert overlap_rule(4.0, 6.0, 0.0, 5.0, 0.5)
    assert not overlap_rule(4.1, 6.1, 0.0, 5.0, 0.5)
    assert overlap_rule(4.1, 6.1, 0.0, 5.0, 0.4)
    assert not overlap_rule(5.0, 6.0, 0.0, 5.0, 0.1)  # touching is no overlap
    assert overlap_rule(5.0, 5.0, 0.0, 5.0, 0.5) and overlap_rule(5.0, 5.0, 5.0, 10.0, 0.5)


def test_window_labels_equal_brute_force() -> None:
    """The sliced search gives what checking every (window, call) pair gives."""
    rng = np.random.default_rng(0)
    dur = 97.3
    starts = rng.uniform(0, dur, 20)
    lengths = np.where(rng.random(20) < 0.2, 0.0, rng.exponential(1.5, 20))
    anns = [
        Annotation(float(s), float(min(dur, s + d)), f"sp{k % 4}")
        for k, (s, d) in enumerate(zip(starts, lengths))
    ]
    for window, hop, mo in ((5.0, 2.5, 0.5), (3.0, 3.0, 0.25), (10.0, 1.0, 1.0)):
        fast = window_labels(anns, dur, window, hop, mo)
        slow = [
            (s, e, sorted({a.label for a in anns if overlap_rule(a.start, a.end, s, e, mo)}))
            for s, e in window_bounds(dur, window, hop)
        ]
        assert fast == slow
        assert any(labs for _, _, labs in fast) and any(not labs for _, _, labs in fast)


def test_window_labels_split_and_ignore_empty() -> None:
    anns = [Annotation(0.5, 1.0, "frog, owl"), Annotation(1.0, 2.0, "")]
    assert window_labels(anns, 3.0, 5.0, 2.5) == [(0.0, 3.0, ["frog", "owl"])]
    with pytest.raises(DataError, match="min_overlap"):
        window_labels(anns, 3.0, 5.0, 2.5, min_overlap=0.0)
