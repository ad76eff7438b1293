"""BEATs encoder (official-checkpoint compatible), its converter, the acoustic tokenizers and the
pretraining objectives (imported lazily: inference never loads the training layer)."""

from typing import Any

from .model import BEATsConfig, BEATsEncoder, BEATsModel
from .quantizer import NormEMAVectorQuantizer, QuantizerConfig
from .tokenizer import (
    BEATsTokenizer,
    BEATsTokenizerConfig,
    RandomProjectionConfig,
    RandomProjectionTokenizer,
    TokenizerDistiller,
    TokenizerEstimator,
    is_official_tokenizer,
    load_official_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

_OBJECTIVE_NAMES = (
    "LabelPredictor",
    "MaskedTokenConfig",
    "MaskedTokenObjective",
    "TokenizerObjective",
    "TokenizerObjectiveConfig",
)

__all__ = [
    *_OBJECTIVE_NAMES,
    "BEATsConfig",
    "BEATsEncoder",
    "BEATsModel",
    "BEATsTokenizer",
    "BEATsTokenizerConfig",
    "NormEMAVectorQuantizer",
    "QuantizerConfig",
    "RandomProjectionConfig",
    "RandomProjectionTokenizer",
    "TokenizerDistiller",
    "TokenizerEstimator",
    "is_official_tokenizer",
    "load_official_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _OBJECTIVE_NAMES:
        from . import objective

        return getattr(objective, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
