"""Normalisation statistics: equal to a direct computation, applied to configs, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import whole_file_row

from bioaudio.cli import main
from bioaudio.data import audio
from bioaudio.data.frontend import FrontendConfig, build_frontend
from bioaudio.data.manifest import write_manifest
from bioaudio.data.stats import (
    StatsConfig,
    apply_stats,
    compute_stats,
    find_stats_for,
    load_stats,
    resolve_stats,
    save_stats,
)
from bioaudio.errors import ConfigError


@pytest.fixture
def clip_set(tmp_path, tone):
    """Clips of different rates, channel counts, lengths and loudness, all under 3 s."""
    specs = [(0.4, 16000, 1), (1.3, 8000, 1), (2.2, 22050, 2), (0.9, 44100, 2), (2.9, 16000, 1)]
    rows = []
    for i, (sec, sr, ch) in enumerate(specs):
        p = tmp_path / f"clip{i}.wav"
        sf.write(p, tone(sec, sr, 200.0 * (i + 1), channels=ch, seed=i) * (0.2 + 0.2 * i), sr)
        rows.append(whole_file_row(p, source="none"))
    df = pd.DataFrame(rows)
    manifest = tmp_path / "train.csv"
    write_manifest(df, manifest)
    return df, manifest


def _all_frames(df: pd.DataFrame, cfg: FrontendConfig, normalise: bool) -> np.ndarray:
    """Every frame of every clip, one clip at a time, without any padding."""
    fe = build_frontend(cfg)
    feats = []
    for p in df["path"]:
        wav = torch.from_numpy(audio.load(p, sample_rate=cfg.sample_rate))[None]
        f, mask = fe(wav) if normalise else fe.raw(wav)
        assert mask is None
        feats.append(f[0].numpy().astype(np.float64))
    return np.concatenate(feats)


@pytest.mark.parametrize("kind", ["beats_fbank", "eat_fbank", "logmel"])
def test_stats_equal_direct_computation_and_normalise(clip_set, kind):
    df, _ = clip_set
    # max_seconds 3 pads every clip: padded frames must not count
    cfg = StatsConfig(frontend=kind, max_clips=100, max_seconds=3.0)
    rec = compute_stats(df, cfg, progress=False)
    fcfg = cfg.frontend_config()
    ref = _all_frames(df, fcfg, normalise=False)
    assert rec["frontend"] == kind and rec["n_clips"] == 5 and rec["n_frames"] == ref.shape[0]
    assert rec["mean"] == pytest.approx(ref.mean(), rel=1e-6, abs=1e-6)
    assert rec["std"] == pytest.approx(ref.std(), rel=1e-6)

    normalised = _all_frames(df, dataclasses.replace(fcfg, mean=rec["mean"], std=rec["std"]), True)
    assert abs(normalised.mean()) < 1e-4 and normalised.std() == pytest.approx(0.5, rel=1e-4)


def test_sample_is_seeded(clip_set):
    df, _ = clip_set
    a = compute_stats(df, StatsConfig(max_clips=2, seed=0), progress=False)
    b = compute_stats(df, StatsConfig(max_clips=2, seed=0), progress=False)
    assert a["n_clips"] == 2 and (a["mean"], a["std"]) == (b["mean"], b["std"])
    others = {
        compute_stats(df, StatsConfig(max_clips=2, seed=s), progress=False)["mean"]
        for s in (1, 2, 3)
    }
    assert len(others | {a["mean"]}) > 1


def test_long_segments_are_cropped(clip_set):
    df, _ = clip_set
    rec = compute_stats(df, StatsConfig(max_seconds=0.5), progress=False)
    # a 0.5 s clip gives 48 fbank frames; the 0.4 s clip gives 38
    assert rec["n_frames"] == 4 * 48 + 38


def test_save_load_apply_and_find(clip_set, tmp_path):
    df, manifest = clip_set
    assert find_stats_for(manifest) is None
    rec = compute_stats(df, StatsConfig(frontend="eat_fbank"), manifest=manifest, progress=False)
    path = save_stats(rec, manifest.parent / "stats.json")
    assert find_stats_for(manifest) == path
    assert load_stats(path) == ("eat_fbank", rec["mean"], rec["std"])

    official = FrontendConfig.official("eat_fbank")
    applied = apply_stats(official, path)
    assert (applied.mean, applied.std) == (rec["mean"], rec["std"])
    assert applied.pad_to_multiple == official.pad_to_multiple  # the rest is untouched
    assert (official.mean, official.std) == (-4.268, 4.569)  # a copy, not a mutation

    with pytest.raises(ConfigError, match="computed for eat_fbank features but the frontend is"):
        apply_stats(FrontendConfig(kind="beats_fbank"), path)
    with pytest.raises(ConfigError, match="n_mels=128 but the frontend uses n_mels=64"):
        apply_stats(FrontendConfig(kind="eat_fbank", n_mels=64), path)

    # training: explicit --stats wins, else stats.json beside the manifest, mismatches only warn
    cfg, used = resolve_stats(FrontendConfig(kind="eat_fbank"), manifest_path=manifest)
    assert used == path and cfg.mean == rec["mean"]
    with pytest.warns(UserWarning, match="ignoring"):
        cfg, used = resolve_stats(FrontendConfig(kind="beats_fbank"), manifest_path=manifest)
    assert used is None and cfg.mean is None
    with pytest.raises(ConfigError):
        resolve_stats(FrontendConfig(kind="beats_fbank"), stats_path=path)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "stats file not found"),
        ("{not json", "is not valid JSON"),
        ('{"frontend": "beats_fbank", "mean": 1.0}', "lacks std"),
        ('{"frontend": "beats_fbank", "mean": 1.0, "std": 0}', "positive std"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_stats_files(tmp_path, content, match):
    p = tmp_path / "stats.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_stats(p)


def test_cli_writes_stats_beside_the_manifest(clip_set, capsys):
    _, manifest = clip_set
    assert main(["stats", str(manifest), "--frontend", "beats_fbank", "--max_clips", "3"]) == 0
    out = capsys.readouterr().out
    path = manifest.parent / "stats.json"
    data = json.loads(path.read_text())
    assert data["n_clips"] == 3 and data["manifest"] == str(manifest.resolve())
    assert str(path) in out and f"{data['mean']:.5f}" in out
    assert not list(manifest.parent.glob(".*tmp"))  # written through a renamed temp file


@pytest.mark.parametrize(
    "args,match",
    [
        (["missing.csv"], "manifest not found"),
        (["M", "--frontend", "mel"], "not one of"),
        (["M", "--max_clips", "0"], "--max_clips must be at least 1"),
    ],
)
def test_cli_errors_are_one_line(clip_set, capsys, args, match):
    _, manifest = clip_set
    args = [str(manifest) if a == "M" else str(manifest.parent / a) if a.endswith(".csv") else a
            for a in args]  # fmt: skip
    assert main(["stats", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (manifest.parent / "stats.json").exists()
