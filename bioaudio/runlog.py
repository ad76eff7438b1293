"""Output of long-running commands for people and for schedulers.

- `session()` owns the console while a command runs (`bioaudio.cli.main` opens one around every
  command; the Trainer opens one when used as a library; nested calls share the outer one):
  * a terminal gets everything as written (progress bars included); a file, pipe or SLURM log
    gets finished lines only: a carriage return restarts the line, so a bar leaves its final
    state and nothing else;
  * only the main process (RANK 0) prints to stdout and shows warnings;
  * a warning is shown the first time; at the end, "warning "X" repeated N times";
  * every finished line is kept in memory, and written to the log files attached with
    `attach(path)` (log.txt of a run: opened for append, so resumes add to it).
- `attach(path)` starts a log file, replaying what the command printed so far (nothing is
  written before a command has checked its input, so a refused command leaves no file behind).
- `Progress`: a tqdm bar on a terminal; elsewhere one plain status line every `status_every`
  seconds (step, epoch, loss, throughput, elapsed, ETA). The clock is injectable.
- `peak_rss_mb()`, `cuda_peak_mb()`: resources for metrics.csv and summary.json.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

default_clock: Callable[[], float] = time.monotonic
"""The clock of new Progress objects (tests replace it with a fake one)."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_KEEP_LINES = 100_000  # lines kept for replay into a log file attached later


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def is_interactive(stream: Any) -> bool:
    """A terminal (or a Jupyter kernel, which renders tqdm widgets)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _Lines:
    """Writes -> finished lines as a terminal shows them: a carriage return restarts the line (a
    progress bar refresh), ANSI cursor codes are dropped, a line cleared by a bar is dropped."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit, self.buf, self.cr = emit, "", False

    def write(self, s: str) -> None:
        pieces = s.split("\n")
        for i, piece in enumerate(pieces):
            if "\r" in piece:
                self.buf, self.cr = piece.rsplit("\r", 1)[1], True
            else:
                self.buf += piece
            if i < len(pieces) - 1:
                self.finish()

    def finish(self) -> None:
        line = _ANSI.sub("", self.buf)
        if line.strip() or not self.cr:
            self.emit(line)
        self.buf, self.cr = "", False

    def close(self) -> None:
        if self.buf:
            self.finish()


class _Tee:
    """sys.stdout / sys.stderr while a session runs: the console (raw on a terminal, finished
    lines elsewhere) plus the session's record (finished lines, main process only)."""

    def __init__(self, session: Session, console: TextIO, quiet: bool):
        self._session, self._console, self._quiet = session, console, quiet
        self._to_console = None if session.interactive else _Lines(self._console_line)
        self._to_record = _Lines(session.record) if session.main else None

    def _console_line(self, line: str) -> None:
        self._console.write(line + "\n")
        self._console.flush()  # a scheduler's log file shows the line now, not at exit

    def write(self, s: str) -> int:
        s = str(s)
        with self._session.lock:
            if not self._quiet:
                if self._to_console is None:
                    self._console.write(s)
                else:
                    self._to_console.write(s)
            if self._to_record is not None:
                self._to_record.write(s)
        return len(s)

    def close_lines(self) -> None:
        with self._session.lock:
            for lines in (self._to_console, self._to_record):
                if lines is not None:
                    lines.close()

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._console.flush()

    def isatty(self) -> bool:
        return is_interactive(self._console) and self._session.interactive

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._console, "encoding", None) or "utf-8"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console, name)


