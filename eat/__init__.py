"""EAT encoder (official fairseq / Hugging Face checkpoint compatible), its converter and the
EAT pretraining objective (imported lazily: inference never loads the training layer)."""

from typing import Any

from .model import EATConfig, EATEncoder, EATModel

_OBJECTIVE_NAMES = ("Decoder2d", "EATObjective", "EATObjectiveConfig")

__all__ = ["EATConfig", "EATEncoder", "EATModel", *_OBJECTIVE_NAMES]


def __getattr__(name: str) -> Any:
    if name in _OBJECTIVE_NAMES:
        from . import objective

        return getattr(objective, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
