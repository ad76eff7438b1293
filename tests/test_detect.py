"""`bioaudio detect`: a tiny classifier trained on tone clips finds tone calls in a 60 s noisy
recording within one hop of the truth; Raven tables read back (read_raven_table, prepare) to the
same events; merge / threshold / min_duration rules on hand-checked score arrays; batched =
batch size 1; windows are streamed (no whole-file read); folder runs resume (also after a kill
between a table and its completion marker); bad input is a one-line error with nothing written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from test_classify import (
    FRONTEND_FLAGS,
    SR,
    TINY_FRONTEND,
    one_thread,  # noqa: F401  (autouse fixture)
    reset_accelerate,
    write_tone_dataset,
)

from bioaudio.cli import main
from bioaudio.data import datasets
from bioaudio.data.labels import read_raven_table
from bioaudio.data.manifest import PrepareConfig, build_manifest
from bioaudio.errors import ConfigError
from bioaudio.inference import detect as D
from bioaudio.models.audio_model import build_model
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export

CALLS = {"call_a": 1000.0, "call_b": 3000.0}
NAMES = ["call_a", "call_b", "noise"]  # sorted: the model's class order
WINDOW, HOP = 1.0, 0.5  # the model's training clip; detect's default hop is window / 2
TRUTH = [("call_a", 10.3, 13.1), ("call_b", 25.7, 28.4), ("call_a", 44.2, 46.9)]
RAVEN_HEADER = (
    "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)"
    "\tSpecies\tMax Prob\tMean Prob"
)


def write_recording(path: Path, seconds: float, calls: list[tuple[str, float, float]], seed: int):
    """Noise with tone calls (the training tones) at known times."""
    rng = np.random.default_rng(seed)
    x = 0.05 * rng.standard_normal(int(seconds * SR))
    for name, a, b in calls:
        i, j = int(a * SR), int(b * SR)
        x[i:j] += 0.4 * np.sin(2 * np.pi * CALLS[name] * np.arange(j - i) / SR)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), SR)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A TinyMelCNN trained by train-baseline on 1 s clips of the two tones and of noise."""
    root = tmp_path_factory.mktemp("detect")
    rng = np.random.default_rng(1)
    for i in range(8):
        n = int(rng.uniform(0.6, 1.4) * SR)
        noise = (0.05 * rng.standard_normal(n)).astype(np.float32)
        (root / "data" / "noise").mkdir(parents=True, exist_ok=True)
        sf.write(root / "data" / "noise" / f"noise_{i:02d}.wav", noise, SR)
    manifest = write_tone_dataset(root / "data", n_per_class=8, classes=CALLS)
    reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-level one_thread
    argv = [
        "train-baseline", str(manifest), "--out", str(root / "runs"), "--seeds", "0",
        "--max_steps", "80", "--lr", "3e-3", "--batch_size", "8", "--clip_seconds", "1",
        "--eval_every", "40", "--num_workers", "0", "--no-progress", "--save_every", "0",
        *FRONTEND_FLAGS,
    ]  # fmt: skip
    assert main(argv) == 0
    torch.set_num_threads(threads)
    reset_accelerate()
    return root / "runs" / "seed_0" / "export"  # the final model (best/ may be an early step)


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> Path:
    return write_recording(tmp_path_factory.mktemp("long") / "night.wav", 60.0, TRUTH, seed=2)


