"""Streaming training under the Trainer: every manifest row is read exactly once per epoch over
two real processes, the order does not depend on the number of DataLoader workers, and a resume
restores the stream position without decoding the clips before it."""

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
from test_classify import reset_accelerate
from train_stream import DECODES, count_decodes, train

from bioaudio.data.datasets import StreamingAudioDataset
from bioaudio.data.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 24


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """24 rows: one-second windows of one 24 s recording (row i holds a tone of its own)."""
    root = tmp_path_factory.mktemp("stream")
    sr = 8000
    t = np.arange(24 * sr) / sr
    wav = (0.3 * np.sin(2 * np.pi * (200 + 20 * (t // 1)) * t)).astype(np.float32)
    path = root / "long.wav"
    sf.write(path, wav, sr)
    rows = [
        {"path": str(path), "sample_rate": sr, "frames": len(wav), "duration": 24.0,
         "channels": 1, "start": float(i), "end": float(i + 1), "labels": "",
         "recording": "long", "source": "test"}
        for i in range(N_ROWS)
    ]  # fmt: skip
    out = root / "manifest.csv"
    write_manifest(pd.DataFrame(rows), out)
    return out


def _seen(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"seen_rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_read_every_row_once_per_epoch(manifest, tmp_path):
    """2 processes x global batch 4 x 6 steps = one epoch of 24 rows: each row exactly once."""
    out = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "train_stream.py"), str(manifest), str(out),
        "--max_steps", "6", "--batch_size", "4", "--expect_processes", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r: [i for rec in _seen(out, r) for i in rec["rows"]] for r in (0, 1)}
    assert len(rows[0]) == len(rows[1]) == N_ROWS // 2  # each process its half, 2 per step
    everything = rows[0] + rows[1]
    assert sorted(everything) == list(range(N_ROWS))  # every row once, none twice
    assert {i % 2 for i in rows[0]} == {0} and {i % 2 for i in rows[1]} == {1}
    summaries = [json.loads((out / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["num_processes"] for s in summaries] == [2, 2]


def test_stream_order_does_not_depend_on_workers(manifest):
    orders = []
    for workers in (0, 2):
        ds = StreamingAudioDataset(manifest, clip_seconds=0.25, train=True, seed=3)
        ds.set_epoch(1)
        loader = __import__("torch").utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        orders.append([int(item["index"]) for item in loader])
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(N_ROWS))


def test_resume_restores_the_position_without_decoding_skipped_clips(manifest, tmp_path):
    """A run stopped at step 2 and resumed to step 5 reads the same rows at steps 3-5 as a
    straight 5-step run, and decodes only the clips of those steps (not the skipped ones)."""
    count_decodes()
    straight = tmp_path / "straight"
    straight.mkdir()
    DECODES["n"] = 0
    train(manifest, straight, max_steps=5, batch_size=4, workers=0)
    assert DECODES["n"] == 5 * 4

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    train(manifest, resumed, max_steps=2, batch_size=4, workers=0)
    reset_accelerate()
    DECODES["n"] = 0
    summary = train(manifest, resumed, max_steps=5, batch_size=4, workers=0)
    assert summary["resumed_from"].endswith("step_2")
    assert DECODES["n"] == 3 * 4  # steps 3, 4, 5 only: the 8 clips before are not decoded
    by_step = {rec["step"]: rec["rows"] for rec in _seen(straight, 0)}
    after = [rec for rec in _seen(resumed, 0) if rec["step"] > 2]
    assert [rec["step"] for rec in after] == [3, 4, 5]
    for rec in after:
        assert rec["rows"] == by_step[rec["step"]]
