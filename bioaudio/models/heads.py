"""Pooling and classification heads on top of an encoder's `EncoderOutput`.

Every pooling is masked: padding tokens (EncoderOutput.padding_mask True) never contribute, so a
clip gives the same result whatever it is batched with.

Poolings (`HeadConfig.pooling`, also `pool_tokens` / `AudioModel.embed`):
- `cls`: the encoder's CLS vector. EAT has one (the official extra token). BEATs has none in the
  official weights; `BEATsConfig.cls_token=True` adds a learned CLS token (new parameters, trained
  by finetuning), prepended after the convolutional positional embedding, with no relative
  position bias to or from it. Asking for `cls` from an encoder without one raises ConfigError.
- `mean`: masked mean of the patch tokens (the CLS token is not included).
- `max`: masked max of the patch tokens.
- `lin_softmax`: a per-token classifier gives per-class probabilities p_t = sigmoid(z_t); the clip
  probability is sum_t p_t^2 / sum_t p_t over valid tokens (linear-softmax pooling, Wang et al.
  2019). The head returns the LOGIT of that probability, so `sigmoid(logits)` is the clip
  probability and BCE-with-logits / cross-entropy losses apply unchanged.
- `attention`: class-wise attentive pooling: logits_c = sum_t softmax_t(a_c . x_t) (w_c . x_t).

`ClassifierHead` (cls / mean / max) = pool -> optional LayerNorm -> optional standardisation
(`HeadConfig.standardize`, what linear probes use) -> dropout -> Linear. It also
expresses the official finetuned heads: EAT = CLS -> LayerNorm (`fc_norm`) -> Linear; BEATs =
Linear on every token, masked mean over tokens (= Linear of the masked token mean), then sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from bioaudio.errors import ConfigError
from bioaudio.models.layers import EncoderOutput

Pooling = Literal["cls", "mean", "max", "lin_softmax", "attention"]
EMBED_POOLINGS = ("mean", "cls", "max")


@dataclass
class HeadConfig:
    """Classification head settings; stored in every export."""

    pooling: Pooling = field(
        default="mean", metadata={"help": "token pooling: cls, mean, max, lin_softmax, attention"}
    )
    num_classes: int = field(default=0, metadata={"help": "number of classes (0: from the labels)"})
    norm: bool = field(
        default=False, metadata={"help": "LayerNorm on the pooled vector before the classifier"}
    )
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of that LayerNorm"})
    standardize: bool = field(
        default=False,
        metadata={
            "help": "standardise each feature by the training data's mean and std before the "
            "classifier (a BatchNorm without affine: the linear-probe recipe of MAE)"
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout before the classifier"})

    def validate(self) -> None:
        if self.pooling not in ("cls", "mean", "max", "lin_softmax", "attention"):
            raise ConfigError(f"head.pooling: unknown pooling {self.pooling!r}")
        if self.num_classes < 1:
            raise ConfigError(f"head.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")


def _valid(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, 1) float weights: 1 on valid tokens."""
    if padding_mask is None:
        return x.new_ones(x.shape[0], x.shape[1], 1)
    return (~padding_mask).to(x.dtype)[..., None]


