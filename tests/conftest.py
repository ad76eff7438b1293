"""Shared test fixtures: paths to ../shared material (skipped when absent) and synthetic audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip(f"real audio not available ({d} is absent)")
    return d


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    d = SHARED / "fixtures" / "official"
    if not d.is_dir():
        pytest.skip(f"official-code fixtures not available ({d} is absent)")
    return d


def make_tone(
    seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """A tone plus a little noise: (samples,) or (samples, channels) float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape[0])
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return x


@pytest.fixture
def tone():
    return make_tone


def whole_file_row(
    path: Path, labels: str = "", recording: str | None = None, source: str = "test"
) -> dict:
    """A manifest row for a whole audio file, from its header (tests build manifests this way,
    independently of `bioaudio prepare`)."""
    from bioaudio.data import audio

    meta = audio.info(path)
    return {
        "path": str(path),
        "sample_rate": meta.sample_rate,
        "frames": meta.frames,
        "duration": meta.duration,
        "channels": meta.channels,
        "start": 0.0,
        "end": meta.duration,
        "labels": labels,
        "recording": path.stem if recording is None else recording,
        "source": source,
    }
