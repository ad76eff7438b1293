"""Building blocks shared by the BEATs and EAT encoders.

- `EncoderOutput`: what every encoder returns (tokens, optional CLS vector, token padding mask).
- `PatchEmbed`: 16 x 16 patches of a (B, T, F) spectrogram as time-major tokens (index t * F' + f).
- `attention`: multi-head attention core through `F.scaled_dot_product_attention`; a plain
  "math" implementation (explicit softmax, as the official code computes it) can be switched in
  with `attention_impl("math")` for debugging and benchmarking (an `ImplSwitch`, which BEATs'
  positional convolution uses too).
- token-mask helpers: frame -> token padding, `keep` masks -> gather indices.

Masks are boolean with True on padding (`padding_mask`) or True on visible tokens (`keep`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bioaudio.errors import DataError

AttentionImpl = Literal["sdpa", "math"]


class ImplSwitch:
    """A process-wide choice between implementations of one computation that give the same
    numbers (the first name is the default); `use(name)` switches it temporarily."""

    def __init__(self, what: str, names: tuple[str, ...]):
        self.what, self.names, self.current = what, names, names[0]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        if name not in self.names:
            raise ValueError(f"unknown {self.what} implementation {name!r}")
        old, self.current = self.current, name
        try:
            yield
        finally:
            self.current = old


ATTENTION = ImplSwitch("attention", ("sdpa", "math"))


class EncoderOutput(NamedTuple):
    """Encoder result. `tokens` (B, N, D) are patch tokens only (no CLS), in time-major order;
    `cls` (B, D) is the CLS vector when the encoder has one; `padding_mask` (B, N) is True on
    padding tokens (None when no token is padding)."""

    tokens: torch.Tensor
    cls: torch.Tensor | None
    padding_mask: torch.Tensor | None


class PatchEmbed(nn.Module):
    """Non-overlapping square patches of a spectrogram -> tokens, time-major (t * F' + f).

    The conv drops the frames (and bins) beyond the last whole patch, as the official models do.
    """

    def __init__(self, patch_size: int, embed_dim: int, bias: bool = True, in_chans: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias
        )

    def grid(self, frames: int, bins: int) -> tuple[int, int]:
        """(time patches, frequency patches) for a (frames, bins) input."""
        return frames // self.patch_size, bins // self.patch_size

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T' * F', D)."""
        if fbank.shape[1] < self.patch_size:
            raise DataError(
                f"input of {fbank.shape[1]} frames is shorter than one {self.patch_size}-frame "
                f"patch (about {(self.patch_size + 1.5) / 100:.3f} s of audio at 100 frames/s)"
            )
        x = self.proj(fbank.unsqueeze(1))  # (B, D, T', F')
        return x.flatten(2).transpose(1, 2)  # (B, T'F', D), row-major over (t, f): time-major


def frames_to_token_mask(
    frame_mask: torch.Tensor | None, patch_size: int, n_freq: int, n_time: int
) -> torch.Tensor | None:
    """Frame padding (B, T) -> token padding (B, n_time * n_freq).

    A token is padding when ANY of its frames is padding, so a clip's valid tokens are exactly
    the tokens it has when run alone. Frames beyond the last whole patch are ignored.
    """
    if frame_mask is None:
        return None
    b = frame_mask.shape[0]
    m = frame_mask[:, : n_time * patch_size].reshape(b, n_time, patch_size).any(-1)  # (B, T')
    m = m[:, :, None].expand(b, n_time, n_freq).reshape(b, n_time * n_freq)  # time-major
    return m if bool(m.any()) else None


def keep_indices(keep: torch.Tensor) -> torch.Tensor:
    """(B, N) bool visible-token mask -> (B, n) indices of the kept tokens, in order.

    Every row must keep the same number of tokens (batched masks are built that way).
    """
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"keep must select the same number of tokens per row, got {counts.tolist()}"
        )
    n = int(counts[0])
    # A stable sort puts the kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    return order[:, :n]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) gathered at idx (B, n) along dim 1 -> (B, n, ...)."""
    shape = idx.shape + x.shape[2:]
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def key_padding_bias(
    padding_mask: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive attention mask that hides padded keys: (B, N) -> (B, 1, 1, N) or bias + that.

    We use the dtype's most negative finite value rather than -inf so a row whose keys are all
    padding (an empty clip) gives a finite uniform average instead of NaN; every other row is
    exactly what -inf gives.
    """
    hide = padding_mask[:, None, None, :]
    neg = torch.finfo(dtype).min
    if bias is None:
        return torch.zeros(hide.shape, dtype=dtype, device=padding_mask.device).masked_fill(
            hide, neg
        )
    return bias.to(dtype).masked_fill(hide, neg)


def attention_impl(impl: AttentionImpl) -> contextlib.AbstractContextManager[None]:
    """Temporarily switch every encoder's attention core ("sdpa" or the plain "math" reference)."""
    return ATTENTION.use(impl)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention, (B, H, N, hd) -> (B, H, N, hd), scale hd ** -0.5.

    `attn_mask` is additive (float, broadcastable to (B, H, N, N)) and is cast to q's dtype, so
    the same call works in fp32 and under bf16 autocast.
    """
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    # On CPU a mask that needs a gradient (BEATs' gated position bias) sends SDPA to its generic
    # fallback, which is slower than the explicit computation below (10 % of a BEATs base step).
    slow_sdpa = attn_mask is not None and attn_mask.requires_grad and q.device.type == "cpu"
    if ATTENTION.current == "sdpa" and not slow_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    # Plain reference: the official models' explicit computation (softmax in fp32).
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def run_layer(layer: Callable[..., torch.Tensor], use_checkpoint: bool, *args: Any) -> torch.Tensor:
    """Run one transformer layer, through activation checkpointing when asked (training only).

    Non-reentrant checkpointing with the RNG state preserved: the recomputed forward draws the
    same dropout / drop-path masks, so results equal the plain call."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class Encoder(nn.Module):
    """The skeleton both transformer encoders share (the uniform encoder API).

    Subclasses set `cfg` and `embed_dim`, implement `_run(fbank, padding_mask, keep, layers)`
    (appending every block's output to `layers` when it is a list), `num_layers`, `layer_id`,
    `describe` and `no_weight_decay` (their token / position parameters).
    """

    embed_dim: int
    gradient_checkpointing: bool  # read by the block loop: `run_layer(block, on and training)`

    def set_activation_checkpointing(self, on: bool = True) -> None:
        """Recompute each block's activations during backward instead of keeping them.

        Peak training memory drops to about one block's activations plus the block inputs, for
        roughly one more forward pass of time (benchmarks/bench_memory.py). Losses and gradients
        are unchanged: the recomputation replays the same RNG state, so dropout and drop path
        draw the same masks. A run-time switch (not saved in exports); no effect without
        gradients (inference, EMA teachers) or in eval mode.
        """
        self.gradient_checkpointing = bool(on)

    def forward(
        self,
        fbank: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """fbank (B, T, F), frame padding (B, T) True=pad, keep (B, N) True=visible token."""
        return self._run(fbank, padding_mask, keep, None)

    def forward_layers(
        self,
        fbank: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[EncoderOutput, list[torch.Tensor]]:
        """Like forward, plus every block's output (B, [1 +] N', D), the CLS token first when
        the encoder has one (distillation targets, layer-wise probing and embeddings)."""
        layers: list[torch.Tensor] = []
        return self._run(fbank, padding_mask, keep, layers), layers

    def _run(
        self,
        fbank: torch.Tensor,
        padding_mask: torch.Tensor | None,
        keep: torch.Tensor | None,
        layers: list[torch.Tensor] | None,
    ) -> EncoderOutput:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def layer_id(self, name: str) -> int:
        """0 for embeddings (patches, positions, tokens, input norms), i + 1 for a parameter
        of block i (`<blocks>.<i>.` in its name), num_layers + 1 for anything after them."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Tokens, position tables and gates: exempt from weight decay (timm convention)."""
        raise NotImplementedError

    def parameter_names(self, *patterns: str) -> set[str]:
        """Names of own parameters matching any pattern, `*` standing for one dotted component
        (e.g. `encoder.layers.*.self_attn.grep_a`)."""

        def match(name: str, pattern: str) -> bool:
            parts, pats = name.split("."), pattern.split(".")
            return len(parts) == len(pats) and all(q in ("*", p) for p, q in zip(parts, pats))

        return {n for n, _ in self.named_parameters() if any(match(n, q) for q in patterns)}


def block_layer_id(name: str, blocks: str, num_layers: int, before: tuple[str, ...]) -> int:
    """Shared `layer_id` rule: `<blocks>.<i>.*` -> i + 1; names starting with one of `before`
    -> 0; anything else -> num_layers + 1."""
    prefix = blocks + "."
    if name.startswith(prefix):
        return int(name[len(prefix) :].split(".", 1)[0]) + 1
    if name.startswith(before):
        return 0
    return num_layers + 1
