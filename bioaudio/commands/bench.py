"""Run the benchmark suite: every script in benchmarks/, each in its own process, then one table.

Every figure is a value measured in this run, most of them ratios of two things timed side by
side (ours vs a baseline on the same machine, interleaved); a figure with a target is marked met
(yes) or not (NO). Each benchmark's wall time and peak resident memory (its own process tree's
largest, from the operating system) are reported too.

Writes OUT/bench_results.json (machine, time, git commit, every benchmark's figures) and
OUT/bench_results.md (the table for the README's Performance section), and OUT/logs/NAME.txt
(each script's output). A failing benchmark is recorded with its last output line and the others
still run; the exit code is then 1. Ctrl-C stops the running script and writes what finished.

Long benchmarks (a script's `BENCH_SUITE = {"long": ...}`: ssl_probe, an hour of pretraining and
linear probes on ../shared/data) run in a full run or when named with --only; --quick skips
them. A benchmark whose data (`BENCH_SUITE["needs"]`) is missing is skipped with the reason.

Examples:
  bioaudio bench --list
  bioaudio bench --quick                      # every benchmark, small sizes: minutes
  bioaudio bench --quick --only fbank,audio_window
  bioaudio bench --only encoders --overwrite  # refresh one entry of runs/bench, keep the rest
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio import benchsuite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, fewer repeats (minutes, not hours)"
    )
    parser.add_argument(
        "--only", default=None, metavar="NAME[,NAME...]", help="run only these benchmarks"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks and what each compares"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="results folder (default: runs/bench)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT/bench_results.json (with --only: refresh those entries, keep the rest)",
    )
    parser.add_argument(
        "--benchmarks",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of benchmark scripts (default: benchmarks/ of the source checkout)",
    )


def run(args: argparse.Namespace) -> int:
    scripts = benchsuite.discover(args.benchmarks)
    if args.list:
        width = max(len(s.name) for s in scripts)
        for s in scripts:
            long = " [long: full runs and --only]" if s.long else ""
            print(f"{s.name:<{width}}  {s.summary}{long}")
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    chosen = benchsuite.select(scripts, only, args.quick)
    results_path = benchsuite.check_out(args.out, args.overwrite)
    previous = benchsuite.load_previous(results_path) if only else []
    info = benchsuite.machine()
    print(benchsuite.machine_line(info, args.quick, benchsuite.now()))

    new, interrupted = benchsuite.run_suite(chosen, args.out, args.quick)
    for e in new:  # each entry carries its machine: a merged file may mix runs
        e.setdefault("machine", info)
    finished = [e for e in new if e["status"] != "skipped"]
    if interrupted and not finished:
        print("bench: interrupted before any benchmark finished; nothing written")
        return 130
    entries = benchsuite.merge(previous, new, [s.name for s in scripts])
    results = benchsuite.build_results(entries, args.quick, info)
    json_path, md_path = benchsuite.write_results(args.out, results)

    print("\n" + benchsuite.text_table(benchsuite.FIGURE_HEADER, benchsuite.figure_rows(entries)))
    print()
    print(benchsuite.text_table(benchsuite.RESOURCE_HEADER, benchsuite.resource_rows(entries)))
    kept = len(entries) - len(new)
    if kept:
        print(f"\n({kept} earlier entr{'y' if kept == 1 else 'ies'} of {json_path} kept)")
    print(f"\nwrote {json_path} and {md_path}")
    failed = [e["name"] for e in new if e["status"] == "failed"]
    if failed:
        print(f"bench: {len(failed)} failed: {', '.join(failed)} (see {args.out / 'logs'})")
    if interrupted:
        print("bench: interrupted; the benchmarks that finished are written")
        return 130
    return 1 if failed else 0
