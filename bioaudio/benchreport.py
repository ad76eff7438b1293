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
