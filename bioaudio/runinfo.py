"""Provenance of a run: what ran, with which software, on which machine, on which data.

Every run directory's `config.json` and every export's `config.json` carry
`provenance.environment` (this module's `environment()`: the command line, the accelerate launch
world size, the bioaudio version and git commit, Python / torch / torchaudio / accelerate versions,
the host, CPU and GPU models) and the Trainer adds `provenance.training` (device, processes,
precision, seeds and a fingerprint of the data: rows, total duration, sha256).

Every lookup degrades to None instead of failing: `git` may be absent, the package may be an
installed copy outside any checkout, /proc/cpuinfo exists only on Linux.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_COMMAND_LINE: list[str] | None = None


def set_command_line(argv: Sequence[str]) -> None:
    """Record the bioaudio command line being run (`bioaudio.cli.main` calls this)."""
    global _COMMAND_LINE
    _COMMAND_LINE = [str(a) for a in argv]


def command_line() -> dict[str, Any]:
    """The command being run: `bioaudio COMMAND ...` as parsed, the process's own sys.argv, the
    working directory and the world size of an `accelerate launch` (1 without one)."""
    argv = _COMMAND_LINE if _COMMAND_LINE is not None else [str(a) for a in sys.argv]
    return {
        "command_line": shlex.join(argv),
        "argv": list(argv),
        "sys_argv": [str(a) for a in sys.argv],
        "cwd": os.getcwd(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
    }


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def bioaudio_version() -> str:
    """The installed bioaudio version; "unknown" in a source tree that is not installed."""
    try:
        return _version("bioaudio") or "unknown"
    except Exception:  # broken package metadata
        return "unknown"


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            # Read-only: never take the index lock another git process (or person) may hold.
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return r.stdout if r.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package; (None, None) when there is none."""
    root = Path(__file__).resolve().parent.parent
    # An installed copy (site-packages) is no checkout, even when a repository encloses it.
    if not (root / ".git").exists():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit.strip(), (bool(status.strip()) if status is not None else None)


@functools.lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    """Versions of bioaudio (and its git commit) and of the libraries that decide the numbers."""
    commit, dirty = git_state()
    return {
        "bioaudio_version": _version("bioaudio"),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchaudio": _version("torchaudio"),
        "accelerate": _version("accelerate"),
        "numpy": _version("numpy"),
    }


def cpu_model() -> str | None:
    """The CPU model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


@functools.lru_cache(maxsize=1)
def hardware() -> dict[str, Any]:
    """Host, platform, CPU model and count, visible GPUs and the CUDA version torch was built
    with."""
    import torch

    gpus: list[str] = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": platform.node() or None,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
    }


def environment() -> dict[str, Any]:
    """Command line + software + hardware: `provenance.environment` of runs and exports."""
    return {**command_line(), **software(), **hardware()}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _total_seconds(table: Any) -> float | None:
    cols = set(table.columns)
    if {"start", "end"} <= cols:
        dur = table["end"] - table["start"]
        if "duration" in cols:
            dur = dur.fillna(table["duration"])
        return round(float(dur.sum()), 3)
    if "duration" in cols:
        return round(float(table["duration"].sum()), 3)
    return None


def data_fingerprint(path: str | Path, table: Any = None) -> dict[str, Any]:
    """What the data was: a manifest file's rows, total duration (seconds) and sha256; for a
    folder (no manifest file) the sha256 is that of the resolved table (path, start, end).
    `table`: the rows as read (saves reading the manifest again)."""
    import pandas as pd

    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve())}
    if p.is_file():
        if table is None:
            table = pd.read_csv(p)
        out["sha256"] = sha256_file(p)
    elif table is not None:
        cols = [c for c in ("path", "start", "end") if c in table.columns]
        text = table[cols].to_csv(index=False)
        out["sha256"] = hashlib.sha256(text.encode()).hexdigest()
        out["sha256_of"] = "file table (path, start, end)"
    if table is not None:
        out["rows"] = int(len(table))
        out["duration_s"] = _total_seconds(table)
    return out
