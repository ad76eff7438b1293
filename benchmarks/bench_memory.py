"""Peak memory and step time of `base` encoder forward+backward (BEATs and EAT, 10 s clips) with
and without activation checkpointing (`--activation_checkpointing`, i.e.
`Encoder.set_activation_checkpointing`), measured side by side in one run; plus the peak RSS of a
tiny pretraining run through the real `pretrain()` (Trainer, PretrainTask, EAT + memory bank).

Every configuration runs in its own fresh child process (this script re-invoked with the hidden
`--child` flag), so no configuration inherits another's allocator caches or freed pages. The
memory figure is what the training step adds on top of the built model: on CPU the child's peak
RSS after the steps (`resource.getrusage` ru_maxrss) minus its peak right after building the
model and its input (libraries, weights); on CUDA `torch.cuda.max_memory_allocated` over the steps
minus the memory allocated after the build. It holds the activations kept for backward, the
gradients (set to None between steps, as the Trainer's `zero_grad` does) and temporaries; the
optimizer state (2 x weights for AdamW) comes on top in a real run and is the same either way.
The encoders are built with `build_encoder` and run in train mode with SDPA attention (the path
training uses); the loss is the mean square of the tokens (+ CLS). Children alternate
A B B A ...; step times are medians over the timed steps of all children of a configuration.

    .venv/bin/python benchmarks/bench_memory.py --quick      # ~4 min on 2 CPU cores (10 s x 1)
    .venv/bin/python benchmarks/bench_memory.py              # ~8 min (10 s x 2, more steps)
    .venv/bin/python benchmarks/bench_memory.py --batch 8    # a GPU box
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bioaudio.benchreport import Report, add_suite_arguments, clip_frames, encoder_step
from bioaudio.benchreport import sync as _sync

ROOT = Path(__file__).resolve().parents[1]
MB = 1024**2


def _rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# --------------------------------------------------------------------------- children


def _encoder_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    from bioaudio.models.registry import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(args.model, args.preset).to(args.device).train()
    return encoder, torch.randn(args.batch, clip_frames(args.seconds), 128, device=args.device)


def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Steps of one configuration in this fresh process; what they add to the peak memory."""
    encoder, fbank = _encoder_and_input(args)
    encoder.set_activation_checkpointing(bool(args.ckpt))
    device = fbank.device
    _sync(device)
    base_rss = _rss_peak_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    for _ in range(args.steps):
        tokens, _ = encoder_step(encoder, fbank)
    _sync(device)
    result = {"rss_peak": _rss_peak_bytes(), "rss_step": _rss_peak_bytes() - base_rss}
    result["tokens"] = tokens
    if device.type == "cuda":
        result["cuda_step"] = torch.cuda.max_memory_allocated(device) - base_cuda
    return result


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    """Step times without / with checkpointing, alternating A B B A in one process (one
    untimed warm-up step of each first)."""
    encoder, fbank = _encoder_and_input(args)
    device = fbank.device
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(1 + args.steps):
        for ckpt in (False, True) if i % 2 == 0 else (True, False):
            encoder.set_activation_checkpointing(ckpt)
            _sync(device)
            t = time.perf_counter()
            encoder_step(encoder, fbank)
            _sync(device)
            if i > 0:
                times["on" if ckpt else "off"].append(time.perf_counter() - t)
    return times


def child_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """A short tiny pretraining run (EAT objective + memory bank) on generated audio."""
    from bioaudio.data.demo import generate_demo_data
    from bioaudio.training.pretrain import PretrainOptions, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(Path(tmp) / "demo", seed=0, n_per_class=1, n_unlabelled=8, soundscapes=0)
        cfg = PretrainOptions(
            out=Path(tmp) / "run",
            model="eat",
            preset=args.preset,
            segment_duration=args.seconds,
            batch_size=args.batch,
            max_steps=args.steps,
            num_workers=0,
            progress=False,
            save_every=0,
            activation_checkpointing=args.ckpt,
        )
        base_rss = _rss_peak_bytes()
        t = time.perf_counter()
        summary = pretrain(Path(tmp) / "demo" / "unlabelled", cfg, say=lambda *a: None)
        elapsed = time.perf_counter() - t
    assert summary["status"] == "completed", summary
    return {
        "rss_peak": _rss_peak_bytes(),
        "rss_step": _rss_peak_bytes() - base_rss,
        "run_s": elapsed,
    }


