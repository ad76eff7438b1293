"""`bioaudio pretrain` (EAT + memory bank): the loss falls, resume equals an uninterrupted run,
the queue holds the keys of both processes of a 2-process run, continuing from the official
checkpoints, the supervised and positive/negative terms, and one-line errors before any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from test_classify import one_thread, reset_accelerate  # noqa: F401  (autouse fixture)

from bioaudio import load_model
from bioaudio.cli import main
from bioaudio.data.demo import generate_demo_data

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model", "eat", "--preset", "tiny", "--segment_duration", "1", "--batch_size", "4",
    "--eat.clone_batch", "2", "--eat.decoder_layers", "1", "--memory_bank.queue_size", "16",
    "--num_workers", "0", "--no-progress", "--log_every", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pt") / "demo"
    generate_demo_data(root, seed=0, n_per_class=4, n_unlabelled=12, soundscapes=1)
    return root


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    reset_accelerate()
    code = main(["pretrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def state_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Model + objective tensors of the newest saved state."""
    steps = sorted((run / "state").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return load_file(str(steps[-1] / "model.safetensors"))


def test_loss_falls_and_the_export_loads(demo, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, demo / "unlabelled", "--out", out, *TINY,
                            "--max_steps", "30", "--lr", "2e-3", "--save_every", "0")  # fmt: skip
    assert code == 0, err
    m = pd.read_csv(out / "metrics.csv")
    head, tail = m["eat/frame_loss"].iloc[:5].mean(), m["eat/frame_loss"].iloc[-5:].mean()
    assert tail < 0.95 * head, (head, tail)
    assert np.isfinite(m["memory_bank/loss"]).all() and m["memory_bank/queue_fill"].iloc[-1] == 16
    model = load_model(out / "export")
    assert model.model_type == "eat" and model.head is None
    prov = json.loads((out / "export" / "config.json").read_text())["provenance"]
    assert prov["task"] == "pretraining" and prov["objectives"] == {"eat": 1.0, "memory_bank": 0.1}
    emb = model.embed(torch.randn(2, 16000), pooling="cls")
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    # the teacher and the queue are in the state (resumable), not in the export
    state = state_tensors(out)
    assert any(k.startswith("parts.eat.teacher.") for k in state)
    assert "parts.memory_bank.queue" in state
    assert not any(
        "teacher" in k or "queue" in k for k in load_file(str(out / "export" / "model.safetensors"))
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"]["objectives"]["eat"]["clone_batch"] == 2
    assert cfg["identity"]["objectives"] == ["eat", "memory_bank"]


def test_resumed_run_equals_an_uninterrupted_one(demo, tmp_path, capsys):
    """SIGKILLed right after its step-3 state, then re-run: the same weights, teacher, decoder,
    heads and queue as a run that was never interrupted."""
    from test_train_baseline import KILL_AFTER_STATE

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [demo / "unlabelled", *TINY, "--save_every", "3", "--lr", "1e-3", "--max_steps", "6"]
    assert cli(capsys, *common, "--out", straight)[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": "3"}
    argv = [sys.executable, "-c", KILL_AFTER_STATE, "pretrain", *map(str, common),
            "--out", str(resumed)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    code, _, err = cli(capsys, *common, "--out", resumed)
    assert code == 0, err
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_3") and summary["steps"] == 6
    a, b = state_tensors(straight), state_tensors(resumed)
    assert set(a) == set(b)
    for k in a:  # student, teacher, decoder, heads, queue
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    ma, mb = pd.read_csv(straight / "metrics.csv"), pd.read_csv(resumed / "metrics.csv")
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)


def test_two_processes_train_like_one(demo, tmp_path, capsys):
    """2 real processes at the same global batch as 1: the same loss curve (up to the rounding
    noise of summing in another order: measured by the same 1-process run with another thread
    count, plus 0.1 %, since Adam can turn reduction-order noise in near-zero gradients into
    lr-sized weight changes on some CPUs), and the queue holds the keys of both processes
    (gathered before they are enqueued)."""
    two, one, floor = tmp_path / "two", tmp_path / "one", tmp_path / "floor"
    args = [str(demo / "unlabelled"), *TINY, "--max_steps", "3", "--save_every", "1"]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "bioaudio", "pretrain", *args, "--out", str(two),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pretrained model:") == 1  # the main process prints
    assert json.loads((two / "summary.json").read_text())["num_processes"] == 2
    assert cli(capsys, *args, "--out", one)[0] == 0
    torch.set_num_threads(2)  # the noise floor: the same run, summed in another order
    assert cli(capsys, *args, "--out", floor)[0] == 0
    torch.set_num_threads(1)
    s2, s1 = state_tensors(two), state_tensors(one)
    assert (
        int(s2["parts.memory_bank.queue_filled"]) == 12 == int(s1["parts.memory_bank.queue_filled"])
    )
    # the same clips in the same slots: process 1's half is there too
    assert torch.equal(s2["parts.memory_bank.queue_ids"], s1["parts.memory_bank.queue_ids"])
    assert len(set(s2["parts.memory_bank.queue_ids"][:12].tolist())) == 12
    m2, m1, mf = (pd.read_csv(d / "metrics.csv") for d in (two, one, floor))
    for col in ("loss", "eat/frame_loss", "eat/utterance_loss", "memory_bank/loss"):
        noise = float((mf[col] - m1[col]).abs().max())
        diff = float((m2[col] - m1[col]).abs().max())
        assert diff <= 10 * noise + 1e-3 * float(m1[col].abs().max()), (col, diff, noise)


@pytest.mark.parametrize("name", ["eat_tiny_hf.safetensors", "eat_tiny_fairseq.pt"])
def test_continue_from_official_eat_checkpoints(official_fixtures, demo, tmp_path, capsys, name):
    src = official_fixtures / name
    config = ["--config", official_fixtures / "eat_tiny_hf_config.json"] if "hf" in name else []
    del config  # the HF config sits beside the file as <stem>_config.json
    out = tmp_path / "cont"
    tiny = [a for a in TINY if a not in ("--preset", "tiny")]
    code, stdout, err = cli(capsys, demo / "unlabelled", "--out", out, *tiny,
                            "--model_path", src, "--max_steps", "2")  # fmt: skip
    assert code == 0, err
    original, continued = load_model(src), load_model(out / "export")
    assert continued.encoder_cfg == original.encoder_cfg and continued.head is None
    prov = json.loads((out / "export" / "config.json").read_text())["provenance"]
    assert prov["continued_from"] == str(src)
    moved = [
        float((a - b).abs().max())
        for a, b in zip(
            original.encoder.state_dict().values(), continued.encoder.state_dict().values()
        )
    ]
    assert max(moved) > 0  # it trained, starting from the official weights


def test_supervised_and_pair_terms(demo, tmp_path, capsys):
    out = tmp_path / "mix"
    code, stdout, err = cli(capsys, demo / "unlabelled", "--out", out, *TINY, "--max_steps", "3",
                            "--objective", "eat:1,memory_bank:0.1,supervised:0.5",
                            "--labeled_dir", demo / "by_class",
                            "--positive_dir", demo / "pairs" / "positive",
                            "--negative_dir", demo / "pairs" / "negative")  # fmt: skip
    assert code == 0, err
    assert "labelled clip(s)" in stdout and "--positive_dir" in stdout
    m = pd.read_csv(out / "metrics.csv")
    assert {"supervised/loss", "memory_bank/loss", "eat/loss"} <= set(m.columns)
    assert np.isfinite(m["supervised/loss"]).all()


@pytest.mark.parametrize(
    "make, extra, message",
    [
        ("empty", [], "no audio files"),
        ("short", [], "shorter than"),
        ("demo", ["--eat.mask_ratio", "1.0"], "mask_ratio must be strictly between 0 and 1"),
        ("demo", ["--memory_bank.queue_size", "2"], "smaller than the global batch"),
        ("demo", ["--objective", "mae:1"], "unknown objective"),
        ("demo", ["--objective", "eat:x"], "is not a number"),
        ("demo", ["--segment_duration", "0.1"], "segment_duration must be at least"),
        ("demo", ["--objective", "supervised:1"], "needs labelled clips"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_step(demo, tmp_path, capsys, make, extra, message):
    if make == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif make == "short":
        data = tmp_path / "short"
        data.mkdir()
        sf.write(data / "blip.wav", np.zeros(800, np.float32), 16000)  # 0.05 s: under one patch
    else:
        data = demo / "unlabelled"
    out = tmp_path / "out"
    code, _, err = cli(capsys, data, "--out", out, *TINY, "--max_steps", "2", *extra)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (out / "state").exists() and not (out / "metrics.csv").exists()


def test_checkpoint_of_another_model_type_is_refused(official_fixtures, demo, tmp_path, capsys):
    out = tmp_path / "out"
    tiny = [a for a in TINY if a not in ("--model", "eat", "--preset", "tiny")]
    code, _, err = cli(capsys, demo / "unlabelled", "--out", out, *tiny, "--model", "beats",
                       "--model_path", official_fixtures / "eat_tiny_fairseq.pt")  # fmt: skip
    assert code == 2 and "holds a eat checkpoint" in err
    assert not out.exists() or not any(out.iterdir())


def test_files_that_break_after_prepare_are_skipped_and_listed(demo, tmp_path, capsys):
    # a manifest made before two of its files broke (one deleted, one overwritten with noise):
    # the run trains on the rest and its skipped.csv names both, with their reasons
    import shutil

    import pandas as pd

    data = tmp_path / "unl"
    shutil.copytree(demo / "unlabelled", data)
    manifest = tmp_path / "m.csv"
    assert main(["prepare", str(data), "--labels", "none", "--out", str(manifest),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    paths = [manifest.parent / p for p in pd.read_csv(manifest)["path"]]  # relative to it
    gone, garbage = paths[0], paths[1]
    gone.unlink()
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 40)
    code, out, err = cli(capsys, manifest, "--out", tmp_path / "run", *TINY, "--max_steps", "6")
    assert code == 0, err
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert {Path(p).name for p in skipped["path"]} == {gone.name, garbage.name}
    assert skipped["reason"].str.len().gt(0).all()
    assert "could not be read during training" in out
