"""Augmentations: per-clip waveform transforms for dataset workers, batch-level ones on device.

- `build_wave_augment(WaveAugmentConfig)` -> a picklable callable `(wav (S,), rng) -> (S,)`
  (gain, gaussian noise, background noise, time roll, time stretch, pitch shift, time masks),
  run inside dataset workers on each clip's valid samples, before padding. All randomness comes
  from the `numpy.random.Generator` it is given, so a seeded worker reproduces its clips.
- `SpecAugment` / `spec_augment`: time and frequency masks on features (B, T, F) that stay
  inside each clip's valid frames.
- `mixup` / `mixup_masked`: per-sample mixup of inputs and one-hot / multi-hot targets.
Batch-level functions take an optional `torch.Generator` (a CPU one: the few random numbers are
drawn on CPU and moved, so results are the same on every device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from bioaudio.data import audio
from bioaudio.errors import AudioDecodeError, ConfigError, DataError

# Time stretch / pitch shift go through an STFT; shorter clips are left as they are.
MIN_STFT_SAMPLES = 2048


def _check_range(name: str, rng: tuple[float, float], low: float | None = None) -> None:
    if len(rng) != 2 or rng[0] > rng[1]:
        raise ConfigError(f"{name}: expected LOW,HIGH with LOW <= HIGH, got {list(rng)}")
    if low is not None and rng[0] <= low:
        raise ConfigError(f"{name}: values must be > {low}, got {list(rng)}")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name}: a probability must be in [0, 1], got {p}")


@dataclass
class WaveAugmentConfig:
    """Per-clip waveform augmentations, each applied with its own probability (0 = off)."""

    sample_rate: int = field(
        default=16000, metadata={"help": "sample rate of the clips (Hz), for stretch/pitch/masks"}
    )
    gain_p: float = field(default=0.0, metadata={"help": "probability of a random gain"})
    gain_db: tuple[float, float] = field(
        default=(-6.0, 6.0),
        metadata={"help": "gain range LOW,HIGH in dB, uniform (negative: use =, e.g. FLAG=-6,6)"},
    )
    noise_p: float = field(default=0.0, metadata={"help": "probability of adding gaussian noise"})
    noise_snr_db: tuple[float, float] = field(
        default=(10.0, 40.0), metadata={"help": "SNR range of gaussian noise in dB (uniform)"}
    )
    background_p: float = field(
        default=0.0, metadata={"help": "probability of mixing in a background-noise clip"}
    )
    background_noise: list[str] = field(
        default_factory=list,
        metadata={
            "help": "background noise: folders (searched recursively), audio files, or .txt "
            "files listing one audio path per line"
        },
    )
    background_snr_db: tuple[float, float] = field(
        default=(0.0, 20.0), metadata={"help": "SNR range of background noise in dB (uniform)"}
    )
    roll_p: float = field(default=0.0, metadata={"help": "probability of a circular time roll"})
    roll_max: float = field(
        default=0.5, metadata={"help": "largest roll as a fraction of the clip (either way)"}
    )
    stretch_p: float = field(default=0.0, metadata={"help": "probability of a time stretch"})
    stretch_rate: tuple[float, float] = field(
        default=(0.8, 1.25),
        metadata={"help": "speed-up factor range (log-uniform); length is kept by crop/pad"},
    )
    pitch_p: float = field(default=0.0, metadata={"help": "probability of a pitch shift"})
    pitch_semitones: tuple[float, float] = field(
        default=(-2.0, 2.0),
        metadata={"help": "pitch shift LOW,HIGH in semitones (negative: use =, e.g. FLAG=-2,2)"},
    )
    time_mask_p: float = field(
        default=0.0, metadata={"help": "probability of zeroing random stretches of the waveform"}
    )
    time_masks: int = field(default=2, metadata={"help": "number of waveform time masks"})
    time_mask_max_s: float = field(
        default=0.1, metadata={"help": "longest waveform time mask in seconds"}
    )

    def validate(self) -> None:
        if self.sample_rate <= 0:
            raise ConfigError(f"sample_rate must be positive, got {self.sample_rate}")
        for name in ("gain_p", "noise_p", "background_p", "roll_p", "stretch_p", "pitch_p"):
            _check_prob(name, getattr(self, name))
        _check_prob("time_mask_p", self.time_mask_p)
        _check_range("gain_db", self.gain_db)
        _check_range("noise_snr_db", self.noise_snr_db)
        _check_range("background_snr_db", self.background_snr_db)
        _check_range("stretch_rate", self.stretch_rate, low=0.0)
        _check_range("pitch_semitones", self.pitch_semitones)
        if not 0.0 <= self.roll_max <= 1.0:
            raise ConfigError(f"roll_max must be in [0, 1], got {self.roll_max}")
        if self.time_masks < 0 or self.time_mask_max_s < 0:
            raise ConfigError("time_masks and time_mask_max_s must be >= 0")
        if self.background_p > 0 and not self.background_noise:
            raise ConfigError("background_p > 0 needs --background_noise (folders or files)")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        """True when any augmentation has a non-zero probability."""
        probs = (self.gain_p, self.noise_p, self.background_p, self.roll_p, self.stretch_p)
        return any(p > 0 for p in (*probs, self.pitch_p, self.time_mask_p))


def find_noise_files(sources: list[str] | list[Path]) -> list[Path]:
    """Resolve folders / audio files / .txt path lists into a sorted list of audio files."""
    files: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and audio.is_audio_path(f))
            if not found:
                raise ConfigError(f"background_noise: no audio files under {p}")
            files.extend(found)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line).expanduser()
                f = f if f.is_absolute() else p.parent / f  # relative to the list file
                if not f.is_file():
                    raise ConfigError(f"background_noise: {f} (listed in {p}) does not exist")
                files.append(f)
        elif p.is_file():
            if not audio.is_audio_path(p):
                raise ConfigError(f"background_noise: {p} is not an audio file or a .txt list")
            files.append(p)
        else:
            raise ConfigError(f"background_noise: {p} does not exist")
    if sources and not files:
        raise ConfigError("background_noise: the given lists hold no audio files")
    return files


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """signal + noise scaled so that 10*log10(P_signal / P_noise) = snr_db (same lengths).

    A silent signal or silent noise has no defined SNR: the signal is returned unchanged.
    """
    p_sig, p_noise = _power(signal), _power(noise)
    if p_sig <= 1e-20 or p_noise <= 1e-20:
        return signal
    scale = math.sqrt(p_sig / (p_noise * 10.0 ** (snr_db / 10.0)))
    return signal + scale * noise


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """Crop the end or zero-pad the end to exactly `length` samples."""
    if x.shape[0] >= length:
        return x[:length]
    return np.pad(x, (0, length - x.shape[0]))


class WaveAugment:
    """Composable per-clip waveform augmentation; see `WaveAugmentConfig`.

    Order: time stretch, pitch shift, time roll, gain, background noise, gaussian noise, time
    masks (signal changes first, then what is added, then what is removed). Picklable, so it
    can live in a dataset that DataLoader workers copy.
    """

    def __init__(self, cfg: WaveAugmentConfig):
        cfg.validate()
        self.cfg = cfg
        self.noise_files = find_noise_files(cfg.background_noise) if cfg.background_p > 0 else []
        self._noise_info: dict[Path, audio.AudioInfo] = {}

    def __call__(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if wav.ndim != 1:
            raise DataError(f"wave augment expects a mono clip (S,), got shape {wav.shape}")
        if not np.issubdtype(wav.dtype, np.floating):
            raise DataError(f"wave augment expects float audio, got {wav.dtype}")
        cfg, n = self.cfg, wav.shape[0]
        if n == 0:
            return wav
        x = wav.astype(np.float32, copy=True)
        # One draw per step whether or not it fires keeps the random stream aligned across
        # configs that only differ in one probability.
        if rng.random() < cfg.stretch_p and n >= MIN_STFT_SAMPLES:
            lo, hi = np.log(cfg.stretch_rate)
            x = time_stretch(x, float(np.exp(rng.uniform(lo, hi))))
        if rng.random() < cfg.pitch_p and n >= MIN_STFT_SAMPLES:
            x = pitch_shift(x, cfg.sample_rate, float(rng.uniform(*cfg.pitch_semitones)))
        if rng.random() < cfg.roll_p:
            limit = int(cfg.roll_max * n)
            x = np.roll(x, int(rng.integers(-limit, limit + 1)))
        if rng.random() < cfg.gain_p:
            x = x * np.float32(10.0 ** (rng.uniform(*cfg.gain_db) / 20.0))
        if rng.random() < cfg.background_p:
            x = mix_at_snr(x, self._background(n, rng), float(rng.uniform(*cfg.background_snr_db)))
        if rng.random() < cfg.noise_p:
            noise = rng.standard_normal(n).astype(np.float32)
            x = mix_at_snr(x, noise, float(rng.uniform(*cfg.noise_snr_db)))
        if rng.random() < cfg.time_mask_p:
            x = time_mask(x, cfg.time_masks, int(cfg.time_mask_max_s * cfg.sample_rate), rng)
        return x.astype(wav.dtype, copy=False)

    def _background(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """A random window of n samples from a random noise file (tiled when it is shorter)."""
        path = self.noise_files[int(rng.integers(len(self.noise_files)))]
        meta = self._noise_info.get(path)
        if meta is None:
            meta = self._noise_info[path] = audio.info(path)
        sr = self.cfg.sample_rate
        seconds = n / sr
        if meta.duration > seconds:
            offset = float(rng.uniform(0.0, meta.duration - seconds))
            noise = audio.load(path, sr, offset=offset, duration=seconds)
        else:
            noise = audio.load(path, sr)
        if noise.shape[0] == 0:
            raise AudioDecodeError(path, "background noise decoded no samples")
        return np.resize(noise, n)  # tiles short noise clips; crops the rounding extra sample


def time_stretch(x: np.ndarray, rate: float) -> np.ndarray:
    """Phase-vocoder time stretch (rate > 1 = faster), cropped / zero-padded to len(x)."""
    import librosa  # imported here: it is slow to import and only some runs augment

    return fit_length(librosa.effects.time_stretch(x, rate=rate), x.shape[0])


def pitch_shift(x: np.ndarray, sample_rate: int, semitones: float) -> np.ndarray:
    """Pitch shift by `semitones` keeping the duration (librosa: stretch + soxr resample)."""
    import librosa

    y = librosa.effects.pitch_shift(x, sr=sample_rate, n_steps=semitones)
    return fit_length(y, x.shape[0])


def time_mask(x: np.ndarray, count: int, max_width: int, rng: np.random.Generator) -> np.ndarray:
    """Zero `count` random stretches of 0..max_width samples (widths and starts uniform)."""
    x = x.copy()
    n = x.shape[0]
    for _ in range(count):
        width = int(rng.integers(0, min(max_width, n) + 1))
        start = int(rng.integers(0, n - width + 1))
        x[start : start + width] = 0.0
    return x


def build_wave_augment(cfg: WaveAugmentConfig) -> WaveAugment:
    """The per-clip waveform augmentation for a config (noise files resolved now)."""
    return WaveAugment(cfg)


# ----------------------------------------------------------------------------------------------
# Batch-level augmentations on features / waveforms (on whatever device the batch lives).


@dataclass
class SpecAugmentConfig:
    """SpecAugment on features (B, T, F): masks never reach into padded frames."""

    time_masks: int = field(default=2, metadata={"help": "time masks per clip (0 = off)"})
    time_width: int = field(default=40, metadata={"help": "widest time mask in frames"})
    freq_masks: int = field(default=2, metadata={"help": "frequency masks per clip (0 = off)"})
    freq_width: int = field(default=16, metadata={"help": "widest frequency mask in bins"})
    max_fraction: float = field(
        default=0.3,
        metadata={"help": "a mask never exceeds this fraction of the clip's frames / the bins"},
    )
    fill: Literal["mean", "zero"] = field(
        default="mean", metadata={"help": "masked value: the clip's mean over valid frames, or 0"}
    )

    def validate(self) -> None:
        for name in ("time_masks", "time_width", "freq_masks", "freq_width"):
            if getattr(self, name) < 0:
                raise ConfigError(f"specaugment {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(
                f"specaugment max_fraction must be in [0, 1], got {self.max_fraction}"
            )
        if self.fill not in ("mean", "zero"):
            raise ConfigError(f"specaugment fill must be 'mean' or 'zero', got {self.fill!r}")

    def __post_init__(self) -> None:
        self.validate()


def _random_spans(
    count: int, max_width: torch.Tensor, limit: torch.Tensor, size: int, generator
) -> torch.Tensor:
    """(B, size) bool: per row, `count` spans of width U{0..max_width} inside [0, limit)."""
    batch = limit.shape[0]
    if count == 0:
        return torch.zeros(batch, size, dtype=torch.bool)
    u_w = torch.rand(batch, count, generator=generator)
    u_s = torch.rand(batch, count, generator=generator)
    width = (u_w * (max_width[:, None] + 1).float()).floor().long()  # U{0..max_width}
    width = torch.minimum(width, max_width[:, None])
    start = (u_s * (limit[:, None] - width + 1).float()).floor().long()  # U{0..limit-width}
    pos = torch.arange(size)[None, None, :]  # (1, 1, size)
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])  # (B, count, size)
    return inside.any(dim=1)


def spec_augment(
    x: torch.Tensor,
    cfg: SpecAugmentConfig,
    padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask features x (B, T, F); returns (x_masked, time_masked (B, T), freq_masked (B, F)).

    Widths are drawn uniformly in 0..min(width, max_fraction * size); time masks stay within
    each clip's valid frames (padding stays exactly as it was). torchaudio's TimeMasking is not
    used because it ignores padding and cannot take a generator.
    """
    batch, frames, bins = x.shape
    if padding_mask is None:
        lengths = torch.full((batch,), frames, dtype=torch.long)
    else:
        lengths = (~padding_mask.bool()).sum(dim=1).cpu()
    t_max = torch.clamp(lengths.float() * cfg.max_fraction, max=cfg.time_width).floor().long()
    f_cap = min(cfg.freq_width, int(math.floor(bins * cfg.max_fraction)))
    f_max = torch.full((batch,), f_cap, dtype=torch.long)
    time_masked = _random_spans(cfg.time_masks, t_max, lengths, frames, generator)
    freq_masked = _random_spans(cfg.freq_masks, f_max, torch.full((batch,), bins), bins, generator)
    time_masked, freq_masked = time_masked.to(x.device), freq_masked.to(x.device)
    if cfg.fill == "mean":
        if padding_mask is None:
            valid = torch.ones(batch, frames, dtype=torch.bool, device=x.device)
        else:
            valid = ~padding_mask.bool()
        w = valid[..., None].to(x.dtype)  # (B, T, 1)
        fill = (x * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * bins).clamp_min(1)  # (B,)
        fill = fill[:, None, None]
    else:
        fill = x.new_zeros(())
    hit = time_masked[:, :, None] | freq_masked[:, None, :]  # (B, T, F)
    if padding_mask is not None:  # frequency masks must not write into padded frames either
        hit = hit & ~padding_mask.bool()[:, :, None]
    out = torch.where(hit, fill.to(x.dtype), x)
    return out, time_masked, freq_masked


