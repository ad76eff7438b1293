"""Audio decoding: formats, windows by seeking, down-mixing, resampling, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from bioaudio.data import audio
from bioaudio.errors import AudioDecodeError


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


LOSSLESS = [
    ("wav", "WAV", "PCM_16", 1 / 2**15),
    ("wav", "WAV", "PCM_24", 1 / 2**23),
    ("wav", "WAV", "PCM_32", 1 / 2**31),
    ("wav", "WAV", "FLOAT", 1e-7),
    ("wav", "WAVEX", "PCM_24", 1 / 2**23),  # WAVE_FORMAT_EXTENSIBLE header
    ("flac", "FLAC", "PCM_16", 1 / 2**15),
    ("flac", "FLAC", "PCM_24", 1 / 2**23),
]


@pytest.mark.parametrize("ext,fmt,subtype,tol", LOSSLESS)
def test_lossless_formats_decode_exactly(tmp_path, tone, ext, fmt, subtype, tol):
    x = tone(1.0, 16000, 440.0)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 16000, format=fmt, subtype=subtype)
    meta = audio.info(p)
    assert (meta.sample_rate, meta.frames, meta.channels) == (16000, 16000, 1)
    y = audio.load(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= tol * 1.01


@pytest.mark.parametrize(
    "ext,fmt,subtype", [("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")]
)
def test_lossy_formats_decode(tmp_path, tone, ext, fmt, subtype):
    x = tone(2.0, 44100, 1000.0)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, 44100, format=fmt, subtype=subtype)
    y = audio.load(p, sample_rate=16000)
    # lossy codecs add encoder delay / padding: length within 0.1 s, the tone survives
    assert abs(len(y) - 32000) < 1600
    assert abs(_peak_hz(y, 16000) - 1000.0) < 10.0


@pytest.mark.parametrize("channels", [2, 6])
def test_downmix_any_channel_count(tmp_path, tone, channels):
    x = tone(0.5, 16000, 300.0, channels=channels)
    p = tmp_path / "multi.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    assert audio.info(p).channels == channels
    np.testing.assert_allclose(audio.load(p), x.mean(axis=1), atol=1e-6)
    multi = audio.load(p, mono=False)
    assert multi.shape == (channels, x.shape[0])
    np.testing.assert_allclose(multi, x.T, atol=1e-7)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 96000, 250000, 500000])
def test_resample_any_rate_to_16k(tmp_path, tone, sr):
    x = tone(0.5, sr, 1234.0)
    p = tmp_path / "r.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    y = audio.load(p, sample_rate=16000)
    assert abs(len(y) - 8000) <= 1
    assert abs(_peak_hz(y, 16000) - 1234.0) < 4.0
    keep = audio.load(p, sample_rate=None)
    assert len(keep) == len(x)


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_window_read_equals_slice_of_full_decode(tmp_path, ext):
    """Seeking a window gives exactly the samples of the full decode."""
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(22050 * 7)).astype(np.float32)
    p = tmp_path / f"long.{ext}"
    sf.write(p, x, 22050, subtype="PCM_24")
    full = audio.load(p, sample_rate=None)
    win = audio.load(p, sample_rate=None, offset=2.5, duration=1.25)
    start = int(round(2.5 * 22050))
    np.testing.assert_array_equal(win, full[start : start + int(np.ceil(1.25 * 22050))])
    # a window running past the end is returned short, never an error
    tail = audio.load(p, sample_rate=None, offset=6.5, duration=2.0)
    np.testing.assert_array_equal(tail, full[int(round(6.5 * 22050)) :])
    # resampled windows have the exact requested length
    assert len(audio.load(p, sample_rate=16000, offset=1.0, duration=2.0)) == 32000


def test_pad_or_crop_mask():
    y, mask = audio.pad_or_crop(np.ones(5, dtype=np.float32), 8)
    assert y.tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert mask.tolist() == [False] * 5 + [True] * 3
    y, mask = audio.pad_or_crop(np.arange(10, dtype=np.float32), 4, start=3)
    assert y.tolist() == [3, 4, 5, 6] and not mask.any()


def test_typed_errors_name_file_and_reason(tmp_path, tone):
    cases = {}
    cases["missing.wav"] = None
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty"
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    cases["garbage.wav"] = None
    good = tmp_path / "good.wav"
    sf.write(good, tone(1.0, 16000), 16000)
    (tmp_path / "truncated.flac").write_bytes(b"fLaC" + good.read_bytes()[4:40])
    cases["truncated.flac"] = None
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    cases["zero.wav"] = "zero-length"
    for name, reason in cases.items():
        with pytest.raises(AudioDecodeError) as err:
            audio.load(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)
        assert err.value.path.endswith(name) and err.value.reason
        if reason:
            assert reason in err.value.reason
    with pytest.raises(AudioDecodeError, match="past the end"):
        audio.load(good, offset=5.0)
    with pytest.raises(AudioDecodeError, match="directory"):
        audio.info(tmp_path)


def test_save_is_atomic_and_roundtrips(tmp_path, tone):
    x = tone(0.25, 16000)
    p = tmp_path / "out" / "x.flac"
    audio.save(p, x, 16000)
    assert not list(p.parent.glob(".*tmp*"))
    np.testing.assert_allclose(audio.load(p), x, atol=1 / 2**15)


@pytest.mark.parametrize("protocol", ["memory", "file"])
def test_fsspec_urls_read_windows_by_seeking(tmp_path, protocol):
    """A manifest may name recordings by fsspec URL (object storage): a window read through the
    URL equals the same window of the local file, and a training dataset reads it."""
    import fsspec
    import pandas as pd

    from bioaudio.data.datasets import AudioDataset
    from bioaudio.data.manifest import read_manifest, write_manifest

    sr = 8000
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10 * sr) / sr)).astype(np.float32)
    local = tmp_path / "long.flac"
    sf.write(local, x, sr)
    if protocol == "memory":
        url = "memory://bucket/site/long.flac"
        with fsspec.open(url, "wb") as f:
            f.write(local.read_bytes())
    else:
        url = f"file://{local}"
    meta = audio.info(url)
    assert (meta.sample_rate, meta.frames) == (sr, len(x))
    window = audio.load(url, sample_rate=sr, offset=3.0, duration=1.5)
    np.testing.assert_allclose(window, audio.load(local, sample_rate=sr, offset=3.0, duration=1.5))
    row = {"path": url, "sample_rate": sr, "frames": len(x), "duration": 10.0, "channels": 1,
           "start": 2.0, "end": 4.0, "labels": "tone", "recording": "long", "source": "csv"}  # fmt: skip
    manifest = write_manifest(pd.DataFrame([row]), tmp_path / "m.csv")
    df = read_manifest(manifest)
    assert df["path"].iloc[0] == url  # not turned into a local path
    item = AudioDataset(df, sample_rate=sr, clip_seconds=2.0)[0]
    np.testing.assert_allclose(item["wav"].numpy(), x[2 * sr : 4 * sr], atol=1e-4)
    with pytest.raises(AudioDecodeError, match="no such file"):
        audio.info("memory://bucket/missing.flac")


@pytest.mark.parametrize(
    "ext,sr,channels", [("wav", 16000, 1), ("flac", 44100, 2), ("wav", 22050, 3)]
)
def test_load_windows_equals_load_window_by_window(tmp_path, ext, sr, channels):
    """One read of the stretch several windows cover gives each window exactly as `load` does:
    overlapping, out of order, touching the end, at the file's rate or resampled and
    down-mixed."""
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((int(3.3 * sr), channels))).astype(np.float32)
    p = tmp_path / f"a.{ext}"
    sf.write(p, x, sr)
    windows = [(0.5, 1.0), (0.0, 1.0), (1.0, 1.0), (1.25, 0.37), (2.5, 1.0), (3.0, 0.3001)]
    for target in (16000, None):
        got = audio.load_windows(p, target, windows)
        assert len(got) == len(windows)
        for (o, d), y in zip(windows, got):
            ref = audio.load(p, target, offset=o, duration=d)
            assert y.dtype == np.float32 and y.shape == ref.shape, (o, d, target)
            assert np.array_equal(y, ref), (o, d, target)
    a, b = audio.load_windows(p, 16000, [(0.0, 1.0), (0.5, 1.0)])
    a[:] = 7.0  # overlapping windows never share a buffer
    assert not np.any(b == 7.0)


def test_load_windows_errors_as_load_does(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioDecodeError, match="past the end"):
        audio.load_windows(p, 16000, [(0.0, 0.5), (1.5, 0.5)])
    with pytest.raises(AudioDecodeError, match="invalid window"):
        audio.load_windows(p, 16000, [(0.0, 0.0)])
    with pytest.raises(AudioDecodeError, match="no such file"):
        audio.load_windows(tmp_path / "missing.wav", 16000, [(0.0, 0.5)])
    assert audio.load_windows(p, 16000, []) == []
