"""The run directory: identity (what must match to resume), resolved config, complete states,
metrics.csv, and the lock that keeps two processes out of one run.

    config.json      resolved config + identity of the model/task (checked on resume) +
                     provenance (bioaudio.runinfo: command line, versions, machine, seeds, data)
    metrics.csv      one row per log / eval step; rows after a resumed step are dropped;
                     samples_per_s, data_wait (fraction of step time waiting for data), peak_rss_mb
    log.txt          everything printed during the run, appended across resumes
    state/step_N/    Accelerate state + trainer_state.json + COMPLETE marker, last K kept
    export/, best/   final and best model
    summary.json     status, steps, time, samples/s, final and best metrics, resources
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bioaudio.config import to_dict
from bioaudio.errors import ConfigError
from bioaudio.fileio import atomic_path, check_writable, save_json_atomic

STATE_FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


def model_identity(
    model: nn.Module, task: Any = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What must match to resume a run: model class, parameter names/shapes/dtypes, task class."""
    digest = hashlib.sha1()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    identity: dict[str, Any] = {
        "model": type(model).__qualname__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "signature": digest.hexdigest()[:16],
    }
    if task is not None:
        identity["task"] = type(task).__qualname__
    if extra:
        identity.update(extra)
    return json.loads(json.dumps(identity, default=str))


def frontend_identity(frontend: Any) -> dict[str, Any]:
    """Identity keys of a frontend config: its kind under "frontend" and every setting as
    "frontend.<name>" (sample rate, mel bins, FFT, hop, statistics, ...), so resuming a run with
    other features is refused, naming the setting that differs."""
    data = to_dict(frontend) if dataclasses.is_dataclass(frontend) else dict(frontend)
    kind = data.pop("kind", None)
    return {"frontend": kind, **{f"frontend.{k}": v for k, v in sorted(data.items())}}


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old vs new` for every identity key that differs. Keys the saved identity does not
    have were added by a later version and are not compared (older runs stay resumable)."""
    return [
        f"{k}: {old.get(k)!r} vs {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k in old and old.get(k) != new.get(k)
    ]


def write_run_config(out_dir: str | Path, config: Any) -> Path:
    """Write the resolved run config (a dataclass or mapping) to out_dir/config.json atomically."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else to_dict(dict(config))
    path = Path(out_dir) / "config.json"
    save_json_atomic(path, data)
    return path


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object of a run file (summary.json, config.json, test_metrics.json); None when
    it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete_state(path: Path) -> bool:
    return (path / "COMPLETE").is_file() and (path / "trainer_state.json").is_file()


def list_states(state_root: str | Path) -> list[Path]:
    """Complete `step_N` states under `state_root`, oldest first (half-written ones are skipped)."""
    root = Path(state_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and is_complete_state(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def find_resume_state(path: str | Path) -> Path | None:
    """The state to resume from `path`: a state dir itself, or the newest complete state of a run
    directory (`path/state/step_N`) or of a `state/` folder. None if there is none."""
    p = Path(path)
    if is_complete_state(p):
        return p
    for root in (p / "state", p):
        states = list_states(root)
        if states:
            return states[-1]
    return None


class MetricsCSV:
    """metrics.csv with a header that grows when new keys appear (then the file is rewritten)."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []

    def start(self, keep_up_to: int | None) -> None:
        """Fresh file, or keep the rows with step <= keep_up_to (a resumed run)."""
        self.columns, self.rows = [], []
        if keep_up_to is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                for row in reader:
                    # A row cut by a kill has missing fields (None) or an unparsable step.
                    if None in row.values() or None in row:
                        continue
                    try:
                        step = int(row["step"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    if step <= keep_up_to:
                        self.rows.append(row)
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.is_file():
            self.columns.extend(new)
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="", lineterminator="\n")
            writer.writerow(self._fmt(row))

    @staticmethod
    def _fmt(row: dict[str, Any]) -> dict[str, str]:
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in row.items()}

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="", lineterminator="\n")
            writer.writeheader()
            for row in self.rows:
                writer.writerow(self._fmt(row))


def lock_run_dir(out: Path) -> Any:
    """Hold an exclusive lock on `out/.lock` (released by closing the returned file)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, as before
        return None
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ConfigError(
            f"--out {out} is being used by another running training process; "
            "wait for it to finish or choose another --out"
        ) from None
    return fh


# What a run folder (one training run) or an experiment root (runs of seeds / folds) may hold
# besides runs: the command's own log and lists, and what the seed scripts (scripts/*.sh)
# prepare into their --save_dir before training there.
_OWN_FILES = {"log.txt", "skipped.csv", "run_summary.csv", "manifest.csv", "labels_resolved.csv"}


_RUN_NAME = re.compile(r"^(seed|fold)_[\w.-]+$")  # the run folders an experiment names


def _command_of(folder: Path) -> str | None:
    cfg = read_json_object(folder / "config.json")
    return str(cfg.get("command") or "?") if cfg is not None else None


def check_out_folder(out: str | Path, command: str, kind: str) -> None:
    """One-line ConfigError, before any work, when `--out` is an existing folder that is not
    of this command's kind: `kind` "run" (one training run: pretrain) or "experiment" (a
    RUN_ROOT of runs: finetune, train-baseline). New, empty or own folders pass, so re-running
    a command resumes it; another command's run or a folder of other files (audio, data) is
    never written into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    check_writable(out)
    if not out.is_dir():
        return
    entries = [e for e in out.iterdir() if not e.name.startswith(".")]
    if not entries:
        return
    here = _command_of(out)
    found = {e.name: _command_of(e) for e in entries if e.is_dir()}
    runs = {name: cmd for name, cmd in found.items() if cmd is not None}
    hint = "; choose a new or empty --out folder"
    if kind == "run":
        if here is not None and here != command:
            raise ConfigError(f"--out {out} holds a `{here}` run, not a {command} run{hint}")
        if here is None and runs:
            cmds = ", ".join(sorted({c for c in runs.values() if c}))
            raise ConfigError(f"--out {out} holds the runs of an experiment ({cmds}){hint}")
    else:
        if here is not None:
            raise ConfigError(
                f"--out {out} is a single `{here}` run folder, not a {command} RUN_ROOT{hint}"
            )
        other = sorted({c for c in runs.values() if c not in (command, "?")})
        if other:
            raise ConfigError(
                f"--out {out} holds runs of `{', '.join(other)}`, not {command}{hint}"
            )
    known = _OWN_FILES | set(runs) | {"config.json", "summary.json", "metrics.csv", "export",
                                      "state", "best", "tensorboard", "sanity_overfit"}  # fmt: skip
    foreign = sorted(e.name for e in entries if e.name not in known and not _RUN_NAME.match(e.name))
    if here is None and not runs and foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(f"--out {out} is not empty and holds no {command} run ({shown}){hint}")


def read_skipped(csv_path: Path) -> dict[str, str]:
    """path -> reason of a run's skipped.csv (empty when missing or unreadable): what a resumed
    run's earlier sessions could not read still counts."""
    import pandas as pd

    if not csv_path.is_file():
        return {}
    try:
        old = pd.read_csv(csv_path, dtype=str).fillna("")
        return dict(zip(old["path"], old["reason"]))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError):
        return {}
