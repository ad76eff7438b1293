"""Does self-supervised pretraining learn? Pretrain on unlabelled real audio for a fixed time
budget, then compare linear probes of the frozen encoder against the same encoder with random
weights (its own initialisation), on two labelled tasks it never saw labels of:

  ESC-10          10 environmental classes, the 5 official folds (leave-one-fold-out)
  spoken digits   10 digits, split by speaker (leave-one-speaker-out, 6 speakers)

The unlabelled pool is every recording of ../shared/data (forest soundscapes, ESC-10 and the
spoken digits, labels dropped). The budget is wall-clock: a short calibration run measures the
seconds per step on this machine, and the run gets as many steps as fit (the learning-rate and
teacher schedules are set for that many steps). A pretrained encoder "learns" when its probe
beats the random one by more than two standard deviations of the fold scores (the larger of
the two), on both tasks. Folds differ in difficulty for every encoder (a hard speaker is hard for
both), so the two encoders are also compared fold by fold: the mean per-fold gain against its
standard error and the number of folds pretrained wins (`verdict()`); both verdicts are reported.

    python benchmarks/ssl_probe.py --data ../shared/data --out runs/ssl_probe --minutes 30
    python benchmarks/ssl_probe.py ... --models eat,beats --extra "--memory_bank.temperature 0.2"

Writes OUT/results.json and OUT/results.md (the README table) and prints the table. With
`--json PATH` (`bioaudio bench`) also the figures: per variant and task the probe accuracy of
the pretrained and the random encoder, and the gain of pretrained over random (target: more than
two standard deviations of the fold scores). `--quick` runs a 2-minute budget into
runs/ssl_probe_quick (a smoke run of the whole path, not a verdict).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bioaudio import load_model  # noqa: E402
from bioaudio.benchreport import Report, add_suite_arguments, run_bioaudio  # noqa: E402
from bioaudio.data.manifest import read_manifest, write_manifest  # noqa: E402
from bioaudio.inference.probe import clip_embeddings, linear_probe  # noqa: E402
from bioaudio.models.audio_model import build_model  # noqa: E402

# How `bioaudio bench` treats this script: too long for --quick; skipped without its --data.
BENCH_SUITE = {"long": "about an hour of pretraining and probes", "needs": ["../shared/data"]}

# Each variant: stages of (run name, model type, objective flags, share of the budget). The EAT
# teacher decay is set for a short run (the official 0.9998 -> 0.99999 is for 400k steps) and 8
# clone views fit a CPU budget; {run:NAME} is the export of an earlier stage.
RECIPES: dict[str, list[tuple[str, str, list[str], float]]] = {
    "eat": [("pretrain_eat", "eat", [
        "--objective", "eat:1,memory_bank:0.1", "--eat.clone_batch", "8",
        "--eat.ema_decay", "0.999", "--eat.ema_end_decay", "0.9999"], 1.0)],
    # ablation: the EAT objective alone (no memory-bank term), same budget
    "eat_no_mb": [("pretrain_eat_no_mb", "eat", [
        "--objective", "eat:1", "--eat.clone_batch", "8",
        "--eat.ema_decay", "0.999", "--eat.ema_end_decay", "0.9999"], 1.0)],
    "beats": [("pretrain_beats", "beats", ["--objective", "beats:1,memory_bank:0.1"], 1.0)],
    # iteration 2: a tokenizer distilled from the iteration-1 model, then masked-token
    # prediction against it (the iteration-1 run is the teacher; it has its own budget)
    "beats_iter2": [
        ("tokenizer_beats", "beats", ["--objective", "beats_tokenizer:1",
                                      "--beats_tokenizer.teacher", "{run:pretrain_beats}"], 0.3),
        ("pretrain_beats_iter2", "beats", ["--objective", "beats:1,memory_bank:0.1",
                                           "--beats.tokenizer", "{run:tokenizer_beats}"], 0.7),
    ],
    # iteration 2 with the EAT run as the tokenizer's teacher (any model load_model reads can
    # teach): masked-token prediction of labels that summarise what EAT learnt
    "beats_eat_teacher": [
        ("tokenizer_from_eat", "beats", ["--objective", "beats_tokenizer:1",
                                         "--beats_tokenizer.teacher", "{run:pretrain_eat}"], 0.3),
        ("pretrain_beats_eat_teacher", "beats", ["--objective", "beats:1",
                                                 "--beats.tokenizer", "{run:tokenizer_from_eat}"],
         0.7),
    ],
}  # fmt: skip

# Peak learning rate of each objective (--lr overrides them all). BEATs is a post-LayerNorm
# transformer: at 1e-3 its masked-token training degrades the encoder within a few hundred steps
# (ESC-10 probe of the last layer after 300 steps: 57.5 % at 1e-3, 72.2 % at 2e-4, random
# weights 68.5 %; the deeper the layer, the worse at 1e-3); EAT (pre-LN) trains well at 1e-3.
STAGE_LR = {"eat": 1e-3, "beats_tokenizer": 1e-3, "beats": 2e-4}


def stage_lr(flags: list[str], override: float | None) -> float:
    if override is not None:
        return override
    objective = flags[flags.index("--objective") + 1] if "--objective" in flags else "eat"
    return STAGE_LR[objective.split(",")[0].split(":")[0]]


def bioaudio(*args: object, log: Path | None = None) -> float:
    return run_bioaudio(*args, log=log, cwd=ROOT)


def prepare(data: Path, out: Path) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """(unlabelled pool manifest, ESC-10 table with folds, digits table with speakers)."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in ("esc10", "fsdd", "soundscapes"):
        m = out / f"{name}.csv"
        if not m.is_file():
            bioaudio("prepare", data / name, "--labels", "none", "--out", m, "--no-progress")
        parts.append(read_manifest(m))
    pool = out / "pool.csv"
    write_manifest(pd.concat(parts, ignore_index=True), pool)
    esc = parts[0].copy()
    esc["label"] = [Path(p).parent.name for p in esc["path"]]
    esc["fold"] = [Path(p).name[0] for p in esc["path"]]
    digits = parts[1].copy()
    digits["label"] = [Path(p).name.split("_")[0] for p in digits["path"]]
    digits["fold"] = [Path(p).name.split("_")[1] for p in digits["path"]]
    return pool, esc, digits