class Session:
    """The console, log files and warning counts of one command (see the module docstring)."""

    def __init__(self, main: bool | None = None, console: TextIO | None = None):
        self.main = _is_main() if main is None else bool(main)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.interactive = is_interactive(console if console is not None else self.stderr)
        self.lock = threading.RLock()
        self.lines: collections.deque[str] = collections.deque(maxlen=_KEEP_LINES)
        self.n_lines = 0  # lines recorded since the start (the deque forgets the oldest)
        self.files: dict[Path, Any] = {}
        self.scopes: list[dict[str, Any]] = []
        self.warning_counts: dict[tuple[str, str], int] = {}
        self._warnings: Any = None

    # ---- lifetime

    def install(self) -> None:
        self._out = _Tee(self, self.stdout, quiet=not self.main)
        self._err = _Tee(self, self.stderr, quiet=False)
        sys.stdout, sys.stderr = self._out, self._err  # type: ignore[assignment]
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        if self.main:
            # "always" reaches our counter for every occurrence; appended, so the filters already
            # set (ignored categories, a library's own) keep precedence.
            warnings.simplefilter("always", append=True)
            warnings.showwarning = self._show_warning
        else:
            warnings.simplefilter("ignore")
        self.scopes.append({"mark": 0, "files": []})

    def uninstall(self) -> None:
        try:
            for tee in (self._out, self._err):
                tee.close_lines()
            repeated = [(k, n) for k, n in self.warning_counts.items() if n > 1]
            for (_, message), n in repeated:
                first = message.strip().splitlines()[0] if message.strip() else message
                sys.stderr.write(f'warning "{first}" repeated {n} times\n')
            self._err.close_lines()
        except (OSError, ValueError):
            pass  # a console closed under us (`| head`): the command's own error says enough
        finally:
            sys.stdout, sys.stderr = self.stdout, self.stderr
            self._warnings.__exit__(None, None, None)
            for scope in self.scopes:
                self._detach(scope)
            self.scopes = []

    def push(self) -> dict[str, Any]:
        scope = {"mark": self.n_lines, "files": []}
        self.scopes.append(scope)
        return scope

    def pop(self, scope: dict[str, Any]) -> None:
        with self.lock:
            try:
                for tee in (self._out, self._err):
                    tee.close_lines()  # a partial line belongs to the scope that wrote it
            except (OSError, ValueError):
                pass  # a closed console must not hide what the scope raised
            self._detach(scope)
            if scope in self.scopes:
                self.scopes.remove(scope)

    def _detach(self, scope: dict[str, Any]) -> None:
        for path in scope["files"]:
            f = self.files.pop(path, None)
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        scope["files"] = []

    # ---- records

    def record(self, line: str) -> None:
        """One finished line: kept for replay and appended to every attached log file."""
        with self.lock:
            self.lines.append(line)
            self.n_lines += 1
            for f in list(self.files.values()):
                try:
                    f.write(line + "\n")
                    f.flush()  # `tail -f log.txt` follows the run; a kill loses nothing
                except OSError:
                    pass

    def log_line(self, line: str) -> None:
        """A line for the log files only (status lines while a terminal shows a bar)."""
        if self.main:
            self.record(line)

    def attach(self, path: Path, replay: bool = True) -> None:
        if not self.main:
            return
        path = Path(path).absolute()
        with self.lock:
            if path in self.files:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open until the scope ends)
            from bioaudio.runinfo import command_line

            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            f.write(f"==> {now} {command_line()['command_line']} [pid {os.getpid()}]\n")
            scope = self.scopes[-1]
            if replay:
                start = max(scope["mark"], self.n_lines - len(self.lines))
                skip = start - (self.n_lines - len(self.lines))
                for i, line in enumerate(self.lines):
                    if i >= skip:
                        f.write(line + "\n")
            f.flush()
            self.files[path] = f
            scope["files"].append(path)

    def _show_warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        key = (category.__name__, str(message))
        n = self.warning_counts.get(key, 0) + 1
        self.warning_counts[key] = n
        if n == 1:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


_ACTIVE: Session | None = None


def active() -> Session | None:
    """The running session, or None."""
    return _ACTIVE


@contextlib.contextmanager
def session(main: bool | None = None, console: TextIO | None = None) -> Iterator[Session]:
    """Own the console for a command (see the module docstring). Nested calls open a scope of
    the running session: log files attached inside it close when it ends. `main`: whether this
    is the main process (default: RANK is 0 or unset)."""
    global _ACTIVE
    if _ACTIVE is not None:
        s = _ACTIVE
        scope = s.push()
        try:
            yield s
        finally:
            s.pop(scope)
        return
    s = Session(main=main, console=console)
    s.install()
    _ACTIVE = s
    try:
        yield s
    finally:
        try:
            s.uninstall()
        finally:
            _ACTIVE = None


def attach(path: str | Path, replay: bool = True) -> None:
    """Append everything printed from now on (and, with `replay`, what this scope printed so far)
    to `path` until the current session scope ends. No-op outside a session and on processes
    other than the main one."""
    if _ACTIVE is not None:
        _ACTIVE.attach(Path(path), replay=replay)


# ----------------------------------------------------------------------------------------------
# Progress