class SpecAugment(nn.Module):
    """SpecAugment as a module: active in training mode, identity in eval mode."""

    def __init__(self, cfg: SpecAugmentConfig | None = None):
        super().__init__()
        self.cfg = cfg or SpecAugmentConfig()

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if not self.training or (self.cfg.time_masks == 0 and self.cfg.freq_masks == 0):
            return x
        return spec_augment(x, self.cfg, padding_mask, generator)[0]


@dataclass
class MixupConfig:
    """Mixup of inputs and targets within a batch."""

    alpha: float = field(
        default=0.0, metadata={"help": "mixup Beta(alpha, alpha) parameter (0 = off)"}
    )
    prob: float = field(default=1.0, metadata={"help": "fraction of clips that get mixed"})

    def validate(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"mixup alpha must be >= 0, got {self.alpha}")
        _check_prob("mixup prob", self.prob)

    def __post_init__(self) -> None:
        self.validate()


def _mix_params(
    batch: int, alpha: float, prob: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam (B,), perm (B,)) on CPU. lam ~ Beta(alpha, alpha) for mixed clips, 1 otherwise."""
    perm = torch.randperm(batch, generator=generator)
    if alpha <= 0:
        return torch.ones(batch), perm
    # torch.distributions cannot take a generator: seed a forked global RNG from it instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    mixed = torch.rand(batch, generator=generator) < prob
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lam = torch.distributions.Beta(alpha, alpha).sample((batch,))
    return torch.where(mixed, lam, torch.ones_like(lam)), perm


def _check_targets(x: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.dim() != 2 or targets.shape[0] != x.shape[0] or not targets.is_floating_point():
        raise DataError(
            f"mixup needs float one-hot / multi-hot targets (B, C) for B={x.shape[0]},"
            f" got {tuple(targets.shape)} {targets.dtype}"
        )


def mixup(
    x: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each clip with a random partner: lam * a + (1 - lam) * b, inputs and targets alike.

    x (B, ...) features or waveforms; targets (B, C) float one-hot or multi-hot. Returns
    (x_mixed, targets_mixed, lam (B,)). alpha <= 0 returns the inputs with lam = 1.
    """
    _check_targets(x, targets)
    lam, perm = _mix_params(x.shape[0], alpha, prob, generator)
    lam, perm = lam.to(x.device), perm.to(x.device)
    lx = lam.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B,) -> (B, 1, ...)
    lt = lam.to(targets.dtype)[:, None]
    return lx * x + (1 - lx) * x[perm], lt * targets + (1 - lt) * targets[perm], lam


