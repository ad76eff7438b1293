"""bioaudio: self-supervised pretraining and finetuning of BEATs and EAT for bioacoustics."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def load_model(path: Any, **kwargs: Any) -> Any:
    """Load an official BEATs / EAT checkpoint or one of our exports (see `bioaudio.checkpoint`)."""
    from bioaudio.models.checkpoint import load_model as _load_model

    return _load_model(path, **kwargs)
