"""Runs operators can watch and reproduce: status lines off a terminal (fake clock, no sleeping),
log.txt, repeated warnings, only the main process printing; provenance of runs and exports
(command line, versions, git commit, data fingerprint); `bioaudio info`; `--config
RUN_DIR/config.json` re-runs a run to the same weights; resources in metrics.csv."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import platform
import shutil
import subprocess
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from test_classify import (
    FRONTEND_FLAGS,
    TINY_FRONTEND,
    one_thread,  # noqa: F401  (autouse fixture)
    reset_accelerate,
    write_tone_dataset,
)
from train_toy import ToyOptions, build

from bioaudio import runinfo, runlog
from bioaudio.cli import main
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export
from bioaudio.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num_workers", "0", "--no-progress", "--batch_size", "6", "--clip_seconds", "1"]
STATUS = r"^train step \d+/\d+ \(\d+%\) \| epoch [\d.]+ .*\| \S+ clips/s \| elapsed \d+:\d\d:\d\d \| ETA "


class FakeClock:
    """Seconds that advance by `tick` at every reading."""

    def __init__(self, tick: float):
        self.ticks = itertools.count()
        self.tick = tick

    def __call__(self) -> float:
        return next(self.ticks) * self.tick


def cli(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ progress, logs


def test_status_lines_one_per_interval_without_carriage_returns():
    now, stream = [0.0], io.StringIO()
    p = runlog.Progress.steps(
        100, batch_size=8, status_every=30, interactive=False, stream=stream,
        clock=lambda: now[0],
    )  # fmt: skip
    for i in range(100):  # one step per (fake) second
        now[0] = float(i + 1)
        p.set(loss=0.5)
        p.update(1, epoch=f"{(i + 1) / 50:.2f}")
    p.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # at 30, 60, 90 s, then the last one at close
    assert [line.split(" | ")[0] for line in lines] == [
        "train step 30/100 (30%)", "train step 60/100 (60%)", "train step 90/100 (90%)",
        "train step 100/100 (100%)",
    ]  # fmt: skip
    assert lines[0] == (
        "train step 30/100 (30%) | epoch 0.60 | loss 0.5 | 8 clips/s | elapsed 0:00:30 | ETA 0:01:10"
    )
    assert lines[-1].endswith("elapsed 0:01:40 | ETA 0:00:00")


def test_audio_progress_reports_audio_hours_and_real_time_factor():
    stream, now = io.StringIO(), [0.0]
    p = runlog.Progress.audio(
        7200.0, desc="embed", status_every=30, interactive=False, stream=stream,
        clock=lambda: now[0], elapsed_offset=0.0,
    )  # fmt: skip
    for _ in range(4):  # 360 s of audio every 10 s: 36x real time, 0.01 audio h/s
        now[0] += 10.0
        p.update(360.0)
    text = stream.getvalue()
    assert text == (
        "embed 0.300/2.000 audio h (15%) | 0.01 audio h/s (36x real time) | elapsed 0:00:30"
        " | ETA 0:02:50\n"
    )
    p.close()
    assert stream.getvalue().count("\n") == 2 and "\r" not in stream.getvalue()


def test_session_log_file_warnings_and_bars(tmp_path, monkeypatch):
    console_out, console_err = io.StringIO(), io.StringIO()  # not terminals
    monkeypatch.setattr("sys.stdout", console_out)
    monkeypatch.setattr("sys.stderr", console_err)
    log = tmp_path / "run" / "log.txt"
    with runlog.session(main=True):
        print("checked the input")
        import sys

        sys.stderr.write("\rbar 10%\rbar 50%\rbar 100%\n")  # what tqdm writes
        runlog.attach(log)  # replays what was printed so far
        print("training")
        for _ in range(3):
            warnings.warn("clip shorter than a window", UserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
        with runlog.session():  # a nested scope (the Trainer inside a command)
            runlog.attach(tmp_path / "inner.txt", replay=False)
            print("inside")
        print("after")
    out, err = console_out.getvalue(), console_err.getvalue()
    assert "\r" not in out + err
    assert "bar 100%" in err and "bar 50%" not in err  # a bar leaves its final state
    shown = [ln for ln in err.splitlines() if ln.endswith("clip shorter than a window")]
    assert len(shown) == 1  # once (however warnings are formatted), then counted
    assert 'warning "clip shorter than a window" repeated 3 times' in err
    assert "another warning" in err and 'another warning" repeated' not in err
    text = log.read_text()
    assert text.startswith("==> ") and "\r" not in text
    body = text.splitlines()[1:]
    assert body[:3] == ["checked the input", "bar 100%", "training"]
    assert body[-2:] == ["after", 'warning "clip shorter than a window" repeated 3 times']
    assert "inside" in body
    assert (tmp_path / "inner.txt").read_text().splitlines()[1:] == ["inside"]
    # a second command (a resume) appends to the same log
    with runlog.session(main=True):
        runlog.attach(log)
        print("resumed")
    assert log.read_text().count("==> ") == 2 and log.read_text().endswith("resumed\n")


def test_only_the_main_process_prints(tmp_path, monkeypatch):
    console_out, console_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", console_out)
    monkeypatch.setattr("sys.stderr", console_err)
    with runlog.session(main=False):
        runlog.attach(tmp_path / "log.txt")
        print("from process 1")
        warnings.warn("from process 1", UserWarning, stacklevel=1)
    assert console_out.getvalue() == "" and console_err.getvalue() == ""
    assert not (tmp_path / "log.txt").exists()


def test_trainer_status_lines_log_and_resources(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runlog, "default_clock", FakeClock(7.0))
    reset_accelerate()
    cfg = TrainConfig(
        out_dir=tmp_path, max_steps=20, batch_size=8, lr=0.05, log_every=5, eval_every=10,
        num_workers=0, progress=True, status_every=30, save_every=0,
    )  # fmt: skip
    trainer, _, _ = build(cfg, ToyOptions(n_items=40, n_eval=13))
    summary = trainer.fit()
    err = capsys.readouterr().err
    assert "\r" not in err  # pytest's capture is not a terminal: status lines, no bar
    status = [line for line in err.splitlines() if line.startswith("train step")]
    assert len(status) >= 3 and all(pd.Series(status).str.match(STATUS))
    assert "loss" in status[-1] and status[-1].startswith("train step 20/20 (100%)")
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log[0].startswith("==> ") and [x for x in log if x.startswith("train step")] == status
    # resources: every log row, and the summary
    m = pd.read_csv(tmp_path / "metrics.csv")
    rows = m.dropna(subset=["loss"])
    assert rows["data_wait"].between(0, 1).all() and (rows["peak_rss_mb"] > 0).all()
    assert 0 <= summary["data_wait"] <= 1 and summary["peak_rss_mb"] > 0
    assert summary["samples_per_s"] > 0


# ------------------------------------------------------------------------------ provenance


def test_data_fingerprint_of_a_manifest_and_of_a_folder_table(tmp_path):
    table = pd.DataFrame(
        {"path": ["a.wav", "b.wav"], "start": [0.0, 1.0], "end": [2.0, 1.5], "duration": 3.0}
    )
    table.to_csv(tmp_path / "m.csv", index=False)
    fp = runinfo.data_fingerprint(tmp_path / "m.csv")
    assert fp["rows"] == 2 and fp["duration_s"] == 2.5
    assert fp["sha256"] == hashlib.sha256((tmp_path / "m.csv").read_bytes()).hexdigest()
    folder = runinfo.data_fingerprint(tmp_path, table)
    assert folder["rows"] == 2 and folder["duration_s"] == 2.5 and len(folder["sha256"]) == 64
    assert runinfo.data_fingerprint(tmp_path, table.iloc[:1])["sha256"] != folder["sha256"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny train-baseline run (one seed), run through the CLI."""
    root = tmp_path_factory.mktemp("prov")
    manifest = write_tone_dataset(root / "tones", n_per_class=6)
    out = root / "runs"
    argv = ["train-baseline", str(manifest), "--out", str(out), "--seeds", "42", "--epochs",
            "2", *QUICK, *FRONTEND_FLAGS]  # fmt: skip
    reset_accelerate()
    torch.set_num_threads(1)
    assert main(argv) == 0
    return manifest, out, argv


