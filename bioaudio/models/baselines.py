"""Small reference models to compare the transformers against, all trainable on any frontend.

Every model takes features `x (B, T, F)` (time x frequency, from any `bioaudio.frontend`
frontend) and an optional frame padding mask `(B, T)` bool (True = padding, padded frames are
zero) and returns logits `(B, n_classes)`. The MLP family can instead take raw waveform
`(B, S)` with a sample padding mask (`input="waveform"`). Inside the CNNs the spectrogram is an
image `(B, 1, T, F)`: time along the height, frequency along the width (the Keras seed's layout).

Padding: models whose pooling is length-aware give a clip the same logits in a padded batch as
alone (in eval mode): padded frames are re-zeroed after every layer that could make them
non-zero, max-pools use `ceil_mode` so the last odd frame is kept the same way in both cases,
and the final pooling only sees valid frames. That holds for `tiny_mel_cnn`, `drone_cnn`, the
MLP family and `genre_cnn` with a fixed `input_frames`. It does not hold exactly for
`genre_cnn` without `input_frames` (Keras "same" pooling pads asymmetrically depending on the
total length, so the windows of a padded batch are aligned differently) nor for timm backbones
(their convolutions see zero padding through batch-norm shifts); both still pool over valid
frames only, so the difference stays small.

Every model records its constructor arguments in `model.config`; `baseline_from_config`
rebuilds it (for exports).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bioaudio.config import from_dict, to_dict
from bioaudio.data.frontend import FrontendConfig, build_frontend
from bioaudio.errors import ConfigError

InputKind = Literal["features", "waveform"]


# ----------------------------------------------------------------------------------------------
# Length-aware helpers. Padding is assumed to sit at the end of each clip (as the frontends and
# collate functions produce it), so a clip is fully described by its valid length.


def lengths_from_mask(
    padding_mask: torch.Tensor | None, batch: int, total: int, device
) -> torch.Tensor:
    """(B, T) padding mask (True = padding) or None -> (B,) valid lengths, at least 1."""
    if padding_mask is None:
        return torch.full((batch,), total, dtype=torch.long, device=device)
    if padding_mask.shape != (batch, total):
        raise ConfigError(
            f"padding mask has shape {tuple(padding_mask.shape)}, expected {(batch, total)}"
        )
    # An all-padding clip still gets one (zero) frame so pooled statistics stay finite.
    return (~padding_mask.bool()).sum(dim=1).clamp_min(1).to(device)


def valid_time(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(B,) lengths -> (B, total) bool, True on valid positions."""
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


def zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero the padded time steps of an image `(B, C, T, F)` (biases and norms make them != 0)."""
    keep = valid_time(lengths, x.shape[2])[:, None, :, None]  # (B, 1, T, 1)
    return x * keep.to(x.dtype)


def masked_adaptive_avg_pool(
    x: torch.Tensor, lengths: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """`adaptive_avg_pool2d` to `size` over each clip's valid time steps only.

    x (B, C, T, F) -> (B, C, size[0], size[1]); with full lengths it equals
    `F.adaptive_avg_pool2d(x, size)` (same bin edges: floor(i*L/n) .. ceil((i+1)*L/n)).
    """
    n_t, n_f = size
    x = F.adaptive_avg_pool2d(x, (x.shape[2], n_f))  # frequency has no padding: plain pooling
    total = x.shape[2]
    i = torch.arange(n_t, device=x.device)[None, :]  # (1, n_t)
    L = lengths[:, None]  # (B, 1)
    start = (i * L) // n_t  # (B, n_t)
    end = ((i + 1) * L + n_t - 1) // n_t
    t = torch.arange(total, device=x.device)[None, None, :]  # (1, 1, T)
    inside = (t >= start[..., None]) & (t < end[..., None])  # (B, n_t, T)
    weights = inside.to(x.dtype) / (end - start).clamp_min(1)[..., None].to(x.dtype)
    return torch.einsum("bctf,bnt->bcnf", x, weights)


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over valid frames: (B, T, F) -> (B, 2F)."""
    w = valid_time(lengths, x.shape[1])[..., None].to(x.dtype)  # (B, T, 1)
    n = lengths[:, None].to(x.dtype)
    mean = (x * w).sum(dim=1) / n
    var = (((x - mean[:, None]) ** 2) * w).sum(dim=1) / n
    return torch.cat([mean, var.clamp_min(1e-6).sqrt()], dim=1)