# glibc serves blocks below its mmap threshold from heaps it rarely gives back, and raises the
# threshold (up to 32 MiB) each time it unmaps a block, so after the first large free most tensors
# come from the heap and freed activations stay resident. Pinning the threshold (which turns the
# dynamic raise off) unmaps every block >= 128 KiB on free: RSS then follows the live tensors,
# as CUDA's max_memory_allocated does.
PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(script_args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *script_args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {script_args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(parser)
    parser.add_argument("--models", default="beats,eat", help="comma-separated model types")
    parser.add_argument("--preset", default="base", help="encoder preset")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (4; --quick 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per configuration (3; --quick 2)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--pretrain_preset", default="tiny", help="preset of the pretraining-run figure ('' = skip)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="eat", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.quick else 4
    if args.steps is None:
        args.steps = 2 if args.quick else 3

    if args.child:
        children = {"memory": child_memory, "time": child_time, "pretrain": child_pretrain}
        print("RESULT " + json.dumps(children[args.child](args)))
        return

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    unit = "CUDA max_memory_allocated" if cuda else "peak RSS"
    print(
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); "
        f"{args.preset} encoders, batch {args.batch} x {args.seconds:g} s; memory: one fresh "
        f"process per configuration, 1 step; time: {args.steps} timed steps of each, "
        f"alternating in one process; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    report = Report(
        "memory",
        f"{args.preset} encoder forward+backward ({args.batch} x {args.seconds:g} s) with vs "
        f"without activation checkpointing: {unit} the step adds, and step time",
    )
    if args.quick:
        report.notes.append(
            f"--quick: batch {args.batch} (full run: 4) and {args.steps} timed steps; gradients "
            "are a fixed floor, so the memory cut grows with the batch"
        )
    key = "cuda_step" if cuda else "rss_step"
    allocators = {"default": {}} if cuda else {"default": {}, "pinned": PINNED}
    header = (
        f"{'model':<6} {'checkpointing':<13} {'tokens':>6} {'step MB':>8} "
        + ("" if cuda else f"{'pinned MB':>9} ")
        + f"{'peak RSS MB':>11} {'s/step':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    common = ["--preset", args.preset, "--seconds", str(args.seconds), "--batch",
              str(args.batch), "--device", args.device]  # fmt: skip
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        mem: dict[tuple[str, bool], dict[str, Any]] = {}
        for alloc, env in allocators.items():
            for ckpt in (False, True):
                argv = ["memory", "--model", model, "--ckpt", str(int(ckpt)), "--steps", "1"]
                mem[alloc, ckpt] = run_child([*argv, *common], env)
        times = run_child(["time", "--model", model, "--steps", str(args.steps), *common])
        step = {False: statistics.median(times["off"]), True: statistics.median(times["on"])}
        for ckpt in (False, True):
            m = mem["default", ckpt]
            pinned = "" if cuda else f"{mem['pinned', ckpt][key] / MB:>9.0f} "
            print(
                f"{model:<6} {'on' if ckpt else 'off':<13} {m['tokens']:>6} {m[key] / MB:>8.0f} "
                f"{pinned}{m['rss_peak'] / MB:>11.0f} {step[ckpt]:>7.2f}"
            )
        what = f"{model} {args.preset}, {args.batch} x {args.seconds:g} s"
        cuts = {}
        for alloc in allocators:
            off, on = mem[alloc, False][key] / MB, mem[alloc, True][key] / MB
            cuts[alloc] = 100.0 * (1.0 - on / off)
            how = unit if alloc == "default" else "peak RSS, glibc mmap threshold pinned"
            label = "" if alloc == "default" else " (live buffers)"
            report.add(f"{model}: step memory without checkpointing{label}", off, "MB",
                       note=f"{what}, {how}")  # fmt: skip
            report.add(f"{model}: step memory with checkpointing{label}", on, "MB",
                       note=f"{what}, {how}")  # fmt: skip
            report.add(f"{model}: memory cut by checkpointing{label}", cuts[alloc], "%",
                       target=40.0, note=f"{what}, {how}")  # fmt: skip
        overhead = 100.0 * (step[True] / step[False] - 1.0)
        report.add(
            f"{model}: step time added by checkpointing",
            overhead,
            "%",
            target=40.0,
            higher_is_better=False,
            note=f"median step {step[False]:.2f} s -> {step[True]:.2f} s, interleaved",
        )
        print(
            "  -> memory cut "
            + ", ".join(f"{c:.0f} % ({a} allocator)" for a, c in cuts.items())
            + f" (target >= 40 %); time {overhead:+.0f} % (target <= 40 %)"
        )

    if args.pretrain_preset:
        steps = 2
        res = run_child(
            [
                "pretrain",
                "--preset",
                args.pretrain_preset,
                "--seconds",
                "1",
                "--batch",
                "4",
                "--steps",
                str(steps),
            ]  # fmt: skip
        )
        peak, added = res["rss_peak"] / MB, res["rss_step"] / MB
        print(
            f"\npretraining run ({args.pretrain_preset} EAT, eat + memory_bank, batch 4 x 1 s, "
            f"{steps} steps, Trainer): peak RSS {peak:.0f} MB, {added:.0f} MB above the process "
            f"before the run ({res['run_s']:.1f} s)"
        )
        note = f"{args.pretrain_preset} EAT, batch 4 x 1 s, {steps} steps, whole process"
        report.add("pretraining run: peak RSS", peak, "MB", note=note)
        report.add("pretraining run: RSS added by the run", added, "MB", note=note)
    print(
        f"\nstep MB = {unit} during one step minus right after building the model (activations,"
        " gradients, temporaries), each configuration in its own process"
        + (
            ""
            if cuda
            else "; pinned MB = the same with MALLOC_MMAP_THRESHOLD_=131072 (freed "
            "buffers returned to the system: the live tensors)"
        )
        + "; s/step = median of steps alternating with / without checkpointing in one process."
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
