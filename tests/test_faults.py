"""Hostile input and faults (issue "Reliability", items 7 and 8): the user's files are never
clobbered, impossible outputs and bad files are one-line errors, nothing is silently wrong,
interrupted runs leave nothing behind forever, and no checkpoint can run code.

Every test here failed before its fix, except the two marked "already held" (they pin down
behaviour that was right and must stay so)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import time
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
from bioaudio.errors import CheckpointError
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import load_model, save_export

NAMES = ["high", "low", "mid"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def cli(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def wav(path: Path, seconds: float = 0.5, sr: int = SR, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """An untrained TinyMelCNN export (what infer / evaluate / convert read)."""
    torch.manual_seed(0)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, NAMES)
    model.provenance = {"clip_seconds": 1.0}
    return save_export(model, tmp_path_factory.mktemp("clf") / "export")


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(export: Path, fn) -> None:
    path = export / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


# ============================================================================ 1. clobbering


def test_split_refuses_to_overwrite_audio_the_input_and_foreign_files(tones, tmp_path, capsys):
    clip = next((tones.parent / "low").glob("*.wav"))
    before = clip.read_bytes()
    code, _, err = cli(capsys, "split", tones, "--out", clip)
    assert code == 2 and clip.read_bytes() == before
    one_line_error(err, str(clip), "audio")
    manifest_before = tones.read_bytes()
    code, _, err = cli(capsys, "split", tones, "--out", tones)
    assert code == 2 and tones.read_bytes() == manifest_before
    one_line_error(err, "input")
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\nspread,sheet\n")
    code, _, err = cli(capsys, "split", tones, "--out", notes)
    assert code == 2 and notes.read_text() == "my,own\nspread,sheet\n"
    one_line_error(err, str(notes), "--overwrite")
    # our own earlier output is replaced; --overwrite replaces anything
    ours = tmp_path / "ours.csv"
    assert cli(capsys, "split", tones, "--out", ours)[0] == 0
    assert cli(capsys, "split", tones, "--out", ours, "--seed", "3")[0] == 0
    assert cli(capsys, "split", tones, "--out", notes, "--overwrite")[0] == 0
    assert "split" in pd.read_csv(notes).columns


def test_stats_refuses_to_overwrite_foreign_files(tones, tmp_path, capsys):
    mine = tmp_path / "settings.json"
    mine.write_text('{"my": "settings"}')
    flags = ["--frontend", "logmel", *FRONTEND_FLAGS, "--max_clips", "2", "--max_seconds", "0.2"]
    code, _, err = cli(capsys, "stats", tones, "--out", mine, *flags)
    assert code == 2 and json.loads(mine.read_text()) == {"my": "settings"}
    one_line_error(err, str(mine))
    clip = next((tones.parent / "mid").glob("*.wav"))
    before = clip.read_bytes()
    assert cli(capsys, "stats", tones, "--out", clip, *flags)[0] == 2
    assert clip.read_bytes() == before
    out = tmp_path / "stats.json"
    assert cli(capsys, "stats", tones, "--out", out, *flags)[0] == 0
    assert cli(capsys, "stats", tones, "--out", out, *flags, "--seed", "1")[0] == 0  # ours
    assert cli(capsys, "stats", tones, "--out", mine, *flags, "--overwrite")[0] == 0
    assert "mean" in json.loads(mine.read_text())


def test_prepare_refuses_to_overwrite_files_it_did_not_write(tmp_path, capsys):
    data = tmp_path / "data"
    wav(data / "a" / "x.wav")
    wav(data / "b" / "y.wav")
    theirs = data / "manifest.csv"
    theirs.write_text("site,observer\nA,me\n")
    code, _, err = cli(capsys, "prepare", data, "--no-progress")
    assert code == 2 and theirs.read_text() == "site,observer\nA,me\n"
    one_line_error(err, str(theirs), "--overwrite")
    code, _, err = cli(capsys, "prepare", data, "--no-progress", "--out", data / "a" / "x.wav")
    assert code == 2 and sf.info(str(data / "a" / "x.wav")).frames > 0
    assert cli(capsys, "prepare", data, "--no-progress", "--overwrite")[0] == 0
    assert cli(capsys, "prepare", data, "--no-progress")[0] == 0  # now it is ours


def test_skipped_csv_is_named_after_its_manifest(tmp_path, capsys):
    data = tmp_path / "data"
    wav(data / "a" / "x.wav")
    wav(data / "b" / "y.wav")
    (data / "a" / "bad.wav").write_bytes(b"RIFF nonsense")
    out = tmp_path / "out"
    assert cli(capsys, "prepare", data, "--no-progress", "--out", out / "one.csv")[0] == 0
    assert cli(capsys, "prepare", data, "--no-progress", "--out", out / "two.csv",
               "--labels", "none")[0] == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "one.csv", "one.skipped.csv", "two.csv", "two.skipped.csv"
    ]  # fmt: skip
    assert len(pd.read_csv(out / "one.skipped.csv")) == 1
    assert cli(capsys, "prepare", data, "--no-progress")[0] == 0
    assert (data / "skipped.csv").is_file()  # the default manifest keeps skipped.csv


def test_run_summary_covers_every_finished_run(tones, tmp_path, capsys):
    out = tmp_path / "runs"
    quick = ["--max_steps", "2", "--batch_size", "4", "--clip_seconds", "0.5", "--num_workers",
             "0", "--no-progress", "--eval_every", "0", *FRONTEND_FLAGS]  # fmt: skip
    assert cli(capsys, "train-baseline", tones, "--out", out, "--seeds", "1", *quick)[0] == 0
    assert cli(capsys, "train-baseline", tones, "--out", out, "--seeds", "2", *quick)[0] == 0
    table = pd.read_csv(out / "run_summary.csv")
    assert table["run"].tolist() == ["seed_1", "seed_2", "mean", "std"]
    assert table["seed"].iloc[:2].tolist() == [1, 2]


def test_demo_data_rerun_keeps_the_users_files(tmp_path):
    from bioaudio.data.demo import generate_demo_data

    out = tmp_path / "demo"
    generate_demo_data(out, seed=0, n_per_class=2, n_unlabelled=2, soundscapes=0)
    mine = out / "by_class" / "my_recording.wav"
    wav(mine)
    notes = out / "labelled" / "my_notes.txt"
    notes.write_text("keep me")
    first = sorted(p.relative_to(out) for p in (out / "unlabelled").rglob("*.*"))
    generate_demo_data(out, seed=0, n_per_class=2, n_unlabelled=1, soundscapes=0)
    assert mine.is_file() and notes.read_text() == "keep me"
    now = sorted(p.relative_to(out) for p in (out / "unlabelled").rglob("*.*"))
    assert len(now) == 1 and len(first) == 2  # its own old files are replaced


# ============================================================================ 2. one-line errors


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from bioaudio.models.audio_model import build_model

    torch.manual_seed(0)
    return save_export(build_model("eat", "tiny"), tmp_path_factory.mktemp("enc") / "eat")


@pytest.mark.parametrize(
    "command",
    ["prepare", "split", "stats", "features", "preview", "train-baseline", "finetune",
     "pretrain", "infer", "evaluate", "convert", "demo-data"],
)  # fmt: skip
def test_impossible_output_paths_are_one_line_errors(
    command, tones, classifier, encoder, tmp_path, capsys
):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker / "out"
    clip = next((tones.parent / "low").glob("*.wav"))
    quick = ["--num_workers", "0", "--no-progress"]
    argv = {
        "prepare": ["prepare", tones.parent, "--out", target / "m.csv", "--no-progress"],
        "split": ["split", tones, "--out", target / "s.csv"],
        "stats": ["stats", tones, "--out", target / "stats.json", "--frontend", "logmel"],
        "features": ["features", tones, "--out", target, "--frontend", "logmel"],
        "preview": ["preview", tones, "--out", target / "p.png"],
        "train-baseline": ["train-baseline", tones, "--out", target, "--max_steps", "1",
                           "--batch_size", "2", *quick, *FRONTEND_FLAGS],
        "finetune": ["finetune", tones, "--model_path", encoder, "--out", target,
                     "--max_steps", "1", "--batch_size", "2", *quick],
        "pretrain": ["pretrain", tones.parent, "--out", target, "--model", "eat", "--preset",
                     "tiny", "--max_steps", "1", "--batch_size", "2", *quick],
        "infer": ["infer", classifier, clip, "--out", target, "--no-progress"],
        "evaluate": ["evaluate", classifier, tones, "--out", target, "--no-progress"],
        "convert": ["convert", classifier, target],
        "demo-data": ["demo-data", target, "--n_per_class", "1"],
    }[command]  # fmt: skip
    code, _, err = cli(capsys, *argv)
    assert code == 2
    one_line_error(err, str(blocker))
    assert blocker.read_text() == "a file, not a folder"


def test_os_errors_while_writing_are_one_line(monkeypatch, tones, capsys):
    import bioaudio.commands.split as split_cmd

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/readonly/manifest.split.csv")

    monkeypatch.setattr(split_cmd, "write_manifest", denied)
    code, _, err = cli(capsys, "split", tones, "--overwrite")
    assert code == 2
    one_line_error(err, "/readonly/manifest.split.csv", "Permission denied")


def test_symlinked_files_and_class_folders(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    wav(outside / "far.wav")
    wav(outside / "frogs_src" / "f1.wav")
    wav(outside / "frogs_src" / "f2.wav")
    data = tmp_path / "data"
    wav(data / "bird" / "b1.wav")
    (data / "bird" / "far.wav").symlink_to(outside / "far.wav")
    (data / "bird" / "gone.wav").symlink_to(outside / "missing.wav")  # dangling
    (data / "frog").symlink_to(outside / "frogs_src", target_is_directory=True)
    (outside / "frogs_src" / "loop").symlink_to(outside / "frogs_src", target_is_directory=True)
    code, _, err = cli(capsys, "prepare", data, "--no-progress", "--labels", "folders")
    assert code == 0, err
    m = pd.read_csv(data / "manifest.csv")
    labels = dict(zip(m["path"], m["labels"]))
    assert labels == {
        "bird/b1.wav": "bird", "bird/far.wav": "bird", "frog/f1.wav": "frog", "frog/f2.wav": "frog"
    }  # fmt: skip
    skipped = pd.read_csv(data / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["gone.wav"]
    assert "dangling" in skipped["reason"].iloc[0]
    # pairs layout, a symlink leaving the tree
    pairs = tmp_path / "pairs"
    wav(pairs / "positive" / "p.wav")
    wav(pairs / "negative" / "n.wav")
    (pairs / "positive" / "far.wav").symlink_to(outside / "far.wav")
    (pairs / "negative" / "gone.wav").symlink_to(outside / "missing.wav")
    assert cli(capsys, "prepare", pairs, "--no-progress")[0] == 0
    m = pd.read_csv(pairs / "manifest.csv")
    assert dict(zip(m["path"], m["labels"]))["positive/far.wav"] == "positive"
    assert len(pd.read_csv(pairs / "skipped.csv")) == 1


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["frontend"].update(sample_rate=0), "sample_rate"),
        (lambda c: c["frontend"].update(hop_length=0), "hop_length"),
        (lambda c: c["frontend"].update(n_mels="16"), "n_mels"),
        (lambda c: c["provenance"].update(clip_seconds="five"), "clip_seconds"),
        (lambda c: c.update(multi_label="yes"), "multi_label"),
        (lambda c: c["frontend"].update(std=float("nan")), "std"),
        (lambda c: c["frontend"].update(mean=1e400), "mean"),
    ],
)
def test_bad_export_configs_are_checkpoint_errors(classifier, tmp_path, capsys, edit, match):
    bad = copy_export(classifier, tmp_path / "bad")
    edit_config(bad, edit)
    with pytest.raises(CheckpointError, match=match):
        load_model(bad)
    code, _, err = cli(capsys, "infer", bad, tmp_path, "--no-progress", "--out", tmp_path / "o")
    assert code == 2
    one_line_error(err, match)


def test_safetensors_header_entry_without_data_offsets(tmp_path):
    from bioaudio.models.checkpoint import read_safetensors

    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="data_offsets"):
        read_safetensors(path)


def test_convert_a_trained_baseline(classifier, tmp_path, capsys):
    model = load_model(classifier)
    assert model.describe() == "baseline tiny_mel_cnn, 3 classes"
    code, out, err = cli(capsys, "convert", classifier, tmp_path / "copy")
    assert code == 0, err
    assert "baseline tiny_mel_cnn, 3 classes" in out and "verified" in out
    again = load_model(tmp_path / "copy")
    wav_ = 0.1 * torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.equal(model(wav_), again(wav_))


def test_config_file_that_is_not_utf8(tones, tmp_path, capsys):
    cfg = tmp_path / "opts.yaml"
    cfg.write_bytes(b"seed: 1\nnote: \xff\xfe caf\xe9\n")
    code, _, err = cli(capsys, "split", tones, "--config", cfg)
    assert code == 2
    one_line_error(err, str(cfg), "UTF-8")


# ============================================================================ 3. silent wrong results


def test_infer_folder_lists_clips_shorter_than_a_frame(classifier, tmp_path, capsys):
    folder = tmp_path / "in"
    wav(folder / "ok.wav", seconds=1.0)
    wav(folder / "tiny.wav", seconds=0.005)  # 80 samples: less than one 256-sample frame
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "infer", classifier, folder, "--out", out, "--no-progress")
    assert code == 0, err
    assert pd.read_csv(out / "predictions.csv")["file"].tolist() == ["ok.wav"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["tiny.wav"]
    assert "short" in skipped["reason"].iloc[0]


def test_flipped_weight_bytes_are_detected(classifier, tmp_path):
    cfg = json.loads((classifier / "config.json").read_text())
    assert len(cfg["weights_sha256"]) == 64
    bad = copy_export(classifier, tmp_path / "flipped")
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-5] ^= 0x40  # inside the last tensor's data: still a valid float
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(bad)
    old = copy_export(classifier, tmp_path / "old")
    edit_config(old, lambda c: c.pop("weights_sha256"))
    load_model(old)  # exports written before the hash load unchecked


def test_non_finite_weights_are_refused_and_json_has_no_nan(classifier, tmp_path):
    from safetensors.torch import load_file, save_file

    from bioaudio.fileio import save_json_atomic

    bad = copy_export(classifier, tmp_path / "nan")
    state = load_file(str(bad / "model.safetensors"))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key][0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    edit_config(bad, lambda c: c.pop("weights_sha256", None))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(bad)
    save_json_atomic(tmp_path / "r.json", {"p": float("nan"), "q": [1.0, float("inf")]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"p": None, "q": [1.0, None]}


def test_non_finite_probabilities_are_an_error_not_a_nan_record(
    classifier, tmp_path, capsys, monkeypatch
):
    import bioaudio.inference.infer as infer_mod

    real = infer_mod.predict_clips

    def nan_scores(*args, **kwargs):
        clips = real(*args, **kwargs)
        clips.scores[:] = np.nan
        return clips

    monkeypatch.setattr(infer_mod, "predict_clips", nan_scores)
    clip = wav(tmp_path / "in" / "a.wav", seconds=1.0)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "infer", classifier, clip, "--out", out, "--no-progress")
    assert code == 2
    one_line_error(err, "non-finite probabilities")
    assert not (out / "a.json").exists()
    code, _, err = cli(capsys, "infer", classifier, clip.parent, "--out", out, "--no-progress")
    assert code == 2 and not (out / "predictions.csv").exists()


def test_negative_top_db_is_refused(tones, capsys):  # already held
    code, _, err = cli(capsys, "stats", tones, "--frontend", "logmel", "--top_db", "-5")
    assert code == 2
    one_line_error(err, "--top_db")


def test_resume_with_another_frontend_is_refused(tones, tmp_path, capsys):
    out = tmp_path / "runs"
    quick = ["--max_steps", "2", "--batch_size", "4", "--clip_seconds", "0.5", "--num_workers",
             "0", "--no-progress", "--eval_every", "0", "--n_fft", "256", "--hop_length", "160"]  # fmt: skip
    code, _, err = cli(capsys, "train-baseline", tones, "--out", out, "--n_mels", "16", *quick)
    assert code == 0, err
    before = (out / "seed_42" / "config.json").read_text()
    code, _, err = cli(capsys, "train-baseline", tones, "--out", out, "--n_mels", "24", *quick)
    assert code == 2
    one_line_error(err, "n_mels", "16", "24")
    assert (out / "seed_42" / "config.json").read_text() == before


def test_raven_rows_sharing_a_selection_number_stay_separate(tmp_path):
    from bioaudio.data.labels import read_raven_table

    table = tmp_path / "rec.selections.txt"
    table.write_text(
        "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tSpecies\n"
        "1\tWaveform 1\t1\t1.0\t2.0\towl\n"
        "1\tSpectrogram 1\t1\t1.0\t2.0\towl\n"
        "1\tSpectrogram 1\t1\t5.0\t6.0\twren\n"  # a second call, numbered 1 again (merged tables)
        "2\tSpectrogram 1\t1\t8.0\t9.0\towl\n"
    )
    anns = read_raven_table(table)
    assert [(a.start, a.label) for a in anns] == [(1.0, "owl"), (5.0, "wren"), (8.0, "owl")]


def test_final_weights_that_are_not_finite_are_not_exported(tmp_path):
    from train_toy import ToyOptions, ToyTask, build

    from bioaudio.training.loop import DivergenceError, TrainConfig

    def poison(self, model, ctx):
        original(self, model, ctx)
        if ctx.step == 3:
            with torch.no_grad():
                model.head.weight.fill_(float("inf"))

    original = ToyTask.on_step_end
    cfg = TrainConfig(out_dir=tmp_path, max_steps=5, batch_size=8, lr=0.05, save_every=0,
                      log_every=1, eval_every=0, num_workers=0, progress=False, seed=0)  # fmt: skip
    trainer, task, _ = build(cfg, ToyOptions(n_eval=0))
    task.on_step_end = poison.__get__(task)
    with pytest.raises(DivergenceError, match="non-finite weights") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["error"]
    assert not (tmp_path / "export").exists()


def test_truncated_wav_is_listed(tmp_path, capsys):
    data = tmp_path / "data"
    wav(data / "whole.wav", seconds=1.0)
    cut = wav(data / "cut.wav", seconds=1.0)
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    assert cli(capsys, "prepare", data, "--no-progress", "--labels", "none")[0] == 0
    m = pd.read_csv(data / "manifest.csv")
    assert m["path"].tolist() == ["whole.wav"]
    skipped = pd.read_csv(data / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["cut.wav"]
    assert "16000" in skipped["reason"].iloc[0] and "truncated" in skipped["reason"].iloc[0]


def test_unreadable_training_files_are_skipped_and_counted(tmp_path, capsys):
    manifest = write_tone_dataset(tmp_path / "data", n_per_class=4)
    df = pd.read_csv(manifest)
    df["split"] = ["test" if i % 4 == 0 else "train" for i in range(len(df))]
    train_rows = df.index[df["split"] == "train"]
    (manifest.parent / df["path"][train_rows[0]]).unlink()  # missing
    (manifest.parent / df["path"][train_rows[1]]).write_bytes(b"RIFF" + b"\0" * 200)  # corrupt
    df.to_csv(manifest, index=False)
    out = tmp_path / "runs"
    code, stdout, err = cli(
        capsys, "train-baseline", manifest, "--out", out, "--max_steps", "3", "--batch_size", "4",
        "--clip_seconds", "0.5", "--num_workers", "0", "--no-progress", "--eval_every", "0",
        "--val", "0", *FRONTEND_FLAGS,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "seed_42" / "summary.json").read_text())
    assert summary["skipped_files"] == 2
    skipped = pd.read_csv(out / "seed_42" / "skipped.csv")
    assert len(skipped) == 2 and skipped["reason"].str.len().gt(0).all()
    assert "skipped 2 unreadable" in stdout


def test_unreadable_validation_and_test_files_are_skipped_and_listed(tmp_path, capsys):
    # Files that break after `prepare` in the validation and test sets: the run finishes,
    # validation and test metrics cover the readable clips, and skipped.csv lists both files.
    manifest = write_tone_dataset(tmp_path / "data", n_per_class=6)
    df = pd.read_csv(manifest)
    df["split"] = [
        "val" if i % 3 == 0 else "test" if i % 3 == 1 else "train" for i in range(len(df))
    ]
    bad_val = df["path"][df.index[df["split"] == "val"][0]]
    bad_test = df["path"][df.index[df["split"] == "test"][0]]
    for rel in (bad_val, bad_test):
        (manifest.parent / rel).write_bytes(b"RIFF" + b"\x07" * 300)  # garbage after prepare
    df.to_csv(manifest, index=False)
    out = tmp_path / "runs"
    code, stdout, err = cli(
        capsys, "train-baseline", manifest, "--out", out, "--max_steps", "4", "--batch_size", "4",
        "--clip_seconds", "0.5", "--num_workers", "0", "--no-progress", "--eval_every", "2",
        *FRONTEND_FLAGS,
    )  # fmt: skip
    assert code == 0, err
    run = out / "seed_42"
    skipped = pd.read_csv(run / "skipped.csv")
    assert {Path(p).name for p in skipped["path"]} == {Path(bad_val).name, Path(bad_test).name}
    assert skipped["reason"].str.len().gt(0).all()
    assert json.loads((run / "summary.json").read_text())["skipped_files"] == 2
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test_skipped_files"] == 1
    n_test = int((df["split"] == "test").sum())
    assert len(pd.read_csv(run / "test_predictions.csv")) == n_test - 1
    history = pd.read_csv(run / "metrics.csv")
    assert history["eval/accuracy"].notna().any()  # validation ran over the readable clips
    assert "skipped 2 unreadable" in stdout


@pytest.mark.slow
def test_two_processes_skip_and_count_unreadable_files_of_every_split(tmp_path):
    # Under two processes each rank reads its share: a broken training, validation and test file
    # are skipped wherever they land, listed once in skipped.csv, and left out of the test metrics.
    import socket
    import subprocess
    import sys

    manifest = write_tone_dataset(tmp_path / "data", n_per_class=6)
    df = pd.read_csv(manifest)
    df["split"] = [
        "val" if i % 3 == 0 else "test" if i % 3 == 1 else "train" for i in range(len(df))
    ]
    bad = [df["path"][df.index[df["split"] == s][0]] for s in ("train", "val", "test")]
    for rel in bad:
        (manifest.parent / rel).write_bytes(b"RIFF" + b"\x07" * 300)
    df.to_csv(manifest, index=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--main_process_port", str(port), "-m", "bioaudio"]
    cmd += ["train-baseline", str(manifest), "--out", str(out), "--max_steps", "4"]
    cmd += ["--batch_size", "4", "--clip_seconds", "0.5", "--num_workers", "0", "--no-progress"]
    cmd += ["--eval_every", "2", *map(str, FRONTEND_FLAGS)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / "seed_42"
    assert json.loads((run / "summary.json").read_text())["num_processes"] == 2
    skipped = pd.read_csv(run / "skipped.csv")
    assert sorted(Path(p).name for p in skipped["path"]) == sorted(Path(p).name for p in bad)
    assert skipped["reason"].str.len().gt(0).all()
    assert json.loads((run / "summary.json").read_text())["skipped_files"] == 3
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test_skipped_files"] == 1
    predicted = pd.read_csv(run / "test_predictions.csv")
    assert len(predicted) == int((df["split"] == "test").sum()) - 1
    assert Path(bad[2]).name not in set(predicted["path"].map(lambda p: Path(p).name))


def test_an_fsdp_launch_is_a_one_line_error(tmp_path):
    # `accelerate launch --use_fsdp`: refused before any work (without a GPU Accelerate itself
    # cannot start FSDP; with one, the toolkit refuses it), one line per process, no traceback
    import socket
    import subprocess
    import sys

    manifest = write_tone_dataset(tmp_path / "data", n_per_class=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes"]
    cmd += ["2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(port), "-m", "bioaudio", "train-baseline", str(manifest)]
    cmd += ["--out", str(tmp_path / "runs"), "--max_steps", "1", "--batch_size", "2"]
    cmd += ["--no-progress", *map(str, FRONTEND_FLAGS)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("bioaudio train")]
    assert 1 <= len(ours) <= 2, res.stderr[-3000:]  # the launcher may stop one first
    assert all(line.startswith("bioaudio train-baseline: error: ") for line in ours)
    assert all("FSDP" in line for line in ours)
    assert 'File "' not in "\n".join(
        line for line in res.stderr.splitlines() if "bioaudio/" in line
    ), res.stderr[-3000:]  # no traceback through our code
    assert not (tmp_path / "runs" / "seed_42" / "state").exists()


# ============================================================================ 4. leftovers


def test_features_removes_stale_temporary_folders(tones, tmp_path, capsys):
    from bioaudio.fileio import temp_dir_beside

    out = tmp_path / "cache"
    live = temp_dir_beside(out)  # made by this (running) process: kept
    host = re.match(r"\.cache\.tmp-p(\d+)h([0-9a-f]+)-", live.name).group(2)
    dead = tmp_path / f".cache.tmp-p{2**22 + 12345}h{host}-x"  # a process that is gone
    dead.mkdir()
    old = tmp_path / ".cache.tmp-abc123"  # the earlier naming: removed once a day old
    old.mkdir()
    (old / "features.f32").write_bytes(b"\0" * 16)
    stamp = time.time() - 2 * 86400
    os.utime(old, (stamp, stamp))
    recent = tmp_path / ".cache.tmp-def456"
    recent.mkdir()
    other = tmp_path / ".notes.tmp-abc"  # not ours
    other.mkdir()
    code, _, err = cli(capsys, "features", tones, "--out", out, "--frontend", "logmel",
                       *FRONTEND_FLAGS, "--num_workers", "0", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert live.is_dir() and recent.is_dir() and other.is_dir()
    assert not dead.exists() and not old.exists()


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path, capsys):
    # Every atomic file write and every export / run-export folder cleans what a killed writer
    # of the same target left: a dead process's temp files and folders go, a live one's stay.
    from bioaudio.fileio import _host_tag, write_csv_atomic

    host, dead_pid = _host_tag(), 2**22 + 12345
    dead_file = tmp_path / f".metrics.tmp-p{dead_pid}h{host}-abc123.csv"
    live_file = tmp_path / f".metrics.tmp-p{os.getpid()}h{host}-def456.csv"
    other_kind = tmp_path / f".metrics.tmp-p{dead_pid}h{host}-abc123.json"  # another target
    for f in (dead_file, live_file, other_kind):
        f.write_text("half-written")
    write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "metrics.csv")
    assert pd.read_csv(tmp_path / "metrics.csv")["a"].tolist() == [1]
    assert not dead_file.exists() and live_file.exists() and other_kind.exists()
    assert [p.name for p in tmp_path.glob(".metrics.tmp-*.csv")] == [live_file.name]

    # a run killed while exporting: the next run's export removes the half-written folder
    manifest = write_tone_dataset(tmp_path / "data", n_per_class=3)
    out = tmp_path / "runs"
    stale = out / "seed_42" / f".export.tmp-p{dead_pid}h{host}-zz"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 8)
    code, _, err = cli(
        capsys, "train-baseline", manifest, "--out", out, "--max_steps", "2", "--batch_size", "4",
        "--clip_seconds", "0.5", "--num_workers", "0", "--no-progress", "--eval_every", "0",
        *FRONTEND_FLAGS,
    )  # fmt: skip
    assert code == 0, err
    assert not stale.exists() and (out / "seed_42" / "export" / "config.json").is_file()
    assert not list((out / "seed_42").glob(".*tmp*"))


# ============================================================================ 5. untrusted checkpoints


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pt(path: Path, marker: Path, payload_key: str = "cfg") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({payload_key: _Evil(marker), "model": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize("how", ["load_model", "load_tokenizer", "hf_bin", "convert"])
def test_malicious_checkpoints_run_nothing(how, tmp_path, capsys):  # already held
    from bioaudio.models.checkpoint import load_tokenizer

    marker = tmp_path / "PWNED"
    evil = _evil_pt(tmp_path / "evil.pt", marker)
    if how == "load_model":
        with pytest.raises(CheckpointError, match="refusing"):
            load_model(evil)
    elif how == "load_tokenizer":
        with pytest.raises(CheckpointError, match="refusing"):
            load_tokenizer(evil)
    elif how == "hf_bin":
        folder = tmp_path / "hf"
        folder.mkdir()
        shutil.move(evil, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({"embed_dim": 8, "num_heads": 2}))
        with pytest.raises(CheckpointError, match="refusing"):
            load_model(folder)
    else:
        code, _, err = cli(capsys, "convert", evil, tmp_path / "out")
        assert code == 2
        one_line_error(err, "refusing")
    assert not marker.exists()


@pytest.mark.parametrize(
    "victim", ["random_states_0.pkl", "optimizer.bin", "task_state_0.pt", "scheduler.bin"]
)
def test_malicious_training_state_runs_nothing(victim, tmp_path):
    from train_toy import ToyOptions, build

    from bioaudio.training.loop import TrainConfig

    cfg = TrainConfig(out_dir=tmp_path / "run", max_steps=2, batch_size=8, lr=0.05, save_every=1,
                      log_every=1, eval_every=0, num_workers=0, progress=False, seed=0)  # fmt: skip
    trainer, _, _ = build(cfg, ToyOptions(n_eval=0))
    trainer.fit()
    state = tmp_path / "run" / "state" / "step_2"
    marker = tmp_path / "PWNED"
    _evil_pt(state / victim, marker)
    reset_accelerate()
    cfg.max_steps = 3
    trainer, _, _ = build(cfg, ToyOptions(n_eval=0))
    with pytest.raises(CheckpointError, match="refusing") as e:
        trainer.fit()
    assert "\n" not in str(e.value) and victim in str(e.value)
    assert not marker.exists()


def test_plain_pickle_state_file_runs_nothing(tmp_path):
    from bioaudio.models.checkpoint import check_pickle_file

    marker = tmp_path / "PWNED"
    path = tmp_path / "random_states_0.pkl"
    path.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match=r"refusing .*system"):
        check_pickle_file(path)
    ok = tmp_path / "ok.pkl"
    torch.save({"random_state": ("x", np.arange(3, dtype=np.uint32)), "t": torch.ones(2)}, ok)
    check_pickle_file(ok)
    assert not marker.exists()


def test_out_folders_of_another_kind_are_refused_before_any_work(tmp_path, capsys):
    # `pretrain --out` a finetune RUN_ROOT, `finetune --out` a pretraining run or the data folder:
    # one line, nothing written; the command's own folders (re-runs) pass
    from bioaudio.errors import ConfigError
    from bioaudio.training.rundir import check_out_folder

    pre = tmp_path / "pre"
    (pre / "export").mkdir(parents=True)
    (pre / "config.json").write_text(json.dumps({"command": "pretrain"}))
    root = tmp_path / "ft"
    (root / "seed_42").mkdir(parents=True)
    (root / "seed_42" / "config.json").write_text(json.dumps({"command": "finetune"}))
    (root / "run_summary.csv").write_text("run\n")
    data = tmp_path / "data"
    (data / "owl").mkdir(parents=True)
    (data / "README.txt").write_text("my recordings")
    refused = [
        (root, "pretrain", "run", "holds the runs of an experiment"),
        (pre, "finetune", "experiment", "single `pretrain` run folder"),
        (root, "train-baseline", "experiment", "holds runs of `finetune`"),
        (data, "finetune", "experiment", "holds no finetune run (README.txt, owl)"),
        (data, "pretrain", "run", "holds no pretrain run"),
    ]
    for out, command, kind, message in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_out_folder(out, command, kind)
    for out, command, kind in ((pre, "pretrain", "run"), (root, "finetune", "experiment"),
                               (tmp_path / "new", "pretrain", "run")):  # fmt: skip
        check_out_folder(out, command, kind)

    manifest = write_tone_dataset(tmp_path / "tones", n_per_class=3)
    before = sorted(p.name for p in pre.rglob("*"))
    code, _, err = cli(capsys, "train-baseline", manifest, "--out", pre, "--max_steps", "1",
                       "--batch_size", "2", "--no-progress", *FRONTEND_FLAGS)  # fmt: skip
    assert code == 2 and "single `pretrain` run folder" in err and "\n" not in err.strip()
    assert sorted(p.name for p in pre.rglob("*")) == before


def test_finished_runs_are_not_reused_for_a_changed_manifest(tmp_path, capsys):
    manifest = write_tone_dataset(tmp_path / "data", n_per_class=4)
    out = tmp_path / "runs"
    args = ["--out", out, "--max_steps", "2", "--batch_size", "4", "--clip_seconds", "0.5",
            "--num_workers", "0", "--no-progress", "--eval_every", "0", *FRONTEND_FLAGS]  # fmt: skip
    code, _, err = cli(capsys, "train-baseline", manifest, *args)
    assert code == 0, err
    code, stdout, err = cli(capsys, "train-baseline", manifest, *args)  # the same data: reused
    assert code == 0 and "finished earlier, skipped" in stdout, err
    df = pd.read_csv(manifest)
    df.iloc[:-1].to_csv(manifest, index=False)  # one clip fewer: other data
    code, _, err = cli(capsys, "train-baseline", manifest, *args)
    one_line_error(err, "finished run on other data", "choose another --out")
    assert code == 2


def test_messages_name_the_real_mistake(tmp_path):
    from bioaudio.data.manifest import read_manifest
    from bioaudio.errors import ConfigError, DataError
    from bioaudio.inference.detect import read_thresholds
    from bioaudio.training.sampling import weights_from_file

    th = tmp_path / "th.csv"
    th.write_text("foo,bar\nx,0.5\n")
    with pytest.raises(ConfigError, match="header must be `class,threshold` \\(got foo,bar\\)"):
        read_thresholds(th, ["a", "b"])
    with pytest.raises(ConfigError, match="is a folder; give a CSV file"):
        weights_from_file(tmp_path, pd.DataFrame({"path": ["a.wav"]}))
    clip = wav(tmp_path / "a.wav")
    with pytest.raises(DataError, match="is an audio file, not a manifest"):
        read_manifest(clip)


def test_an_out_path_that_cannot_be_a_folder_or_file_is_said_plainly(tmp_path):
    from bioaudio.errors import ConfigError
    from bioaudio.inference.embed import _check_out
    from bioaudio.training.rundir import check_out_folder

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        _check_out(afile / "x.parquet", overwrite=False)
    with pytest.raises(ConfigError, match="is a file; give a folder for the run"):
        check_out_folder(afile, "pretrain", "run")


def test_a_config_key_at_the_wrong_level_says_where_it_goes():
    from bioaudio.commands.finetune import FinetuneConfig
    from bioaudio.config import from_dict
    from bioaudio.errors import ConfigError

    with pytest.raises(ConfigError, match="`time_width` goes under `spec:`"):
        from_dict(FinetuneConfig, {"time_width": 5, "model_path": "m"})
