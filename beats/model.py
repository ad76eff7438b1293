"""BEATs encoder (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers"),
numerically compatible with the official microsoft/unilm checkpoints.

Architecture, top-down:
    fbank (B, T, 128) -> 16x16 patches (Conv2d, no bias) -> tokens (B, N, E), time-major t*8+f
    -> LayerNorm(E) -> Linear E->D (`post_extract_proj`) -> input dropout
    -> transformer (`encoder`):
         x[padding] = 0; x = x + GELU(weight-normed grouped Conv1d over tokens)  (positions)
         post-LN: x = LayerNorm(x); then L layers, each
           x = LN(alpha * x + SelfAttn(x, gated relative position bias))
           x = LN(alpha * x + FFN(x))                       (DeepNorm: alpha = (2L) ** 0.25)
    -> tokens (B, N, D)
The relative position bias (T5-style log buckets, one embedding table shared by every layer) is
gated per layer, head and query (`grep_linear`, `grep_a`) and enters scaled dot-product attention
as its additive mask, together with key padding.

Differences from the official code, none changing numbers: the shared `relative_attention_bias`
lives once at `encoder.relative_attention_bias` (the official state dict repeats it under every
layer), weight norm uses `torch.nn.utils.parametrizations` (official `weight_g` / `weight_v` are
renamed on conversion, see beats/convert.py), the patch conv is `patch_embedding.proj`.

Optional extra: `cls_token=True` adds a learned CLS token (absent from official weights) that is
prepended after the positional convolution and input LayerNorm and has no relative position bias.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from bioaudio.errors import ConfigError
from bioaudio.models.audio_model import AudioModel
from bioaudio.models.layers import (
    Encoder,
    EncoderOutput,
    ImplSwitch,
    PatchEmbed,
    attention,
    block_layer_id,
    frames_to_token_mask,
    gather_tokens,
    keep_indices,
    key_padding_bias,
    run_layer,
)

Activation = Literal["gelu", "gelu_accurate", "gelu_fast", "relu", "tanh", "linear"]

# Presets. `base` has the dimensions and settings of the released iter3 / iter3+ checkpoints
# except two training-only knobs (see BEATsConfig help): converting an official checkpoint
# always takes every value from the checkpoint's own cfg.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        embed_dim=32,
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
    ),
    # CPU-sized pretraining (hours of audio in minutes on a laptop CPU): a third of the base
    # width, half its depth (~5 M parameters).
    "small": dict(
        embed_dim=256,
        encoder_layers=6,
        encoder_embed_dim=256,
        encoder_ffn_embed_dim=1024,
        encoder_attention_heads=4,
    ),
    "base": dict(),
}


@dataclass
class BEATsConfig:
    """BEATs encoder settings (field names follow the official `BEATsConfig`)."""

    input_patch_size: int = field(default=16, metadata={"help": "patch size (frames and bins)"})
    embed_dim: int = field(default=512, metadata={"help": "patch embedding width E"})
    conv_bias: bool = field(default=False, metadata={"help": "bias in the patch convolution"})
    encoder_layers: int = field(default=12, metadata={"help": "transformer layers L"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer width D"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward width"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    activation_fn: Activation = field(default="gelu", metadata={"help": "feed-forward activation"})
    layer_wise_gradient_decay_ratio: float = field(
        default=1.0,
        metadata={"help": "scale gradients by this at every layer (official iter3 cfg: 0.6)"},
    )
    layer_norm_first: bool = field(default=False, metadata={"help": "pre-LN instead of post-LN"})
    deep_norm: bool = field(default=True, metadata={"help": "DeepNorm residual scaling"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the transformer"})
    attention_dropout: float = field(default=0.0, metadata={"help": "attention weight dropout"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after activation"})
    encoder_layerdrop: float = field(
        default=0.0,
        metadata={"help": "probability of skipping a layer in training (official iter3: 0.05)"},
    )
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the patch tokens"})
    conv_pos: int = field(default=128, metadata={"help": "positional convolution kernel"})
    conv_pos_groups: int = field(default=16, metadata={"help": "positional convolution groups"})
    relative_position_embedding: bool = field(
        default=True, metadata={"help": "relative position bias in attention"}
    )
    num_buckets: int = field(default=320, metadata={"help": "relative position buckets"})
    max_distance: int = field(default=800, metadata={"help": "relative position max distance"})
    gru_rel_pos: bool = field(default=True, metadata={"help": "gate the relative position bias"})
    n_mels: int = field(default=128, metadata={"help": "input feature bins"})
    cls_token: bool = field(
        default=False,
        metadata={"help": "add a learned CLS token (not in official weights; see heads.py)"},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute layer activations in backward (saves memory)"}
    )

    @classmethod
    def preset(cls, name: str) -> BEATsConfig:
        """A named preset: `tiny` (tests), `small` (CPU-sized pretraining) or `base` (official
        iter3 dimensions)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown BEATs preset {name!r} (known: {', '.join(PRESETS)})")
        cfg = cls(**PRESETS[name])
        cfg.validate()
        return cfg

    def validate(self) -> None:
        d, h = self.encoder_embed_dim, self.encoder_attention_heads
        if min(self.input_patch_size, self.embed_dim, d, h, self.encoder_layers) < 1:
            raise ConfigError("BEATs sizes (patch, widths, heads, layers) must be positive")
        if d % h:
            raise ConfigError(f"BEATs encoder_embed_dim {d} is not divisible by {h} heads")
        if d % self.conv_pos_groups:
            raise ConfigError(f"BEATs conv_pos_groups {self.conv_pos_groups} must divide {d}")
        if self.deep_norm and self.layer_norm_first:
            raise ConfigError("BEATs deep_norm requires post-LN (layer_norm_first false)")
        if self.n_mels < self.input_patch_size:
            raise ConfigError(f"BEATs n_mels {self.n_mels} < patch size {self.input_patch_size}")
        if self.activation_fn not in get_args(Activation):
            raise ConfigError(f"BEATs activation_fn {self.activation_fn!r} is not supported")


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` backward (official layer-wise decay)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_accurate", "gelu_fast"):  # fairseq's name and its deprecated alias
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "tanh":
        return torch.tanh(x)
    return x


def relative_position_bucket(
    rel: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional T5 log buckets of relative positions (key - query), as the official code."""
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    # clamp_min(1) only avoids log(0) on entries that take the exact branch anyway.
    large = (
        max_exact
        + (
            torch.log(dist.clamp_min(1).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).long()
    )
    large = large.clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the gated relative position bias, via SDPA."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads, self.head_dim = h, d // h
        self.dropout = cfg.attention_dropout
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, h, 1, 1))

    def forward(
        self,
        x: torch.Tensor,
        pos_bias: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, n, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, n, h, hd).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(x).view(b, n, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, h, hd).transpose(1, 2)
        mask = None
        if pos_bias is not None:
            mask = pos_bias  # (b, H, N, N), b in {1, B}
            if self.gru_rel_pos:
                # Per-query gate from the unscaled query: 8 outputs summed in two groups of 4.
                g = torch.sigmoid(self.grep_linear(q).view(b, h, n, 2, 4).sum(-1))  # (B,H,N,2)
                gate = g[..., :1] * (g[..., 1:] * self.grep_a - 1.0) + 2.0  # (B, H, N, 1)
                mask = gate * pos_bias
        if key_padding_mask is not None:
            mask = key_padding_bias(key_padding_mask, q.dtype, mask)
        drop = self.dropout if self.training else 0.0
        out = attention(q, k, v, mask, drop)  # (B, H, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class BEATsLayer(nn.Module):
    """One transformer layer (post-LN with DeepNorm, or pre-LN)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = cfg.activation_fn
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = (2.0 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout2(_activation(self.activation, self.fc1(x)))
        return self.dropout3(self.fc2(x))

    def forward(
        self,
        x: torch.Tensor,
        pos_bias: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout1(
                self.self_attn(self.self_attn_layer_norm(x), pos_bias, key_padding_mask)
            )
            return x + self._ffn(self.final_layer_norm(x))
        x = x * self.alpha + self.dropout1(self.self_attn(x, pos_bias, key_padding_mask))
        x = self.self_attn_layer_norm(x)
        x = x * self.alpha + self._ffn(x)
        return self.final_layer_norm(x)


class BEATsTransformer(nn.Module):
    """Positional convolution, relative position bias and the layers (official `encoder.*`)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        d, k = cfg.encoder_embed_dim, cfg.conv_pos
        self.cfg = cfg
        conv = nn.Conv1d(d, d, kernel_size=k, padding=k // 2, groups=cfg.conv_pos_groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (k * d)))
        nn.init.zeros_(conv.bias)
        # A one-element list keeps the official key prefix `encoder.pos_conv.0.`.
        self.pos_conv = nn.ModuleList([weight_norm(conv, name="weight", dim=2)])
        self.relative_attention_bias = (
            nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads)
            if cfg.relative_position_embedding
            else None
        )
        self.layers = nn.ModuleList(BEATsLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # Official init: BERT-style N(0, 0.02) for linears and the bias table, then DeepNorm's
        # xavier-normal with gain beta on the value / output / feed-forward projections.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        if self.cfg.deep_norm:
            beta = (8.0 * self.cfg.encoder_layers) ** -0.25
            for layer in self.layers:
                att = layer.self_attn
                nn.init.xavier_normal_(att.k_proj.weight, gain=1.0)
                nn.init.xavier_normal_(att.q_proj.weight, gain=1.0)
                for lin in (att.v_proj, att.out_proj, layer.fc1, layer.fc2):
                    nn.init.xavier_normal_(lin.weight, gain=beta)

    def position_bias(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Relative position bias (b, H, n, n) for token positions (b, n)."""
        if self.relative_attention_bias is None:
            return None
        rel = positions[:, None, :] - positions[:, :, None]  # (b, n_query, n_key): key - query
        bucket = relative_position_bucket(rel, self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # (b, H, n, n)

    def pos_conv_embed(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(conv(x)) over the token sequence (B, N, D) -> (B, N, D).

        The weight-normed grouped conv (kernel 128 in every release) runs through the FFT
        (`grouped_conv1d_fft`, the same numbers to fp32 rounding): direct grouped convolution
        with a long kernel runs far below the matmul peak on CPU and took a third of a small
        model's masked pretraining step. It runs in fp32 under autocast (torch.fft has no bf16
        for most lengths, and oneDNN's AMX bf16 grouped conv1d is wrong for narrow groups).
        """
        conv = self.pos_conv[0]
        with torch.autocast(x.device.type, enabled=False):
            x32, w32, b32 = x.float().transpose(1, 2), conv.weight.float(), conv.bias.float()
            if POS_CONV.current == "fft":
                y = grouped_conv1d_fft(x32, w32, b32, conv.groups, conv.padding[0])
            else:
                y = F.conv1d(x32, w32, b32, padding=conv.padding[0], groups=conv.groups)
        if self.cfg.conv_pos % 2 == 0:
            y = y[:, :, :-1]  # (B, D, N + 1) for an even kernel
        return F.gelu(y).transpose(1, 2).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        cls_token: torch.Tensor | None = None,
        layers: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x (B, N, D) -> (tokens (B, N', D), cls (B, D) | None, padding mask (B, N') | None).

        When `layers` is a list, every layer's output (B, [1 +] N', D) is appended to it.
        """
        hidden = padding_mask if keep is None else _or(padding_mask, ~keep)
        if hidden is not None:
            # Padding (and dropped tokens) must not leak into neighbours through the conv.
            x = x.masked_fill(hidden[..., None], 0.0)
        x = x + self.pos_conv_embed(x)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)

        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device)[None]  # (1, N)
        if keep is not None:
            positions = keep_indices(keep)  # (B, n_keep)
            x = gather_tokens(x, positions)
            if padding_mask is not None:
                padding_mask = gather_tokens(padding_mask, positions)
                padding_mask = padding_mask if bool(padding_mask.any()) else None
        pos_bias = self.position_bias(positions)
        key_mask = padding_mask
        if cls_token is not None:
            x = torch.cat([cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
            if pos_bias is not None:
                pos_bias = F.pad(pos_bias, (1, 0, 1, 0))  # no position to or from the CLS token
            if key_mask is not None:
                key_mask = F.pad(key_mask, (1, 0), value=False)

        ckpt = self.gradient_checkpointing and self.training
        for layer in self.layers:
            if self.cfg.layer_wise_gradient_decay_ratio != 1.0:
                x = _GradMultiply.apply(x, self.cfg.layer_wise_gradient_decay_ratio)
            if self.training and self.cfg.encoder_layerdrop > 0:
                if float(torch.rand(())) < self.cfg.encoder_layerdrop:
                    continue
            x = run_layer(layer, ckpt, x, pos_bias, key_mask)
            if layers is not None:
                layers.append(x)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        if cls_token is not None:
            return x[:, 1:], x[:, 0], padding_mask
        return x, None, padding_mask


POS_CONV = ImplSwitch("positional convolution", ("fft", "direct"))


def pos_conv_impl(impl: Literal["fft", "direct"]) -> contextlib.AbstractContextManager[None]:
    """Temporarily compute the positional convolution through the FFT (the default) or as the
    direct grouped convolution (the same numbers; benchmarks count model FLOPs with it)."""
    return POS_CONV.use(impl)


def fft_size(n: int) -> int:
    """The smallest 5-smooth integer >= n (a length FFTs handle fast)."""
    m = max(1, n)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _PaddedRFFT(torch.autograd.Function):
    """`torch.fft.rfft(w, n)` of a real `w` (..., K), K <= n, n even, with a cheap backward.

    The adjoint of the zero-padded real FFT is one inverse real FFT: grad_w = n *
    irfft(g with the bins strictly between 0 and n / 2 halved)[..., :K]. Autograd's generic
    backward instead pads to a full complex signal and runs a complex FFT, which cost more than
    the whole forward for the positional convolution's kernel (C x C / groups signals).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, n: int) -> torch.Tensor:
        ctx.k, ctx.n = w.shape[-1], n
        return torch.fft.rfft(w, n=n)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h = g.clone()
        h[..., 1:-1] *= 0.5
        return torch.fft.irfft(h, n=ctx.n)[..., : ctx.k] * ctx.n, None


@functools.lru_cache(maxsize=256)  # every forward asks again for the same few shapes
def _block_fft_size(n_out: int, k: int, batch: int, c_group: int) -> int:
    """Overlap-save block length L (even, 5-smooth) for outputs n_out, kernel k.

    Each block of L inputs gives L - k + 1 outputs. Per channel the work is about
    batch * blocks * (2 L log L + 4 F c_group) for the signal FFTs and the per-bin products, plus
    c_group * L log L for the kernel's spectrum (F = L / 2 + 1): short blocks waste work on the
    overlap, long ones inflate the kernel's spectrum; take the cheapest candidate.
    """

    def even_fft_size(m: int) -> int:  # even, so the last bin is the Nyquist bin (_PaddedRFFT)
        return 2 * fft_size(-(-m // 2))

    longest = even_fft_size(n_out + k - 1)  # one block holds the whole sequence
    candidates = {even_fft_size(m) for m in (2 * k, 3 * k, 4 * k, 6 * k, 8 * k)}
    best, best_cost = 0, float("inf")
    for size in sorted(c for c in candidates | {longest} if c <= longest):
        step = size - k + 1
        blocks = -(-n_out // step)
        log = math.log2(size)
        cost = batch * blocks * (2 * size * log + 4 * (size // 2 + 1) * c_group)
        cost += c_group * size * log
        if cost < best_cost:
            best, best_cost = size, cost
    return best


def grouped_conv1d_fft(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, padding: int
) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, padding=padding, groups=groups)` through the FFT.

    x (B, C, N), weight (C_out, C / groups, K), 0 <= padding <= K - 1 -> (B, C_out,
    N + 2 * padding - K + 1). Overlap-save: the padded input is cut into blocks of L samples
    that overlap by K - 1; in each block the cross-correlation is the circular convolution
    with the flipped kernel, valid (nothing wrapped) at its last L - K + 1 samples. Each
    frequency bin mixes the channels of a group with one small complex matmul.
    """
    b, c, n = x.shape
    c_out, c_group, k = weight.shape
    if c != c_group * groups or c_out % groups or not 0 <= padding <= k - 1:
        raise ValueError(
            f"grouped_conv1d_fft: input channels {c}, weight {tuple(weight.shape)}, "
            f"groups {groups}, padding {padding} do not fit"
        )
    o_group = c_out // groups
    n_out = n + 2 * padding - k + 1
    size = _block_fft_size(n_out, k, b, c_group)
    step = size - k + 1
    blocks = -(-n_out // step)
    x = F.pad(x, (padding, padding + blocks * step - n_out))  # length blocks * step + K - 1
    segments = x.unfold(-1, size, step)  # (B, C, blocks, L)
    xf = torch.fft.rfft(segments, n=size)  # (B, C, blocks, F)
    wf = _PaddedRFFT.apply(weight.flip(-1), size)  # (C_out, C / g, F)
    n_freq = xf.shape[-1]
    xf = xf.view(b, groups, c_group, blocks, n_freq).permute(4, 1, 0, 3, 2)
    xf = xf.reshape(n_freq, groups, b * blocks, c_group)
    wf = wf.view(groups, o_group, c_group, n_freq).permute(3, 0, 2, 1)  # (F, g, C / g, O / g)
    yf = torch.matmul(xf, wf).view(n_freq, groups, b, blocks, o_group)
    yf = yf.permute(2, 1, 4, 3, 0).reshape(b, c_out, blocks, n_freq)
    y = torch.fft.irfft(yf, n=size)[..., k - 1 :]  # (B, C_out, blocks, step)
    y = y.reshape(b, c_out, blocks * step)[..., :n_out]
    return y if bias is None else y + bias[:, None]


def _or(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a | b


class BEATsEncoder(Encoder):
    """BEATs: fbank (B, T, F) [+ frame padding mask, + keep mask] -> EncoderOutput."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = cfg.encoder_embed_dim
        self.patch_embedding = PatchEmbed(cfg.input_patch_size, cfg.embed_dim, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
            if cfg.embed_dim != cfg.encoder_embed_dim
            else None
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BEATsTransformer(cfg)
        self.cls_token = None
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.encoder_embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def has_cls(self) -> bool:
        return self.cls_token is not None

    @property
    def num_layers(self) -> int:
        return self.cfg.encoder_layers

    def no_weight_decay(self) -> set[str]:
        """The CLS token, the relative-position bias table and its gates, and the weight-norm
        scale of the positional convolution."""
        return self.parameter_names(
            "cls_token",
            "encoder.relative_attention_bias.weight",
            "encoder.layers.*.self_attn.grep_a",
            "encoder.pos_conv.0.parametrizations.weight.original0",
        )

    def layer_id(self, name: str) -> int:
        before = ["patch_embedding", "layer_norm", "post_extract_proj", "cls_token"]
        before += ["encoder.pos_conv", "encoder.relative_attention_bias"]
        if not self.cfg.layer_norm_first:  # post-LN: the encoder's norm runs before the blocks
            before.append("encoder.layer_norm")
        return block_layer_id(name, "encoder.layers", self.num_layers, tuple(before))

    def set_drop_path(self, rate: float) -> None:
        """Regularisation for finetuning: BEATs has no per-block stochastic depth, so this is
        its layer drop (each layer skipped with probability `rate` in training)."""
        self.cfg.encoder_layerdrop = float(rate)

    def add_cls_token(self) -> None:
        """Add a learned CLS token (absent from official weights; trained by finetuning),
        prepended after the positional convolution, with no relative position bias."""
        if self.cls_token is None:
            p = next(self.parameters())
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=p.device))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.cfg.cls_token = True

    def describe(self) -> str:
        c = self.cfg
        return (
            f"{c.encoder_layers} layers x {c.encoder_embed_dim}, {c.encoder_attention_heads} heads"
        )

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    @property
    def n_freq(self) -> int:
        """Frequency patches per time step (8 for 128 bins)."""
        return self.cfg.n_mels // self.cfg.input_patch_size

    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank (B, T, F) -> projected patch tokens (B, N, D), before positions."""
        if fbank.dim() != 3 or fbank.shape[-1] != self.cfg.n_mels:
            raise ValueError(
                f"BEATs expects features (B, T, {self.cfg.n_mels}), got {tuple(fbank.shape)}"
            )
        x = self.layer_norm(self.patch_embedding(fbank))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.dropout_input(x)

    def encode(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Transformer on embedded tokens (B, N, D) with a token padding mask (B, N)."""
        return EncoderOutput(*self.encoder(x, token_mask, keep, self.cls_token))

    def _run(
        self,
        fbank: torch.Tensor,
        padding_mask: torch.Tensor | None,
        keep: torch.Tensor | None,
        layers: list[torch.Tensor] | None,
    ) -> EncoderOutput:
        x = self.embed(fbank)
        n_time = fbank.shape[1] // self.cfg.input_patch_size
        token_mask = frames_to_token_mask(
            padding_mask, self.cfg.input_patch_size, self.n_freq, n_time
        )
        return EncoderOutput(*self.encoder(x, token_mask, keep, self.cls_token, layers))


