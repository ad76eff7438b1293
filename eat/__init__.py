"""EAT encoder (official fairseq / Hugging Face checkpoint compatible) and its converter."""

from .model import EATConfig, EATEncoder, EATModel

__all__ = ["EATConfig", "EATEncoder", "EATModel"]
