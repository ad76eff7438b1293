"""Feature cache: cached = on the fly, npz = memmap, seeded crops, atomic builds, refusals, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import whole_file_row
from torch.utils.data import DataLoader

from bioaudio.cli import main
from bioaudio.data import audio
from bioaudio.data import features as F
from bioaudio.data.datasets import AudioDataset, collate_batch, segment_windows
from bioaudio.data.features import (
    FeatureDataset,
    FeaturesConfig,
    build_cache,
    find_cache,
    frames_for_seconds,
    open_cache,
)
from bioaudio.data.frontend import FrontendConfig, build_frontend
from bioaudio.data.manifest import write_manifest
from bioaudio.errors import ConfigError, DataError

SR = 16000


def write_set(root: Path, specs: list[tuple[str, float, int, int, str]], tone) -> Path:
    """WAV / FLAC files from (name, seconds, rate, channels, labels) + their manifest."""
    rows = []
    for i, (name, sec, sr, ch, labels) in enumerate(specs):
        p = root / name
        sf.write(p, tone(sec, sr, 300.0 + 150 * i, channels=ch, seed=i), sr)
        rows.append(whole_file_row(p, labels))
    return write_manifest(pd.DataFrame(rows), root / "manifest.csv")


@pytest.fixture
def manifest(tmp_path, tone):
    specs = [
        ("a.wav", 1.3, 16000, 1, "bird"),
        ("b.wav", 0.6, 8000, 1, "frog"),
        ("c.flac", 2.2, 22050, 2, "bird"),
        ("d.wav", 0.4, 44100, 2, ""),
        ("e.wav", 1.75, 16000, 1, "insect"),
    ]
    return write_set(tmp_path, specs, tone)


def cfg_of(**kw) -> FeaturesConfig:
    base = {"num_workers": 0, "progress": False}
    base.update(kw)
    return FeaturesConfig(**base)


def raw_on_the_fly(cfg: FrontendConfig, item: dict) -> np.ndarray:
    with torch.no_grad():
        feats, _ = build_frontend(cfg).raw(item["wav"][None], item["padding_mask"][None])
    return feats[0].numpy()


# --------------------------------------------------------------------------- cached = on the fly


@pytest.mark.parametrize("kind", ["beats_fbank", "eat_fbank", "logmel", "mfcc"])
def test_cached_clips_equal_frontend_on_the_fly(manifest, tmp_path, kind):
    out = build_cache(manifest, cfg_of(frontend=kind, format="memmap"), tmp_path / "cache")
    cache = open_cache(out)
    fcfg = cache.frontend
    ds = FeatureDataset(out, normalise=False)
    clips = AudioDataset(manifest, class_names=[], sample_rate=SR)
    assert len(ds) == len(clips) == 5
    for i in range(len(ds)):
        ref = raw_on_the_fly(fcfg, clips[i])
        item = ds[i]
        assert item["feats"].dtype == torch.float32 and item["feats"].shape == ref.shape
        np.testing.assert_array_equal(item["feats"].numpy(), ref)
        assert not item["frame_mask"].any()
        assert item["path"] == clips[i]["path"] and item["start"] == clips[i]["start"]
    assert cache.meta["total_frames"] == int(cache.items["n_frames"].sum())


def test_cached_windows_equal_frontend_of_windowed_items(tmp_path, tone):
    manifest = write_set(tmp_path, [("long.wav", 4.3, SR, 1, "owl")], tone)
    out = build_cache(manifest, cfg_of(window=1.0, hop=0.5), tmp_path / "cache")
    cache = open_cache(out)
    windows = segment_windows(pd.read_csv(manifest).assign(path=str(tmp_path / "long.wav")), 1, 0.5)
    clips = AudioDataset(windows, sample_rate=SR, clip_seconds=1.0)
    ds = FeatureDataset(out, normalise=False)
    assert len(ds) == len(windows) and cache.meta["window"] == 1.0 and cache.meta["hop"] == 0.5
    assert cache.items["window_index"].tolist() == windows["window_index"].tolist()
    for i in range(len(ds)):
        item = clips[i]  # the last window is padded: the frontend featurises its valid audio
        np.testing.assert_array_equal(ds[i]["feats"].numpy(), raw_on_the_fly(cache.frontend, item))
        assert ds[i]["start"] == pytest.approx(windows["start"][i])
    assert clips[len(clips) - 1]["padding_mask"].any()


def test_fbank_crop_on_hop_boundary_equals_features_of_cropped_audio(tmp_path, tone):
    """The documented trade-off: Kaldi fbank crops on 10 ms boundaries are exact (BEATs) or
    equal to float rounding (EAT); dB frontends are relative to the whole clip and differ."""
    manifest = write_set(tmp_path, [("long.wav", 3.0, SR, 1, "")], tone)
    x = torch.from_numpy(audio.load(tmp_path / "long.wav", SR))
    for kind, atol in (("beats_fbank", 1e-4), ("eat_fbank", 1e-2), ("logmel", None)):
        out = build_cache(manifest, cfg_of(frontend=kind), tmp_path / kind)
        whole = FeatureDataset(out, normalise=False)[0]["feats"].numpy()
        cfg = FrontendConfig(kind=kind)
        k, m = 37, 100  # the crop starts on frame k's first sample and covers m frames
        hop, size = (160, 400) if atol else (cfg.hop_length, cfg.hop_length)
        with torch.no_grad():
            crop = build_frontend(cfg).raw(x[hop * k : hop * (k + m - 1) + size])[0][0].numpy()
        crop = crop[:m]
        assert crop.shape == (m, cfg.n_features)
        if atol is not None:
            np.testing.assert_allclose(whole[k : k + m], crop, atol=atol, rtol=0)
        else:
            assert np.abs(whole[k : k + m] - crop).max() > 1.0


@pytest.mark.parametrize("seconds", [0.033, 0.3, 1.0, 2.37])
@pytest.mark.parametrize("kind", ["beats_fbank", "logmel", "stft"])
def test_frames_for_seconds_matches_frontend(kind, seconds):
    cfg = FrontendConfig(kind=kind, sample_rate=SR)
    n = int(round(seconds * SR))
    with torch.no_grad():
        feats, _ = build_frontend(cfg).raw(torch.randn(1, n) * 0.1)
    assert frames_for_seconds(cfg, seconds) == feats.shape[1]


# --------------------------------------------------------------------------- FeatureDataset


@pytest.mark.parametrize("kind", ["beats_fbank", "eat_fbank"])
def test_items_equal_frontend_of_audio_dataset_items(manifest, tmp_path, kind):
    """Eval items, normalised with the official stats and EAT's pad-to-16: bit-for-bit equal."""
    out = build_cache(manifest, cfg_of(frontend=kind), tmp_path / "cache")
    fcfg = FrontendConfig.official(kind)
    ds = FeatureDataset(out, frontend=fcfg)
    clips = AudioDataset(manifest, sample_rate=SR)
    assert ds.class_names == clips.class_names == ["bird", "frog", "insect"]
    frontend = build_frontend(fcfg)
    for i in range(len(ds)):
        item, ref = ds[i], clips[i]
        with torch.no_grad():
            feats, mask = frontend(ref["wav"][None], ref["padding_mask"][None])
        torch.testing.assert_close(item["feats"], feats[0], rtol=0, atol=0)
        assert torch.equal(item["frame_mask"], mask[0])
        assert torch.equal(item["target"], ref["target"])  # class index; -100 when unlabelled
    assert ds[3]["target"].item() == -100
    if kind == "eat_fbank":
        assert all(ds[i]["feats"].shape[0] % 16 == 0 for i in range(len(ds)))


