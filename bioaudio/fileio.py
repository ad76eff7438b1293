"""Atomic writes: every file and folder the toolkit produces appears whole or not at all.

A reader (another process, a resumed run, a user opening a CSV) never sees half a file: a file is
written under a temporary name beside its target (same file system) and renamed into place; a
folder (an export, a training state, a feature cache) is filled under a temporary name and swapped
in, the previous one removed only after the swap succeeded. Temporary folders left by a killed
process are recognised by name and removed later (`remove_stale_temp_dirs`).

Outputs are checked before any work: `check_writable` (a parent that is a file, a read-only
place) and `guard_output` (never replace audio, the command's input, or a file that is not one
of our outputs of that kind, unless --overwrite). JSON never holds NaN (`json_safe`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bioaudio.errors import ConfigError

# Extensions we try to decode as audio (bioaudio.data.audio reads them; here so that output
# guards can refuse to write over audio without importing the data layer)
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav",
        ".wave",
        ".flac",
        ".ogg",
        ".oga",
        ".mp3",
        ".aif",
        ".aiff",
        ".aifc",
        ".w64",
        ".rf64",
        ".caf",
        ".opus",
    }
)


def is_audio_path(path: str | Path) -> bool:
    """True when the file name has an extension we try to decode."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS and not Path(path).name.startswith("._")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds,
    delete it when the block raises. The suffix is kept (writers that pick a format by it)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(p.parent, rf"^\.{re.escape(p.stem)}\.tmp-", p.suffix, STALE_AFTER_S)
    prefix = f".{p.stem}.tmp-p{os.getpid()}h{_host_tag()}-"
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=p.suffix, dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _match_umask(tmp, 0o666)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, +-inf) replaced by None: JSON has no NaN, and a
    bare `NaN` in a results file breaks strict readers (and hides that something went wrong)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(value.item())
    return value


def save_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON (indented, non-JSON values as str, non-finite numbers as null) atomically."""
    text = json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def write_csv_atomic(df: Any, path: str | Path, **kwargs: Any) -> Path:
    """`df.to_csv(path, **kwargs)` atomically (pandas DataFrame; index=False unless given)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(path)


def _match_umask(path: Path, mode: int) -> None:
    # mkstemp / mkdtemp create private entries; outputs are as shareable as any file the user makes
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir_beside(out: str | Path) -> Path:
    """A new empty folder next to `out` (same file system, so the final rename is atomic).

    Named `.<name>.tmp-p<pid>h<host>-<random>`, so a later run can tell a folder left by a killed
    process from one a running process is filling: those are removed first
    (`remove_stale_temp_dirs`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    prefix = f".{out.name}.tmp-p{os.getpid()}h{_host_tag()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    _match_umask(tmp, 0o777)
    return tmp


STALE_AFTER_S = 86400.0  # temp folders whose maker cannot be checked: removed after a day


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temp_dirs(out: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary folders `temp_dir_beside(out)` left behind by interrupted runs.

    A folder made on this machine by a process that no longer exists is removed; one made
    elsewhere (a shared file system) or named the older way (no process id) only once it has
    not changed for `max_age_s`. Folders of a running process and anything else are kept.
    Returns the folders removed."""
    out = Path(out)
    return _remove_stale(out.parent, rf"^\.{re.escape(out.name)}\.tmp-", "", max_age_s)


def _remove_stale(parent: Path, head: str, suffix: str, max_age_s: float) -> list[Path]:
    """Remove the entries of `parent` named `head` + `[p<pid>h<host>-]<random>` + `suffix` that an
    interrupted write left (`atomic_path` files, `temp_dir_beside` folders), by the rule of
    `remove_stale_temp_dirs`. Best effort: a folder that cannot be listed is left alone."""
    if not parent.is_dir():
        return []
    mine = re.compile(rf"{head}(?:p(\d+)h([0-9a-f]{{8}})-)?[^/]*{re.escape(suffix)}$")
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if mine.match(e.name)]
    except OSError:
        return []
    for e in entries:
        d = Path(e.path)
        if d.is_symlink():
            continue
        m = mine.match(e.name)
        pid, host = m.group(1), m.group(2)  # type: ignore[union-attr]
        if pid is not None and host == _host_tag():
            stale = not _pid_alive(int(pid))
        else:
            try:
                stale = time.time() - d.stat().st_mtime > max_age_s
            except OSError:
                stale = False
        if not stale:
            continue
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)
        removed.append(d)
    return removed


# ----------------------------------------------------------------------------------------------
# Outputs: never clobber what the command did not write, fail before any work when impossible


def check_writable(path: str | Path, flag: str = "--out") -> Path:
    """One-line ConfigError, before any work, when `path` cannot be written: an ancestor is a
    file, or the nearest existing folder is not writable. Returns `path`."""
    p = Path(path).expanduser()
    probe = p.parent if not p.exists() or not p.is_dir() else p
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link where a folder should be
            raise ConfigError(f"cannot write {flag} {p}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot write {flag} {p}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {flag} {p}: {probe} is not writable (permission denied)")
    return p


def guard_output(
    path: str | Path,
    *,
    what: str,
    ours: Callable[[Path], bool],
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse (one-line ConfigError) to write `what` to `path` when that would destroy a file the
    command did not make: an input of the command, an audio file, or an existing file that
    `ours(path)` does not recognise as one of our outputs of this kind. `overwrite` allows all.
    Also checks that `path` can be written at all (`check_writable`). Returns `path`."""
    from bioaudio.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; give a file name")
    check_writable(p, flag)
    if overwrite:
        return p
    hint = "; pass --overwrite to replace it anyway, or choose another path"
    for source in inputs:
        try:
            same = Path(source).exists() and p.exists() and os.path.samefile(source, p)
        except OSError:
            same = False
        if same:
            raise ConfigError(f"{flag} {p} is the command's input; refusing to overwrite it{hint}")
    if is_audio_path(p):
        raise ConfigError(
            f"{flag} {p} is named like an audio file; refusing to write {what} there{hint}"
        )
    if (p.exists() or p.is_symlink()) and not ours(p):
        raise ConfigError(
            f"{flag} {p} exists and is not a {what} written by bioaudio; refusing to replace it"
            f"{hint}"
        )
    return p


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder `src` to `dst`. An existing `dst` is renamed aside first and
    removed only once `src` is in place; if the move fails, the old `dst` is put back."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    try:
        src.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `out`; swap it in with `replace_dir` when the block
    succeeds, delete it when the block raises."""
    tmp = temp_dir_beside(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
