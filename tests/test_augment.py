"""Augmentations: waveform transforms measured on synthetic audio, SpecAugment, mixup."""

from __future__ import annotations

import argparse
import math
import pickle

import numpy as np
import pytest
import torch

from bioaudio.config import add_dataclass_args, config_from_args
from bioaudio.data import audio
from bioaudio.data.augment import (
    MixupConfig,
    SpecAugment,
    SpecAugmentConfig,
    WaveAugmentConfig,
    build_wave_augment,
    mixup,
    mixup_masked,
    spec_augment,
    time_stretch,
)
from bioaudio.errors import ConfigError, DataError

SR = 16000


def _tone(freq: float, seconds: float = 1.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return 10 * math.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))


def _peak_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    return float(np.fft.rfftfreq(x.shape[0], 1 / sr)[np.argmax(spec)])


ALL_ON = dict(
    gain_p=1.0,
    noise_p=1.0,
    roll_p=1.0,
    stretch_p=1.0,
    pitch_p=1.0,
    time_mask_p=1.0,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1000, 12345])
def test_wave_augment_keeps_shape_and_dtype(dtype, length):
    aug = build_wave_augment(WaveAugmentConfig(**ALL_ON))
    x = _tone(440.0, length / SR).astype(dtype)
    y = aug(x, np.random.default_rng(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.isfinite(y).all() and not np.array_equal(x, y)
    assert np.array_equal(x, _tone(440.0, length / SR).astype(dtype))  # input untouched


def test_wave_augment_is_deterministic_per_seed_and_picklable():
    aug = build_wave_augment(WaveAugmentConfig(**ALL_ON))
    x = _tone(300.0, 0.5)
    a = aug(x, np.random.default_rng(7))
    b = aug(x, np.random.default_rng(7))
    c = aug(x, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # DataLoader workers receive a pickled copy: it must behave identically.
    clone = pickle.loads(pickle.dumps(aug))
    np.testing.assert_array_equal(clone(x, np.random.default_rng(7)), a)


def test_disabled_augment_is_identity():
    cfg = WaveAugmentConfig()
    assert not cfg.enabled
    x = _tone(500.0, 0.3)
    np.testing.assert_array_equal(build_wave_augment(cfg)(x, np.random.default_rng(0)), x)


@pytest.mark.parametrize("snr", [0.0, 10.0, 30.0])
def test_gaussian_noise_snr_is_measured(snr):
    aug = build_wave_augment(WaveAugmentConfig(noise_p=1.0, noise_snr_db=(snr, snr)))
    x = _tone(440.0, 1.0)
    assert abs(_snr_db(x, aug(x, np.random.default_rng(1))) - snr) < 0.5


def test_gain_in_db_is_measured():
    x = _tone(440.0, 0.25)
    aug = build_wave_augment(WaveAugmentConfig(gain_p=1.0, gain_db=(6.0, 6.0)))
    y = aug(x, np.random.default_rng(0))
    assert 20 * math.log10(np.sqrt(np.mean(y**2) / np.mean(x**2))) == pytest.approx(6.0, abs=1e-3)
    aug = build_wave_augment(WaveAugmentConfig(gain_p=1.0, gain_db=(-3.0, 2.0)))
    gains = [
        20 * math.log10(np.abs(aug(x, np.random.default_rng(s))).max() / np.abs(x).max())
        for s in range(30)
    ]
    assert -3.0 - 1e-4 <= min(gains) and max(gains) <= 2.0 + 1e-4
    assert max(gains) - min(gains) > 2.0  # actually random within the range


def _write_noise(folder, name: str, freq: float, seconds: float) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.2 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape[0])
    audio.save(folder / name, x.astype(np.float32), SR)


def test_background_noise_from_folder_at_snr(tmp_path):
    noise_dir = tmp_path / "noise" / "wind"
    noise_dir.mkdir(parents=True)
    _write_noise(noise_dir, "hum.wav", 3000.0, 3.0)
    cfg = WaveAugmentConfig(
        background_p=1.0, background_noise=[str(tmp_path / "noise")], background_snr_db=(5, 5)
    )
    aug = build_wave_augment(cfg)
    x = _tone(440.0, 1.0)
    y = aug(x, np.random.default_rng(0))
    assert abs(_snr_db(x, y) - 5.0) < 0.5
    assert abs(_peak_hz(y - x) - 3000.0) < 20  # the residual is the file's noise


def test_short_background_noise_is_tiled_and_txt_lists_work(tmp_path):
    _write_noise(tmp_path, "short.flac", 2000.0, 0.2)
    (tmp_path / "noise.txt").write_text("# one path per line\nshort.flac\n")
    cfg = WaveAugmentConfig(
        background_p=1.0, background_noise=[str(tmp_path / "noise.txt")], background_snr_db=(0, 0)
    )
    x = _tone(440.0, 1.0)
    residual = build_wave_augment(cfg)(x, np.random.default_rng(0)) - x
    # Noise present in every 0.1 s slice, including after the 0.2 s of the file.
    slices = residual.reshape(10, -1)
    assert (np.sqrt(np.mean(slices**2, axis=1)) > 0.1).all()


def test_background_noise_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --background_noise"):
        WaveAugmentConfig(background_p=0.5)
    with pytest.raises(ConfigError, match="does not exist"):
        build_wave_augment(
            WaveAugmentConfig(background_p=0.5, background_noise=[str(tmp_path / "nope")])
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no audio files under"):
        build_wave_augment(
            WaveAugmentConfig(background_p=0.5, background_noise=[str(tmp_path / "empty")])
        )


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_time_stretch_keeps_length(rate):
    x = _tone(440.0, 0.7)
    aug = build_wave_augment(WaveAugmentConfig(stretch_p=1.0, stretch_rate=(rate, rate)))
    y = aug(x, np.random.default_rng(0))
    assert y.shape == x.shape
    assert abs(_peak_hz(y) - 440.0) < 10  # a stretch keeps the pitch


def test_time_stretch_moves_content_in_time():
    """Rate 2: a 500 Hz then 2 kHz signal finishes in half the time; the rest is padding."""
    x = np.concatenate([_tone(500.0, 0.5), _tone(2000.0, 0.5)])
    y = time_stretch(x, 2.0)
    assert y.shape == x.shape
    q = SR // 4
    assert abs(_peak_hz(y[:q]) - 500.0) < 40
    assert abs(_peak_hz(y[q : 2 * q]) - 2000.0) < 40
    assert np.sqrt(np.mean(y[-q:] ** 2)) < 1e-3


def test_pitch_shift_octave_doubles_frequency():
    x = _tone(440.0, 1.0)
    aug = build_wave_augment(WaveAugmentConfig(pitch_p=1.0, pitch_semitones=(12.0, 12.0)))
    y = aug(x, np.random.default_rng(0))
    assert y.shape == x.shape
    assert abs(_peak_hz(y) / 880.0 - 1.0) < 0.02


def test_time_roll_is_a_bounded_circular_shift():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    aug = build_wave_augment(WaveAugmentConfig(roll_p=1.0, roll_max=0.1))
    shifts = set()
    for seed in range(20):
        y = aug(x, np.random.default_rng(seed))
        matches = [k for k in range(-100, 101) if np.array_equal(np.roll(x, k), y)]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5


def test_waveform_time_masks_zero_bounded_stretches():
    x = np.ones(SR, dtype=np.float32)
    cfg = WaveAugmentConfig(time_mask_p=1.0, time_masks=3, time_mask_max_s=0.05)
    for seed in range(10):
        y = build_wave_augment(cfg)(x, np.random.default_rng(seed))
        zeros = y == 0
        assert zeros.sum() <= 3 * 0.05 * SR
        assert np.all(y[~zeros] == 1.0)


def test_wave_augment_rejects_bad_input_and_config():
    aug = build_wave_augment(WaveAugmentConfig(gain_p=1.0))
    with pytest.raises(DataError, match="mono"):
        aug(np.zeros((10, 2), np.float32), np.random.default_rng(0))
    with pytest.raises(DataError, match="float"):
        aug(np.zeros(10, np.int16), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="gain_db"):
        WaveAugmentConfig(gain_db=(6.0, -6.0))
    with pytest.raises(ConfigError, match="noise_p"):
        WaveAugmentConfig(noise_p=1.5)


def test_configs_are_cli_flags():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, WaveAugmentConfig)
    args = parser.parse_args(["--gain_db=-3,3", "--gain_p", "0.5", "--pitch_p", "1"])
    cfg = config_from_args(WaveAugmentConfig, args)
    assert cfg.gain_db == (-3.0, 3.0) and cfg.gain_p == 0.5 and cfg.enabled
    args = parser.parse_args(["--stretch_rate", "0,2"])
    with pytest.raises(ConfigError, match="stretch_rate"):
        config_from_args(WaveAugmentConfig, args)
    for cls in (SpecAugmentConfig, MixupConfig):
        add_dataclass_args(argparse.ArgumentParser(), cls)


# ---------------------------------------------------------------------------------------------
# SpecAugment


def _padded_features(lengths, bins=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths), bins)
    mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, bins, generator=g) + 3.0
        mask[i, :n] = False
    return x, mask


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_spec_augment_widths_within_bounds_and_padding_untouched():
    lengths = [100, 60, 25, 8]
    x, mask = _padded_features(lengths)
    cfg = SpecAugmentConfig(time_masks=1, time_width=20, freq_masks=1, freq_width=6)
    g = torch.Generator().manual_seed(0)
    seen_time, seen_freq = 0, 0
    for _ in range(15):
        y, tmask, fmask = spec_augment(x, cfg, mask, g)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y[mask], x[mask])  # padding stays exactly zero
        assert not (tmask & mask).any()
        for i, n in enumerate(lengths):
            t_runs, f_runs = _runs(tmask[i]), _runs(fmask[i])
            assert all(r <= min(20, int(n * cfg.max_fraction)) for r in t_runs)
            assert all(r <= min(6, int(32 * cfg.max_fraction)) for r in f_runs)
            seen_time += sum(t_runs)
            seen_freq += sum(f_runs)
            # Exactly the masked cells changed, and they hold the clip's valid-frame mean.
            hit = (tmask[i, :, None] | fmask[i, None, :]) & ~mask[i, :, None]
            fill = x[i, :n].mean()
            torch.testing.assert_close(y[i][hit], fill.expand(int(hit.sum())))
            assert torch.equal(y[i][~hit], x[i][~hit])
    assert seen_time > 0 and seen_freq > 0