def test_eval_clip_frames_equal_frontend_of_audio_crops(manifest, tmp_path):
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    fcfg = FrontendConfig.official("beats_fbank")
    m = frames_for_seconds(fcfg, 1.0)
    ds = FeatureDataset(out, frontend=fcfg, clip_frames=m)
    clips = AudioDataset(manifest, sample_rate=SR, clip_seconds=1.0)
    for i in range(len(ds)):
        item, ref = ds[i], clips[i]
        with torch.no_grad():
            feats, _ = build_frontend(fcfg)(ref["wav"][None], ref["padding_mask"][None])
        valid = feats.shape[1]
        assert item["feats"].shape == (m, 128)
        assert int((~item["frame_mask"]).sum()) == valid  # short clips padded, mask on the tail
        torch.testing.assert_close(item["feats"][:valid], feats[0], atol=1e-4, rtol=0)
        assert (item["feats"][valid:] == 0).all()


def test_multi_label_targets_rows_and_stats(tmp_path, tone):
    specs = [
        ("a.wav", 0.5, SR, 1, "bird,frog"),
        ("b.wav", 0.5, SR, 1, ""),
        ("c.wav", 0.5, SR, 1, "frog"),
    ]
    manifest = write_set(tmp_path, specs, tone)
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    ds = FeatureDataset(out)
    clips = AudioDataset(manifest, sample_rate=SR)
    assert ds.multi_label and clips.multi_label
    for i in range(3):
        assert torch.equal(ds[i]["target"], clips[i]["target"])
    assert "target" not in FeatureDataset(out, class_names=[])[0]
    sub = FeatureDataset(out, rows=[2, 0])
    assert [sub[i]["path"] for i in range(2)] == [ds[2]["path"], ds[0]["path"]]
    # stats.json overrides the normalisation; raw features are kept in the cache
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"frontend": "beats_fbank", "mean": 3.0, "std": 2.0}))
    raw = FeatureDataset(out, normalise=False)[0]["feats"]
    torch.testing.assert_close(FeatureDataset(out, stats=stats)[0]["feats"], (raw - 3.0) / 4.0)
    stats.write_text(json.dumps({"frontend": "logmel", "mean": 3.0, "std": 2.0}))
    with pytest.raises(ConfigError, match="logmel"):
        FeatureDataset(out, stats=stats)
    with pytest.raises(ConfigError, match="kind=beats_fbank"):
        FeatureDataset(out, frontend=FrontendConfig(kind="eat_fbank"))


