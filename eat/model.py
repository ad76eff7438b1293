"""EAT encoder (Chen et al. 2024, "EAT: Self-Supervised Pre-Training with Efficient Audio
Transformer"), numerically compatible with the official fairseq and Hugging Face checkpoints.

Architecture, top-down (a ViT on the log-mel image):
    fbank (B, T, 128) -> 16x16 patches (Conv2d with bias, `local_encoder.proj`) -> (B, N, D),
    time-major t*8+f -> + fixed 2-D sin-cos positions (first N rows of a (max_length*8, D) table)
    -> prepend the learned CLS token (`extra_tokens`, no position) -> LayerNorm (`pre_norm`)
    -> `depth` post-LN blocks: x = LN1(x + Attn(x)); x = LN2(x + MLP(x))  (fused qkv, GELU MLP)
    -> tokens (B, N, D) and CLS (B, D). No final norm.
The position table is a buffer stored in every checkpoint; its length (`max_length` time patches,
768 = 122.9 s for the released models) bounds the input length and is read from the weights.

Key names equal the Hugging Face port's without its `model.` prefix (eat/convert.py maps both
official layouts). Masked pretraining passes `keep` (visible patches): dropped tokens are removed
after the positions are added, so the blocks only see (and pay for) the visible ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp

from bioaudio.errors import ConfigError, DataError
from bioaudio.models.audio_model import AudioModel
from bioaudio.models.layers import (
    Encoder,
    EncoderOutput,
    PatchEmbed,
    attention,
    block_layer_id,
    frames_to_token_mask,
    gather_tokens,
    keep_indices,
    key_padding_bias,
    run_layer,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, max_length=64),
    # CPU-sized pretraining (hours of audio in minutes on a laptop CPU): a third of ViT-B's
    # width, half its depth (~5 M parameters).
    "small": dict(embed_dim=256, depth=6, num_heads=4),
    "base": dict(),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


@dataclass
class EATConfig:
    """EAT encoder settings (names follow the Hugging Face `EATConfig` where they exist)."""

    embed_dim: int = field(default=768, metadata={"help": "transformer width D"})
    depth: int = field(default=12, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=12, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width / D"})
    patch_size: int = field(default=16, metadata={"help": "patch size (frames and bins)"})
    n_mels: int = field(default=128, metadata={"help": "input feature bins"})
    max_length: int = field(
        default=768, metadata={"help": "time patches in the position table (x16 frames)"}
    )
    qkv_bias: bool = field(default=True, metadata={"help": "bias in the fused qkv projection"})
    norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon"})
    norm_affine: bool = field(default=True, metadata={"help": "LayerNorms have weight and bias"})
    drop_rate: float = field(
        default=0.0, metadata={"help": "dropout after pre-norm and attention projection"}
    )
    attn_drop_rate: float = field(default=0.0, metadata={"help": "attention weight dropout"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout inside the MLP"})
    post_mlp_drop: float = field(default=0.0, metadata={"help": "dropout after the MLP"})
    drop_path_rate: float = field(
        default=0.0, metadata={"help": "stochastic depth, linear from 0 to this at the last block"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute block activations in backward (saves memory)"}
    )

    @classmethod
    def preset(cls, name: str) -> EATConfig:
        """A named preset: `tiny` (tests), `small` (CPU-sized pretraining), `base` (EAT-base,
        ViT-B), `large` (EAT-large, ViT-L)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown EAT preset {name!r} (known: {', '.join(PRESETS)})")
        cfg = cls(**PRESETS[name])
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if min(self.embed_dim, self.depth, self.num_heads, self.patch_size, self.max_length) < 1:
            raise ConfigError("EAT sizes (width, depth, heads, patch, max_length) must be positive")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"EAT embed_dim {self.embed_dim} not divisible by {self.num_heads} heads"
            )
        if self.embed_dim % 4:
            raise ConfigError("EAT embed_dim must be a multiple of 4 (2-D sin-cos positions)")
        if self.n_mels < self.patch_size:
            raise ConfigError(f"EAT n_mels {self.n_mels} < patch size {self.patch_size}")