def masked_mean(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of (B, N, D) ignoring padding; a clip with no valid token gives zeros."""
    if padding_mask is None:
        return x.mean(1)
    w = _valid(x, padding_mask)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def masked_max(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Max over dim 1 of (B, N, D) ignoring padding."""
    if padding_mask is None:
        return x.amax(1)
    return x.masked_fill(padding_mask[..., None], torch.finfo(x.dtype).min).amax(1)


def pool_tokens(out: EncoderOutput, pooling: str) -> torch.Tensor:
    """(B, D) clip vector from an encoder output: `mean`, `max` or `cls` (see module doc)."""
    if pooling == "mean":
        return masked_mean(out.tokens, out.padding_mask)
    if pooling == "max":
        return masked_max(out.tokens, out.padding_mask)
    if pooling == "cls":
        if out.cls is None:
            raise ConfigError(
                "pooling 'cls' needs a CLS token, but this encoder has none (official BEATs "
                "weights have no CLS: use pooling 'mean', or build BEATs with cls_token=true)"
            )
        return out.cls
    raise ConfigError(f"unknown pooling {pooling!r} for an embedding (use one of {EMBED_POOLINGS})")


class Standardize(nn.Module):
    """Per-feature standardisation, a BatchNorm without affine parameters that ignores padding:
    in training, by the statistics of the batch's valid vectors (their cumulative average kept
    as running statistics); in evaluation, by those running statistics. Input (B, D), or
    (B, N, D) with an optional (B, N) padding mask (True = padding)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)
        flat = x.reshape(-1, x.shape[-1]).float()
        if padding_mask is not None and x.dim() == 3:
            flat = flat[~padding_mask.reshape(-1)]
        if flat.shape[0] < 2:  # too few vectors for a variance: the running statistics
            return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
        with torch.no_grad():
            n = int(self.num_batches_tracked) + 1
            self.running_mean += (mean.detach() - self.running_mean) / n
            unbiased = var.detach() * flat.shape[0] / (flat.shape[0] - 1)
            self.running_var += (unbiased - self.running_var) / n
            self.num_batches_tracked += 1
        return ((x.float() - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)


class _LinearHead(nn.Module):
    """Optional LayerNorm -> optional standardisation -> dropout -> Linear (embed_dim ->
    classes), the part every head has."""

    def __init__(self, cfg: HeadConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(embed_dim, eps=cfg.norm_eps) if cfg.norm else nn.Identity()
        self.standardize = Standardize(embed_dim) if cfg.standardize else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the classifier sees: norm -> standardisation -> dropout."""
        x = self.norm(x)
        if self.standardize is not None:
            x = self.standardize(x, padding_mask)
        return self.dropout(x)


class ClassifierHead(_LinearHead):
    """Pool (cls / mean / max) -> optional LayerNorm -> dropout -> Linear: logits (B, C)."""

    def forward(self, out: EncoderOutput) -> torch.Tensor:
        return self.fc(self.features(pool_tokens(out, self.cfg.pooling)))


class LinSoftmaxHead(_LinearHead):
    """Per-token classifier + linear-softmax pooling; returns clip logits (see module doc)."""

    eps = 1e-6

    def forward(self, out: EncoderOutput) -> torch.Tensor:
        z = self.fc(self.features(out.tokens, out.padding_mask)).float()  # (B, N, C), fp32 pool
        p = torch.sigmoid(z)
        w = _valid(p, out.padding_mask)
        clip = (p * p * w).sum(1) / (p * w).sum(1).clamp_min(self.eps)
        clip = clip.clamp(self.eps, 1.0 - self.eps)
        return torch.log(clip) - torch.log1p(-clip)


class AttentionHead(_LinearHead):
    """Class-wise attentive pooling: per class, a softmax over tokens weights per-token logits."""

    def __init__(self, cfg: HeadConfig, embed_dim: int):
        super().__init__(cfg, embed_dim)
        self.att = nn.Linear(embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.att.weight, std=0.02)
        nn.init.zeros_(self.att.bias)

    def forward(self, out: EncoderOutput) -> torch.Tensor:
        x = self.features(out.tokens, out.padding_mask)
        scores = self.att(x).float()  # (B, N, C)
        if out.padding_mask is not None:
            scores = scores.masked_fill(out.padding_mask[..., None], torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=1)
        return (weights * self.fc(x).float()).sum(1)


def build_head(cfg: HeadConfig, embed_dim: int) -> nn.Module:
    """The head module for a config (validated)."""
    cfg.validate()
    if cfg.pooling == "lin_softmax":
        return LinSoftmaxHead(cfg, embed_dim)
    if cfg.pooling == "attention":
        return AttentionHead(cfg, embed_dim)
    return ClassifierHead(cfg, embed_dim)