@pytest.mark.parametrize("clip_frames", [None, 40])
def test_npz_and_memmap_give_identical_items(manifest, tmp_path, clip_frames):
    a = build_cache(manifest, cfg_of(format="npz"), tmp_path / "npz")
    b = build_cache(manifest, cfg_of(format="memmap"), tmp_path / "mm")
    assert len(list((a / "clips").rglob("*.npz"))) == 5 and not (a / "features.f32").exists()
    with np.load(next((a / "clips").rglob("*.npz"))) as z:
        assert z["spectrogram"].dtype == np.float32 and z["spectrogram"].shape[1] == 128
    for train in (False, True):
        da = FeatureDataset(a, clip_frames=clip_frames, train=train, seed=5)
        db = FeatureDataset(b, clip_frames=clip_frames, train=train, seed=5)
        for i in range(len(da)):
            x, y = da[i], db[i]
            assert torch.equal(x["feats"], y["feats"]) and torch.equal(
                x["frame_mask"], y["frame_mask"]
            )
            assert x["start"] == y["start"] and torch.equal(x["target"], y["target"])


def test_training_crops_are_seeded_by_seed_epoch_index(tmp_path, tone):
    manifest = write_set(tmp_path, [(f"{i}.wav", 2.0, SR, 1, "a") for i in range(4)], tone)
    out = build_cache(manifest, cfg_of(format="memmap"), tmp_path / "cache")
    full = FeatureDataset(out)
    ds = FeatureDataset(out, clip_frames=30, train=True, seed=3)
    again = FeatureDataset(out, clip_frames=30, train=True, seed=3)
    other = FeatureDataset(out, clip_frames=30, train=True, seed=4)
    starts = [ds[i]["start"] for i in range(4)]
    assert starts == [again[i]["start"] for i in range(4)]
    assert starts != [other[i]["start"] for i in range(4)]
    for i in range(4):  # a crop is the slice of the whole item that its start names
        a = int(round(ds[i]["start"] * 100))
        assert torch.equal(ds[i]["feats"], full[i]["feats"][a : a + 30])
    ds.set_epoch(1)
    epoch1 = [ds[i]["start"] for i in range(4)]
    assert epoch1 != starts
    # DataLoader workers (which reopen the memmap) see the same items and the set epoch
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_batch)
    got = torch.cat([b["start"] for b in loader]).tolist()
    assert got == pytest.approx(epoch1)