def sincos_positions(n_time: int, n_freq: int, dim: int) -> torch.Tensor:
    """The official fixed 2-D sin-cos table (n_time * n_freq, dim), rows time-major.

    The first dim/2 channels encode the frequency column, the last dim/2 the time row (the
    official meshgrid puts the width coordinate first); each half is [sin(p w_i), cos(p w_i)]
    with w_i = 10000 ** (-i / (dim / 4)). Computed in float64 like the official numpy code.
    """

    def one_axis(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    freq, time = np.meshgrid(np.arange(n_freq), np.arange(n_time))  # (T', F') each
    table = np.concatenate([one_axis(freq, dim // 2), one_axis(time, dim // 2)], axis=1)
    return torch.from_numpy(table).float()


class FixedPositions(nn.Module):
    """Holds the position table as a (persistent, non-trained) buffer `positions` (1, L, D)."""

    def __init__(self, n_time: int, n_freq: int, dim: int):
        super().__init__()
        self.register_buffer("positions", sincos_positions(n_time, n_freq, dim)[None])


class EATAttention(nn.Module):
    """Fused-qkv multi-head self-attention via SDPA."""

    def __init__(self, cfg: EATConfig):
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.attn_drop = cfg.attn_drop_rate
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        # q, k, v as chunks of the last dim (the fused layout [3, H, hd]), each (B, H, N, hd):
        # the backward concatenates the three gradients in one pass, where indexing a permuted
        # (3, B, H, N, hd) view wrote each into a zeroed copy of the whole qkv, then summed
        q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        drop = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, attn_mask, drop)  # (B, H, N, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class EATBlock(nn.Module):
    """Post-LN block (the official AltBlock with layer_norm_first=False)."""

    def __init__(self, cfg: EATConfig, drop_path: float):
        super().__init__()
        d = cfg.embed_dim
        self.attn = EATAttention(cfg)
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), act_layer=nn.GELU, drop=cfg.activation_dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.post_mlp_dropout = nn.Dropout(cfg.post_mlp_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.attn(x, attn_mask)))
        return self.norm2(x + self.drop_path(self.post_mlp_dropout(self.mlp(x))))


class EATEncoder(Encoder):
    """EAT: fbank (B, T, F) [+ frame padding mask, + keep mask] -> EncoderOutput with CLS."""

    def __init__(self, cfg: EATConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = self.embed_dim = cfg.embed_dim
        self.local_encoder = PatchEmbed(cfg.patch_size, d, bias=True)
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, d))
        self.fixed_positional_encoder = FixedPositions(cfg.max_length, self.n_freq, d)
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(EATBlock(cfg, float(r)) for r in rates)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # Official init: xavier-uniform patch conv (as a matrix), N(0, 0.02) CLS, timm-style
        # truncated normal linears with zero bias.
        w = self.local_encoder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.trunc_normal_(self.extra_tokens, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def has_cls(self) -> bool:
        return True

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    def no_weight_decay(self) -> set[str]:
        """The CLS token (the sin-cos positions are a buffer, never optimised)."""
        return {"extra_tokens"}

    def layer_id(self, name: str) -> int:
        return block_layer_id(
            name, "blocks", self.cfg.depth, ("local_encoder", "extra_tokens", "pre_norm")
        )

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for finetuning: linear from 0 to `rate` at the last block."""
        self.cfg.drop_path_rate = float(rate)
        for block, r in zip(self.blocks, np.linspace(0.0, rate, self.cfg.depth)):
            block.drop_path = DropPath(float(r)) if r > 0 else nn.Identity()

    def describe(self) -> str:
        c = self.cfg
        seconds = c.max_length * c.patch_size / 100
        return f"{c.depth} blocks x {c.embed_dim}, {c.num_heads} heads, max {seconds:.1f} s"

    @property
    def n_freq(self) -> int:
        """Frequency patches per time step (8 for 128 bins)."""
        return self.cfg.n_mels // self.cfg.patch_size

    @property
    def max_frames(self) -> int:
        """Longest input (frames) the position table covers."""
        return self.cfg.max_length * self.cfg.patch_size

    def _run(
        self,
        fbank: torch.Tensor,
        padding_mask: torch.Tensor | None,
        keep: torch.Tensor | None,
        layers: list[torch.Tensor] | None,
    ) -> EncoderOutput:
        if fbank.dim() != 3 or fbank.shape[-1] != self.cfg.n_mels:
            raise ValueError(
                f"EAT expects features (B, T, {self.cfg.n_mels}), got {tuple(fbank.shape)}"
            )
        p = self.cfg.patch_size
        n_time = fbank.shape[1] // p
        if n_time > self.cfg.max_length:
            raise DataError(
                f"input of {fbank.shape[1]} frames is longer than this EAT model's position table "
                f"({self.max_frames} frames = {self.max_frames / 100:.1f} s): crop or segment it"
            )
        x = self.local_encoder(fbank)  # (B, N, D)
        n = x.shape[1]
        x = x + self.fixed_positional_encoder.positions[:, :n].to(x.dtype)
        token_mask = frames_to_token_mask(padding_mask, p, self.n_freq, n_time)
        if keep is not None:
            idx = keep_indices(keep)  # (B, n_keep)
            x = gather_tokens(x, idx)
            if token_mask is not None:
                token_mask = gather_tokens(token_mask, idx)
                token_mask = token_mask if bool(token_mask.any()) else None
        b = x.shape[0]
        x = torch.cat([self.extra_tokens.expand(b, -1, -1).to(x.dtype), x], dim=1)  # CLS first
        x = self.pos_drop(self.pre_norm(x))
        attn_mask = None
        if token_mask is not None:
            attn_mask = key_padding_bias(
                nn.functional.pad(token_mask, (1, 0), value=False), x.dtype
            )
        ckpt = self.gradient_checkpointing and self.training
        for block in self.blocks:
            x = run_layer(block, ckpt, x, attn_mask)
            if layers is not None:
                layers.append(x)
        return EncoderOutput(x[:, 1:], x[:, 0], token_mask)


class EATModel(AudioModel):
    """AudioModel with an EAT encoder, plus the official entry points on log-mel input.

    `extract_features(mel)` and `model(mel)` take the official input (B, 1, T, 128) (normalised
    log-mel, T a multiple of 16): features (B, 1 + N, D) with CLS first, or for a model with a
    head the logits (B, C) (no sigmoid, as the official forward). `model(wav)` with a waveform
    batch (B, S) is our API (logits through the frontend).
    """

    model_type = "eat"

    def extract_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Official `EAT.extract_features`: (B, 1, T, F) -> (B, 1 + N, D), CLS first."""
        out = self.encoder(self._official_input(mel))
        return torch.cat([out.cls[:, None], out.tokens], dim=1)

    def forward(
        self,
        x: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        feats: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x is not None and x.dim() == 4:  # the official log-mel input
            out = self.encoder(self._official_input(x))
            if self.head is None:
                return torch.cat([out.cls[:, None], out.tokens], dim=1)
            return self.head(out)
        return super().forward(x, padding_mask, feats=feats, frame_mask=frame_mask)

    def _official_input(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 4 or mel.shape[1] != 1:
            raise ValueError(
                f"expected the official EAT input (B, 1, T, F), got {tuple(mel.shape)}"
            )
        return mel[:, 0]
