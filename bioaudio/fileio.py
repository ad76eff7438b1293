"""Atomic writes: every file and folder the toolkit produces appears whole or not at all.

A reader (another process, a resumed run, a user opening a CSV) never sees half a file: a file is
written under a temporary name beside its target (same file system) and renamed into place; a
folder (an export, a training state, a feature cache) is filled under a temporary name and swapped
in, the previous one removed only after the swap succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds,
    delete it when the block raises. The suffix is kept (writers that pick a format by it)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.stem}.tmp-", suffix=p.suffix, dir=p.parent)
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


def save_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON (indented, non-JSON values as str) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


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


def temp_dir_beside(out: str | Path) -> Path:
    """A new empty folder next to `out` (same file system, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _match_umask(tmp, 0o777)
    return tmp


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
