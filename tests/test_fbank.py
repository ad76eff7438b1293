"""Batched Kaldi fbank (`bioaudio.data.fbank`) against `torchaudio.compliance.kaldi.fbank` called
clip by clip, the way both official preprocessors call it.

Tolerance. Log mel energies are compared in absolute terms at 1e-4 plus twice each mel bin's own
float32 rounding sensitivity, measured on the same clip as max over frames of |torchaudio float32
- torchaudio float64|. Most bins are well conditioned (sensitivity ~1e-6 to 1e-5, so the bound
is ~1e-4), but a bin whose energy is far below the frame's total (the lowest bins, attenuated by
DC removal and pre-emphasis, under a loud tone) carries FFT rounding of order eps * frame energy:
there two correct float32 implementations, or torchaudio itself on two CPUs (AVX2 vs AVX-512
kernels), differ by up to ~1e-3. The bound is exact where float32 is exact and CPU-independent
where it is not; on one machine our rows equal torchaudio's to ~2e-6 everywhere. The test audio
has a white-noise floor (1e-2) so no mel bin sits near Kaldi's epsilon floor; bins whose filter
covers no FFT bin are exactly zero in every implementation and compare equal.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchaudio.compliance import kaldi

from bioaudio.data.fbank import KaldiFbankOptions, kaldi_fbank_batch
from bioaudio.data.frontend import FrontendConfig, build_frontend, lengths_to_mask

EPS = torch.finfo(torch.float32).eps
SR = 16000
# < 1 frame, exactly one frame, one sample more, hop-aligned and not, 1 s, 10 s
LENGTHS = [0, 1, 399, 400, 401, 559, 560, 561, 4000, 12345, 16000, 160000]
OFFICIAL = {"beats": KaldiFbankOptions.beats(), "eat": KaldiFbankOptions.eat()}


def official_preprocess(kind: str, wav: torch.Tensor) -> torch.Tensor:
    """The official per-clip calls, verbatim (BEATs.preprocess; EAT feature_extract)."""
    if kind == "beats":
        return kaldi.fbank(
            wav[None] * 2**15,
            num_mel_bins=128,
            sample_frequency=16000,
            frame_length=25,
            frame_shift=10,
        )
    return kaldi.fbank(
        (wav - wav.mean())[None],
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def torchaudio_fbank(wav: torch.Tensor, options: KaldiFbankOptions) -> torch.Tensor:
    """torchaudio's fbank of one clip with the same options (and input conditioning)."""
    kwargs = dataclasses.asdict(options)
    if kwargs.pop("subtract_clip_mean"):
        wav = wav - wav.mean()
    wav = wav * kwargs.pop("waveform_scale")
    return kaldi.fbank(wav[None], **kwargs)


def as_log(x: torch.Tensor, options: KaldiFbankOptions) -> torch.Tensor:
    """Linear outputs compared as logs, so the same absolute rule applies to every setting."""
    x = x.double()
    if options.use_log_fbank:
        return x
    return x.clamp_min(EPS).log()


def kaldi_tolerance(wav: torch.Tensor, options: KaldiFbankOptions) -> torch.Tensor:
    """(F,) absolute tolerance on log values: 1e-4 + 2 * the bin's float32 rounding sensitivity
    on this clip (module docstring)."""
    ref64 = as_log(torchaudio_fbank(wav.double(), options), options)
    ref32 = as_log(torchaudio_fbank(wav, options), options)
    return 1e-4 + 2 * (ref32 - ref64).abs().amax(0)


def assert_close_kaldi(
    ours: torch.Tensor, wav: torch.Tensor, options: KaldiFbankOptions, ref: torch.Tensor
) -> None:
    """ours (T, F) = ref (T, F) within `kaldi_tolerance` of the clip, elementwise."""
    assert ours.shape == ref.shape
    tol = kaldi_tolerance(wav, options).expand(ref.shape)
    err = (as_log(ours, options) - as_log(ref, options)).abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (
        f"row {worst // ref.shape[1]} bin {worst % ref.shape[1]}: "
        f"err {err.flatten()[worst]:.3g} > tol {tol.flatten()[worst]:.3g}"
    )