def check_variants(variants: list[str], out: Path) -> None:
    """SystemExit (one line) for an unknown variant, or one that needs a run (its teacher) that
    neither an earlier variant of the list makes nor `out` already holds."""
    made: set[str] = set()
    for variant in variants:
        if variant not in RECIPES:
            raise SystemExit(f"--models: unknown variant {variant!r} (known: {', '.join(RECIPES)})")
        for name, _, flags, _ in RECIPES[variant]:
            for f in flags:
                need = f[5:-1] if f.startswith("{run:") else None
                if need and need not in made and not (out / need / "export").is_dir():
                    owner = next(v for v, st in RECIPES.items() if any(s[0] == need for s in st))
                    raise SystemExit(
                        f"--models {variant} needs the {need} run: list {owner} before it "
                        f"(e.g. --models {owner},{variant})"
                    )
            made.add(name)


def pretrain(variant: str, pool: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run the stages of a variant within the budget; returns the last stage's summary (with
    the total wall time and steps of every stage)."""
    total_steps, total_minutes, summary = 0, 0.0, {}
    for name, model_type, flags, share in RECIPES[variant]:
        flags = [str(out / f[5:-1] / "export") if f.startswith("{run:") else f for f in flags]
        common = [
            pool, "--model", model_type, "--preset", args.preset, "--segment_duration",
            args.segment, "--batch_size", args.batch_size, "--num_workers", 2,
            "--seed", args.seed, "--no-progress", *flags, *shlex.split(args.extra),
        ]  # fmt: skip
        run = out / name
        if (run / "summary.json").is_file():
            summary = json.loads((run / "summary.json").read_text())
            total_steps += summary["steps"]
            total_minutes += summary.get("train_time_s", 0) / 60
            continue
        if args.steps:
            steps, per_step = max(10, int(args.steps * share)), float("nan")
        else:
            calib = out / f"calibrate_{name}"
            if not (calib / "summary.json").is_file():
                bioaudio("pretrain", *common, "--out", calib, "--max_steps", 12,
                         "--save_every", 0, "--log_every", 1,
                         log=out / f"calibrate_{name}.log")  # fmt: skip
            m = pd.read_csv(calib / "metrics.csv")
            per_step = float(np.median(np.diff(m["elapsed_s"].to_numpy())[2:]))
            steps = max(10, int(args.minutes * share * 60 / per_step))
        print(f"{name}: {per_step:.2f} s/step -> {steps} steps", flush=True)
        schedule = ["--max_steps", steps, "--warmup_steps", max(1, steps // 20)]
        if "eat:" in " ".join(flags):
            schedule += ["--eat.ema_anneal_end_step", steps]
        bioaudio("pretrain", *common, *schedule, "--out", run, "--save_every",
                 max(1, steps // 4), "--lr", stage_lr(flags, args.lr),
                 log=out / f"{name}.log")  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        total_steps += summary["steps"]
        total_minutes += summary.get("train_time_s", 0) / 60
    return {**summary, "total_steps": total_steps, "total_minutes": round(total_minutes, 1)}


def probe(model: torch.nn.Module, esc: pd.DataFrame, digits: pd.DataFrame) -> dict:
    out = {}
    for name, table in (("esc10", esc), ("digits", digits)):
        x = clip_embeddings(model, table, pooling="mean", batch_size=16)
        out[name] = linear_probe(x, table["label"].tolist(), table["fold"].tolist()).as_dict()
    return out


def verdict(a: dict, b: dict) -> dict:
    """Pretrained probe `a` against random-weights probe `b` (ProbeResult dicts, same folds).

    `learns` is the issue's criterion: the gain of the means exceeds two standard deviations of
    the fold scores (the larger of the two). Folds differ in difficulty (one speaker is harder
    than another for every encoder), so that criterion mixes fold difficulty into the noise; the
    paired figures compare the two encoders fold by fold: mean and standard error of the
    per-fold gains, and the folds where pretrained wins. `learns_paired`: the mean paired gain
    exceeds two standard errors and pretrained wins on every fold but at most one.
    """
    gains = [x - y for x, y in zip(a["scores"], b["scores"], strict=True)]
    n = len(gains)
    mean = statistics.fmean(gains)
    sem = (statistics.stdev(gains) if n > 1 else 0.0) / n**0.5
    won = sum(g > 0 for g in gains)
    two_std = 2 * max(a["std"], b["std"])
    return {
        "gain": round(a["mean"] - b["mean"], 4),
        "two_std": round(two_std, 4),
        "learns": bool(a["mean"] - b["mean"] > two_std),
        "paired_gains": [round(g, 4) for g in gains],
        "paired_sem": round(sem, 4),
        "folds_won": f"{won}/{n}",
        "learns_paired": bool(mean > 2 * sem and won >= n - 1),
    }


TASKS = {"esc10": "ESC-10 (5 folds)", "digits": "spoken digits (by speaker)"}


def figures(results: dict, preset: str) -> Report:
    """The bench-suite figures of `results` (the dict written to OUT/results.json)."""
    report = Report(
        "ssl_probe",
        "linear probes of the frozen pretrained encoder vs the same encoder with random weights "
        "(ESC-10 by fold, spoken digits by speaker), after a fixed pretraining budget",
    )
    for variant, res in results["models"].items():
        p = res["pretrain"]
        budget = f"{p.get('total_steps')} steps, {p.get('total_minutes')} min of pretraining"
        for task, title in TASKS.items():
            a, b, v = res["pretrained"][task], res["random"][task], res["verdict"][task]
            for kind, r in (("pretrained", a), ("random weights", b)):
                report.add(f"{variant} {preset}, {title}: probe accuracy, {kind}",
                           100 * r["mean"], "%", note=f"+- {100 * r['std']:.1f} % over folds")  # fmt: skip
            report.add(
                f"{variant} {preset}, {title}: gain over random",
                100 * v["gain"],
                "pp",
                target=100 * v["two_std"],
                note=f"target: two standard deviations of the fold scores; {budget}",
            )
            report.add(
                f"{variant} {preset}, {title}: paired gain / its standard error",
                v["gain"] / v["paired_sem"] if v.get("paired_sem") else float("nan"),
                "x",
                target=2.0,
                note=f"per-fold gains, pretrained better on {v.get('folds_won', '?')} folds",
            )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default runs/ssl_probe, with --quick runs/ssl_probe_quick); "
        "finished stages in it are reused",
    )
    parser.add_argument(
        "--models",
        default="eat",
        help="comma-separated: eat, eat_no_mb (EAT without the memory bank), beats, beats_iter2 (after beats), beats_eat_teacher (after eat)",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="pretraining budget")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--segment", type=float, default=2.0, help="pretraining clip seconds")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of every stage (default: "
        "per objective, STAGE_LR: EAT 1e-3, BEATs 2e-4, tokenizer 1e-3)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="pretraining steps (default: as many as --minutes allow, measured on this machine)",
    )
    parser.add_argument("--extra", default="", help="more `bioaudio pretrain` flags")
    add_suite_arguments(parser)
    args = parser.parse_args()
    if args.quick:  # a smoke run of the whole path; its own folder, never mixed with a real one
        args.minutes = min(args.minutes, 2.0)
    if args.out is None:
        args.out = ROOT / "runs" / ("ssl_probe_quick" if args.quick else "ssl_probe")
    if not (args.data / "esc10").is_dir():
        raise SystemExit(f"{args.data} does not hold esc10/, fsdd/, soundscapes/")
    torch.set_num_threads(2)
    check_variants(args.models.split(","), args.out)
    pool, esc, digits = prepare(args.data, args.out)
    results: dict = {"machine": {"cpu_threads": torch.get_num_threads()}, "models": {}}
    for variant in args.models.split(","):
        summary = pretrain(variant, pool, args.out, args)
        run = args.out / RECIPES[variant][-1][0]
        model_type = RECIPES[variant][-1][1]
        torch.manual_seed(args.seed)  # the pretraining run's own initialisation
        cfg = json.loads((run / "config.json").read_text())["options"]
        encoder = {"preset": cfg["preset"], **cfg["encoder_options"]}
        random_init = build_model(model_type, encoder=encoder)
        pretrained = load_model(run / "export")
        res = {"pretrain": summary, "random": probe(random_init, esc, digits)}
        res["pretrained"] = probe(pretrained, esc, digits)
        for task in ("esc10", "digits"):
            res.setdefault("verdict", {})[task] = verdict(
                res["pretrained"][task], res["random"][task]
            )
        results["models"][variant] = res
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [
        "| encoder | pretraining | ESC-10 (5 folds) | spoken digits (by speaker) |",
        "|---|---|---|---|",
    ]
    for model_type, res in results["models"].items():
        p = res["pretrain"]
        what = f"{p['total_steps']} steps, {p['total_minutes']} min"
        for kind in ("random", "pretrained"):
            cells = [
                f"{100 * res[kind][t]['mean']:.1f} +- {100 * res[kind][t]['std']:.1f} %"
                for t in ("esc10", "digits")
            ]
            label = f"{model_type} {args.preset}, {kind} weights"
            lines.append(
                f"| {label} | {what if kind == 'pretrained' else 'none'} | {' | '.join(cells)} |"
            )
    lines.append("")
    for model_type, res in results["models"].items():
        for task, title in TASKS.items():
            v = res["verdict"][task]
            lines.append(
                f"- {model_type}, {title}: gain {100 * v['gain']:+.1f} pp "
                f"(two fold std {100 * v['two_std']:.1f} pp: {'met' if v['learns'] else 'not met'}); "
                f"paired per fold {100 * v['gain']:+.1f} +- {100 * v['paired_sem']:.1f} pp (sem), "
                f"better on {v['folds_won']} folds"
            )
    table = "\n".join(lines)
    (args.out / "results.md").write_text(table + "\n")
    print("\n" + table)
    for model_type, res in results["models"].items():
        print(model_type, json.dumps(res["verdict"]))
    figures(results, args.preset).write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
