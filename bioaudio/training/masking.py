"""Token masks for masked pretraining: which patches the student sees (`keep`, True = visible).

Both functions return a (B, N) bool `keep` mask over the time-major patch grid (token index
t * n_freq + f, as `bioaudio.models.layers.PatchEmbed` orders them) with the SAME number of kept
tokens in every row, because the encoders remove the dropped tokens and stack the rows
(`bioaudio.models.layers.keep_indices`).

- `inverse_block_mask`: data2vec 2.0 / EAT inverse block masking (EAT, BEATs-style runs may use it
  too): square blocks of patches are chosen to be KEPT and everything else is masked.
- `random_mask`: uniform masking (BEATs, MAE).

Every random number is drawn on the CPU from the `torch.Generator` passed in (the pretraining task
seeds it from seed, step, process and micro-batch), so a mask is a pure function of that
generator's state; masks are built on the CPU (they are small) and returned on `device`.

Keep count. Without padding every row keeps k = round(N * (1 - mask_ratio)) tokens (Python
`round`, at least 1). The official `compute_block_mask_2d` uses int() (floor) instead; the two
differ only when N * (1 - mask_ratio) has a fractional part >= 0.5.

Padding (optional `padding` (B, N), True = padding token): each row keeps
k_i = max(1, round(n_valid_i * (1 - mask_ratio))) of its own valid tokens, so every clip is masked
at `mask_ratio` whatever it is batched with, and then as many of its padding tokens as it takes
to reach the batch's largest count (a shorter clip has that much padding). The encoders hide
padding tokens from attention and no loss is computed on them, so these fillers only make the
rows stackable. Rows without any valid token (empty clips) keep padding tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bioaudio.errors import ConfigError

__all__ = [
    "inverse_block_mask",
    "keep_count",
    "keep_counts",
    "per_clip_masks",
    "random_mask",
    "stack_keeps",
]


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ConfigError(f"mask ratio must be strictly between 0 and 1, got {mask_ratio}")


def _valid_tokens(padding: Tensor | None, batch: int, n_tokens: int) -> Tensor:
    """(B, N) bool on the CPU, True on tokens that may be kept."""
    if padding is None:
        return torch.ones(batch, n_tokens, dtype=torch.bool)
    if tuple(padding.shape) != (batch, n_tokens):
        raise ValueError(
            f"padding must have shape ({batch}, {n_tokens}), got {tuple(padding.shape)}"
        )
    return ~padding.detach().to("cpu", torch.bool)


def keep_counts(n_valid: Tensor, mask_ratio: float) -> Tensor:
    """(B,) valid tokens each row keeps: max(1, round(n_valid * (1 - mask_ratio))), 0 for rows
    without valid tokens (see the module docstring)."""
    _check_ratio(mask_ratio)
    keep_frac = 1.0 - float(mask_ratio)
    k = torch.tensor([max(1, round(int(v) * keep_frac)) for v in n_valid.tolist()])
    return k * (n_valid > 0)


def keep_count(n_valid: Tensor, n_tokens: int, mask_ratio: float) -> int:
    """Tokens every row keeps (valid ones plus padding fillers): the largest per-row count."""
    k = keep_counts(n_valid, mask_ratio)
    return int(k.max()) if bool((k > 0).any()) else max(1, round(n_tokens * (1 - mask_ratio)))


def _select(
    score: Tensor, valid: Tensor, k_rows: Tensor, device: torch.device | str | None
) -> Tensor:
    """keep (B, N): per row the k_i valid tokens of highest score, then padding tokens (first
    ones) up to the batch count K = max k_i; a row with too little padding keeps more valid
    tokens instead (a rounding corner case)."""
    b, n = score.shape
    k_total = (
        int(k_rows.max()) if bool((k_rows > 0).any()) else int(keep_count(valid.sum(1), n, 0.5))
    )
    k_total = max(1, min(k_total, n))
    order = score.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(b, n))
    keep = valid & (rank < k_rows[:, None])
    pad = ~valid
    need = k_total - keep.sum(1)
    keep |= pad & (pad.long().cumsum(1) <= need[:, None])
    short = k_total - keep.sum(1)  # rows that ran out of padding take more valid tokens
    if bool((short > 0).any()):
        keep |= valid & (rank < (k_rows + short)[:, None])
    return keep.to(device) if device is not None else keep


def random_mask(
    batch: int,
    n_tokens: int,
    mask_ratio: float,
    generator: torch.Generator,
    padding: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform random keep mask (B, N): each row keeps `keep_count` tokens chosen uniformly
    among its valid ones (MAE / BEATs `random_masking`: a random permutation per row).

    `device` defaults to `padding`'s device (CPU without padding)."""
    _check_ratio(mask_ratio)
    if batch < 1 or n_tokens < 1:
        raise ValueError(f"mask shape must be positive, got ({batch}, {n_tokens})")
    if device is None and padding is not None:
        device = padding.device
    valid = _valid_tokens(padding, batch, n_tokens)
    k_rows = keep_counts(valid.sum(1), mask_ratio)
    score = torch.rand(batch, n_tokens, generator=generator)  # uniform among valid tokens
    return _select(score, valid, k_rows, device)