def mixup_masked(
    x: torch.Tensor,
    padding_mask: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mixup` for padded batches (waveform (B, S) or features (B, T, F) + mask (B, T|S)).

    Padded positions are zero, so a mixed position is padding only where both partners are
    padding; returns (x_mixed, padding_mask_mixed, targets_mixed, lam).
    """
    _check_targets(x, targets)
    lam, perm = _mix_params(x.shape[0], alpha, prob, generator)
    lam, perm = lam.to(x.device), perm.to(x.device)
    pad = padding_mask.bool()
    dims = [1] * (x.dim() - 1)
    valid = (~pad).to(x.dtype).reshape(*pad.shape, *([1] * (x.dim() - pad.dim())))
    x = x * valid  # enforce the zero-padding contract before mixing
    lx = lam.to(x.dtype).reshape(-1, *dims)  # (B,) -> (B, 1, ...)
    lt = lam.to(targets.dtype)[:, None]
    # A clip with lam == 1 keeps its own mask: its partner contributes nothing.
    keep_own = (lam >= 1.0)[:, None]
    mixed_pad = torch.where(keep_own, pad, pad & pad[perm])
    x_mixed = lx * x + (1 - lx) * x[perm]
    return x_mixed, mixed_pad, lt * targets + (1 - lt) * targets[perm], lam