def noisy_audio(n: int, seed: int) -> torch.Tensor:
    """A tone, a chirp, a DC offset and a 1e-2 white-noise floor (no mel bin near Kaldi's
    energy floor, also without the 2**15 scaling of BEATs)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 100.0 + 2000.0 * torch.rand((), generator=g, dtype=torch.float64)
    x = 0.4 * torch.sin(2 * math.pi * f0 * t) + 0.2 * torch.sin(2 * math.pi * (300 + 200 * t) * t)
    x = x + 0.05 + 1e-2 * torch.randn(n, generator=g, dtype=torch.float64)
    return x.float()


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) batch of noisy clips; the padding holds loud noise, so any frame (or clip mean)
    that reached into it would show."""
    g = torch.Generator().manual_seed(seed + 1000)
    wav = 3.0 * torch.randn(len(lengths), max(lengths), generator=g)
    for b, n in enumerate(lengths):
        wav[b, :n] = noisy_audio(n, seed + b)
    return wav, torch.tensor(lengths)


def expected_frames(n: int, options: KaldiFbankOptions) -> int:
    w, h = options.window_size, options.window_shift
    return 0 if n < w else 1 + (n - w) // h


@pytest.mark.parametrize("kind", ["beats", "eat"])
def test_official_settings_match_torchaudio_clip_by_clip(kind):
    options = OFFICIAL[kind]
    wav, lengths = padded_batch(LENGTHS)
    feats, frames = kaldi_fbank_batch(wav, lengths, options)
    assert feats.dtype == torch.float32
    assert feats.shape == (len(LENGTHS), 998, 128)
    assert frames.tolist() == [expected_frames(n, options) for n in LENGTHS]
    assert frames.tolist()[:5] == [0, 0, 0, 1, 1]
    for b, n in enumerate(LENGTHS):
        t = int(frames[b])
        assert bool((feats[b, t:] == 0).all()), "rows beyond a clip's frames must be zero"
        if n < 400:  # torchaudio refuses clips shorter than one window
            continue
        clip = wav[b, :n]
        ref = official_preprocess(kind, clip)
        assert ref.shape[0] == t
        assert_close_kaldi(feats[b, :t], clip, options, ref)


