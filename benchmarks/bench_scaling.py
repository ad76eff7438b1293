"""How encoder training cost grows with work: forward+backward step time of the `tiny` and `base`
BEATs / EAT encoders against clip length (2, 5, 10, 30 s at batch 1) and batch size (1, 2, 4, 8
clips of 5 s), with the tokens per clip and the share of attention in the model FLOPs.

Encoders are built with `build_encoder` and trained as the Trainer does (train mode, SDPA
attention, fp32 on CPU / bf16 autocast on CUDA); the loss is the mean square of the tokens
(+ CLS). Within one encoder every configuration is timed once per round, the order reversed
every other round (A B C .. C B A ..), after one untimed step each; figures are medians over
rounds. FLOPs of one fp32 step at batch 1 are counted by `torch.utils.flop_counter` with the
explicit attention (`attention_impl("math")`), so the two attention matmuls (q k^T and
softmax(.) v, forward and backward) appear as `aten.bmm` and nothing else in the encoders does;
their count is checked against the closed form 12 L B N^2 D (N tokens, + CLS for EAT). FLOPs
count matmuls and convolutions only: softmax, masks and norms cost time, not FLOPs.

Everything but attention is linear in the tokens, attention quadratic: per clip
FLOPs(N) = a N + b N^2, so attention's share passes 50 % at N = a / b tokens, reported in seconds
of audio (128 mel bins -> 8 tokens per 16 frames = 0.16 s). The `tiny` EAT preset's position
table (10.2 s) is extended to 122.9 s (the `base` table) for the 30 s clips: a buffer, no weights.
The table and a PNG plot (time against length and batch, attention share) are written; the plot
goes to --out, else beside the --json file, else ./scaling.png.

    .venv/bin/python benchmarks/bench_scaling.py --quick   # ~3 min: tiny BEATs + EAT, base EAT
    .venv/bin/python benchmarks/bench_scaling.py           # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bioaudio.benchreport import Report, add_suite_arguments, encoder_step, flop_counter
from bioaudio.benchreport import clip_frames as frames_of
from bioaudio.benchreport import sync as _sync
from bioaudio.models.layers import attention_impl
from bioaudio.models.registry import build_encoder

PATCH_SECONDS = 0.16  # one time patch: 16 frames of 10 ms


def build(model: str, preset: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    options: dict[str, Any] = {"preset": preset}
    if model == "eat" and preset == "tiny":
        options["max_length"] = 768  # the base table's 122.9 s (positions are a fixed buffer)
    return build_encoder(model, options).to(device).train()


def count_flops(encoder: torch.nn.Module, fbank: torch.Tensor) -> tuple[float, float]:
    """(total, attention) FLOPs of one fp32 forward+backward with explicit attention."""
    from beats.model import pos_conv_impl

    with attention_impl("math"), pos_conv_impl("direct"), flop_counter() as counter:
        encoder_step(encoder, fbank)
    ops = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in ops.items() if "bmm" in str(op))
    return float(counter.get_total_flops()), float(attention)


def analytic_attention(encoder: torch.nn.Module, tokens: int, batch: int) -> float:
    """12 L B N^2 D: q k^T and p v (2 B H N^2 hd each) forward, twice that backward, per layer."""
    n = tokens + int(bool(getattr(encoder, "has_cls", False)))
    return 12.0 * encoder.num_layers * batch * n * n * encoder.embed_dim


def sweep(
    encoder: torch.nn.Module, configs: list[tuple[int, float]], device: torch.device, rounds: int
) -> dict[tuple[int, float], float]:
    """Median step seconds per (batch, seconds) config, configs interleaved (A B .. / .. B A)."""
    inputs = {c: torch.randn(c[0], frames_of(c[1]), 128, device=device) for c in configs}
    times: dict[tuple[int, float], list[float]] = {c: [] for c in configs}
    for r in range(rounds + 1):
        for c in configs if r % 2 == 0 else configs[::-1]:
            _sync(device)
            t = time.perf_counter()
            encoder_step(encoder, inputs[c])
            _sync(device)
            if r > 0:  # round 0 warms up every shape
                times[c].append(time.perf_counter() - t)
    return {c: statistics.median(v) for c, v in times.items()}


def plot(results: list[dict[str, Any]], lengths: list[float], batches: list[int], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for res in results:
        name = res["name"]
        xs = [s for s in lengths if (1, s) in res["time"]]
        axes[0].plot(xs, [res["time"][(1, s)] * 1e3 for s in xs], "o-", label=name)
        bs = [b for b in batches if (b, res["batch_seconds"]) in res["time"]]
        per_clip = [res["time"][(b, res["batch_seconds"])] / b * 1e3 for b in bs]
        axes[1].plot(bs, per_clip, "o-", label=name)
        xs = [s for s in lengths if s in res["share"]]
        axes[2].plot(xs, [100 * res["share"][s] for s in xs], "o-", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="clip length (s)", ylabel="ms per step",
                title="step time vs clip length (batch 1)")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="batch (clips)", ylabel="ms per clip",
                title="time per clip vs batch")  # fmt: skip
    axes[2].axhline(50, color="grey", lw=0.8, ls="--")
    axes[2].set(xscale="log", xlabel="clip length (s)", ylabel="% of model FLOPs", ylim=(0, 100),
                title="attention share of FLOPs")  # fmt: skip
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_arguments(parser)
    parser.add_argument(
        "--encoders",
        default=None,
        help="model:preset list (default beats:tiny,eat:tiny,beats:base,eat:base; "
        "--quick: beats:tiny,eat:tiny,eat:base)",
    )
    parser.add_argument("--lengths", default="2,5,10,30", help="clip lengths (s), batch 1")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes at --batch_seconds")
    parser.add_argument("--batch_seconds", type=float, default=5.0, help="clip length of batches")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (3; --quick 2)")
    parser.add_argument("--out", type=Path, default=None, help="PNG plot path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    quick = args.quick
    encoders = args.encoders or (
        "beats:tiny,eat:tiny,eat:base" if quick else "beats:tiny,eat:tiny,beats:base,eat:base"
    )
    lengths = [float(s) for s in args.lengths.split(",") if s.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rounds = args.rounds or (2 if quick else 3)
    device = torch.device(args.device)
    out = args.out or (args.json.parent / "scaling.png" if args.json else Path("scaling.png"))
    print(
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads); median of "
        f"{rounds} interleaved rounds after a warm-up round; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    report = Report(
        "scaling",
        "encoder forward+backward step time against clip length and batch size (tiny, base), "
        "tokens per clip, attention share of the model FLOPs",
    )
    results = []
    for spec in [e.strip() for e in encoders.split(",") if e.strip()]:
        model, preset = spec.split(":")
        name = f"{model} {preset}"
        lens = list(lengths)
        bats = list(batches)
        if quick and preset != "tiny":
            lens = [s for s in lens if s < 30]  # --quick: no 30 s clips for base
            bats = [b for b in bats if b <= 4]
            report.notes.append(f"--quick: {name} without 30 s clips and batch 8")
        encoder = build(model, preset, device)
        configs = sorted({(1, s) for s in lens} | {(b, args.batch_seconds) for b in bats})
        times = sweep(encoder, configs, device, rounds)
        tokens, share, flops = {}, {}, {}
        for s in lens:
            fbank = torch.randn(1, frames_of(s), 128, device=device)
            with torch.no_grad():
                tokens[s] = encoder(fbank).tokens.shape[1]
            total, attn = count_flops(encoder, fbank)
            closed = analytic_attention(encoder, tokens[s], 1)
            if not math.isclose(attn, closed, rel_tol=1e-6):
                raise RuntimeError(f"{name} {s} s: counted attention {attn:.4g} != {closed:.4g}")
            share[s], flops[s] = attn / total, total
        # FLOPs per clip = a N + b N^2 (b exact from the closed form, a from the counted rest)
        s_ref = max(lens)
        n_ref = tokens[s_ref] + int(bool(encoder.has_cls))
        b_coef = analytic_attention(encoder, tokens[s_ref], 1) / n_ref**2
        a_coef = (flops[s_ref] - b_coef * n_ref**2) / n_ref
        cross_tokens = a_coef / b_coef
        cross_s = cross_tokens / encoder.n_freq * PATCH_SECONDS
        results.append(dict(name=name, time=times, share=share, batch_seconds=args.batch_seconds))

        print(f"\n{name} ({encoder.describe()})")
        header = f"{'batch':>5} {'clip s':>6} {'tokens':>6} {'GFLOP':>8} {'attn %':>6} {'ms/step':>9} {'ms/clip':>8}"
        print(header + "\n" + "-" * len(header))
        for b, s in configs:
            gflop = f"{flops[s] / 1e9:8.2f}" if b == 1 and s in flops else f"{'':8}"
            attn = f"{100 * share[s]:6.1f}" if b == 1 and s in share else f"{'':6}"
            tok = tokens.get(s, int(frames_of(s) // 16 * encoder.n_freq))
            t = times[(b, s)]
            print(f"{b:>5} {s:>6g} {tok:>6} {gflop} {attn} {t * 1e3:>9.1f} {t / b * 1e3:>8.1f}")
        growth = []
        if (1, 5.0) in times and (1, 10.0) in times:
            ratio = times[(1, 10.0)] / times[(1, 5.0)]
            growth.append(f"10 s / 5 s step time {ratio:.2f}x (tokens x2)")
            report.add(
                f"{name}: step time 10 s / 5 s",
                ratio,
                "x",
                note=f"tokens {tokens[5.0]} -> {tokens[10.0]}; linear cost = 2x, quadratic = 4x",
            )
        if (1, 10.0) in times and (1, 30.0) in times:
            ratio = times[(1, 30.0)] / times[(1, 10.0)]
            growth.append(f"30 s / 10 s {ratio:.2f}x (tokens x3)")
            report.add(f"{name}: step time 30 s / 10 s", ratio, "x", note="linear = 3x")
        b_lo, b_hi = min(bats), max(bats)
        per_clip = (times[(b_hi, args.batch_seconds)] / b_hi) / times[(b_lo, args.batch_seconds)]
        growth.append(f"time per clip at batch {b_hi} / batch {b_lo} {per_clip:.2f}x")
        report.add(
            f"{name}: time per clip, batch {b_hi} / batch {b_lo}",
            per_clip,
            "x",
            higher_is_better=False,
            note=f"{args.batch_seconds:g} s clips",
        )
        share_note = ", ".join(f"{s:g} s {100 * share[s]:.0f} %" for s in lens)
        report.add(
            f"{name}: clip length where attention passes 50 % of FLOPs",
            cross_s,
            "s",
            note=f"{cross_tokens:.0f} tokens; measured {share_note}",
        )
        print(
            "  " + "; ".join(growth) + f"; attention share {share_note}; passes 50 % at "
            f"{cross_s:.1f} s ({cross_tokens:.0f} tokens)"
        )
        del encoder

    plot(results, lengths, batches, out)
    report.plots.append(str(out))
    print(
        f"\nplot: {out}\nattn % = the two attention matmuls' share of one step's FLOPs (checked "
        "against 12 L B N^2 D); ms/clip = ms/step / batch; cost is linear in tokens while "
        "attention's share is small and turns quadratic past the 50 % length."
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
