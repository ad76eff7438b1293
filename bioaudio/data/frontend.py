"""Waveform -> features. Kaldi fbank frontends with each model's official constants, and the
log-mel / STFT / MFCC frontends of the CNN baselines.

Every frontend is an `nn.Module` with
    forward(wav (B, S) float, padding_mask (B, S) bool | None) -> (feats (B, T, F), frame_mask (B, T) | None)
`padding_mask` / `frame_mask` are True on padding. Clips in a padded batch are featurised on
their valid samples only, so a clip's features do not depend on what it was batched with.
Frontends always run in float32 (autocast off): fbank in bf16 loses the low-energy bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torchaudio

FrontendKind = Literal["beats_fbank", "eat_fbank", "logmel", "stft", "mfcc"]

# Official normalisation constants (../shared/fixtures/official/preprocess_constants.json):
# features are normalised as (x - mean) / (2 * std) for both transformers.
OFFICIAL_STATS: dict[str, tuple[float, float]] = {
    "beats_fbank": (15.41663, 6.55582),
    "eat_fbank": (-4.268, 4.569),
}


@dataclass
class FrontendConfig:
    """Feature extraction settings; stored in every run config and export."""

    kind: FrontendKind = field(default="beats_fbank", metadata={"help": "feature type"})
    sample_rate: int = field(default=16000, metadata={"help": "input sample rate (Hz)"})
    n_mels: int = field(default=128, metadata={"help": "mel bins (fbank / logmel / mfcc)"})
    mean: float | None = field(
        default=None, metadata={"help": "feature mean for normalisation (None: official or none)"}
    )
    std: float | None = field(
        default=None, metadata={"help": "feature std; features become (x - mean) / (2 * std)"}
    )
    pad_to_multiple: int = field(
        default=0,
        metadata={
            "help": "zero-pad each clip's frames (before normalisation) to a multiple (EAT: 16)"
        },
    )
    target_frames: int | None = field(
        default=None,
        metadata={"help": "pad/crop every clip to this many frames (EAT official: 1024)"},
    )
    n_fft: int = field(default=1024, metadata={"help": "FFT size (logmel / stft / mfcc)"})
    hop_length: int = field(default=320, metadata={"help": "hop in samples (logmel / stft / mfcc)"})
    n_mfcc: int = field(default=40, metadata={"help": "MFCC coefficients"})
    top_db: float = field(default=80.0, metadata={"help": "dynamic range kept by dB frontends"})

    @classmethod
    def official(cls, kind: FrontendKind) -> FrontendConfig:
        """The released models' preprocessing: BEATs or EAT fbank with official statistics."""
        if kind == "beats_fbank":
            return cls(kind="beats_fbank", mean=15.41663, std=6.55582)
        if kind == "eat_fbank":
            return cls(kind="eat_fbank", mean=-4.268, std=4.569, pad_to_multiple=16)
        return cls(kind=kind)

    @property
    def n_features(self) -> int:
        if self.kind == "stft":
            return self.n_fft // 2 + 1
        if self.kind == "mfcc":
            return self.n_mfcc
        return self.n_mels

    @property
    def frame_rate(self) -> float:
        """Feature frames per second."""
        if self.kind in ("beats_fbank", "eat_fbank"):
            return 100.0
        return self.sample_rate / self.hop_length

    def normalisation(self) -> tuple[float, float] | None:
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        return OFFICIAL_STATS.get(self.kind)


# Fields an options dataclass may repeat as flat flags (`--frontend logmel --n_mels 64`).
FLAT_OPTIONS = ("sample_rate", "n_mels", "n_fft", "hop_length", "n_mfcc", "top_db")


def frontend_from_options(options: object) -> FrontendConfig:
    """A FrontendConfig from a command's flat options: `options.frontend` is the kind, and any of
    FLAT_OPTIONS the options define are copied (the others keep their defaults)."""
    values = {n: getattr(options, n) for n in FLAT_OPTIONS if hasattr(options, n)}
    return FrontendConfig(kind=options.frontend, **values)  # type: ignore[attr-defined]


