"""The figures a benchmark reports, in one shape the `bioaudio bench` suite can collect.

Each script in `benchmarks/` accepts `--quick` (smaller sizes, fewer repeats: minutes, not hours)
and `--json PATH`; it prints its own detailed table as before and, with `--json`, writes

    {"benchmark": "fbank", "compares": "...", "figures": [...], "plots": [...], "notes": [...]}

where every figure is a value measured in this run, optionally a ratio against a target:

    {"figure": "batched / per-clip fbank speed", "value": 2.7, "unit": "x",
     "target": 2.0, "higher_is_better": true, "met": true, "note": "64 clips of 1-12 s"}

Ratios are measured side by side in one run (both sides interleaved), never against a number
from another run or another machine.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bioaudio.fileio import save_json_atomic


@dataclass
class Figure:
    figure: str
    value: float
    unit: str = ""
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None or not math.isfinite(self.value):
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


@dataclass
class Report:
    """What one benchmark measured; `write(args.json)` at the end of the script."""

    benchmark: str
    compares: str
    figures: list[Figure] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        figure: str,
        value: float,
        unit: str = "",
        target: float | None = None,
        higher_is_better: bool = True,
        note: str = "",
    ) -> Figure:
        f = Figure(figure, float(value), unit, target, higher_is_better, note)
        self.figures.append(f)
        return f

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "compares": self.compares,
            "figures": [f.as_dict() for f in self.figures],
            "plots": list(self.plots),
            "notes": list(self.notes),
        }

    def write(self, path: str | Path | None) -> None:
        if path:
            save_json_atomic(Path(path), self.as_dict())


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quick` and `--json PATH`, the two flags `bioaudio bench` passes to every script."""
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer repeats (a few minutes)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the figures as JSON (bioaudio bench)"
    )


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.1f} %"
    mag = abs(value)
    text = f"{value:.3g}" if mag < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def format_target(f: dict[str, Any]) -> str:
    if f.get("target") is None:
        return ""
    op = ">=" if f.get("higher_is_better", True) else "<="
    return f"{op} {format_value(f['target'], f.get('unit', ''))}"


# --------------------------------------------------------------------------- encoder steps
# The training step the encoder benchmarks time (bench_encoders, bench_memory, bench_scaling,
# bench_compile), written once so they all measure the same computation.


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten.convolution_backward`: each requested gradient (input, weight) costs one
    forward, 2 * outputs * (C_in / groups) * kernel size. torch's own formula ignores `groups`
    and counts a grouped convolution's backward `groups` times over (16x for BEATs' positional
    convolution and EAT's decoder)."""
    transposed = args[4] if len(args) > 4 else kwargs.get("transposed", False)
    output_mask = args[7] if len(args) > 7 else kwargs.get("output_mask", (True, True, False))
    # a transposed conv's weight is (C_in, C_out / groups, ...): count over its input instead
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """`torch.utils.flop_counter.FlopCounterMode` (no display) with a correct count for grouped
    convolutions' backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False, custom_mapping={aten.convolution_backward: _conv_backward_flops}
    )


def clip_frames(seconds: float, patch: int = 16) -> int:
    """Fbank frames (10 ms hop) of a clip, rounded down to whole patches."""
    frames = int(round(seconds * 100))
    return frames - frames % patch


def encoder_step(module: Any, fbank: Any, bf16: bool | None = None, keep_grads: bool = False):
    """One forward + backward of an encoder as training runs it: the loss is the mean square of
    the tokens (+ CLS), under bf16 autocast when `bf16` (None: on CUDA with bf16 support, as the
    Trainer's precision "auto"). Gradients are cleared (set to None, as the Trainer's zero_grad)
    unless `keep_grads`. Returns (tokens per clip, the detached loss)."""
    import torch

    device = fbank.device
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = module(fbank)
        loss = out.tokens.float().square().mean()
        if out.cls is not None:
            loss = loss + out.cls.float().square().mean()
    loss.backward()
    if not keep_grads:
        module.zero_grad(set_to_none=True)
    return int(out.tokens.shape[1]), loss.detach()


def interleaved_times(
    fns: dict[str, Any], rounds: int, warmup: int = 0, device: Any = None
) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn for `warmup + rounds` rounds, the order
    reversed every other round (A B, B A, ...) so that drift and other load hit all alike; the
    warm-up rounds are not timed; `device` is synchronised around each call (CUDA)."""
    import time

    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            if i >= warmup:
                out[name].append(time.perf_counter() - t)
    return out


def run_bioaudio(*args: object, log: Path | None = None, cwd: Path | None = None) -> float:
    """Run one `bioaudio` command in a child process (printed first; its output appended to
    `log`, else discarded); SystemExit naming the log when it fails. Returns its wall time (s)."""
    import shlex
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "bioaudio", *map(str, args)]
    print("$", shlex.join(["bioaudio", *cmd[3:]]), flush=True)
    t = time.perf_counter()
    with open(log, "a") if log else open(os.devnull, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): see {log}")
    return time.perf_counter() - t
