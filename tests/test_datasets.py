"""Datasets: windows over long recordings, crops, padding, targets, collate, streaming shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import whole_file_row
from torch.utils.data import DataLoader

from bioaudio.data import audio
from bioaudio.data.datasets import (
    IGNORE_INDEX,
    AudioDataset,
    StreamingAudioDataset,
    collate_batch,
    is_multi_label,
    resolve_classes,
    segment_windows,
)
from bioaudio.data.manifest import write_manifest
from bioaudio.errors import AudioDecodeError, DataError

SR = 16000


def manifest_rows(files: list[tuple[Path, str]]) -> pd.DataFrame:
    """A manifest of whole files from their headers (not `bioaudio prepare`: kept independent)."""
    return pd.DataFrame([whole_file_row(path, labels) for path, labels in files])


def noise(seconds: float, sr: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.standard_normal((int(round(seconds * sr)), channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


@pytest.fixture
def clips(tmp_path, tone):
    """Short files at several rates, mono and stereo, with labels."""
    specs = [
        ("a.wav", 0.3, 16000, 1, "bird"),
        ("b.wav", 1.0, 8000, 1, "frog"),
        ("c.flac", 2.5, 22050, 2, "bird,frog"),
        ("d.wav", 1.7, 44100, 2, "insect"),
        ("e.wav", 0.9, 16000, 1, ""),
    ]
    files = []
    for i, (name, sec, sr, ch, labels) in enumerate(specs):
        p = tmp_path / name
        sf.write(p, tone(sec, sr, 300.0 + 100 * i, channels=ch, seed=i), sr)
        files.append((p, labels))
    return manifest_rows(files)


@pytest.fixture
def long_file(tmp_path):
    """A 30 s 16 kHz recording of noise: any misplaced window shows."""
    x = noise(30.0, SR, seed=7)
    p = tmp_path / "long.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    return p, x


# --------------------------------------------------------------------------- windows


def test_segment_windows_tail_rule():
    df = pd.DataFrame(
        {
            "path": ["x.wav"] * 4,
            "start": [0.0, 10.0, 0.0, 0.0],
            "end": [5.0, 14.0, 0.3, 5.5],
            "labels": ["a", "b", "", "c"],
        }
    )
    w = segment_windows(df.iloc[:3], window=2.0)
    # 0-5: full 0-2, 2-4, and the 1 s tail (>= half a window) kept; 10-14 tiles exactly;
    # a 0.3 s segment is its own padded window
    assert w["start"].tolist() == [0.0, 2.0, 4.0, 10.0, 12.0, 0.0]
    assert w["end"].tolist() == [2.0, 4.0, 5.0, 12.0, 14.0, 0.3]
    assert w["segment_index"].tolist() == [0, 0, 0, 1, 1, 2]
    assert w["window_index"].tolist() == [0, 1, 2, 0, 1, 0]
    assert w["labels"].tolist() == ["a", "a", "a", "b", "b", ""]
    # a tail shorter than min_last is dropped
    assert segment_windows(df.iloc[:1], 2.0, min_last=1.5)["start"].tolist() == [0.0, 2.0]
    # with overlap, the one partial window reaches the end; no later partial repeats it
    w = segment_windows(df.iloc[3:], window=2.0, hop=1.0)
    assert w["start"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert w["end"].tolist() == [2.0, 3.0, 4.0, 5.0, 5.5]


@pytest.mark.parametrize("window,hop", [(1.0, 1.0), (2.0, 0.7), (0.5, 0.25), (3.0, 1.1)])
def test_segment_windows_cover_each_segment(window, hop):
    rng = np.random.default_rng(0)
    start = rng.uniform(0, 100, 50).round(3)
    df = pd.DataFrame(
        {"path": "x.wav", "start": start, "end": start + rng.uniform(0.05, 9, 50).round(3)}
    )
    w = segment_windows(df, window, hop, min_last=0.0)
    for i, seg in w.groupby("segment_index"):
        s, e = df.loc[i, "start"], df.loc[i, "end"]
        assert seg["start"].min() == pytest.approx(s) and seg["end"].max() == pytest.approx(e)
        assert (seg["end"] - seg["start"] <= window + 1e-9).all()
        assert (seg["end"] <= e + 1e-9).all()
        assert np.allclose(np.diff(seg["start"]), hop)  # regular hops, none skipped
        # all windows but the last are full
        assert np.allclose((seg["end"] - seg["start"]).iloc[:-1], window)


def test_windowed_items_equal_slices_of_the_file(long_file):
    path, x = long_file
    df = pd.DataFrame(
        {
            "path": [str(path)],
            "sample_rate": [SR],
            "frames": [len(x)],
            "duration": [30.0],
            "start": [3.0],
            "end": [30.0],
            "labels": ["owl"],
        }
    )
    win = segment_windows(df, window=2.0, hop=1.5)
    ds = AudioDataset(win, sample_rate=SR, clip_seconds=2.0)
    assert len(ds) == len(win)
    for i in range(len(ds)):
        item = ds[i]
        a = int(round(win["start"][i] * SR))
        valid = min(2 * SR, len(x) - a)
        assert item["wav"].shape == (2 * SR,)
        np.testing.assert_array_equal(item["wav"][:valid].numpy(), x[a : a + valid])
        assert not item["padding_mask"][:valid].any() and item["padding_mask"][valid:].all()
        assert (item["wav"][valid:] == 0).all()
        assert item["target"].item() == 0 and item["start"] == pytest.approx(win["start"][i])
    assert ds[len(ds) - 1]["padding_mask"].any()  # the last window (29-30 s) is padded


# --------------------------------------------------------------------------- clips


def test_whole_file_item_equals_decoding_the_file(clips):
    ds = AudioDataset(clips, sample_rate=SR, min_seconds=0.0)
    for i, path in enumerate(clips["path"]):
        item = ds[i]
        ref = audio.load(path, sample_rate=SR)  # mono down-mix + resample of the whole file
        assert item["wav"].dtype == torch.float32 and item["padding_mask"].dtype == torch.bool
        n = min(len(ref), item["wav"].shape[0])
        assert abs(len(ref) - item["wav"].shape[0]) <= 1
        np.testing.assert_allclose(item["wav"][:n].numpy(), ref[:n], atol=1e-6)
        assert not item["padding_mask"].any()


def test_short_clips_padded_with_mask(clips):
    ds = AudioDataset(clips, sample_rate=SR, clip_seconds=1.2, min_seconds=0.0)
    for i in range(len(ds)):
        item = ds[i]
        valid = min(int(round(clips["duration"][i] * SR)), int(1.2 * SR))
        assert item["wav"].shape == (int(1.2 * SR),)
        assert int((~item["padding_mask"]).sum()) == valid
        assert (item["wav"][item["padding_mask"]] == 0).all()


def test_eval_crop_start_and_center(long_file):
    path, x = long_file
    df = manifest_rows([(path, "")])
    first = AudioDataset(df, sample_rate=SR, clip_seconds=1.0)[0]
    centre = AudioDataset(df, sample_rate=SR, clip_seconds=1.0, eval_crop="center")[0]
    np.testing.assert_array_equal(first["wav"].numpy(), x[:SR])
    a = (len(x) - SR) // 2
    np.testing.assert_array_equal(centre["wav"].numpy(), x[a : a + SR])
    assert "target" not in first  # no classes: a pretraining item


def test_train_crops_are_seeded_by_seed_epoch_index(long_file):
    path, x = long_file
    df = manifest_rows([(path, "")] * 3)
    ds = AudioDataset(df, sample_rate=SR, clip_seconds=1.0, train=True, seed=3)
    again = AudioDataset(df, sample_rate=SR, clip_seconds=1.0, train=True, seed=3)
    other_seed = AudioDataset(df, sample_rate=SR, clip_seconds=1.0, train=True, seed=4)
    starts = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        other_seed.set_epoch(epoch)
        for i in range(3):
            item = ds[i]
            a = int(round(item["start"] * SR))
            np.testing.assert_array_equal(item["wav"].numpy(), x[a : a + SR])  # crop = slice
            assert torch.equal(item["wav"], again[i]["wav"])
            starts[epoch, i] = item["start"]
            assert other_seed[i]["start"] != item["start"]
    # rows of the same file still get different crops; a new epoch moves them
    assert len({starts[0, i] for i in range(3)}) == 3
    assert all(starts[0, i] != starts[1, i] for i in range(3))


def test_set_epoch_reaches_persistent_workers(long_file):
    path, _ = long_file
    df = manifest_rows([(path, "")] * 6)
    ds = AudioDataset(df, sample_rate=SR, clip_seconds=0.5, train=True, seed=1)
    loader = DataLoader(
        ds, batch_size=2, num_workers=2, persistent_workers=True, collate_fn=collate_batch
    )
    seen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batches = list(loader)
        got = torch.cat([b["start"] for b in batches])
        want = torch.tensor([ds[i]["start"] for i in range(6)], dtype=torch.float64)
        assert torch.equal(got, want)  # workers drew the same crops as the main process
        seen.append(got)
    assert not torch.equal(seen[0], seen[1])


def test_wave_augment_gets_valid_samples_and_a_seeded_generator(clips):
    lengths = []

    def augment(wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lengths.append(len(wav))
        return wav + rng.standard_normal(len(wav)).astype(np.float32)

    kw = dict(sample_rate=SR, clip_seconds=2.0, train=True, seed=5, min_seconds=0.0)
    ds = AudioDataset(clips, wave_augment=augment, **kw)
    a, b = ds[1], ds[1]
    assert torch.equal(a["wav"], b["wav"])
    assert lengths[-1] == int((~a["padding_mask"]).sum()) == SR  # b.wav lasts 1 s
    assert (a["wav"][a["padding_mask"]] == 0).all()  # padding untouched by the augmentation
    plain = AudioDataset(clips, **kw)[1]
    assert not torch.equal(plain["wav"], a["wav"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["wav"], a["wav"])


# --------------------------------------------------------------------------- targets


def test_targets_multi_label_single_label_and_unlabelled(clips):
    names, multi = resolve_classes(clips)
    assert names == ["bird", "frog", "insect"] and multi and is_multi_label(clips)
    ds = AudioDataset(clips, sample_rate=SR, min_seconds=0.0)
    targets = torch.stack([ds[i]["target"] for i in range(len(ds))])
    assert targets.dtype == torch.float32
    expected = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert targets.tolist() == expected

    single = clips.drop(index=2).reset_index(drop=True)
    assert not is_multi_label(single)
    ds = AudioDataset(single, class_names=["frog", "bird", "insect"], sample_rate=SR)
    got = [int(ds[i]["target"]) for i in range(len(ds))]
    assert got == [1, 0, 2, IGNORE_INDEX] and ds[0]["target"].dtype == torch.long


def test_label_errors_name_the_problem(clips):
    with pytest.raises(DataError, match="'insect' is not one of the classes"):
        AudioDataset(clips, class_names=["bird", "frog"], min_seconds=0.0)
    with pytest.raises(DataError, match="2 labels .* single-label"):
        AudioDataset(clips, multi_label=False, min_seconds=0.0)


def test_min_seconds_drops_short_segments(clips):
    with pytest.warns(UserWarning, match="dropping 1 of 5"):
        ds = AudioDataset(clips, min_seconds=0.5)
    assert len(ds) == 4 and "a.wav" not in " ".join(ds.df["path"])


def test_unreadable_file_raises_or_is_skipped(clips, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really audio")
    df = clips.copy()
    df.loc[1, "path"] = str(bad)
    ds = AudioDataset(df, sample_rate=SR, min_seconds=0.0)
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        ds[1]
    ds = AudioDataset(df, sample_rate=SR, min_seconds=0.0, skip_errors=True)
    with pytest.warns(UserWarning, match="broken.wav"):
        item = ds[1]
    assert item["index"] == 2 and ds.n_skipped == 1
    assert torch.equal(item["wav"], ds[2]["wav"])


# --------------------------------------------------------------------------- collate


def test_collate_pads_to_longest_and_keeps_items(clips):
    ds = AudioDataset(clips, sample_rate=SR, min_seconds=0.0)
    items = [ds[i] for i in range(len(ds))]
    batch = collate_batch(items)
    longest = max(it["wav"].shape[0] for it in items)
    assert batch["wav"].shape == (5, longest) and batch["padding_mask"].shape == (5, longest)
    assert batch["target"].shape == (5, 3) and batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["path"] == list(clips["path"])
    for b, it in enumerate(items):
        n = it["wav"].shape[0]
        assert torch.equal(batch["wav"][b, :n], it["wav"])
        assert not batch["padding_mask"][b, :n].any() and batch["padding_mask"][b, n:].all()
        assert (batch["wav"][b, n:] == 0).all()


# --------------------------------------------------------------------------- streaming


@pytest.fixture
def stream_manifest(tmp_path, long_file):
    """13 one-second segments of one recording (an odd count: shards are uneven)."""
    path, _ = long_file
    labels = ["a", "b", "c", "a,b"] * 3 + ["c"]
    df = manifest_rows([(path, "")] * 13)
    df["start"] = np.arange(13) * 2.0
    df["end"] = df["start"] + 1.5
    df["labels"] = labels
    out = tmp_path / "stream.csv"
    write_manifest(df, out)
    return out


def _stream_items(manifest: Path, rank: int, world: int, workers: int, **kw) -> list[dict]:
    ds = StreamingAudioDataset(manifest, rank=rank, world_size=world, **kw)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return list(loader)


def test_streaming_shards_cover_every_row_once(stream_manifest):
    kw = dict(sample_rate=SR, clip_seconds=1.0, train=True, seed=0, even_shards=False)
    per_rank = [
        [it["index"] for it in _stream_items(stream_manifest, r, 2, 2, **kw)] for r in (0, 1)
    ]
    all_rows = sorted(per_rank[0] + per_rank[1])
    assert all_rows == list(range(13))
    assert sorted(per_rank[0]) == list(range(0, 13, 2))  # row i goes to rank i % world
    # even shards: both ranks yield the same number of rows, none twice
    kw["even_shards"] = True
    even = [[it["index"] for it in _stream_items(stream_manifest, r, 2, 2, **kw)] for r in (0, 1)]
    assert len(even[0]) == len(even[1]) == 6 and len(set(even[0] + even[1])) == 12
    ds = StreamingAudioDataset(stream_manifest, rank=1, world_size=2, **kw)
    assert len(ds) == 6


def test_streaming_is_seeded_and_epoch_changes_order(stream_manifest):
    def order(seed: int, epoch: int) -> list[int]:
        ds = StreamingAudioDataset(
            stream_manifest, train=True, seed=seed, shuffle_buffer=4, sample_rate=SR
        )
        ds.set_epoch(epoch)
        return [it["index"] for it in DataLoader(ds, batch_size=None, num_workers=2)]

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(13))
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)


def test_streaming_items_equal_map_style_items(stream_manifest):
    from bioaudio.data.manifest import read_manifest

    kw = dict(sample_rate=SR, clip_seconds=1.0, train=True, seed=2)
    stream = StreamingAudioDataset(stream_manifest, **kw)
    ref = AudioDataset(read_manifest(stream_manifest), **kw)
    assert stream.class_names == ref.class_names == ["a", "b", "c"]
    assert stream.multi_label and ref.multi_label
    for epoch in (0, 3):
        stream.set_epoch(epoch)
        ref.set_epoch(epoch)
        for item in stream:
            other = ref[item["index"]]
            assert torch.equal(item["wav"], other["wav"])
            assert torch.equal(item["target"], other["target"])
            assert item["path"] == other["path"]


def test_streaming_bad_input(tmp_path, stream_manifest):
    with pytest.raises(DataError, match="manifest not found"):
        StreamingAudioDataset(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,labels\nx.wav,a\n")
    with pytest.raises(DataError, match="missing column"):
        StreamingAudioDataset(bad)
    # label problems surface at construction (main process), not inside a DataLoader worker
    with pytest.raises(DataError, match="row 2 .*'c' is not one of the classes"):
        StreamingAudioDataset(stream_manifest, class_names=["a", "b"])
    with pytest.raises(DataError, match="row 3 .*2 labels"):
        StreamingAudioDataset(stream_manifest, class_names=["a", "b", "c"], multi_label=False)
