"""Pretraining step speed, measured side by side in one run (ratios; absolute figures are this
machine's and vary with its load):

1. EAT student views per second with clone batch 16 vs clone batch 1 (one teacher pass serves
   16 masked views instead of 1): target >= 2x.
2. EAT with masked tokens dropped before the encoder (ours) vs a student that encodes the full
   sequence with a mask embedding at masked positions (BEATs / MAE-decoder style), same views:
   target >= 4x.
3. BEATs masked-token prediction at mask ratio 0.75: dropped tokens vs the full sequence:
   target >= 2.5x.
4. Steps per second and model FLOPs utilisation (fp32 matmul peak measured in the same run) of
   a whole EAT + memory-bank training step for `tiny` and `small` (and `base` with --base).

Every step is the code path training uses (`PretrainTask` objectives, forward + backward +
AdamW). The full-sequence variants are the same objectives with `keep` replaced by "keep all"
and masked tokens overwritten by a learned mask embedding (what an encoder without token
dropping must compute). The two sides of each ratio are built first and their steps
interleaved (A B, B A, ...), so that load on this shared machine hits both alike.

Figures (`--json`, `bioaudio bench`): the three ratios with their targets, and per preset the
training step's steps/s and MFU (reported, no target).

    .venv/bin/python benchmarks/bench_pretrain.py            # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_pretrain.py --quick    # smaller batches, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bioaudio.benchreport import Report, add_suite_arguments, flop_counter, interleaved_times  # noqa: E402
from bioaudio.models.audio_model import build_model  # noqa: E402
from bioaudio.training.objectives import PretrainInputs  # noqa: E402
from bioaudio.training.optim import make_adamw  # noqa: E402


class _Ctx:
    """The few TaskContext fields the objectives read."""

    step, rank, world_size, micro_step = 0, 0, 1, 0
    device = torch.device("cpu")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def mean_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FullSequence(torch.nn.Module):
    """An encoder wrapper that ignores `keep`: masked patches are replaced by a learned mask
    embedding and the whole sequence is encoded (what a model without token dropping pays)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.inner = encoder
        self.mask_emb = torch.nn.Parameter(torch.zeros(encoder.embed_dim))

    def __getattr__(self, name: str):  # cfg, n_freq, embed_dim, has_cls, ... of the encoder
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, fbank, padding_mask=None, keep=None):
        out = self.inner(fbank, padding_mask)
        if keep is None:
            return out
        tokens = torch.where(keep[..., None], out.tokens, self.mask_emb.to(out.tokens.dtype))
        # the objective expects only the kept tokens back: take them (the cost was paid)
        n = int(keep[0].sum())
        idx = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
        kept = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        return type(out)(kept, out.cls, None)


