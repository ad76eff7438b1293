"""`torch.compile` for the encoders' training step: eager vs compiled forward+backward of the BEATs
and EAT encoders, measured side by side in one run, plus the one-off compile time and the largest
difference between the two steps' losses and gradients (same weights, same input).

The encoders are built with `build_encoder` and run as the Trainer does (train mode, SDPA
attention, fp32 on CPU / bf16 autocast on CUDA; the loss is the mean square of the tokens (+ CLS)).
The compiled side is `torch.compile(encoder)` (inductor, default mode); its first step (tracing and
code generation) is timed on its own and not counted in the step times. After that eager and
compiled steps alternate (A B, B A, ...) and each figure is the median over the timed steps. The
encoders are run in eval mode for the equality check only (dropout off), in train mode for timing.

The ratio decides whether the toolkit offers compilation: a speed-up that does not pay back its
compile time within a short run, or that is below ~1.1x, is not worth the failure modes (a C++
compiler at run time, recompiles on new clip lengths).

    .venv/bin/python benchmarks/bench_compile.py --quick   # tiny encoders, 5 s clips: ~3 min
    .venv/bin/python benchmarks/bench_compile.py           # base encoders, 10 s clips
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bioaudio.benchreport import (  # noqa: E402
    Report,
    add_suite_arguments,
    clip_frames,
    encoder_step,
    interleaved_times,
)
from bioaudio.benchreport import sync as _sync  # noqa: E402
from bioaudio.models.registry import build_encoder  # noqa: E402


def grads_of(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def max_difference(encoder, compiled, fbank) -> tuple[float, float]:
    """(|loss difference|, largest |gradient difference| / largest |gradient|), dropout off."""
    encoder.eval()
    encoder.zero_grad(set_to_none=True)
    _, loss_eager = encoder_step(encoder, fbank, keep_grads=True)
    g_eager = grads_of(encoder)
    encoder.zero_grad(set_to_none=True)
    _, loss_compiled = encoder_step(compiled, fbank, keep_grads=True)
    g_compiled = grads_of(encoder)
    encoder.zero_grad(set_to_none=True)
    encoder.train()
    scale = max(float(g.abs().max()) for g in g_eager.values()) or 1.0
    worst = max(float((g_eager[n] - g_compiled[n]).abs().max()) for n in g_eager)
    return abs(float(loss_eager - loss_compiled)), worst / scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="beats,eat", help="comma-separated model types")
    parser.add_argument("--preset", default="base", help="encoder preset")
    parser.add_argument("--batch", type=int, default=2, help="clips per step")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--iters", type=int, default=6, help="timed steps per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.seconds, args.iters = "tiny", 2, 5.0, 4

    device = torch.device(args.device)
    frames = clip_frames(args.seconds)
    report = Report(
        "compile",
        f"torch.compile vs eager forward+backward of the {args.preset} BEATs / EAT encoders "
        f"({args.batch} x {args.seconds:g} s clips, {device.type})",
    )
    print(
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); "
        f"{args.preset} encoders, batch {args.batch} x {args.seconds:g} s, {args.iters} timed steps"
    )
    header = f"{'model':<6} {'compile s':>9} {'eager s/step':>12} {'compiled s/step':>15} {'speed-up':>8} {'loss diff':>9} {'grad diff':>9}"
    print(header)
    print("-" * len(header))
    for model_type in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        encoder = build_encoder(model_type, args.preset).to(device).train()
        fbank = torch.randn(args.batch, frames, 128, device=device)
        compiled = torch.compile(encoder)
        try:
            t0 = time.perf_counter()
            encoder_step(compiled, fbank)
            _sync(device)
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # no C++ compiler, unsupported op: report, do not crash
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"{model_type:<6} torch.compile failed: {reason}")
            report.notes.append(f"{model_type}: torch.compile failed ({reason})")
            continue
        times = interleaved_times(
            {
                "eager": lambda m=encoder, x=fbank: encoder_step(m, x),
                "compiled": lambda m=compiled, x=fbank: encoder_step(m, x),
            },
            args.iters,
            warmup=1,
            device=device,
        )
        eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
        loss_diff, grad_diff = max_difference(encoder, compiled, fbank)
        print(
            f"{model_type:<6} {compile_s:>9.1f} {eager:>12.3f} {comp:>15.3f} "
            f"{eager / comp:>7.2f}x {loss_diff:>9.1e} {grad_diff:>9.1e}"
        )
        shape = f"{args.preset}, {args.batch} x {args.seconds:g} s, median of {args.iters}"
        report.add(f"compiled / eager step speed, {model_type}", eager / comp, "x", note=shape)
        report.add(
            f"compile time, {model_type}", compile_s, "s", higher_is_better=False,
            note=f"first step (trace + codegen) = {compile_s / max(eager, 1e-9):.0f} eager steps",
        )  # fmt: skip
        report.add(
            f"compiled vs eager gradient difference, {model_type}", grad_diff, "rel",
            higher_is_better=False, note="largest |difference| / largest |gradient|, dropout off",
        )  # fmt: skip
        del compiled, encoder
        torch._dynamo.reset()
    print(
        "\nspeed-up = eager median step time / compiled median step time (same run, "
        "alternating); compile time = the compiled module's first step."
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
