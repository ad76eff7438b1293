"""Schedules as pure functions of the optimizer step, so a resumed run needs nothing but the step.

`step` is the 0-based index of the optimizer update being taken (the first update is step 0).
"""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """LR multiplier in [min_ratio, 1]: linear warmup to 1, then half a cosine down to `min_ratio`.

    Warmup reaches 1 on update `warmup_steps - 1` (update 0 already learns at 1/warmup_steps), the
    cosine reaches `min_ratio` at `total_steps` and stays there if training is extended.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_ramp(step: int, *, start: float, end: float, ramp_steps: int) -> float:
    """`start` at step 0, linear to `end` at `ramp_steps`, then `end` (EMA-teacher decay, data2vec)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    return start + (end - start) * max(step, 0) / ramp_steps


def cosine_ramp(step: int, *, start: float, end: float, ramp_steps: int) -> float:
    """`start` at step 0, half a cosine to `end` at `ramp_steps`, then `end` (BYOL/MoCo momentum)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    progress = max(step, 0) / ramp_steps
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))