def inverse_block_mask(
    batch: int,
    n_time: int,
    n_freq: int,
    mask_ratio: float,
    block_size: int,
    generator: torch.Generator,
    padding: Tensor | None = None,
    mask_prob_adjust: float = 0.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0 inverse block mask (B, N = n_time * n_freq), True = kept (visible).

    Reproduces `compute_block_mask_2d(..., inverse_mask=True, require_same_masks=True)`
    (cwx-worst-one/EAT `utils/data_utils.py`, the same function as fairseq
    `fairseq/data/data_utils.py` that data2vec 2.0's `modalities/images.py` calls):
    1. with p = 1 - mask_ratio the fraction to keep, int(N * (p + mask_prob_adjust) /
       block_size**2) block centres are drawn uniformly with replacement (EAT uses
       mask_prob_adjust 0.07: more blocks than needed, because blocks overlap);
    2. each centre marks a block_size x block_size square around it (offset block_size // 2),
       its coordinates clamped to the grid (a block at an edge is squashed against it);
    3. the exact count is enforced: surplus marked tokens are unmarked uniformly at random,
       missing ones are added uniformly among the unmarked valid tokens.
    The marked tokens are the kept ones (the official code builds the complement and inverts it).

    Differences from the official code: centres are drawn among each row's valid tokens and the
    number of centres comes from that row's valid count (at least one centre); the count is
    `keep_count` (round instead of floor, padding-aware, see the module docstring).
    `device` defaults to `padding`'s device (CPU without padding).
    """
    _check_ratio(mask_ratio)
    if int(block_size) != block_size or block_size < 1:
        raise ConfigError(f"mask block size must be an integer >= 1, got {block_size}")
    if 1.0 - float(mask_ratio) + float(mask_prob_adjust) <= 0.0:
        raise ConfigError(
            f"mask_prob_adjust {mask_prob_adjust} leaves no block to keep at ratio {mask_ratio}"
        )
    if batch < 1 or n_time < 1 or n_freq < 1:
        raise ValueError(f"mask shape must be positive, got ({batch}, {n_time}, {n_freq})")
    block_size = int(block_size)
    n = n_time * n_freq
    if device is None and padding is not None:
        device = padding.device
    valid = _valid_tokens(padding, batch, n)
    n_valid = valid.sum(1)  # (B,)
    k_rows = keep_counts(n_valid, mask_ratio)

    # 1. Block centres: per row, floor(n_valid * (p + adjust) / bs^2) of them (at least one).
    density = (1.0 - float(mask_ratio) + float(mask_prob_adjust)) / block_size**2
    n_centres = (n_valid.double() * density).floor().long().clamp(min=1) * (n_valid > 0)
    max_centres = max(int(n_centres.max()), 1)
    u = torch.rand(batch, max_centres, generator=generator)
    # Valid positions first (a stable sort keeps their order), then the u-quantile among them.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, N)
    pick = (u * n_valid[:, None]).long().clamp(max=n - 1)
    pick = torch.minimum(pick, (n_valid[:, None] - 1).clamp(min=0))
    centre = torch.gather(order, 1, pick)  # (B, max_centres) flat token index
    active = torch.arange(max_centres)[None, :] < n_centres[:, None]  # (B, max_centres)

    # 2. Squares around the centres, clamped to the grid.
    offsets = torch.arange(block_size) - block_size // 2
    t = (centre // n_freq)[:, :, None, None] + offsets[None, None, :, None]
    f = (centre % n_freq)[:, :, None, None] + offsets[None, None, None, :]
    t = t.clamp(0, n_time - 1)
    f = f.clamp(0, n_freq - 1)
    idx = (t * n_freq + f).reshape(batch, -1)  # (B, max_centres * bs * bs)
    hits = active[:, :, None, None].expand(-1, -1, block_size, block_size).reshape(batch, -1)
    marked = torch.zeros(batch, n).scatter_add_(1, idx, hits.float()) > 0
    marked &= valid

    # 3. Exact count k_i: marked tokens first (a random subset when there are too many), then
    # random valid unmarked ones; padding fillers up to the batch count (module docstring).
    score = torch.rand(batch, n, generator=generator) + 2.0 * marked
    return _select(score, valid, k_rows, device)


def per_clip_masks(
    make: Any,
    generators: list[torch.Generator],
    views: int,
    padding: Tensor | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Masks drawn clip by clip: `make(views, generator, padding_rows)` gives the (views, N) keep
    mask of one clip from that clip's own generator, so a clip's masks do not depend on the
    clips it is batched with (a 2-process run draws what a 1-process run draws). The rows are
    then stacked, shorter ones filled up with hidden padding tokens (module docstring). Returns
    (B * views, N), view j of clip i at row i * views + j."""
    keeps = []
    for i, gen in enumerate(generators):
        rows = None if padding is None else padding[i : i + 1].expand(views, -1)
        keeps.append(make(views, gen, rows).cpu())
    keep = torch.cat(keeps)
    pad = None if padding is None else padding.detach().cpu().repeat_interleave(views, 0)
    return stack_keeps(keep, pad).to(device if device is not None else keep.device)


def stack_keeps(keep: Tensor, padding: Tensor | None) -> Tensor:
    """Give every row of `keep` (B, N) the same count: rows with fewer kept tokens keep extra
    padding tokens (hidden by the encoders, no loss on them), or extra valid ones when a row has
    no padding left (a rounding corner case)."""
    counts = keep.sum(1)
    k = int(counts.max())
    need = k - counts
    if not bool((need > 0).any()):
        return keep
    pad = torch.zeros_like(keep) if padding is None else padding.to(keep.device, torch.bool)
    free_pad = pad & ~keep
    keep = keep | (free_pad & (free_pad.long().cumsum(1) <= need[:, None]))
    need = k - keep.sum(1)
    free = ~keep
    return keep | (free & (free.long().cumsum(1) <= need[:, None]))
