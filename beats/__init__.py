"""BEATs encoder (official-checkpoint compatible) and its converter."""

from .model import BEATsConfig, BEATsEncoder, BEATsModel

__all__ = ["BEATsConfig", "BEATsEncoder", "BEATsModel"]