VARIANTS = {
    "defaults_23_bins": KaldiFbankOptions(),
    "hamming_energy_first": KaldiFbankOptions(window_type="hamming", use_energy=True),
    "rectangular_energy_htk": KaldiFbankOptions(
        window_type="rectangular", use_energy=True, htk_compat=True
    ),
    "blackman_windowed_energy": KaldiFbankOptions(
        window_type="blackman", use_energy=True, raw_energy=False, energy_floor=0.0
    ),
    "magnitude_linear": KaldiFbankOptions(use_power=False, use_log_fbank=False, num_mel_bins=40),
    # Without per-frame DC removal the per-clip mean (over valid samples only) becomes visible.
    "clip_mean_no_dc": KaldiFbankOptions(
        remove_dc_offset=False, subtract_clip_mean=True, window_type="hanning"
    ),
    "no_preemphasis_scaled": KaldiFbankOptions(preemphasis_coefficient=0.0, waveform_scale=2**15),
    "unpadded_fft_band": KaldiFbankOptions(
        round_to_power_of_two=False, low_freq=100.0, high_freq=-400.0, num_mel_bins=64
    ),
    "8khz_32ms": KaldiFbankOptions(
        sample_frequency=8000.0, frame_length=32.0, frame_shift=16.0, num_mel_bins=30
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_option_variants_match_torchaudio(name):
    options = VARIANTS[name]
    lengths = [0, 150, options.window_size, options.window_size + 1, 3001, 12345]
    wav, lens = padded_batch(lengths, seed=7)
    feats, frames = kaldi_fbank_batch(wav, lens, options)
    assert feats.shape[2] == options.num_features
    for b, n in enumerate(lengths):
        t = int(frames[b])
        assert t == expected_frames(n, options)
        assert bool((feats[b, t:] == 0).all())
        if t:
            clip = wav[b, :n]
            assert_close_kaldi(feats[b, :t], clip, options, torchaudio_fbank(clip, options))


@pytest.mark.parametrize("kind", ["beats", "eat"])
def test_batched_equals_one_at_a_time(kind):
    """A clip's rows do not depend on its batch, nor on how frames are chunked."""
    options = OFFICIAL[kind]
    lengths = [16000, 399, 12345, 400, 9001]
    wav, lens = padded_batch(lengths, seed=3)
    batched, frames = kaldi_fbank_batch(wav, lens, options)
    small_chunks, _ = kaldi_fbank_batch(wav, lens, options, chunk_frames=7)
    for b, n in enumerate(lengths):
        alone, alone_frames = kaldi_fbank_batch(wav[b : b + 1, :n], None, options)
        assert alone_frames.tolist() == [int(frames[b])]
        t = int(frames[b])
        if t:
            clip = wav[b, :n]
            assert_close_kaldi(batched[b, :t], clip, options, alone[0])
            assert_close_kaldi(small_chunks[b, :t], clip, options, alone[0])
    # Unpadded batch (the copy-free path), chunked finer than one frame per clip.
    wav, _ = padded_batch([9001, 9001, 9001], seed=4)
    small_chunks, frames = kaldi_fbank_batch(wav, None, options, chunk_frames=2)
    assert frames.tolist() == [54, 54, 54] and small_chunks.shape[1] == 54
    for b in range(3):
        alone = official_preprocess(kind, wav[b])
        assert_close_kaldi(small_chunks[b], wav[b], options, alone)


def test_beats_official_fixture(official_fixtures):
    """The official BEATs preprocess output, (fbank - 15.41663) / (2 * 6.55582)."""
    d = torch.load(official_fixtures / "beats_tiny_io.pt", weights_only=True)
    feats, frames = kaldi_fbank_batch(d["wav"], None, KaldiFbankOptions.beats())
    assert frames.tolist() == [298, 298]
    torch.testing.assert_close(
        (feats - 15.41663) / (2 * 6.55582), d["fbank_plain"], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("padded", [False, True])
def test_eat_official_fixture(official_fixtures, padded):
    """The official EAT input: fbank of (wav - mean), zero-padded to 304 frames, normalised
    (x + 4.268) / (2 * 4.569). Made from the shared `wav`; the padded case from `wav_pad` with row
    1 cut at its valid samples (the clip mean is taken over those only)."""
    d = torch.load(official_fixtures / "eat_tiny_io.pt", weights_only=True)
    if padded:
        wav, ref = d["wav_pad"], d["mel_padded"][:, 0]
        lengths = torch.tensor([wav.shape[1], int(d["n_valid_row1_padded"])])
    else:
        wav, ref, lengths = d["wav"], d["mel_plain"][:, 0], None
    feats, frames = kaldi_fbank_batch(wav, lengths, KaldiFbankOptions.eat())
    assert frames.tolist() == ([298, 198] if padded else [298, 298])
    n = int(d["target_length"])
    feats = torch.nn.functional.pad(feats, (0, 0, 0, n - feats.shape[1]))
    torch.testing.assert_close((feats + 4.268) / (2 * 4.569), ref, atol=1e-4, rtol=0)


def reference_frontend(
    cfg: FrontendConfig, wav: torch.Tensor, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frontend as it was before batching: torchaudio clip by clip, then padding, frame mask
    and normalisation."""
    kind = "beats" if cfg.kind == "beats_fbank" else "eat"
    lengths = [wav.shape[1]] * wav.shape[0]
    if padding_mask is not None:
        lengths = (~padding_mask).sum(1).tolist()
    feats = []
    for b, n in enumerate(lengths):
        f = official_preprocess(kind, wav[b, :n]) if n >= 400 else torch.zeros(0, 128)
        if cfg.pad_to_multiple > 1:
            f = torch.nn.functional.pad(f, (0, 0, 0, (-f.shape[0]) % cfg.pad_to_multiple))
        if cfg.target_frames:
            m = cfg.target_frames
            f = torch.nn.functional.pad(f[:m], (0, 0, 0, m - min(m, f.shape[0])))
        feats.append(f)
    frames = torch.tensor([f.shape[0] for f in feats])
    t_max = int(frames.max())
    out = torch.zeros(len(feats), t_max, 128)
    for b, f in enumerate(feats):
        out[b, : f.shape[0]] = f
    mean, std = cfg.normalisation()
    out = (out - mean) / (2 * std)
    mask = None
    if padding_mask is not None or bool((frames != t_max).any()):
        mask = lengths_to_mask(frames, t_max)
        out = out.masked_fill(mask[..., None], 0.0)
    return out, mask


FRONTENDS = {
    "beats": FrontendConfig.official("beats_fbank"),
    "eat_pad16": FrontendConfig.official("eat_fbank"),
    "eat_target_crop": dataclasses.replace(FrontendConfig.official("eat_fbank"), target_frames=64),
    "eat_target_pad": dataclasses.replace(FrontendConfig.official("eat_fbank"), target_frames=256),
}


@pytest.mark.parametrize("name", list(FRONTENDS))
@pytest.mark.parametrize("masked", [False, True])
def test_frontend_keeps_per_clip_behaviour(name, masked):
    """KaldiFbank (batched) = the former per-clip frontend: pad_to_multiple, target_frames,
    normalisation, frame-mask semantics, clips shorter than one frame."""
    cfg = FRONTENDS[name]
    fe = build_frontend(cfg)
    lengths = [24000, 300, 12345, 24000] if masked else [24000, 24000]
    wav, lens = padded_batch(lengths, seed=11)
    padding_mask = lengths_to_mask(lens, wav.shape[1]) if masked else None
    feats, mask = fe(wav, padding_mask)
    ref, ref_mask = reference_frontend(cfg, wav, padding_mask)
    assert feats.dtype == torch.float32 and feats.shape == ref.shape
    assert (mask is None) == (ref_mask is None) == (not masked)
    if mask is not None:
        assert torch.equal(mask, ref_mask)
    mean, std = cfg.normalisation()
    options = KaldiFbankOptions.beats() if cfg.kind == "beats_fbank" else KaldiFbankOptions.eat()
    raw, _ = fe.raw(wav, padding_mask)
    for b, n in enumerate(lengths):
        t = expected_frames(n, options)
        if t:  # the clip's own frames: the log tolerance scaled by the normalisation
            tol = kaldi_tolerance(wav[b, :n], options) / (2 * std)
            assert bool(((feats[b, :t] - ref[b, :t]).abs() <= tol).all())
            torch.testing.assert_close(raw[b, :t], feats[b, :t] * 2 * std + mean)
        # zero frames from pad_to_multiple / target_frames, and masked rows: exactly equal
        assert torch.equal(feats[b, t:], ref[b, t:])


def test_frontend_under_autocast_is_float32():
    fe = build_frontend(FrontendConfig.official("beats_fbank"))
    wav, _ = padded_batch([16000, 16000])
    plain, _ = fe(wav)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = fe(wav)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, atol=0, rtol=0)


def test_clip_features():
    fe = build_frontend(FrontendConfig.official("beats_fbank"))
    assert fe.clip_features(torch.randn(399)).shape == (0, 128)
    clip = noisy_audio(4000, seed=5)
    options = KaldiFbankOptions.beats()
    assert_close_kaldi(fe.clip_features(clip), clip, options, official_preprocess("beats", clip))


@pytest.mark.parametrize(
    "kwargs", [{"dither": 1.0}, {"snip_edges": False}, {"window_type": "hann"}]
)
def test_unsupported_options_raise(kwargs):
    with pytest.raises(ValueError):
        KaldiFbankOptions(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    wav, lens = padded_batch([16000, 12345, 300])
    for options in OFFICIAL.values():
        cpu, frames = kaldi_fbank_batch(wav, lens, options)
        gpu, gpu_frames = kaldi_fbank_batch(wav.cuda(), lens.cuda(), options)
        assert torch.equal(frames, gpu_frames.cpu())
        for b, n in enumerate([16000, 12345, 300]):
            t = int(frames[b])
            if t:
                assert_close_kaldi(gpu[b, :t].cpu(), wav[b, :n], options, cpu[b, :t])
