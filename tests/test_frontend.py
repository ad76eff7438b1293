"""Frontends: official parity (BEATs / EAT fixtures) and padding-aware batching."""

from __future__ import annotations

import pytest
import torch

from bioaudio.data.frontend import FrontendConfig, build_frontend


def _io(official_fixtures, name):
    return torch.load(official_fixtures / f"{name}.pt", weights_only=True)


def test_beats_fbank_matches_official(official_fixtures):
    d = _io(official_fixtures, "beats_tiny_io")
    feats, mask = build_frontend(FrontendConfig.official("beats_fbank"))(d["wav"])
    assert mask is None
    torch.testing.assert_close(feats, d["fbank_plain"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_eat_fbank_matches_official(official_fixtures, padded):
    d = _io(official_fixtures, "eat_tiny_io")
    cfg = FrontendConfig.official("eat_fbank")
    cfg.target_frames = int(d["target_length"])
    fe = build_frontend(cfg)
    if padded:
        pad = torch.zeros_like(d["wav_pad"], dtype=torch.bool)
        pad[1, int(d["n_valid_row1_padded"]) :] = True
        feats, _ = fe(d["wav_pad"], pad)
        ref = d["mel_padded"][:, 0]
    else:
        feats, _ = fe(d["wav"])
        ref = d["mel_plain"][:, 0]
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["beats_fbank", "eat_fbank", "logmel", "stft", "mfcc"])
def test_batched_features_equal_single_clip(kind):
    """A clip's features do not depend on the clips it is batched with."""
    g = torch.Generator().manual_seed(0)
    lengths = [16000, 9000, 12345]
    wav = torch.zeros(3, max(lengths))
    pad = torch.ones(3, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        wav[i, :n] = 0.1 * torch.randn(n, generator=g)
        pad[i, :n] = False
    fe = build_frontend(FrontendConfig.official(kind))
    feats, frame_mask = fe(wav, pad)
    assert frame_mask is not None and frame_mask.shape == feats.shape[:2]
    for i, n in enumerate(lengths):
        alone, alone_mask = fe(wav[i : i + 1, :n])
        t = alone.shape[1]
        assert int((~frame_mask[i]).sum()) == t
        torch.testing.assert_close(feats[i, :t], alone[0], atol=1e-5, rtol=0)
        assert bool((feats[i, t:] == 0).all())


def test_feature_sizes():
    for kind, n in [("beats_fbank", 128), ("logmel", 64), ("stft", 513), ("mfcc", 40)]:
        cfg = FrontendConfig(kind=kind, n_mels=128 if kind == "beats_fbank" else 64)
        feats, _ = build_frontend(cfg)(torch.randn(2, 16000) * 0.1)
        assert feats.shape[0] == 2 and feats.shape[2] == n
        assert torch.isfinite(feats).all()


@pytest.mark.parametrize("kind", ["logmel", "stft", "mfcc", "beats_fbank"])
def test_very_short_clips_do_not_crash(kind):
    feats, _ = build_frontend(FrontendConfig(kind=kind))(torch.randn(1, 300) * 0.1)
    assert torch.isfinite(feats).all()
    if kind != "beats_fbank":  # a 300-sample clip gives at least one spectrogram frame
        assert feats.shape[1] >= 1