def detect(capsys, *argv) -> tuple[int, str, str]:
    code = main(["detect", *map(str, argv), "--no-progress", "--cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def calls_of(df: pd.DataFrame) -> list[tuple[str, float, float]]:
    df = df[df["class"] != "noise"].sort_values("start")
    return [(c, float(s), float(e)) for c, s, e in zip(df["class"], df["start"], df["end"])]


# ---------------------------------------------------------------------------- end to end


def test_detects_the_calls_and_writes_raven_tables(model, long_wav, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = detect(capsys, model, long_wav, "--out", out, "--save_windows")
    assert code == 0, err
    det = pd.read_csv(out / "detections.csv")
    assert list(det.columns) == ["file", "class", "start", "end", "max_prob", "mean_prob"]
    found = calls_of(det)
    # every call is found once, onset and offset within one hop; nothing else of a call class
    assert [c for c, _, _ in found] == [c for c, _, _ in TRUTH], found
    for (_, s, e), (_, a, b) in zip(found, TRUTH):
        assert abs(s - a) <= HOP + 1e-6 and abs(e - b) <= HOP + 1e-6, (s, e, a, b)
    assert ((det["max_prob"] >= det["mean_prob"]) & (det["mean_prob"] >= 0.5)).all()
    assert "per class: call_a 2, call_b 1" in stdout and "1 processed now" in stdout

    table = out / "night.selections.txt"
    assert table.read_text().splitlines()[0] == RAVEN_HEADER
    raw = pd.read_csv(table, sep="\t")
    assert list(raw["Selection"]) == list(range(1, len(det) + 1))
    assert (raw["View"] == "Spectrogram 1").all() and (raw["Low Freq (Hz)"] == 0).all()
    assert (raw["High Freq (Hz)"] == SR / 2).all()  # the recording's Nyquist
    back = sorted((a.label, a.start, a.end) for a in read_raven_table(table))
    assert back == sorted(zip(det["class"], det["start"], det["end"]))

    # 1 s windows every 0.5 s: 119 windows, softmax rows; the events are their positive runs
    win = pd.read_csv(out / "night.windows.csv")
    assert list(win.columns) == ["start", "end", *NAMES] and len(win) == 119
    np.testing.assert_allclose(win[NAMES].sum(axis=1), 1.0, atol=1e-5)
    again = D.merge_events(win["start"], win["end"], win[NAMES], 0.5, NAMES)
    assert [(e.label, e.start, e.end) for e in again] == list(
        zip(det["class"], det["start"], det["end"])
    )


def test_bioaudio_prepare_reads_the_tables_back_as_labels(model, long_wav, tmp_path, capsys):
    out = tmp_path / "out"
    assert detect(capsys, model, long_wav, "--out", out, "--ignore", "noise")[0] == 0
    det = pd.read_csv(out / "detections.csv")
    assert set(det["class"]) == {"call_a", "call_b"}  # --ignore: no background events
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    shutil.copy(long_wav, labelled / long_wav.name)
    shutil.copy(out / "night.selections.txt", labelled / "night.selections.txt")
    res = build_manifest(labelled, PrepareConfig(labels="auto", window=1.0, hop=0.5))
    m = res.manifest
    assert (m["source"] == "raven").all()
    for name, a, b in calls_of(det):  # windows inside an event carry its class, others none
        inside = m[(m["start"] >= a - 1e-6) & (m["end"] <= b + 1e-6)]
        assert len(inside) and (inside["labels"] == name).all()
    outside = m[m.apply(lambda r: all(r.end <= a or r.start >= b for _, a, b in TRUTH), axis=1)]
    assert len(outside) and (outside["labels"] == "").all()


# ---------------------------------------------------------------------------- rules


def test_merge_threshold_and_min_duration_by_hand():
    starts = np.arange(8) * 0.5
    ends = starts + 1.0
    p_a = np.array([0.1, 0.6, 0.7, 0.2, 0.1, 0.9, 0.4, 0.1])
    probs = np.stack([p_a, 1 - p_a], axis=1)
    ev = D.merge_events(starts, ends, probs, [0.5, 2.0], ["a", "b"])  # b can never fire
    # windows 1, 2 ([0.5, 1.5], [1, 2]) overlap -> one event; window 5 ([2.5, 3.5]) is apart
    assert [(e.label, e.start, e.end) for e in ev] == [("a", 0.5, 2.0), ("a", 2.5, 3.5)]
    assert ev[0].max_prob == pytest.approx(0.7) and ev[0].mean_prob == pytest.approx(0.65)
    assert ev[1].max_prob == ev[1].mean_prob == pytest.approx(0.9)
    # a 0.5 s gap bridged by --merge_gap 0.5; mean over the positive windows only
    (m,) = D.merge_events(starts, ends, probs, [0.5, 2.0], ["a", "b"], merge_gap=0.5)
    assert (m.start, m.end, m.max_prob) == (0.5, 3.5, pytest.approx(0.9))
    assert m.mean_prob == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    # --min_duration drops the 1 s event, keeps the 1.5 s one
    kept = D.merge_events(starts, ends, probs, [0.5, 2.0], ["a", "b"], min_duration=1.2)
    assert [(e.start, e.end) for e in kept] == [(0.5, 2.0)]
    # a threshold is inclusive (p >= t); b below 0.5 fires where a does not
    both = D.merge_events(starts, ends, probs, [0.7, 0.8], ["a", "b"])
    assert [(e.label, e.start, e.end) for e in both] == [
        ("b", 0.0, 1.0),
        ("a", 1.0, 2.0),
        ("b", 1.5, 3.0),
        ("a", 2.5, 3.5),
        ("b", 3.5, 4.5),
    ]
    # windows k and k + 2 of a half-window hop touch: one event, not two end to end
    touching = D.merge_events(starts[:5], ends[:5], [[0.9], [0.1], [0.9], [0.1], [0.1]], 0.5, ["x"])
    assert [(e.start, e.end) for e in touching] == [(0.0, 2.0)]
    # a non-overlapping hop: consecutive windows touch and merge, a skipped one splits
    flat = D.merge_events([0, 1, 2, 3], [1, 2, 3, 4], [[0.9], [0.9], [0.1], [0.9]], 0.5, ["x"])
    assert [(e.start, e.end) for e in flat] == [(0.0, 2.0), (3.0, 4.0)]


def test_thresholds_file_and_ignored_classes(tmp_path):
    f = tmp_path / "thr.csv"
    f.write_text("class,threshold\ncall_b,0.9\nnoise,0.2\n")
    rule = D.event_rule(D.DetectConfig(thresholds=f, threshold=0.4, ignore=["noise"]), NAMES)
    assert rule.thresholds == (0.4, 0.9, 0.2)
    probs = np.array([[0.45, 0.85, 0.9]])  # softmax-like row: a over 0.4; b under 0.9; noise off
    assert [e.label for e in rule.events([0.0], [1.0], probs)] == ["call_a"]
    f.write_text("call_a,0.3\n")  # no header
    assert D.read_thresholds(f, NAMES) == {"call_a": 0.3}
    for text, message in [
        ("class,threshold\nowl,0.5\n", "unknown class(es) 'owl'; the model's classes are "),
        ("call_a,1.5\n", "outside [0, 1]"),
        ("call_a,high\n", "is not a number"),
        ("call_a,0.5\ncall_a,0.6\n", "listed twice"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            D.read_thresholds(f, NAMES)


def test_multi_label_models_score_with_sigmoid(tmp_path):
    torch.manual_seed(0)
    net = BaselineClassifier.build("mlp", TINY_FRONTEND, NAMES, multi_label=True)
    scorer = D.load_scorer(save_export(net, tmp_path / "ml"))
    wav = torch.randn(3, SR) * 0.1
    with torch.no_grad():
        expected = torch.sigmoid(net.eval()(wav))
    torch.testing.assert_close(scorer(wav), expected)


def test_a_transformer_classifier_without_clip_length_uses_5_s_windows(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_model("eat", encoder="tiny", head={"num_classes": 3}, class_names=NAMES)
    exported = save_export(net, tmp_path / "eat")
    wav = write_recording(tmp_path / "six.wav", 6.0, [("call_a", 1.0, 3.0)], seed=6)
    code, _, err = detect(capsys, exported, wav, "--out", tmp_path / "o", "--save_windows")
    assert code == 0, err
    win = pd.read_csv(tmp_path / "o" / "six.windows.csv")
    # 5 s windows every 2.5 s: [0, 5] and the padded tail [2.5, 6]
    assert win[["start", "end"]].values.tolist() == [[0.0, 5.0], [2.5, 6.0]]
    np.testing.assert_allclose(win[NAMES].sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- the runner


def test_batched_equals_batch_size_one(model, long_wav):
    scorer = D.load_scorer(model)
    rule = D.event_rule(D.DetectConfig(), scorer.class_names)
    one = D.detect_file(scorer, long_wav, rule, WINDOW, HOP, batch_size=1)
    many = D.detect_file(scorer, long_wav, rule, WINDOW, 0.5, batch_size=16)
    pd.testing.assert_frame_equal(one.windows, many.windows, atol=1e-5, rtol=0)
    assert [(e.label, e.start, e.end) for e in one.events] == [
        (e.label, e.start, e.end) for e in many.events
    ]


def test_a_recording_is_streamed_window_by_window(model, long_wav, monkeypatch):
    """Bounded reads: each batch's windows come from one read of the stretch they cover (never
    the whole recording), and every window is read once."""
    from bioaudio.data import audio

    spans: list[tuple[int, float]] = []  # (windows, seconds decoded) per read
    real_load, real_windows = audio.load, audio.load_windows

    def spy_load(path, sample_rate=16000, offset=0.0, duration=None, mono=True):
        spans.append((1, duration))
        return real_load(path, sample_rate, offset, duration, mono)

    def spy_windows(path, sample_rate, windows):
        spans.append((len(windows), max(o + d for o, d in windows) - min(o for o, _ in windows)))
        return real_windows(path, sample_rate, windows)

    monkeypatch.setattr(datasets, "load", spy_load)  # the window reader's own references
    monkeypatch.setattr(datasets, "load_windows", spy_windows)
    scorer = D.load_scorer(model)
    rule = D.event_rule(D.DetectConfig(), scorer.class_names)
    det = D.detect_file(scorer, long_wav, rule, WINDOW, HOP, batch_size=8)
    assert len(det.windows) == 119
    assert sum(n for n, _ in spans) == 119  # every window read once
    assert len(spans) == 15  # one read per batch of 8
    assert all(n <= 8 and d is not None and d <= WINDOW + (n - 1) * HOP + 1e-9 for n, d in spans)


def test_short_and_unreadable_recordings_among_many(model, long_wav, tmp_path, capsys):
    folder = tmp_path / "recs"
    folder.mkdir()
    shutil.copy(long_wav, folder / "night.wav")
    write_recording(folder / "brief.wav", 0.7, [], seed=3)  # < one window, >= 0.5 s: scored
    write_recording(folder / "blip.wav", 0.3, [], seed=4)  # too short: skipped
    (folder / "broken.wav").write_bytes(b"RIFF....not audio at all")
    out = tmp_path / "out"
    code, stdout, err = detect(capsys, model, folder, "--out", out, "--window", "1")
    assert code == 0, err
    skipped = pd.read_csv(out / "skipped.csv").set_index("path")["reason"]
    assert sorted(Path(p).name for p in skipped.index) == ["blip.wav", "broken.wav"]
    assert "too short: 0.300 s" in skipped[str(folder / "blip.wav")]
    assert (out / "brief.selections.txt").is_file()
    assert "2 processed now" in stdout and "skipped 2 file(s)" in stdout
    assert "note: 1 recording(s) shorter than one 1 s window" in stdout


# ---------------------------------------------------------------------------- resuming


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        calls = [("call_a", 2.2 + i, 4.6 + i), ("call_b", 8.3, 10.1)]
        write_recording(root / f"site{i % 2}" / f"rec{i}.wav", 12.0, calls, seed=10 + i)
    return root


def test_folder_runs_resume_and_add_new_recordings(model, tmp_path, capsys):
    folder = _folder(tmp_path / "recs", 2)
    out = tmp_path / "out"
    code, stdout, err = detect(capsys, model, folder, "--out", out)
    assert code == 0, err
    tables = sorted(out.rglob("*.selections.txt"))
    assert [t.relative_to(out).as_posix() for t in tables] == [
        "site0/rec0.selections.txt",
        "site1/rec1.selections.txt",
    ]
    stamps = {t: t.stat().st_mtime_ns for t in tables}
    first = pd.read_csv(out / "detections.csv")

    code, stdout, err = detect(capsys, model, folder, "--out", out)
    assert code == 0, err
    assert "0 processed now" in stdout and "2 already done" in stdout
    assert {t: t.stat().st_mtime_ns for t in tables} == stamps  # untouched
    pd.testing.assert_frame_equal(pd.read_csv(out / "detections.csv"), first)

    _folder(tmp_path / "more", 3)
    shutil.copy(tmp_path / "more" / "site0" / "rec2.wav", folder / "site0" / "rec2.wav")
    code, stdout, err = detect(capsys, model, folder, "--out", out)
    assert code == 0, err
    assert "1 processed now" in stdout and "2 already done" in stdout
    assert {t: t.stat().st_mtime_ns for t in tables} == stamps
    det = pd.read_csv(out / "detections.csv")
    straight = tmp_path / "straight"
    assert detect(capsys, model, folder, "--out", straight)[0] == 0
    pd.testing.assert_frame_equal(det, pd.read_csv(straight / "detections.csv"))
    assert not det.duplicated().any()
    assert sorted(set(det["file"])) == [
        str(folder / "site0" / "rec0.wav"),
        str(folder / "site0" / "rec2.wav"),
        str(folder / "site1" / "rec1.wav"),
    ]


def test_a_kill_between_table_and_marker_is_redone(model, tmp_path, capsys, monkeypatch):
    folder = _folder(tmp_path / "recs", 3)
    out = tmp_path / "out"
    real = D.write_raven_table
    calls = []

    def killed_on_second(*args, **kwargs):
        calls.append(args[0])
        real(*args, **kwargs)  # the table is complete on disk...
        if len(calls) == 2:
            raise KeyboardInterrupt  # ...but the run dies before marking it finished

    monkeypatch.setattr(D, "write_raven_table", killed_on_second)
    code, _, err = detect(capsys, model, folder, "--out", out)
    assert code == 130 and "interrupted" in err
    assert not (out / "detections.csv").exists()
    monkeypatch.setattr(D, "write_raven_table", real)
    code, stdout, err = detect(capsys, model, folder, "--out", out)
    assert code == 0, err
    assert "2 processed now" in stdout and "1 already done" in stdout
    straight = tmp_path / "straight"
    assert detect(capsys, model, folder, "--out", straight)[0] == 0
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "detections.csv"), pd.read_csv(straight / "detections.csv")
    )


def test_other_settings_and_foreign_files_need_overwrite(model, long_wav, tmp_path, capsys):
    out = tmp_path / "out"
    assert detect(capsys, model, long_wav, "--out", out)[0] == 0
    code, _, err = detect(capsys, model, long_wav, "--out", out, "--threshold", "0.9")
    assert code == 2 and "other settings (thresholds)" in err and err.count("\n") == 1
    code, stdout, err = detect(capsys, model, long_wav, "--out", out, "--threshold", "0.9",
                               "--overwrite")  # fmt: skip
    assert code == 0 and "1 processed now" in stdout, err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "night.selections.txt").write_text("my own annotations\n")
    code, _, err = detect(capsys, model, long_wav, "--out", foreign)
    assert code == 2 and "was not written by bioaudio detect" in err
    assert (foreign / "night.selections.txt").read_text() == "my own annotations\n"
    assert sorted(p.name for p in foreign.iterdir()) == ["night.selections.txt"]
    assert detect(capsys, model, long_wav, "--out", foreign, "--overwrite")[0] == 0
    assert (foreign / "night.selections.txt").read_text().startswith("Selection\t")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("audio_folder_as_model", "neither an export folder"),
        ("text_file_as_model", "not a checkpoint format"),
        ("encoder_only", "detect needs a classifier: finetune first"),
        ("unknown_class", "unknown class(es) 'owl'; the model's classes are call_a, call_b, noise"),
        ("threshold_out_of_range", "--threshold must be in [0, 1]"),
        ("file_threshold_out_of_range", "threshold 1.2 is outside [0, 1]"),
        ("hop_zero", "--hop must be positive"),
        ("hop_over_window", "--hop 2 is longer than the window (1 s)"),
        ("too_short", "too short: 0.300 s (detect needs at least 0.5 s)"),
        ("missing_input", "input not found"),
    ],
)
def test_bad_input_is_a_one_line_error(model, long_wav, tmp_path, capsys, case, message):
    m, audio, extra = model, long_wav, []
    if case == "audio_folder_as_model":
        m = long_wav.parent
    elif case == "text_file_as_model":
        m = tmp_path / "model.txt"
        m.write_text("not a model")
    elif case == "encoder_only":
        m = save_export(build_model("eat", encoder="tiny"), tmp_path / "encoder")
    elif case in ("unknown_class", "file_threshold_out_of_range"):
        thr = tmp_path / "thr.csv"
        thr.write_text("owl,0.5\n" if case == "unknown_class" else "call_a,1.2\n")
        extra = ["--thresholds", thr]
    elif case == "threshold_out_of_range":
        extra = ["--threshold", "1.5"]
    elif case == "hop_zero":
        extra = ["--hop", "0"]
    elif case == "hop_over_window":
        extra = ["--hop", "2"]
    elif case == "too_short":
        audio = write_recording(tmp_path / "blip.wav", 0.3, [], seed=5)
    else:
        audio = tmp_path / "missing.wav"
    out = tmp_path / "out"
    code, _, err = detect(capsys, m, audio, "--out", out, *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("bioaudio detect: error:")
    assert message in err, err
    assert not out.exists()  # nothing written