def check_environment(env: dict, argv: list[str]) -> None:
    assert env["argv"] == ["bioaudio", *argv]
    assert env["command_line"].startswith("bioaudio train-baseline ")
    assert env["world_size"] == 1
    assert env["bioaudio_version"] == version("bioaudio")
    assert env["python"] == platform.python_version()
    assert env["torch"] == version("torch") and env["accelerate"] == version("accelerate")
    assert env["torchaudio"] == version("torchaudio")
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
        assert env["git_commit"] == head and isinstance(env["git_dirty"], bool)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        assert env["cpu"] in cpuinfo.read_text()
    assert env["gpus"] == ([] if not torch.cuda.is_available() else env["gpus"])


def test_provenance_of_a_run_and_its_exports(run):
    manifest, out, argv = run
    run_dir = out / "seed_42"
    cfg = json.loads((run_dir / "config.json").read_text())
    prov = cfg["provenance"]
    check_environment(prov["environment"], argv)
    training = prov["training"]
    assert training["seeds"] == {"seed": 42, "split_seed": 0}
    assert training["num_processes"] == 1 and training["device"] == "cpu"
    data = training["data"]
    rows = pd.read_csv(manifest)
    assert data["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert data["rows"] == len(rows)
    assert data["duration_s"] == pytest.approx((rows["end"] - rows["start"]).sum(), abs=1e-3)
    for name in ("export", "best"):
        exported = json.loads((run_dir / name / "config.json").read_text())["provenance"]
        check_environment(exported["environment"], argv)
        assert exported["training"]["data"] == data and exported["training"]["step"] > 0
    # logs: the whole command in RUN_ROOT/log.txt, the training loop in the run's
    root_log = (out / "log.txt").read_text()
    assert "tiny_mel_cnn: 3 classes" in root_log and "accuracy:" in root_log
    assert (run_dir / "log.txt").read_text().startswith("==> ")


def test_rerun_from_a_run_config_gives_the_same_weights(run, tmp_path, capsys):
    manifest, out, _ = run
    first = out / "seed_42"
    again = tmp_path / "again"
    code, _, err = cli(capsys, "train-baseline", manifest, "--config", first / "config.json",
                       "--out", again)  # fmt: skip
    assert code == 0, err
    second = again / "seed_42"
    a = load_file(str(first / "export" / "model.safetensors"))
    b = load_file(str(second / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    old, new = (json.loads((d / "config.json").read_text()) for d in (first, second))
    assert {**old["options"], "out": None} == {**new["options"], "out": None}
    assert new["train"] == {**old["train"], "out_dir": new["train"]["out_dir"]}


@pytest.mark.parametrize(
    "command, config, message",
    [
        ("finetune", "seed_42/config.json", "the config of a `bioaudio train-baseline` run"),
        ("train-baseline", "seed_42/export/config.json", "bioaudio.export folder (a model)"),
    ],
)
def test_a_config_of_another_command_is_refused(run, capsys, command, config, message):
    manifest, out, _ = run
    code, _, err = cli(capsys, command, manifest, "--config", out / config)
    assert code == 2 and err.count("\n") == 1 and message in err, err


# ------------------------------------------------------------------------------ bioaudio info


def test_info_on_a_run_an_experiment_and_an_export(run, capsys):
    manifest, out, argv = run
    code, text, err = cli(capsys, "info", out / "seed_42")
    assert code == 0, err
    assert "run directory" in text and "completed: 4/4 steps" in text
    assert "best        eval/accuracy" in text and "test        accuracy" in text
    assert "parameters (export/)" in text and "peak RSS" in text
    assert "bioaudio train-baseline " + str(manifest) in text
    assert f"bioaudio {version('bioaudio')}" in text and f"torch {version('torch')}" in text
    assert "seed 42" in text and hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] in text

    code, text, err = cli(capsys, "info", out)
    assert code == 0, err
    assert "experiment root" in text and "1 run(s) of bioaudio train-baseline" in text
    assert "seed_42  completed" in text and "mean +- std test_accuracy" in text

    code, text, err = cli(capsys, "info", out / "seed_42" / "export", "--json")
    assert code == 0, err
    facts = json.loads(text)
    assert facts["kind"] == "export" and facts["model_type"] == "baseline"
    n = sum(v.numel() for v in load_file(str(out / "seed_42/export/model.safetensors")).values())
    assert 0 < facts["parameters"] <= n
    assert facts["provenance"]["training"]["seeds"]["seed"] == 42


def test_info_says_when_an_export_is_damaged(run, tmp_path, capsys):
    import shutil

    _, out, _ = run
    broken = tmp_path / "export"
    shutil.copytree(out / "seed_42" / "export", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated after export
    code, text, _ = cli(capsys, "info", broken)
    assert code == 1
    assert "PROBLEM" in text and "cannot be loaded" in text and "sha256" in text


def test_info_on_an_official_checkpoint(official_fixtures, capsys):
    files = sorted(official_fixtures.glob("*.pt"))
    if not files:
        pytest.skip("no official .pt fixture")
    code, text, err = cli(capsys, "info", files[0])
    assert code == 0, err
    assert text.startswith("official checkpoint") and "not a bioaudio export" in text


@pytest.mark.parametrize("case", ["missing", "empty", "foreign_config", "text_file"])
def test_info_bad_input_is_one_line(tmp_path, capsys, case):
    path = tmp_path / "x"
    if case == "empty":
        path.mkdir()
    elif case == "foreign_config":
        path.mkdir()
        (path / "config.json").write_text('{"learning_rate": 0.1}')
    elif case == "text_file":
        path.write_text("not a model\n")
    code, out, err = cli(capsys, "info", path)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    expected = {
        "missing": "no such file or folder",
        "empty": "not a run directory, an experiment root or an export",
        "foreign_config": "not written by bioaudio",
        "text_file": "not a checkpoint format",
    }[case]
    assert expected in err


# ------------------------------------------------------------------------------ embed, detect


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A tiny (untrained) classifier export and a 20 s recording."""
    root = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, ["a", "b"], False)
    save_export(model, root / "model")
    rng = np.random.default_rng(0)
    sf.write(root / "night.wav", (0.1 * rng.standard_normal(20 * 16000)).astype(np.float32), 16000)
    return root


@pytest.mark.parametrize("command", ["embed", "detect"])
def test_embed_and_detect_status_lines_and_log(recording, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(runlog, "default_clock", FakeClock(100.0))  # a line at every batch
    out = tmp_path / ("emb.parquet" if command == "embed" else "det")
    code, _, err = cli(capsys, command, recording / "model", recording / "night.wav", "--out", out,
                       "--window", "2", "--batch_size", "4", "--status_every", "30")  # fmt: skip
    assert code == 0, err
    assert "\r" not in err
    status = [line for line in err.splitlines() if line.startswith(command)]
    assert status and all("audio h" in s and "x real time" in s and "ETA" in s for s in status)
    log = out.with_suffix(".log.txt") if command == "embed" else out / "log.txt"
    text = log.read_text()
    assert text.startswith("==> ") and f"bioaudio {command} " in text.splitlines()[0]
    assert all(s in text for s in status)