def test_collate_pads_features_like_one_at_a_time(manifest, tmp_path):
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    ds = FeatureDataset(out)
    items = [ds[i] for i in range(len(ds))]
    batch = collate_batch(items)
    n = max(it["feats"].shape[0] for it in items)
    assert batch["feats"].shape == (5, n, 128) and batch["frame_mask"].shape == (5, n)
    assert "wav" not in batch and batch["index"].tolist() == [0, 1, 2, 3, 4]
    for b, it in enumerate(items):
        t = it["feats"].shape[0]
        assert torch.equal(batch["feats"][b, :t], it["feats"])
        assert not batch["frame_mask"][b, :t].any() and batch["frame_mask"][b, t:].all()
        assert (batch["feats"][b, t:] == 0).all()


# --------------------------------------------------------------------------- building


def test_workers_build_the_same_cache(manifest, tmp_path):
    a = build_cache(manifest, cfg_of(format="npz", num_workers=2), tmp_path / "w2")
    b = build_cache(manifest, cfg_of(format="npz"), tmp_path / "w0")
    da, db = FeatureDataset(a), FeatureDataset(b)
    for i in range(len(da)):
        assert torch.equal(da[i]["feats"], db[i]["feats"])


def test_unreadable_rows_are_skipped_and_listed(manifest, tmp_path):
    df = pd.read_csv(manifest)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not audio")
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "path": "bad.wav", "recording": "bad"}
    write_manifest(df.assign(path=[str(tmp_path / p) for p in df["path"]]), manifest)
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    cache = open_cache(out)
    skipped = pd.read_csv(out / "skipped.csv")
    assert cache.meta["n_skipped"] == 1 and len(cache) == 5
    assert skipped["path"].tolist() == [str(bad)] and skipped["reason"].iloc[0]
    assert str(bad) not in cache.items["path"].tolist()
    assert cache.items["manifest_row"].tolist() == [0, 1, 2, 3, 4]


