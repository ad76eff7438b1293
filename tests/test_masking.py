"""Token masks: exact keep counts, block shape, padding, reproducibility, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bioaudio.errors import ConfigError
from bioaudio.training.masking import inverse_block_mask, keep_count, random_mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def components(keep: torch.Tensor, n_time: int, n_freq: int) -> float:
    """Mean number of 4-connected groups of kept tokens per row."""
    return float(np.mean([ndimage.label(r.view(n_time, n_freq).numpy())[1] for r in keep]))


@pytest.mark.parametrize(
    "n_time,n_freq,ratio,block",
    [(64, 8, 0.8, 5), (16, 8, 0.8, 5), (10, 8, 0.6, 3), (7, 8, 0.75, 1), (64, 8, 0.5, 2)],
)
def test_inverse_block_mask_exact_count(n_time, n_freq, ratio, block):
    n = n_time * n_freq
    keep = inverse_block_mask(12, n_time, n_freq, ratio, block, gen(), mask_prob_adjust=0.07)
    assert keep.dtype == torch.bool and keep.shape == (12, n)
    assert keep.sum(1).tolist() == [round(n * (1 - ratio))] * 12


def test_random_mask_exact_count_and_uniform():
    keep = random_mask(4000, 40, 0.75, gen(1))
    assert keep.sum(1).eq(10).all()
    freq = keep.float().mean(0)  # every position kept ~25 % of the time
    assert float(freq.min()) > 0.2 and float(freq.max()) < 0.3


def test_keep_count_at_least_one():
    assert keep_count(torch.tensor([3, 3]), 3, 0.9) == 1
    assert keep_count(torch.tensor([512]), 512, 0.8) == 102


def test_blocks_are_contiguous():
    # Official EAT grid: 64 x 8 patches, 80 % masked, 5 x 5 blocks.
    blocks = inverse_block_mask(64, 64, 8, 0.8, 5, gen(2), mask_prob_adjust=0.07)
    uniform = random_mask(64, 512, 0.8, gen(2))
    n_blocks, n_uniform = components(blocks, 64, 8), components(uniform, 64, 8)
    assert n_uniform > 40  # a uniform mask scatters the 102 kept tokens
    assert n_blocks < 0.3 * n_uniform


def test_single_block_is_a_square():
    # 25 of 160 tokens kept with 5 x 5 blocks and no adjustment: exactly one centre per row;
    # when it is away from the edges the kept set is exactly a 5 x 5 square (40 % of rows).
    keep = inverse_block_mask(200, 20, 8, 1 - 25 / 160, 5, gen(3))
    squares = 0
    for row in keep:
        grid = row.view(20, 8)
        t, f = grid.nonzero().unbind(1)
        if int(t.max() - t.min()) == 4 and int(f.max() - f.min()) == 4:
            assert int(grid[t.min() : t.max() + 1, f.min() : f.max() + 1].sum()) == 25
            squares += 1
    assert squares > 0.25 * len(keep)


def test_each_clip_is_masked_at_the_ratio_whatever_it_is_batched_with():
    """Every clip keeps round(valid * 0.2) of its own valid tokens; shorter clips fill up to the
    batch count with padding tokens (hidden by the encoders, no loss on them)."""
    n_time, n_freq = 32, 8
    n = n_time * n_freq
    pad = torch.zeros(6, n, dtype=torch.bool)
    valid_t = [32, 20, 12, 32, 25, 16]  # padding at the end of time, as clips are padded
    for i, t in enumerate(valid_t):
        pad[i, t * n_freq :] = True
    for keep in (
        inverse_block_mask(6, n_time, n_freq, 0.8, 5, gen(4), padding=pad, mask_prob_adjust=0.07),
        random_mask(6, n, 0.8, gen(4), padding=pad),
    ):
        assert keep.sum(1).tolist() == [round(256 * 0.2)] * 6  # stackable rows
        kept_valid = (keep & ~pad).sum(1).tolist()
        assert kept_valid == [round(t * n_freq * 0.2) for t in valid_t]


def test_empty_row_keeps_padding_without_lowering_the_count():
    pad = torch.zeros(3, 80, dtype=torch.bool)
    pad[1] = True  # an empty clip
    keep = inverse_block_mask(3, 10, 8, 0.8, 3, gen(5), padding=pad)
    assert keep.sum(1).tolist() == [16, 16, 16]
    assert not (keep[[0, 2]] & pad[[0, 2]]).any()


def test_a_clip_masks_the_same_whatever_it_is_batched_with():
    """The count of a clip's kept valid tokens does not depend on its batch neighbours."""
    pad = torch.zeros(2, 80, dtype=torch.bool)
    pad[1, 16:] = True  # a short clip: 2 of 10 time steps
    keep = random_mask(2, 80, 0.75, gen(9), padding=pad)
    alone = random_mask(1, 80, 0.75, gen(9), padding=pad[1:])
    assert int((keep[1] & ~pad[1]).sum()) == int((alone[0] & ~pad[1]).sum()) == 4


def test_reproducible_from_the_generator():
    a = inverse_block_mask(8, 64, 8, 0.8, 5, gen(7), mask_prob_adjust=0.07)
    b = inverse_block_mask(8, 64, 8, 0.8, 5, gen(7), mask_prob_adjust=0.07)
    c = inverse_block_mask(8, 64, 8, 0.8, 5, gen(8), mask_prob_adjust=0.07)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_mask(8, 100, 0.7, gen(7)), random_mask(8, 100, 0.7, gen(7)))
    # Rows of one call differ (each is its own draw).
    assert not torch.equal(a[0], a[1])


def test_device_follows_padding():
    pad = torch.zeros(2, 16, dtype=torch.bool)
    keep = random_mask(2, 16, 0.5, gen(), padding=pad, device="cpu")
    assert keep.device.type == "cpu"


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="mask ratio"):
        inverse_block_mask(2, 8, 8, ratio, 3, gen())
    with pytest.raises(ConfigError, match="mask ratio"):
        random_mask(2, 64, ratio, gen())


@pytest.mark.parametrize("block", [0, -1, 2.5])
def test_bad_block_size(block):
    with pytest.raises(ConfigError, match="block size"):
        inverse_block_mask(2, 8, 8, 0.8, block, gen())
