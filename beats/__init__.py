"""BEATs encoder (official-checkpoint compatible), its converter, and the acoustic tokenizers."""

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

__all__ = [
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
