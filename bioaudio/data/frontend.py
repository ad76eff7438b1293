"""Waveform -> features. Kaldi fbank frontends with each model's official constants, and the
log-mel / STFT / MFCC frontends of the CNN baselines.

Every frontend is an `nn.Module` with
    forward(wav (B, S) float, padding_mask (B, S) bool | None) -> (feats (B, T, F), frame_mask (B, T) | None)
`padding_mask` / `frame_mask` are True on padding. Clips in a padded batch are featurised on
their valid samples only, so a clip's features do not depend on what it was batched with.
Frontends always run in float32 (autocast off): fbank in bf16 loses the low-energy bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torchaudio

from bioaudio.data.fbank import KaldiFbankOptions, kaldi_fbank_batch
from bioaudio.errors import ConfigError

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

    def validate(self) -> None:
        """One-line ConfigError for settings no frontend can use (a config file, an export's
        config.json): types and ranges, finite statistics."""

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"frontend {name} must be an integer >= {low}, got {v!r}")

        for name in ("sample_rate", "n_mels", "n_fft", "hop_length", "n_mfcc"):
            integer(name, 1)
        integer("pad_to_multiple", 0)
        if self.target_frames is not None:
            integer("target_frames", 1)
        if self.n_fft > MAX_N_FFT:
            raise ConfigError(f"frontend n_fft {self.n_fft} is larger than {MAX_N_FFT} samples")
        for name in ("mean", "std", "top_db"):
            v = getattr(self, name)
            if v is None and name != "top_db":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"frontend {name} must be a finite number, got {v!r}")
        if self.std is not None and self.std <= 0:
            raise ConfigError(f"frontend std must be positive, got {self.std!r}")
        if self.top_db <= 0:
            raise ConfigError(f"frontend top_db must be positive, got {self.top_db!r}")


# Largest FFT accepted from a flag: 2**16 samples is 4 s at 16 kHz, far beyond any useful window,
# and keeps a typo from allocating terabytes.
MAX_N_FFT = 1 << 16


@dataclass
class FrontendOptions:
    """The frontend flags of every command that featurises (`--frontend logmel --n_mels 64`).

    Commands inherit these fields; a command may re-declare `frontend` with another default."""

    frontend: FrontendKind = field(
        default="beats_fbank", metadata={"help": "beats_fbank | eat_fbank | logmel | stft | mfcc"}
    )
    sample_rate: int = field(
        default=FrontendConfig.sample_rate, metadata={"help": "frontend sample rate (Hz)"}
    )
    n_mels: int = field(default=FrontendConfig.n_mels, metadata={"help": "mel bins"})
    n_fft: int = field(
        default=FrontendConfig.n_fft, metadata={"help": "FFT size (logmel / stft / mfcc)"}
    )
    hop_length: int = field(
        default=FrontendConfig.hop_length,
        metadata={"help": "hop in samples (logmel / stft / mfcc)"},
    )
    n_mfcc: int = field(default=FrontendConfig.n_mfcc, metadata={"help": "MFCC coefficients"})
    top_db: float = field(
        default=FrontendConfig.top_db, metadata={"help": "dynamic range of dB frontends"}
    )

    def validate_frontend(self) -> None:
        """One-line ConfigError for values no frontend can use."""
        for name in ("sample_rate", "n_mels", "n_fft", "hop_length", "n_mfcc"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if self.n_fft > MAX_N_FFT:
            raise ConfigError(f"--n_fft {self.n_fft} is larger than {MAX_N_FFT} samples")
        if not 8000 <= self.sample_rate <= 500_000:
            raise ConfigError(f"--sample_rate must be in [8000, 500000] Hz, got {self.sample_rate}")
        if not (isinstance(self.top_db, (int, float)) and 0 < self.top_db < float("inf")):
            raise ConfigError(f"--top_db must be a positive number of dB, got {self.top_db!r}")

    def frontend_config(self) -> FrontendConfig:
        """The FrontendConfig these flags describe (validated)."""
        self.validate_frontend()
        return FrontendConfig(
            kind=self.frontend,
            sample_rate=self.sample_rate,
            n_mels=self.n_mels,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mfcc=self.n_mfcc,
            top_db=float(self.top_db),
        )


def valid_lengths(wav: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Number of valid samples per clip (padding is assumed to be at the end)."""
    if padding_mask is None:
        return torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=wav.device)
    return padding_mask.shape[1] - padding_mask.sum(dim=1)  # 3x faster than (~mask).sum()


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

    def batch_features(
        self, wav: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) float32 and (B,) valid samples -> un-normalised (B, T, F) features, zero
        beyond each clip's frames, and (B,) frames. Default: `clip_features` clip by clip."""
        feats = [self.clip_features(wav[b, : int(lengths[b])]) for b in range(wav.shape[0])]
        frames = torch.tensor([f.shape[0] for f in feats], device=wav.device)
        out = wav.new_zeros(len(feats), int(frames.max()), self.cfg.n_features)
        for b, f in enumerate(feats):
            out[b, : f.shape[0]] = f
        return out, frames

    def _run(self, wav: torch.Tensor, padding_mask: torch.Tensor | None, normalise: bool):
        if wav.dim() == 1:
            wav = wav[None]
        with torch.autocast(device_type=wav.device.type, enabled=False):
            wav = wav.float()
            lengths = valid_lengths(wav, padding_mask)
            out, frames = self.batch_features(wav, lengths)  # rows beyond `frames` are zero
            pad_to = self.cfg.pad_to_multiple
            if pad_to > 1:  # official EAT: zero frames appended before normalisation, valid input
                frames = frames + (-frames) % pad_to
            if self.cfg.target_frames:  # every clip cropped or zero-padded to n frames
                n = self.cfg.target_frames
                frames = torch.full_like(frames, n)
            t_max = int(frames.max())
            # The zero rows beyond a clip's own frames are exactly the zero padding added above.
            out = nn.functional.pad(out[:, :t_max], (0, 0, 0, t_max - min(t_max, out.shape[1])))
            stats = self.cfg.normalisation() if normalise else None
            if stats is not None:
                out = (out - stats[0]) / (2.0 * stats[1])
            frame_mask = None
            if padding_mask is not None or bool((frames != t_max).any()):
                frame_mask = lengths_to_mask(frames, t_max)
                out = out.masked_fill(frame_mask[..., None], 0.0)
        return out, frame_mask


class KaldiFbank(Frontend):
    """BEATs / EAT Kaldi fbank, equal to the official per-clip preprocessing (module docstring),
    computed for the whole batch at once by `kaldi_fbank_batch`."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__(cfg)
        if cfg.kind == "beats_fbank":
            self.options = KaldiFbankOptions.beats(cfg.n_mels, cfg.sample_rate)
        elif cfg.kind == "eat_fbank":
            self.options = KaldiFbankOptions.eat(cfg.n_mels, cfg.sample_rate)
        else:
            raise ValueError(f"not a Kaldi fbank frontend: {cfg.kind}")

    def batch_features(
        self, wav: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kaldi_fbank_batch(wav, lengths, self.options)

    def clip_features(self, wav: torch.Tensor) -> torch.Tensor:
        lengths = torch.tensor([wav.shape[0]], device=wav.device)
        return kaldi_fbank_batch(wav[None].float(), lengths, self.options)[0][0]


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