def keras_same_padding(n: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow/Keras `padding="same"`: output ceil(n / stride).

    TF puts the odd extra element after, which is why it cannot be a symmetric torch padding.
    """
    out = -(-n // stride)
    total = max((out - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def keras_max_pool2d(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Keras `MaxPooling2D(kernel, strides=stride, padding="same")` on (B, C, H, W)."""
    top, bottom = keras_same_padding(x.shape[2], kernel, stride)
    left, right = keras_same_padding(x.shape[3], kernel, stride)
    # -inf padding: TF ignores padded positions in the max (never picks a pad value).
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, kernel, stride)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics ignore padded time steps (same state_dict keys)."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None or not self.training or bool((lengths >= x.shape[2]).all()):
            return super().forward(x)
        w = valid_time(lengths, x.shape[2])[:, None, :, None].to(x.dtype)  # (B, 1, T, 1)
        count = w.sum() * x.shape[3]
        mean = (x * w).sum(dim=(0, 2, 3)) / count
        var = (((x - mean[None, :, None, None]) ** 2) * w).sum(dim=(0, 2, 3)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _pool_lengths(lengths: torch.Tensor, stride: int) -> torch.Tensor:
    """Valid length after a ceil-mode / "same" pooling with this stride."""
    return (lengths + stride - 1) // stride


# ----------------------------------------------------------------------------------------------
# Models


class Baseline(nn.Module):
    """Common interface: `forward(x, padding_mask=None) -> logits (B, n_classes)`."""

    name: ClassVar[str] = ""
    input: InputKind = "features"

    def __init__(self, n_classes: int, n_features: int, **options: Any):
        super().__init__()
        if int(n_classes) < 1:
            raise ConfigError(f"{self.name}: n_classes must be >= 1, got {n_classes}")
        if int(n_features) < 1:
            raise ConfigError(f"{self.name}: n_features must be >= 1, got {n_features}")
        self.n_classes = int(n_classes)
        self.n_features = int(n_features)
        self.config: dict[str, Any] = {
            "name": self.name,
            "n_classes": self.n_classes,
            "n_features": self.n_features,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        }

    def _check_features(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[2] != self.n_features:
            raise ConfigError(
                f"{self.name} was built for features (B, T, {self.n_features}); got a tensor of "
                f"shape {tuple(x.shape)} (check the frontend: kind, n_mels, n_fft, n_mfcc)"
            )


class TinyMelCNN(Baseline):
    """Tiny log-mel CNN (class demo seed): 3 x [conv3x3 -> ReLU -> max-pool 2], adaptive
    average pool to 4x4, dense 128 + ReLU, dropout 0.2, linear.

    Max-pools use ceil_mode (the seed's floor mode drops an odd last frame; ceil keeps it and
    makes padded batches equal single clips). The 4x4 pooling only averages valid frames.
    """

    name = "tiny_mel_cnn"

    def __init__(
        self,
        n_classes: int,
        n_features: int,
        channels: Sequence[int] = (16, 32, 64),
        hidden: int = 128,
        dropout: float = 0.2,
        grid: Sequence[int] = (4, 4),
    ):
        super().__init__(
            n_classes,
            n_features,
            channels=tuple(channels),
            hidden=hidden,
            dropout=dropout,
            grid=tuple(grid),
        )
        self.grid = (int(grid[0]), int(grid[1]))
        chans = [1, *map(int, channels)]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(chans[:-1], chans[1:])
        )
        self.head = nn.Sequential(
            nn.Linear(chans[-1] * self.grid[0] * self.grid[1], hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(x)
        lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
        h = zero_padding(x[:, None], lengths)  # (B, T, F) -> (B, 1, T, F)
        for conv in self.convs:
            h = zero_padding(F.relu(conv(h)), lengths)
            h = F.max_pool2d(h, 2, ceil_mode=True)
            lengths = _pool_lengths(lengths, 2)
        h = masked_adaptive_avg_pool(h, lengths, self.grid)  # (B, C, 4, 4)
        return self.head(h.flatten(1))


class KerasGenreCNN(Baseline):
    """The genre-challenge seed's Keras CNN, ported layer by layer:
    [conv 32 3x3 valid + ReLU, max-pool 3/2 "same", batch-norm] x 2, conv 32 2x2 + ReLU,
    max-pool 2/2 "same", batch-norm, flatten, dense 64 + ReLU, dropout 0.3, linear.

    Keras details kept: asymmetric "same" pooling (`keras_max_pool2d`), BatchNormalization
    eps 1e-3 / momentum 0.99 (torch momentum 0.01), Glorot-uniform weights and zero biases.
    Flatten needs a fixed size: with `input_frames` every clip is zero-padded / cropped to that
    many frames and the map is flattened as in Keras (the seed used 130 MFCC frames); without
    it (default) the last map is average-pooled over valid frames to a `grid` (time bins x
    min(freq bins, map width)) before flatten, so any clip length works. Needs at least 11
    frequency bins (and frames; shorter clips are zero-padded). Batch-norm statistics skip
    padded frames.
    """

    name = "genre_cnn"
    MIN_SIZE = 11  # smallest input surviving conv3, pool/2, conv3, pool/2, conv2

    def __init__(
        self,
        n_classes: int,
        n_features: int,
        input_frames: int | None = None,
        grid: Sequence[int] = (4, 4),
        channels: int = 32,
        hidden: int = 64,
        dropout: float = 0.3,
    ):
        super().__init__(
            n_classes,
            n_features,
            input_frames=input_frames,
            grid=tuple(grid),
            channels=channels,
            hidden=hidden,
            dropout=dropout,
        )
        if n_features < self.MIN_SIZE:
            raise ConfigError(
                f"genre_cnn needs at least {self.MIN_SIZE} feature bins, got {n_features}"
                " (use more mel bins / MFCCs or another baseline)"
            )
        if input_frames is not None and input_frames < self.MIN_SIZE:
            raise ConfigError(
                f"genre_cnn: input_frames must be >= {self.MIN_SIZE}, got {input_frames}"
            )
        self.input_frames = input_frames
        c = int(channels)
        self.conv1 = nn.Conv2d(1, c, 3)
        self.conv2 = nn.Conv2d(c, c, 3)
        self.conv3 = nn.Conv2d(c, c, 2)
        self.bn1, self.bn2, self.bn3 = (
            MaskedBatchNorm2d(c, eps=1e-3, momentum=0.01) for _ in range(3)
        )
        f_out = self.map_size(n_features)
        if input_frames is not None:
            self.grid: tuple[int, int] | None = None
            flat = c * self.map_size(input_frames) * f_out
        else:
            self.grid = (int(grid[0]), min(int(grid[1]), f_out))
            flat = c * self.grid[0] * self.grid[1]
        self.fc = nn.Linear(flat, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def map_size(n: int) -> int:
        """Size of one axis after the three conv/pool stages (Keras shape arithmetic)."""
        n = math.ceil((n - 2) / 2)  # conv 3 valid, pool 3/2 same
        n = math.ceil((n - 2) / 2)  # conv 3 valid, pool 3/2 same
        return math.ceil((n - 1) / 2)  # conv 2 valid, pool 2/2 same

    def _stage(
        self,
        h: torch.Tensor,
        lengths: torch.Tensor,
        conv: nn.Conv2d,
        bn: MaskedBatchNorm2d,
        pool: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = conv.kernel_size[0]
        h = F.relu(conv(h))
        lengths = (lengths - k + 1).clamp_min(1)  # a valid conv output needs k valid inputs
        h = keras_max_pool2d(zero_padding(h, lengths), pool, 2)
        lengths = _pool_lengths(lengths, 2)
        h = zero_padding(bn(h, lengths), lengths)
        return h, lengths

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(x)
        lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
        target = self.input_frames or max(x.shape[1], self.MIN_SIZE)
        if x.shape[1] != target:  # zero frames are padding: lengths already exclude them
            x = F.pad(x[:, :target], (0, 0, 0, max(target - x.shape[1], 0)))
            lengths = lengths.clamp_max(target)
        h = zero_padding(x[:, None], lengths)  # (B, T, F) -> (B, 1, T, F)
        h, lengths = self._stage(h, lengths, self.conv1, self.bn1, 3)
        h, lengths = self._stage(h, lengths, self.conv2, self.bn2, 3)
        h, lengths = self._stage(h, lengths, self.conv3, self.bn3, 2)
        if self.grid is not None:
            h = masked_adaptive_avg_pool(h, lengths, self.grid)  # (B, C, grid_t, grid_f)
        h = self.dropout(F.relu(self.fc(h.flatten(1))))
        return self.out(h)


class DroneCNN(Baseline):
    """The drone/car/speech seed's CNN: conv 16 -> pool 2 -> conv 32 -> pool 2 -> conv 64
    (3x3, ReLU), global max-pool over valid frames, linear. Channel widths are the seed's
    structure with assumed sizes 16/32/64."""

    name = "drone_cnn"

    def __init__(
        self,
        n_classes: int,
        n_features: int,
        channels: Sequence[int] = (16, 32, 64),
        dropout: float = 0.0,
    ):
        super().__init__(n_classes, n_features, channels=tuple(channels), dropout=dropout)
        if len(channels) != 3:
            raise ConfigError(f"drone_cnn: channels needs 3 widths, got {list(channels)}")
        chans = [1, *map(int, channels)]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(chans[:-1], chans[1:])
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(chans[-1], n_classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(x)
        lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
        h = zero_padding(x[:, None], lengths)  # (B, T, F) -> (B, 1, T, F)
        for i, conv in enumerate(self.convs):
            h = zero_padding(F.relu(conv(h)), lengths)
            if i < 2:  # two pools: the last conv feeds the global max directly
                h = F.max_pool2d(h, 2, ceil_mode=True)
                lengths = _pool_lengths(lengths, 2)
        pad = ~valid_time(lengths, h.shape[2])[:, None, :, None]  # (B, 1, T, 1)
        h = h.masked_fill(pad, float("-inf")).amax(dim=(2, 3))  # (B, C)
        return self.out(self.dropout(h))


class _MLPFamily(Baseline):
    """Dense stack on pooled features, a fixed flattened window of features, or raw waveform.

    Inputs (`input`, `input_frames`, `input_samples`):
    - features, input_frames=None (default): mean and std of each bin over valid frames (2F
      inputs), any clip length, padding-invariant;
    - features, input_frames=N: the first N frames zero-padded / cropped and flattened (N*F
      inputs), as the GTZAN seed flattened its fixed MFCC matrix;
    - waveform: `(B, S)` samples zero-padded / cropped to `input_samples` and flattened.
    """

    hidden_default: ClassVar[tuple[int, ...]] = (512, 256, 64)
    dropout_default: ClassVar[float] = 0.0
    batch_norm: ClassVar[bool] = False
    activation: ClassVar[str] = "relu"

    def __init__(
        self,
        n_classes: int,
        n_features: int,
        input: InputKind = "features",
        input_frames: int | None = None,
        input_samples: int | None = None,
        hidden: Sequence[int] | None = None,
        dropout: float | None = None,
    ):
        hidden = tuple(int(h) for h in (hidden or self.hidden_default))
        dropout = self.dropout_default if dropout is None else float(dropout)
        if input not in ("features", "waveform"):
            raise ConfigError(f"{self.name}: input must be 'features' or 'waveform', got {input!r}")
        if input == "waveform" and not input_samples:
            raise ConfigError(
                f"{self.name}: input='waveform' needs input_samples (clip length in samples,"
                " e.g. 16000 * seconds)"
            )
        super().__init__(
            n_classes,
            n_features,
            input=input,
            input_frames=input_frames,
            input_samples=input_samples,
            hidden=hidden,
            dropout=dropout,
        )
        self.input = input
        self.input_frames = input_frames
        self.input_samples = input_samples
        if input == "waveform":
            in_dim = int(input_samples)
        elif input_frames:
            in_dim = int(input_frames) * self.n_features
        else:
            in_dim = 2 * self.n_features
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if self.batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_activation(self.activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        layers.append(nn.Linear(in_dim, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.input == "waveform":
            if x.dim() != 2:
                raise ConfigError(
                    f"{self.name} was built for waveform (B, S); got shape {tuple(x.shape)}"
                )
            lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
            x = x * valid_time(lengths, x.shape[1]).to(x.dtype)
            n = self.input_samples
            h = F.pad(x[:, :n], (0, max(n - x.shape[1], 0)))  # (B, S) -> (B, input_samples)
        else:
            self._check_features(x)
            lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
            x = x * valid_time(lengths, x.shape[1])[..., None].to(x.dtype)
            if self.input_frames:
                n = self.input_frames
                h = F.pad(x[:, :n], (0, 0, 0, max(n - x.shape[1], 0))).flatten(1)  # (B, N*F)
            else:
                h = masked_mean_std(x, lengths)  # (B, 2F)
        return self.net(h)


def _activation(name: str) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name == "elu":
        return nn.ELU()
    return nn.ReLU()


class MLP(_MLPFamily):
    """GTZAN seed MLP: dense 512 -> 256 -> 64 (ReLU) -> linear. See `_MLPFamily` for inputs."""

    name = "mlp"


class MLP2(_MLPFamily):
    """GTZAN seed MLP2, the regularised MLP: dense 512 -> 256 -> 64 (ReLU), dropout 0.3 after
    each (the seed's L2 penalty is the optimizer's weight decay). See `_MLPFamily` for inputs."""

    name = "mlp2"
    dropout_default = 0.3


class CEL(_MLPFamily):
    """GTZAN seed CEL: dense blocks 512 -> 256 -> 128, each Linear -> BatchNorm -> ReLU ->
    dropout 0.3, then linear. The seed only fixes that CEL/CEL2/CEL3 differ by activation; the
    widths, batch-norm and dropout here are our documented assumption."""

    name = "cel"
    hidden_default = (512, 256, 128)
    dropout_default = 0.3
    batch_norm = True


class CEL2(CEL):
    """CEL with LeakyReLU (slope 0.1)."""

    name = "cel2"
    activation = "leaky_relu"


class CEL3(CEL):
    """CEL with ELU."""

    name = "cel3"
    activation = "elu"


class TimmBaseline(Baseline):
    """A timm backbone (e.g. resnet18, efficientnet_b0) on the spectrogram as a one-channel
    image, randomly initialised (never downloads), average-pooled over valid frames, linear.

    Extra options go to `timm.create_model` (e.g. `drop_path_rate`). Not exactly
    padding-invariant (see module docstring)."""

    name = "timm"

    def __init__(
        self,
        n_classes: int,
        n_features: int,
        model_name: str = "resnet18",
        drop_rate: float = 0.0,
        **timm_options: Any,
    ):
        super().__init__(
            n_classes, n_features, model_name=model_name, drop_rate=drop_rate, **timm_options
        )
        import timm

        self.config["name"] = f"timm:{model_name}"
        if timm_options.get("pretrained"):
            raise ConfigError("timm baselines are randomly initialised: pretrained is not allowed")
        timm_options.pop("pretrained", None)
        try:
            # num_classes=0 + global_pool='' -> the feature map, so we can pool over valid frames.
            self.backbone = timm.create_model(
                model_name,
                pretrained=False,
                in_chans=1,
                num_classes=0,
                global_pool="",
                **timm_options,
            )
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"timm:{model_name}: {str(e).splitlines()[0]}") from e
        self.dropout = nn.Dropout(drop_rate)
        self.out = nn.Linear(self.backbone.num_features, n_classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(x)
        lengths = lengths_from_mask(padding_mask, x.shape[0], x.shape[1], x.device)
        x = x * valid_time(lengths, x.shape[1])[..., None].to(x.dtype)
        h = self.backbone(x[:, None])  # (B, 1, T, F) -> (B, C, T', F') for CNNs
        if h.dim() == 4:
            # Valid feature rows: the input's valid fraction of the (strided) time axis.
            t_out = h.shape[2]
            lengths = (lengths * t_out + x.shape[1] - 1) // x.shape[1]
            w = valid_time(lengths.clamp_min(1), t_out)[:, None, :, None].to(h.dtype)
            h = (h * w).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) * h.shape[3])  # (B, C)
        elif h.dim() == 3:  # token models (ViT-like): mean over tokens
            h = h.mean(dim=1)
        return self.out(self.dropout(h))


BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (TinyMelCNN, KerasGenreCNN, MLP, MLP2, CEL, CEL2, CEL3, DroneCNN)
}
TIMM_PREFIX = "timm:"


def _timm_name(name: str) -> str | None:
    """The timm architecture for `timm:<name>` or a plain timm model name, else None."""
    import timm

    arch = name[len(TIMM_PREFIX) :] if name.startswith(TIMM_PREFIX) else name
    if arch and timm.is_model(arch.split(".")[0]):
        return arch
    if name.startswith(TIMM_PREFIX):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown timm model {arch!r}{hint}; see timm.list_models()")
    return None


def _check_options(cls: type[Baseline], name: str, options: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ("self", "n_classes", "n_features")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"baseline {name}: unknown option(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )


def build_baseline(name: str, n_classes: int, n_features: int, **options: Any) -> Baseline:
    """Build a registered baseline (`BASELINES`), or a timm backbone by `timm:<name>` / name."""
    if name in BASELINES:
        cls = BASELINES[name]
        _check_options(cls, name, options)
        return cls(n_classes, n_features, **options)
    arch = _timm_name(name)
    if arch is not None:
        options.pop("model_name", None)
        return TimmBaseline(n_classes, n_features, model_name=arch, **options)
    close = difflib.get_close_matches(name, list(BASELINES), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"unknown baseline {name!r}{hint}; known: {', '.join(BASELINES)},"
        " or timm:<name> for any timm.list_models() name (e.g. timm:resnet18)"
    )


def baseline_from_config(config: dict[str, Any]) -> Baseline:
    """Rebuild a model from its `model.config` (e.g. read back from an export's config.json)."""
    cfg = dict(config)
    try:
        name, n_classes, n_features = cfg.pop("name"), cfg.pop("n_classes"), cfg.pop("n_features")
    except KeyError as e:
        raise ConfigError(f"baseline config lacks {e.args[0]!r}") from e
    if str(name).startswith(TIMM_PREFIX):
        cfg.pop("model_name", None)
    return build_baseline(name, n_classes, n_features, **cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# The baseline classifier: frontend + baseline, one exportable model

MODEL_TYPE = "baseline"


class BaselineClassifier(nn.Module):
    """A frontend (waveform -> features) and a `bioaudio.baselines` model, as one exportable
    classifier. Waveform-input models (the MLP family with input="waveform") skip the frontend."""

    model_type: str = MODEL_TYPE

    def __init__(
        self,
        baseline: Baseline,
        frontend: FrontendConfig,
        class_names: Sequence[str],
        multi_label: bool = False,
    ):
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) != baseline.n_classes:
            raise ConfigError(
                f"{baseline.config.get('name')}: {baseline.n_classes} outputs but"
                f" {len(names)} class names"
            )
        if len(set(names)) != len(names):
            raise ConfigError("class names are not unique")
        if baseline.input == "features" and baseline.n_features != frontend.n_features:
            raise ConfigError(
                f"{baseline.config.get('name')} was built for {baseline.n_features} feature bins"
                f" but the {frontend.kind} frontend gives {frontend.n_features}"
            )
        self.frontend_cfg = frontend
        self.frontend = build_frontend(frontend)
        self.baseline = baseline
        self.class_names = names
        self.multi_label = bool(multi_label)
        self.provenance: dict[str, Any] = {}

    @classmethod
    def build(
        cls,
        name: str,
        frontend: FrontendConfig,
        class_names: Sequence[str],
        multi_label: bool = False,
        **options: Any,
    ) -> BaselineClassifier:
        """A fresh classifier: `name` is a `bioaudio.baselines` name or `timm:<arch>`."""
        baseline = build_baseline(name, len(class_names), frontend.n_features, **options)
        return cls(baseline, frontend, class_names, multi_label)

    @property
    def input(self) -> str:
        """ "features" (the frontend runs first) or "waveform" (raw samples in)."""
        return self.baseline.input

    def describe(self) -> str:
        """One line, e.g. "baseline tiny_mel_cnn, 3 classes" (as AudioModel.describe)."""
        name = self.baseline.config.get("name", type(self.baseline).__name__)
        return f"{MODEL_TYPE} {name}, {len(self.class_names)} classes"

    def featurise(
        self, wav: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """wav (B, S) -> normalised features (B, T, F) and frame mask (B, T) | None."""
        return self.frontend(wav, padding_mask)

    def forward(
        self,
        wav: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        feats: Tensor | None = None,
        frame_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, C) from a waveform batch or from features (a cache, or augmented)."""
        if self.input == "waveform":
            if wav is None:
                raise ConfigError(
                    f"{self.baseline.config.get('name')} takes the raw waveform; it cannot be fed"
                    " features (do not use a feature cache with input=waveform)"
                )
            return self.baseline(wav, padding_mask)
        if feats is None:
            if wav is None:
                raise ValueError("forward needs wav or feats")
            feats, frame_mask = self.frontend(wav, padding_mask)
        return self.baseline(feats, frame_mask)

    def _output_layer(self) -> nn.Linear:
        # Every baseline registers its classifier Linear last (TinyMelCNN head[-1], `out`,
        # MLP net[-1]; timm backbones come before `out`), so it is the last Linear module.
        return [m for m in self.baseline.modules() if isinstance(m, nn.Linear)][-1]

    @property
    def embed_dim(self) -> int:
        """Width of `embed`: the input width of the final linear layer."""
        return int(self._output_layer().in_features)

    def embed(self, wav: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Clip embeddings (B, D): the penultimate activation (what the final linear layer
        sees; dropout is identity in eval mode)."""
        seen: list[Tensor] = []
        hook = self._output_layer().register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        try:
            self(wav, padding_mask)
        finally:
            hook.remove()
        return seen[-1]

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the model; `bioaudio.checkpoint` writes it into exports."""
        return {
            "model_type": MODEL_TYPE,
            "baseline": json_ready(self.baseline.config),
            "frontend": to_dict(self.frontend_cfg),
            "class_names": list(self.class_names),
            "multi_label": self.multi_label,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaselineClassifier:
        """Rebuild (random weights) from `config()` or from a whole export config.json."""
        if not isinstance(config, dict):
            raise ConfigError("a baseline config must be a mapping")
        if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
        missing = [k for k in ("baseline", "frontend", "class_names") if k not in config]
        if missing:
            raise ConfigError(f"baseline config lacks {', '.join(missing)}")
        if not isinstance(config["baseline"], dict) or not isinstance(config["frontend"], dict):
            raise ConfigError("baseline config: 'baseline' and 'frontend' must be mappings")
        names = config["class_names"]
        if not isinstance(names, list) or not names:
            raise ConfigError("baseline config: class_names must be a non-empty list")
        frontend = from_dict(FrontendConfig, config["frontend"], where="frontend")
        baseline = baseline_from_config(config["baseline"])
        return cls(baseline, frontend, names, bool(config.get("multi_label", False)))


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (model configs go through JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