def hms(seconds: float | None) -> str:
    """0:01:05, or 2d 03:04:05 past a day; ? when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Progress of a loop: a tqdm bar on a terminal, else one plain status line every
    `status_every` seconds (and a last one at `close`), e.g.

        train step 120/1000 (12%) | epoch 1.20 | loss 0.4321 | 85.3 clips/s | elapsed 0:01:10 | ETA 0:08:30

    Status lines also go to the session's log files while a terminal shows the bar. `enabled`
    False: no bar and nothing on the console (the log files still get the status lines).
    `stream` / `interactive` default to the session's console (or sys.stderr); `clock` to
    `default_clock`. Use `Progress.steps` (training) or `Progress.audio` (embed, detect)."""

    def __init__(
        self,
        total: float | None,
        *,
        desc: str,
        amount: Callable[[float, float | None], str],
        rate: Callable[[float], str],
        unit: str = "it",
        initial: float = 0,
        status_every: float = 30.0,
        enabled: bool = True,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] | None = None,
        elapsed_offset: float = 0.0,
        bar_format: str | None = None,
        unit_scale: float = 1.0,
    ):
        self.total, self.desc, self.n = total, desc, float(initial)
        self._amount, self._rate = amount, rate
        self.status_every = float(status_every)
        self.clock = clock or default_clock
        self.elapsed_offset = float(elapsed_offset)
        self.fields: dict[str, Any] = {}
        self.t0 = self.clock()
        self._last_t, self._last_n, self._initial = self.t0, self.n, self.n
        self._lines_emitted = 0
        s = active()
        if interactive is None:
            interactive = s.interactive if (s is not None and stream is None) else None
            if interactive is None:
                interactive = is_interactive(stream if stream is not None else sys.stderr)
        self.interactive = interactive
        self.bar = None
        self._stream: TextIO | None = None
        if enabled and interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=stream,
                dynamic_ncols=True,
                bar_format=bar_format,
                unit_scale=unit_scale if unit_scale != 1.0 else False,  # 1.0 means "SI units"
            )
        elif enabled:
            self._stream = stream if stream is not None else sys.stderr
        # Lines only for the log files: the console shows a bar, or nothing.
        self._log_only = s.log_line if (s is not None and self._stream is None) else None

    @classmethod
    def steps(cls, total: int, *, batch_size: int, desc: str = "train", **kw: Any) -> Progress:
        """Optimizer steps; throughput in clips/s (steps/s x the global batch)."""

        def amount(n: float, t: float | None) -> str:
            return f"step {n:.0f}/{t:.0f}" if t else f"step {n:.0f}"

        return cls(
            total, desc=desc, unit="step", amount=amount,
            rate=lambda per_s: f"{per_s * batch_size:.3g} clips/s", **kw,
        )  # fmt: skip

    @classmethod
    def audio(cls, total_seconds: float, *, desc: str, **kw: Any) -> Progress:
        """Seconds of audio; throughput in audio hours/s and as a real-time factor."""

        def amount(n: float, t: float | None) -> str:
            return f"{n / 3600:.3f}/{(t or 0) / 3600:.3f} audio h"

        kw.setdefault(
            "bar_format",
            "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} audio s "
            "[{elapsed}<{remaining}{postfix}]",
        )
        return cls(
            total_seconds, desc=desc, unit="s", amount=amount,
            rate=lambda per_s: f"{per_s / 3600:.3g} audio h/s ({per_s:.0f}x real time)", **kw,
        )  # fmt: skip

    # ---- updates

    def update(self, n: float = 1, **fields: Any) -> None:
        """Advance by `n` (and set `fields`); emits a status line when one is due."""
        self.n += n
        self.fields.update(fields)
        now = self.clock()
        if self.bar is not None:
            self.bar.update(n)
            if n and now > self.t0:
                self.bar.set_postfix_str(self._postfix(now), refresh=False)
        if self.status_every > 0 and now - self._last_t >= self.status_every:
            self._emit(now)

    def set(self, **fields: Any) -> None:
        """Values shown in the status line and the bar (epoch, loss, ...); None hides one."""
        self.fields.update(fields)

    def _shown(self) -> list[tuple[str, Any]]:
        # The epoch first (where the run is), then the values in the order they were set.
        items = [(k, v) for k, v in self.fields.items() if v is not None]
        return sorted(items, key=lambda kv: kv[0] != "epoch")

    def _postfix(self, now: float) -> str:
        parts = [f"{k}={_fmt(v)}" for k, v in self._shown()]
        done = self.n - self._initial
        if done > 0:
            parts.append(self._rate(done / (now - self.t0)))
        return ", ".join(parts)

    def status_line(self, now: float | None = None) -> str:
        """The plain status line for the state at `now`."""
        now = self.clock() if now is None else now
        head = f"{self.desc} {self._amount(self.n, self.total)}"
        if self.total:
            head += f" ({100.0 * self.n / self.total:.0f}%)"
        parts = [head] + [f"{k} {_fmt(v)}" for k, v in self._shown()]
        window = now - self._last_t
        if window > 0 and self.n > self._last_n:
            parts.append(self._rate((self.n - self._last_n) / window))
        parts.append(f"elapsed {hms(self.elapsed_offset + now - self.t0)}")
        eta = None
        done, spent = self.n - self._initial, now - self.t0
        if self.total is not None and done > 0 and spent > 0:
            eta = max(self.total - self.n, 0.0) / (done / spent)
        parts.append(f"ETA {hms(eta)}")
        return " | ".join(parts)

    def _emit(self, now: float) -> None:
        line = self.status_line(now)
        self._last_t, self._last_n = now, self.n
        self._lines_emitted += 1
        if self._stream is not None:
            self._stream.write(line + "\n")
            self._stream.flush()
        elif self._log_only is not None:
            self._log_only(line)

    def close(self) -> None:
        """Close the bar; a last status line when anything happened since the previous one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.status_every > 0 and self.n > self._last_n:
            self._emit(self.clock())


# ----------------------------------------------------------------------------------------------
# Resources


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where `resource` does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def cuda_peak_mb(device: Any) -> float | None:
    """Peak CUDA memory allocated by torch on `device` in MiB (None off CUDA)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
