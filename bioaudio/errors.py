"""Typed errors. The CLI turns any of these into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class BioaudioError(Exception):
    """Base class of every error the user can fix (bad input, bad flags, bad files)."""


class ConfigError(BioaudioError):
    """A flag, config file or flag combination that cannot work."""


class DataError(BioaudioError):
    """A dataset, manifest or label file that cannot be used."""


class AudioDecodeError(BioaudioError):
    """An audio file that cannot be read. Carries the path and the reason."""

    def __init__(self, path: str | Path, reason: str | None = None):
        # One-argument form: PyTorch re-creates worker exceptions from their message alone.
        self.path = str(path)
        self.reason = reason or ""
        super().__init__(
            f"cannot read audio {self.path}: {reason}" if reason is not None else str(path)
        )


class CheckpointError(BioaudioError):
    """A checkpoint or export that cannot be loaded (unknown format, truncated, wrong shapes)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