def official_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The official reduction of a padding mask to `length` steps: drop the remainder, reshape
    to (B, length, -1), a step is padding when ALL its elements are (BEATs.forward_padding_mask).
    """
    extra = padding_mask.shape[1] % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.reshape(padding_mask.shape[0], length, -1).all(-1)


class BEATsModel(AudioModel):
    """AudioModel with a BEATs encoder, plus the official `extract_features` entry point."""

    model_type = "beats"

    def preprocess(
        self,
        source: torch.Tensor,
        fbank_mean: float | None = None,
        fbank_std: float | None = None,
    ) -> torch.Tensor:
        """Official preprocessing: Kaldi fbank of each whole (padded) waveform, normalised."""
        fbank, _ = self.frontend.raw(source)
        stats = self.frontend_cfg.normalisation()
        mean = fbank_mean if fbank_mean is not None else stats[0] if stats else 0.0
        std = fbank_std if fbank_std is not None else stats[1] if stats else 0.5
        return (fbank - mean) / (2.0 * std)

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        fbank_mean: float | None = None,
        fbank_std: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop-in for the official `BEATs.extract_features(source, padding_mask)`.

        Returns (features (B, N, D), token padding mask | None), or for a model with a head
        (official finetuned checkpoints) (sigmoid class scores (B, C), token padding mask).
        The padding rule is the official one (fbank of the padded waveform, masks reduced by
        trimming and `all`); `features()` / `embed()` use the batch-independent rule instead.
        """
        fbank = self.preprocess(source, fbank_mean, fbank_std)
        frame_mask = None
        if padding_mask is not None:
            frame_mask = official_padding_mask(padding_mask, fbank.shape[1])
        x = self.encoder.embed(fbank)
        token_mask = None
        if frame_mask is not None:
            token_mask = official_padding_mask(frame_mask, x.shape[1])
        out = self.encoder.encode(x, token_mask)
        if self.head is not None:
            return torch.sigmoid(self.head(out)), token_mask
        return out.tokens, token_mask
