"""Which paths the app may touch: only under the data and run folders it was started with.

Every path typed into the UI goes through `PathPolicy.resolve`: relative paths are taken from
the first allowed folder of their kind, `~` is expanded, symlinks and `..` are resolved first, and
a path that lands outside every allowed folder is refused with a message (not an exception trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bioaudio.errors import ConfigError

Kind = Literal["data", "runs", "any"]


class OutsideRootsError(ConfigError):
    """A path typed into the app that lies outside its data and run folders."""


@dataclass
class PathPolicy:
    """The data folders (read) and run folders (read and write) the app was started with."""

    data_dirs: list[Path] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dirs = [Path(p).expanduser().resolve() for p in self.data_dirs]
        self.run_dirs = [Path(p).expanduser().resolve() for p in self.run_dirs]

    def roots(self, kind: Kind = "any") -> list[Path]:
        if kind == "data":
            return self.data_dirs
        if kind == "runs":
            return self.run_dirs
        return self.data_dirs + self.run_dirs

    def describe(self, kind: Kind = "any") -> str:
        return ", ".join(str(r) for r in self.roots(kind)) or "(none given)"

    def resolve(self, text: str | Path, kind: Kind = "any", must_exist: bool = False) -> Path:
        """The absolute path of `text` when it lies under an allowed folder of `kind`."""
        raw = str(text).strip()
        roots = self.roots(kind)
        if not raw:
            raise ConfigError("give a path")
        if not roots:
            what = {"data": "data folder (--data_dir)", "runs": "run folder (--runs_dir)"}
            raise OutsideRootsError(
                f"no {what.get(kind, 'data or run folder')} was given when the app started"
            )
        p = Path(raw).expanduser()
        candidates = [p] if p.is_absolute() else [r / p for r in roots]
        for c in candidates:
            resolved = c.resolve()  # follows symlinks and `..` before the check
            if any(resolved == r or resolved.is_relative_to(r) for r in roots):
                if must_exist and not resolved.exists():
                    continue
                return resolved
        if must_exist and any(
            c.resolve().is_relative_to(r) or c.resolve() == r for c in candidates for r in roots
        ):
            raise ConfigError(f"{raw}: no such file or folder")
        raise OutsideRootsError(
            f"{raw} is outside the folders this app may use ({self.describe(kind)})"
        )

    def contains(self, path: str | Path, kind: Kind = "any") -> bool:
        """True when an existing or future `path` lies under an allowed folder of `kind`."""
        resolved = Path(path).expanduser().resolve()
        return any(resolved == r or resolved.is_relative_to(r) for r in self.roots(kind))


def common_root(paths: Sequence[str]) -> Path | None:
    """The deepest folder holding every path, or None when they share none but '/'."""
    import os

    if not paths:
        return None
    root = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    return None if root == Path(root.anchor) else root
