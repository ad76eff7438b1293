"""The benchmark suite behind `bioaudio bench`: find the scripts in `benchmarks/`, run each in its
own process, collect the figures it reports (`bioaudio.benchreport`), and write one results file
and one table.

A script is named by its file (bench_fbank.py -> fbank, ssl_probe.py -> ssl_probe) and run as
`python SCRIPT --json TMP [--quick]` from the checkout root, its output streamed to the console
and to OUT/logs/NAME.txt. Its wall time and peak resident memory come from the operating system:
a small launcher process forks the script and `os.wait4` gives the script's own `ru_maxrss`,
which on Linux is the largest resident set of the script or of any of its waited-for
descendants (DataLoader workers, its own subprocesses), in KiB (bytes on macOS). A failing script
is recorded with the last line it printed and the suite goes on; Ctrl-C stops the running script
(and everything it started) and keeps what finished.

OUT/bench_results.json holds the machine, the time, the git commit and one entry per benchmark
(with its own time, machine and git commit, so `--only NAME --overwrite` refreshes one entry and
keeps the others); OUT/bench_results.md is the same table in markdown, ready for the README.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bioaudio import runinfo, runlog
from bioaudio.benchreport import format_target, format_value
from bioaudio.errors import ConfigError
from bioaudio.fileio import check_writable, save_json_atomic, write_text_atomic

RESULTS_JSON = "bench_results.json"
RESULTS_MD = "bench_results.md"


@dataclass
class Script:
    """A benchmark script and what it declares for the suite.

    A script may declare, at module level, `BENCH_SUITE = {"long": "why", "needs": ["path"]}`
    (read from its source, never imported): "long" keeps it out of --quick runs unless named by
    --only; each "needs" path (relative to the checkout root, e.g. its `--data` default) must
    exist or the script is skipped with that reason."""

    name: str
    path: Path
    summary: str  # the first sentence of its docstring
    long: str | None = None
    needs: tuple[str, ...] = ()


def default_folder() -> Path:
    """`benchmarks/` of the source checkout that holds this package."""
    return Path(__file__).resolve().parents[1] / "benchmarks"


def _summary(doc: str, limit: int = 110) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    for end in (". ", "? "):
        if end in para:
            para = para[: para.index(end) + 1]
            break
    return para if len(para) <= limit else para[: limit - 3].rstrip() + "..."


def read_script(path: Path) -> Script:
    """Name, summary and BENCH_SUITE declaration of a script, from its source."""
    import ast

    doc, declared = "", {}
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree) or ""
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "BENCH_SUITE" for t in node.targets
            ):
                declared = ast.literal_eval(node.value)
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        pass  # a script that does not parse fails when run, with its own message
    if not isinstance(declared, dict):
        declared = {}
    needs = declared.get("needs") or ()
    return Script(
        script_name(path),
        path,
        _summary(doc),
        long=declared.get("long") or None,
        needs=(needs,) if isinstance(needs, str) else tuple(map(str, needs)),
    )


def script_name(path: Path) -> str:
    return path.stem.removeprefix("bench_")


def discover(folder: Path | None = None) -> list[Script]:
    """The benchmark scripts of `folder` (default: the checkout's benchmarks/), sorted by name."""
    given = folder is not None
    folder = Path(folder) if given else default_folder()
    if not folder.is_dir():
        hint = (
            ""
            if given
            else " (the suite runs from a source checkout: git clone the project, or pass "
            "--benchmarks DIR)"
        )
        raise ConfigError(f"no benchmarks folder at {folder}{hint}")
    paths = [p for p in folder.glob("*.py") if not p.name.startswith("_")]
    scripts = sorted((read_script(p) for p in paths), key=lambda s: s.name)
    if not scripts:
        raise ConfigError(f"no benchmark scripts (*.py) in {folder}")
    return scripts


def select(
    scripts: list[Script], only: list[str] | None, quick: bool
) -> list[tuple[Script, str | None]]:
    """(script, reason it is skipped or None) for the scripts this run covers."""
    names = [s.name for s in scripts]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ConfigError(
                f"unknown benchmark{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"valid: {', '.join(names)}"
            )
        chosen = [s for s in scripts if s.name in only]
    else:
        chosen = scripts
    out = []
    for s in chosen:
        reason = None
        missing = [n for n in s.needs if not (s.path.parent.parent / n).exists()]
        if s.long and quick and not only:
            reason = f"long ({s.long}): runs in a full run or with --only {s.name}"
        elif missing:
            where = (s.path.parent.parent / missing[0]).resolve()
            reason = f"needs {where}, which is missing"
        out.append((s, reason))
    return out


def machine() -> dict[str, Any]:
    """The machine and software the figures were measured with."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        **runinfo.hardware(),
        **runinfo.software(),
        "cpu_model": runinfo.cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# Runs one script and reports its rusage. The script is forked from this small process, not from
# the suite's: on Linux a child's ru_maxrss starts at the size of the process it was forked from
# (the parent's pages count until exec), which for the suite (torch imported) is ~650 MB. SIGINT
# is ignored here (the script handles it; the launcher waits for it to finish).
LAUNCHER = """
import json, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execv(sys.argv[2], sys.argv[2:])
signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(pid, sig))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss": usage.ru_maxrss, "exit_code": os.waitstatus_to_exitcode(status)}, f)
"""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """Set `handler` for Ctrl-C, SIGTERM and SIGHUP while the block runs (main thread only:
    elsewhere the defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the script and everything it started (its own process group): SIGINT as Ctrl-C
    would, then SIGTERM, then SIGKILL. A second Ctrl-C meanwhile does not cut this short (the
    group is in its own session: nothing else would stop it)."""
    with _signals(signal.SIG_IGN):
        for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass


def run_script(script: Script, out: Path, quick: bool, tmp: Path) -> dict[str, Any]:
    """Run one script; its entry in bench_results.json. Raises KeyboardInterrupt after stopping
    the script when the user interrupts (the script's log is kept)."""
    log = out / "logs" / f"{script.name}.txt"
    log.unlink(missing_ok=True)
    result_json = tmp / f"{script.name}.json"
    usage_json = tmp / f"{script.name}.rusage.json"
    cmd = [sys.executable, str(script.path), "--json", str(result_json)]
    cmd += ["--quick"] if quick else []
    entry: dict[str, Any] = {
        "name": script.name,
        "script": _shown(script.path),
        "command": f"python {_shown(script.path)}" + (" --quick" if quick else ""),
        "created": now(),
        "quick": quick,
        "load_average": [round(os.getloadavg()[0], 2)],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    tail = ""
    # SIGTERM / SIGHUP to the suite (a scheduler, a closed terminal) stop the script like Ctrl-C.
    with _signals(_raise_interrupt):
        # Its own session (process group): Ctrl-C reaches the suite only, which then stops the
        # whole group (the script, its DataLoader workers, its subprocesses) in order.
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage_json), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=script.path.parent.parent,
            env=env,
            start_new_session=True,
        )
        try:
            with runlog.session():
                runlog.attach(log, replay=False)
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                    text = decoder.decode(chunk)
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    tail = (tail + text)[-8192:]
                text = decoder.decode(b"", final=True)
                sys.stdout.write(text)
                tail += text
                if tail and not tail.endswith("\n"):
                    sys.stdout.write("\n")
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    entry["load_average"].append(round(os.getloadavg()[0], 2))
    try:
        usage = json.loads(usage_json.read_text())
    except (OSError, ValueError):  # the launcher itself died
        usage = {"maxrss": None, "exit_code": proc.returncode}
    scale = 2**20 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    rss = usage["maxrss"]
    entry["peak_rss_mb"] = round(rss / scale, 1) if rss else None
    entry["exit_code"] = code = usage["exit_code"]
    entry["log"] = str(log.relative_to(out))
    if code != 0:
        last = _last_line(tail) or "(no output)"
        return {**entry, "status": "failed", "error": f"exit code {code}: {last}"}
    try:
        report = json.loads(result_json.read_text(encoding="utf-8"))
        figures = list(report["figures"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = "wrote no --json results" if isinstance(e, OSError) else f"bad --json results ({e})"
        return {**entry, "status": "failed", "error": f"exit code 0 but {why}"}
    plots = _copy_plots(report.get("plots") or [], script, out)
    return {
        **entry,
        "status": "ok",
        "compares": report.get("compares", ""),
        "figures": figures,
        "plots": plots,
        "notes": list(report.get("notes") or []),
    }


def _shown(path: Path) -> str:
    """`path` relative to the checkout root (benchmarks/NAME.py) when it is inside it."""
    root = path.resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _copy_plots(plots: list[str], script: Script, out: Path) -> list[str]:
    """Copy the script's plots into OUT/plots/NAME/ (they may live in a temporary folder)."""
    kept = []
    for p in plots:
        src = Path(p) if Path(p).is_absolute() else script.path.parent.parent / p
        if not src.is_file():
            continue
        dst = out / "plots" / script.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        kept.append(str(dst.relative_to(out)))
    return kept


def skipped_entry(script: Script, reason: str, quick: bool) -> dict[str, Any]:
    return {
        "name": script.name,
        "script": _shown(script.path),
        "created": now(),
        "quick": quick,
        "status": "skipped",
        "reason": reason,
    }


def check_out(out: Path, overwrite: bool) -> Path:
    """Refuse (one line) an existing results file without --overwrite; check OUT is writable."""
    check_writable(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    results = out / RESULTS_JSON
    if results.exists() and not overwrite:
        raise ConfigError(
            f"{results} exists; pass --overwrite to replace it (with --only NAME, to refresh "
            "those benchmarks and keep the others)"
        )
    return results


def load_previous(path: Path) -> list[dict[str, Any]]:
    """The entries of an earlier results file, for --only --overwrite."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["benchmarks"]
        if not all(isinstance(e, dict) and "name" in e for e in entries):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot keep the other benchmarks of {path}: not a bench results file ({e}); "
            "remove it or run the whole suite"
        ) from None
    return entries


def merge(
    previous: list[dict[str, Any]], new: list[dict[str, Any]], order: list[str]
) -> list[dict[str, Any]]:
    """`new` entries replace earlier ones of the same name (a skipped one keeps the earlier
    measurement); ordered by `order`, then any earlier entries of scripts no longer present."""
    by_name = {e["name"]: e for e in previous}
    for e in new:
        if e["status"] == "skipped" and e["name"] in by_name:
            continue
        by_name[e["name"]] = e
    known = [by_name.pop(n) for n in order if n in by_name]
    return known + list(by_name.values())


def build_results(
    entries: list[dict[str, Any]], quick: bool, info: dict[str, Any]
) -> dict[str, Any]:
    return {
        "machine": info,
        "created": now(),
        "quick": quick,
        "git": info.get("git_commit"),
        "git_dirty": info.get("git_dirty"),
        "benchmarks": entries,
    }


# ----------------------------------------------------------------------------------------------
# Tables


def _met(f: dict[str, Any]) -> str:
    return {True: "yes", False: "NO"}.get(f.get("met"), "-")


def figure_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """benchmark, figure, value, target, met, note: one row per figure; one row per benchmark
    without figures (failed, skipped) saying why."""
    rows = []
    for e in entries:
        if e["status"] != "ok":
            why = e.get("error") or e.get("reason") or ""
            rows.append([e["name"], f"({e['status']})", "", "", "-", why])
            continue
        for f in e.get("figures", []):
            value = f.get("value")
            text = format_value(float("nan") if value is None else value, f.get("unit", ""))
            rows.append(
                [e["name"], f["figure"], text, format_target(f), _met(f), f.get("note", "")]
            )
    return rows


def resource_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """benchmark, status, wall time, peak RSS, load average (start-end), measured, log."""
    rows = []
    for e in entries:
        seconds = e.get("seconds")
        rss = e.get("peak_rss_mb")
        load = "-".join(f"{x:.1f}" for x in e.get("load_average", []))
        when = e.get("created", "")[:16].replace("T", " ")
        rows.append(
            [
                e["name"],
                e["status"],
                _duration(seconds),
                f"{rss:,.0f} MB" if rss is not None else "",
                load,
                when + (" quick" if e.get("quick") else ""),
                e.get("log", ""),
            ]
        )
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else runlog.hms(seconds)


FIGURE_HEADER = ["benchmark", "figure", "value", "target", "met", "note"]
RESOURCE_HEADER = [
    "benchmark",
    "status",
    "wall time",
    "peak RSS",
    "load avg",
    "measured (UTC)",
    "log",
]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width columns; the last column runs free."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for i, r in enumerate([header, *rows]):
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(lines)


def machine_line(info: dict[str, Any], quick: bool, created: str) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    commit = (info.get("git_commit") or "unknown")[:10]
    dirty = " (uncommitted changes)" if info.get("git_dirty") else ""
    return (
        f"Machine: {info.get('cpu_model') or 'unknown CPU'}, {info.get('logical_cores')} logical "
        f"cores, CPU capability {info.get('cpu_capability')}, device {info.get('device')}{gpu}; "
        f"torch {info.get('torch')}; bioaudio {commit}{dirty}; {created[:10]}"
        f"{', --quick' if quick else ''}."
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: dict[str, Any]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        return out

    entries = results["benchmarks"]
    lines = [machine_line(results["machine"], results["quick"], results["created"]), ""]
    lines += table(FIGURE_HEADER, figure_rows(entries))
    lines += ["", *table(RESOURCE_HEADER[:-1], [r[:-1] for r in resource_rows(entries)])]
    compares = [f"- {e['name']}: {e['compares']}" for e in entries if e.get("compares")]
    if compares:
        lines += ["", "What each benchmark compares:", "", *compares]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """OUT/bench_results.json and OUT/bench_results.md, each written atomically."""
    return (
        save_json_atomic(out / RESULTS_JSON, results),
        write_text_atomic(out / RESULTS_MD, markdown(results)),
    )


def run_suite(
    chosen: list[tuple[Script, str | None]], out: Path, quick: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Run the chosen scripts in order: (entries, interrupted). Status lines go to the console."""
    entries: list[dict[str, Any]] = []
    runnable = [s for s, reason in chosen if reason is None]
    with tempfile.TemporaryDirectory(prefix="bioaudio-bench-") as tmp:
        i = 0
        for script, reason in chosen:
            if reason is not None:
                print(f"bench: {script.name}: skipped: {reason}", flush=True)
                entries.append(skipped_entry(script, reason, quick))
                continue
            i += 1
            flag = " --quick" if quick else ""
            print(
                f"\nbench [{i}/{len(runnable)}] {script.name}: {script.path.name}{flag}",
                flush=True,
            )
            try:
                entry = run_script(script, out, quick, Path(tmp))
            except KeyboardInterrupt:
                print(f"bench: {script.name}: interrupted; stopping", flush=True)
                return entries, True
            entries.append(entry)
            if entry["status"] == "ok":
                met = [f.get("met") for f in entry["figures"] if f.get("met") is not None]
                targets = f"{sum(met)} of {len(met)} targets met" if met else "no targets"
                n = len(entry["figures"])
                done = f"ok, {n} figure{'s' if n != 1 else ''}, {targets}"
            else:
                done = f"FAILED ({entry['error']})"
            print(
                f"bench [{i}/{len(runnable)}] {script.name}: {done} in "
                f"{_duration(entry['seconds'])}, peak RSS {entry['peak_rss_mb'] or 0:,.0f} MB",
                flush=True,
            )
    return entries, False