def test_spec_augment_multiple_masks_total_width_and_zero_fill():
    x, mask = _padded_features([80, 40])
    cfg = SpecAugmentConfig(time_masks=3, time_width=10, freq_masks=2, freq_width=4, fill="zero")
    y, tmask, fmask = spec_augment(x, cfg, mask, torch.Generator().manual_seed(1))
    assert (tmask.sum(1) <= 3 * 10).all() and (fmask.sum(1) <= 2 * 4).all()
    hit = (tmask[:, :, None] | fmask[:, None, :]) & ~mask[:, :, None]
    assert (y[hit] == 0).all()


def test_spec_augment_module_determinism_and_eval_identity():
    x, mask = _padded_features([50, 30])
    module = SpecAugment(SpecAugmentConfig(time_width=10, freq_width=8))
    a = module(x, mask, torch.Generator().manual_seed(5))
    b = module(x, mask, torch.Generator().manual_seed(5))
    c = module(x, mask, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    module.eval()
    assert module(x, mask) is x


# ---------------------------------------------------------------------------------------------
# Mixup


def test_mixup_mixes_inputs_and_targets_the_same_way():
    """With x = targets = identity, any mixing shows up identically in both."""
    b = 16
    eye = torch.eye(b)
    x_mixed, t_mixed, lam = mixup(eye.clone(), eye.clone(), 0.4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_mixed, t_mixed)
    torch.testing.assert_close(t_mixed.sum(1), torch.ones(b))
    assert ((lam >= 0) & (lam <= 1)).all()
    # Own weight is lam (or 1 when the partner is the clip itself).
    own = t_mixed.diagonal()
    partner_is_self = own > 1 - 1e-6
    torch.testing.assert_close(own[~partner_is_self], lam[~partner_is_self])


def test_mixup_multi_hot_targets_are_convex_combinations_and_features_shape():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 20, 16, generator=g)
    targets = (torch.rand(8, 5, generator=g) > 0.5).float()
    x_mixed, t_mixed, lam = mixup(x, targets, 1.0, torch.Generator().manual_seed(2))
    assert x_mixed.shape == x.shape and t_mixed.shape == targets.shape
    # Recover each partner from the inputs, then check targets use the same lam and partner.
    for i in range(8):
        if lam[i] > 1 - 1e-6:
            continue
        partner = (x_mixed[i] - lam[i] * x[i]) / (1 - lam[i])
        j = int(((x - partner).flatten(1).abs().max(1).values).argmin())
        torch.testing.assert_close(partner, x[j], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(t_mixed[i], lam[i] * targets[i] + (1 - lam[i]) * targets[j])


@pytest.mark.parametrize("alpha", [0.4, 5.0])
def test_mixup_lambda_follows_beta(alpha):
    x, t = torch.zeros(20000, 1), torch.zeros(20000, 2)
    _, _, lam = mixup(x, t, alpha, torch.Generator().manual_seed(0))
    assert abs(float(lam.mean()) - 0.5) < 0.01
    assert abs(float(lam.var()) - 1 / (4 * (2 * alpha + 1))) < 0.01  # Beta(a, a) variance


def test_mixup_determinism_and_off_switches():
    x, t = torch.randn(6, 100), torch.eye(6)
    a = mixup(x, t, 0.5, torch.Generator().manual_seed(3))
    b = mixup(x, t, 0.5, torch.Generator().manual_seed(3))
    c = mixup(x, t, 0.5, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    for kwargs in ({"alpha": 0.0}, {"alpha": 0.5, "prob": 0.0}):
        x_m, t_m, lam = mixup(x, t, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(x_m, x) and torch.equal(t_m, t) and (lam == 1).all()
    with pytest.raises(DataError, match="one-hot"):
        mixup(x, torch.arange(6), 0.5)
    with pytest.raises(ConfigError, match="alpha"):
        MixupConfig(alpha=-1.0)


def test_mixup_masked_waveforms_keep_padding_consistent():
    g = torch.Generator().manual_seed(0)
    lengths = [900, 400, 650, 200]
    wav = torch.zeros(4, 900)
    pad = torch.ones(4, 900, dtype=torch.bool)
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g)
        pad[i, :n] = False
    wav[3, 200:] = 5.0  # garbage under the mask is zeroed before mixing
    targets = torch.eye(4)
    x_m, pad_m, t_m, lam = mixup_masked(wav, pad, targets, 1.0, torch.Generator().manual_seed(1))
    assert x_m.shape == wav.shape and pad_m.shape == pad.shape
    assert (x_m[pad_m] == 0).all()
    # Valid length of a mixed clip = the longer of the two partners (read off the targets).
    for i in range(4):
        partners = [j for j in range(4) if t_m[i, j] > 1e-6]
        assert int((~pad_m[i]).sum()) == max(lengths[j] for j in partners)
    torch.testing.assert_close(t_m.sum(1), torch.ones(4))