def time_steps(fn, iters: int) -> float:
    """Median seconds of `fn()` over `iters` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_rates(a: tuple, b: tuple, rounds: int) -> tuple[float, float]:
    """Items per second of two (step function, items per step) setups, their steps interleaved
    A B, B A, ... after two warm-up rounds, so that load and clock drift hit both alike (medians)."""
    times = interleaved_times({"a": a[0], "b": b[0]}, rounds, warmup=2)
    return a[1] / statistics.median(times["a"]), b[1] / statistics.median(times["b"])


def objective_step(model, objective, params, fbank, seed: int = 0):
    opt = make_adamw(params, lr=1e-4)

    def run() -> None:
        gen = torch.Generator().manual_seed(seed)
        inputs = PretrainInputs(fbank=fbank, frame_mask=None, generator=gen, view2=fbank,
                                view2_mask=None, index=torch.arange(fbank.shape[0]))  # fmt: skip
        out = objective(model, inputs, _Ctx())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def eat_views(preset: str, batch: int, clone: int, seconds: float, full: bool) -> tuple:
    """(one step of the EAT objective, student views per step)."""
    from eat.objective import EATObjective, EATObjectiveConfig

    torch.manual_seed(0)
    model = build_model("eat", preset)
    obj = EATObjective(model, EATObjectiveConfig(clone_batch=clone, decoder_layers=3))
    if full:
        model.encoder = FullSequence(model.encoder)
    params = [p for p in list(model.parameters()) + list(obj.parameters()) if p.requires_grad]
    fbank = torch.randn(batch, int(seconds * 100), 128)
    return objective_step(model, obj, params, fbank), batch * clone


def beats_views(
    preset: str, batch: int, seconds: float, full: bool, predictor_dim: int = 0
) -> tuple:
    """(one step of the BEATs masked-token objective at mask ratio 0.75, clips per step);
    `predictor_dim` the label predictor's width (0: the default, the encoder's width)."""
    from beats.objective import MaskedTokenConfig, MaskedTokenObjective

    torch.manual_seed(0)
    model = build_model("beats", preset)
    obj = MaskedTokenObjective(model, MaskedTokenConfig(predictor_dim=predictor_dim))
    if full:
        model.encoder = FullSequence(model.encoder)
    params = [p for p in list(model.parameters()) + list(obj.parameters()) if p.requires_grad]
    fbank = torch.randn(batch, int(seconds * 100), 128)
    return objective_step(model, obj, params, fbank), batch


def training_step(preset: str, batch: int, seconds: float, iters: int) -> tuple[float, float]:
    """(steps/s, model FLOP/s) of the default EAT + memory-bank step."""
    from bioaudio.training.memory_bank import MemoryBankObjective
    from eat.objective import EATObjective, EATObjectiveConfig

    torch.manual_seed(0)
    model = build_model("eat", preset)
    eat = EATObjective(model, EATObjectiveConfig(clone_batch=16))
    mb = MemoryBankObjective(model)
    mb.bind([eat])
    params = [p for m in (model, eat, mb) for p in m.parameters() if p.requires_grad]
    opt = make_adamw(params, lr=1e-4)
    wav = 0.1 * torch.randn(batch, int(seconds * 16000))

    def run() -> None:
        fbank, mask = model.featurise(wav)
        inputs = PretrainInputs(fbank=fbank, frame_mask=mask, generator=torch.Generator().manual_seed(0),
                                view2=fbank, view2_mask=mask, index=torch.arange(batch))  # fmt: skip
        out = eat(model, inputs, _Ctx())
        inputs.student_utterance = out.utterance
        loss = out.loss + 0.1 * mb(model, inputs, _Ctx()).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = flop_counter()  # grouped convs (EAT's decoder) counted once, not per group
    with counter:
        run()
    seconds_per_step = time_steps(run, iters)
    return 1 / seconds_per_step, counter.get_total_flops() / seconds_per_step


def matmul_peak() -> float:
    best = 0.0
    for m, k, o in ((1024, 1024, 1024), (512, 768, 3072)):
        a, b = torch.randn(m, k), torch.randn(k, o)
        a @ b
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * o / (time.perf_counter() - t))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="store_true", help="also time the base preset step")
    parser.add_argument("--threads", type=int, default=2)
    add_suite_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    iters = 2 if args.quick else 4
    b = 2 if args.quick else 4
    rows: list[tuple[str, float, float, float, float]] = []

    rounds = 8 if args.quick else 12  # interleaved pairs: each figure is a median of `rounds`
    v16, v1 = paired_rates(eat_views("small", b, 16, 3.0, full=False),
                           eat_views("small", b * 8, 1, 3.0, full=False), rounds)  # fmt: skip
    rows.append(("EAT small: clone 16 vs clone 1 (views/s)", v16, v1, v16 / v1, 2.0))
    v16, vfull = paired_rates(eat_views("small", b, 16, 3.0, full=False),
                              eat_views("small", b, 16, 3.0, full=True), rounds)  # fmt: skip
    rows.append(("EAT small: dropped vs full sequence (views/s)", v16, vfull, v16 / vfull, 4.0))
    bd, bf = paired_rates(beats_views("small", b * 2, 3.0, full=False),
                          beats_views("small", b * 2, 3.0, full=True), rounds)  # fmt: skip
    rows.append(("BEATs small: dropped vs full sequence (clips/s)", bd, bf, bd / bf, 2.5))
    # the label predictor sees the whole grid in both: a narrower one shows what dropping saves
    bd, bf = paired_rates(beats_views("small", b * 2, 3.0, full=False, predictor_dim=128),
                          beats_views("small", b * 2, 3.0, full=True, predictor_dim=128), rounds)  # fmt: skip
    rows.append(("BEATs small, predictor_dim 128: dropped vs full", bd, bf, bd / bf, 0.0))

    peak = matmul_peak()
    presets = ["tiny", "small"] + (["base"] if args.base else [])
    mfu = {}
    for preset in presets:
        sps, flops = training_step(preset, b, 3.0, iters)
        mfu[preset] = (sps, flops / peak)
    print(f"fp32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s "
          f"({args.threads} threads)")  # fmt: skip
    print(f"\n{'comparison':<48} {'ours':>10} {'baseline':>10} {'ratio':>7}  target")
    for name, a, c, r, target in rows:
        goal = f">= {target:g}x" if target else "(reported)"
        print(f"{name:<48} {a:>10.2f} {c:>10.2f} {r:>6.2f}x  {goal}")
    print(f"\n{'EAT + memory bank training step':<48} {'steps/s':>10} {'MFU':>10}")
    for preset, (sps, util) in mfu.items():
        print(f"{preset + f' (batch {b}, clone 16, 3 s)':<48} {sps:>10.3f} {100 * util:>9.1f}%")

    report = Report(
        "pretrain",
        "pretraining steps (PretrainTask objectives, forward + backward + AdamW): clone batch 16 "
        "vs 1, masked tokens dropped vs encoded, and the EAT + memory-bank step's MFU",
    )
    for name, ours, baseline, ratio, target in rows:
        report.add(name, ratio, "x", target=target or None,
                   note=f"{ours:.2f} vs {baseline:.2f}; 3 s clips, medians of {rounds} interleaved steps")  # fmt: skip
    for preset, (sps, util) in mfu.items():
        shape = f"batch {b}, clone 16, 3 s clips"
        report.add(f"EAT + memory bank step, {preset}: steps/s", sps, "steps/s", note=shape)
        report.add(f"EAT + memory bank step, {preset}: MFU", 100 * util, "%",
                   note=f"{shape}; fp32 peak {peak / 1e9:.0f} GFLOP/s this run")  # fmt: skip
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