def test_existing_cache_needs_force_and_non_caches_are_never_replaced(manifest, tmp_path):
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    with pytest.raises(ConfigError, match="--force"):
        build_cache(manifest, cfg_of(), out)
    build_cache(manifest, cfg_of(force=True, format="npz"), out)
    assert open_cache(out).format == "npz"
    precious = tmp_path / "my_data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a feature cache"):
        build_cache(manifest, cfg_of(force=True), precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_crash_leaves_no_half_cache_and_keeps_the_old_one(manifest, tmp_path, monkeypatch):
    out = build_cache(manifest, cfg_of(), tmp_path / "cache")
    before = FeatureDataset(out)[1]["feats"]
    real = F._Featurise.__getitem__

    def crash(self, i):
        if i == 3:
            raise RuntimeError("disk on fire")
        return real(self, i)

    monkeypatch.setattr(F._Featurise, "__getitem__", crash)
    with pytest.raises(RuntimeError):
        build_cache(manifest, cfg_of(force=True, format="npz"), out)
    with pytest.raises(RuntimeError):
        build_cache(manifest, cfg_of(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert open_cache(out).format == "memmap"  # the old cache is intact
    assert torch.equal(FeatureDataset(out)[1]["feats"], before)


def test_half_or_corrupt_caches_are_refused_in_one_line(manifest, tmp_path):
    def broken(name: str) -> Path:
        return build_cache(manifest, cfg_of(), tmp_path / name)

    def refused(path: Path, match: str) -> None:
        with pytest.raises(DataError, match=match) as e:
            FeatureDataset(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)

    a = broken("a")
    (a / "cache.json").unlink()
    refused(a, "no cache.json")
    b = broken("b")
    md = pd.read_csv(b / "metadata.csv")
    md.iloc[:-1].to_csv(b / "metadata.csv", index=False)
    refused(b, "4 rows but cache.json says 5")
    c = broken("c")
    data = (c / "features.f32").read_bytes()
    (c / "features.f32").write_bytes(data[: len(data) // 2])
    refused(c, "features.f32 is")
    d = broken("d")
    meta = json.loads((d / "cache.json").read_text())
    meta["total_frames"] += 1
    (d / "cache.json").write_text(json.dumps(meta))
    refused(d, "do not add up")
    refused(tmp_path / "nowhere", "not found")


# --------------------------------------------------------------------------- finding a cache


def test_find_cache_matches_manifest_frontend_and_window(manifest, tmp_path, tone):
    beats = FrontendConfig(kind="beats_fbank")
    assert find_cache(manifest, beats) is None
    out = build_cache(manifest, cfg_of())  # default: features/<stem>-<kind> beside the manifest
    assert out == manifest.parent / "features" / "manifest-beats_fbank"
    assert find_cache(manifest, beats) == out
    # official stats or EAT-style frame padding do not change what is cached
    assert find_cache(manifest, dataclasses.replace(beats, mean=1.0, std=2.0)) == out
    assert find_cache(manifest, FrontendConfig(kind="logmel")) is None
    assert find_cache(manifest, beats, window=1.0) is None
    with pytest.raises(ConfigError, match="kind=beats_fbank"):
        find_cache(manifest, FrontendConfig(kind="logmel"), cache_dir=out)
    with pytest.raises(ConfigError, match="whole manifest rows, not 1 s windows"):
        find_cache(manifest, beats, cache_dir=out, window=1.0)
    # a damaged cache in the default place is passed over with a warning, never used
    data = (out / "features.f32").read_bytes()
    (out / "features.f32").write_bytes(data[:-4])
    with pytest.warns(UserWarning, match="ignoring feature cache"):
        assert find_cache(manifest, beats) is None
    (out / "features.f32").write_bytes(data)
    other = write_set(tmp_path / "features", [("z.wav", 0.5, SR, 1, "")], tone)
    with pytest.raises(ConfigError, match="made from .*manifest.csv, not from"):
        find_cache(other, beats, cache_dir=out)
    # editing the manifest invalidates its caches
    df = pd.read_csv(manifest)
    df.loc[0, "labels"] = "owl"
    df.to_csv(manifest, index=False)
    assert find_cache(manifest, beats) is None
    with pytest.raises(ConfigError, match="has changed since the cache was made") as e:
        find_cache(manifest, beats, cache_dir=out)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- CLI


def test_cli_builds_a_cache_and_reports_where(manifest, tmp_path, capsys):
    out = tmp_path / "cli_cache"
    code = main(
        ["features", str(manifest), "--out", str(out), "--num_workers", "0", "--no-progress"]
        + ["--frontend", "logmel", "--format", "npz"]
    )
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.frontend.kind == "logmel" and cache.format == "npz" and len(cache) == 5


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--window", "-1"], "--window must be > 0"),
        (["--hop", "1"], "--hop needs --window"),
        (["--format", "zip"], "--format"),
        (["--frontend", "wavelet"], "--frontend"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(manifest, tmp_path, capsys, extra, match):
    code = main(["features", str(manifest), "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_missing_manifest_and_existing_out(manifest, tmp_path, capsys):
    assert main(["features", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "manifest not found" in err and err.count("\n") == 1
    args = ["features", str(manifest), "--out", str(tmp_path / "c"), "--num_workers", "0"]
    assert main(args + ["--no-progress"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and err.count("\n") == 1


@pytest.mark.shared_data
def test_real_recordings_cached_equal_on_the_fly(shared_data, tmp_path):
    """Real ESC-10 clips (44.1 kHz OGG, resampled): cache = frontend on the fly, both formats."""
    files = sorted((shared_data / "esc10").glob("*/*.ogg"))[:3]
    if len(files) < 3:
        pytest.skip("ESC-10 clips not found")
    rows = []
    for p in files:
        meta = audio.info(p)
        rows.append(
            {"path": str(p), "sample_rate": meta.sample_rate, "frames": meta.frames}
            | {"duration": meta.duration, "labels": p.parent.name}
        )
    manifest = write_manifest(pd.DataFrame(rows), tmp_path / "esc.csv")
    clips = AudioDataset(manifest, sample_rate=SR)
    fcfg = FrontendConfig.official("eat_fbank")
    for fmt in ("npz", "memmap"):
        out = build_cache(manifest, cfg_of(frontend="eat_fbank", format=fmt), tmp_path / fmt)
        ds = FeatureDataset(out, frontend=fcfg)
        for i in range(3):
            with torch.no_grad():
                ref, _ = build_frontend(fcfg)(clips[i]["wav"][None], clips[i]["padding_mask"][None])
            assert torch.equal(ds[i]["feats"], ref[0])
            assert torch.equal(ds[i]["target"], clips[i]["target"])