def valid_lengths(wav: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Number of valid samples per clip (padding is assumed to be at the end)."""
    if padding_mask is None:
        return torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=wav.device)
    return (~padding_mask).sum(dim=1)


def lengths_to_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(B,) lengths -> (B, total) bool mask, True beyond each length."""
    ar = torch.arange(total, device=lengths.device)
    return ar[None, :] >= lengths[:, None]


class Frontend(nn.Module):
    """Base: per-clip raw features, then padding, frame mask and normalisation."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.cfg = cfg

    def clip_features(self, wav: torch.Tensor) -> torch.Tensor:
        """(S,) float32 -> (T, F) un-normalised features of one clip."""
        raise NotImplementedError

    def raw(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Un-normalised features (for statistics): same shapes as forward."""
        return self._run(wav, padding_mask, normalise=False)

    def forward(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self._run(wav, padding_mask, normalise=True)

    def _run(self, wav: torch.Tensor, padding_mask: torch.Tensor | None, normalise: bool):
        if wav.dim() == 1:
            wav = wav[None]
        with torch.autocast(device_type=wav.device.type, enabled=False):
            wav = wav.float()
            lengths = valid_lengths(wav, padding_mask)
            feats = [self.clip_features(wav[b, : int(lengths[b])]) for b in range(wav.shape[0])]
            pad_to = self.cfg.pad_to_multiple
            if pad_to > 1:  # official EAT: zero frames appended before normalisation, valid input
                feats = [nn.functional.pad(f, (0, 0, 0, (-f.shape[0]) % pad_to)) for f in feats]
            if self.cfg.target_frames:
                n = self.cfg.target_frames
                feats = [nn.functional.pad(f[:n], (0, 0, 0, n - min(n, f.shape[0]))) for f in feats]
            frames = torch.tensor([f.shape[0] for f in feats], device=wav.device)
            t_max = int(frames.max())
            out = wav.new_zeros(len(feats), t_max, self.cfg.n_features)
            for b, f in enumerate(feats):
                out[b, : f.shape[0]] = f
            stats = self.cfg.normalisation() if normalise else None
            if stats is not None:
                out = (out - stats[0]) / (2.0 * stats[1])
            frame_mask = None
            if padding_mask is not None or bool((frames != t_max).any()):
                frame_mask = lengths_to_mask(frames, t_max)
                out = out.masked_fill(frame_mask[..., None], 0.0)
        return out, frame_mask


class KaldiFbank(Frontend):
    """BEATs / EAT Kaldi fbank, bit-for-bit the official preprocessing (see module docstring)."""

    def clip_features(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[0] < int(self.cfg.sample_rate * 0.025):  # shorter than one 25 ms frame
            return wav.new_zeros(0, self.cfg.n_mels)
        kaldi = torchaudio.compliance.kaldi
        if self.cfg.kind == "beats_fbank":
            return kaldi.fbank(
                wav[None] * 2**15,
                num_mel_bins=self.cfg.n_mels,
                sample_frequency=self.cfg.sample_rate,
                frame_length=25,
                frame_shift=10,
            )
        return kaldi.fbank(
            (wav - wav.mean())[None],
            htk_compat=True,
            sample_frequency=self.cfg.sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.cfg.n_mels,
            dither=0.0,
            frame_shift=10,
        )


class SpectrogramDB(Frontend):
    """Log-mel dB, STFT dB or MFCC (torchaudio transforms), as the CNN seed projects used.

    dB values are relative to each clip's maximum (librosa's `power_to_db(ref=np.max)`), clamped
    to `top_db` below it.
    """

    def __init__(self, cfg: FrontendConfig):
        super().__init__(cfg)
        T = torchaudio.transforms
        if cfg.kind == "logmel":
            self.transform = T.MelSpectrogram(
                sample_rate=cfg.sample_rate,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                n_mels=cfg.n_mels,
            )
        elif cfg.kind == "stft":
            self.transform = T.Spectrogram(n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=2.0)
        elif cfg.kind == "mfcc":
            self.transform = T.MFCC(
                sample_rate=cfg.sample_rate,
                n_mfcc=cfg.n_mfcc,
                melkwargs={"n_fft": cfg.n_fft, "hop_length": cfg.hop_length, "n_mels": cfg.n_mels},
            )
        else:
            raise ValueError(f"not a spectrogram frontend: {cfg.kind}")
        # The STFT window and mel filters follow from the config: keep them out of state dicts
        # (exports, Accelerate states). torchaudio's periodic window is also a view of a longer
        # tensor, which safetensors refuses to save.
        for module in self.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module.register_buffer(name, buf.clone(), persistent=False)

    def clip_features(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[0] == 0:
            return wav.new_zeros(0, self.cfg.n_features)
        if wav.shape[0] <= self.cfg.n_fft // 2:  # reflect padding needs more than n_fft / 2
            wav = torch.nn.functional.pad(wav, (0, self.cfg.n_fft // 2 + 1 - wav.shape[0]))
        spec = self.transform(wav)  # (F, T)
        if self.cfg.kind != "mfcc":
            spec = 10.0 * torch.log10(spec.clamp_min(1e-10))
            spec = spec - spec.max()
            spec = spec.clamp_min(-self.cfg.top_db)
        return spec.T.contiguous()


def build_frontend(cfg: FrontendConfig) -> Frontend:
    """The frontend module for a config."""
    if cfg.kind in ("beats_fbank", "eat_fbank"):
        return KaldiFbank(cfg)
    return SpectrogramDB(cfg)
