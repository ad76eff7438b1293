"""Model types -> encoder class, config class, AudioModel wrapper, default frontend.

bioaudio never imports `beats` or `eat` at module level: a spec names the module and classes, and
they are imported the first time a model of that type is built or loaded. New encoders register a
`ModelSpec` with `register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from bioaudio.config import from_dict
from bioaudio.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model type lives and how it preprocesses audio."""

    model_type: str
    module: str  # imported lazily, e.g. "beats.model"
    encoder: str  # encoder nn.Module class name in `module`
    config: str  # config dataclass name in `module` (with a `preset(name)` classmethod)
    wrapper: str  # AudioModel subclass name in `module`
    frontend: str  # FrontendConfig.official(kind) used by default
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    """Add (or replace) a model type."""
    _REGISTRY[spec.model_type] = spec


register(
    ModelSpec(
        "beats",
        "beats.model",
        "BEATsEncoder",
        "BEATsConfig",
        "BEATsModel",
        "beats_fbank",
        "BEATs (Chen et al. 2022), official microsoft/unilm checkpoints",
    )
)
register(
    ModelSpec(
        "eat",
        "eat.model",
        "EATEncoder",
        "EATConfig",
        "EATModel",
        "eat_fbank",
        "EAT (Chen et al. 2024), official fairseq and Hugging Face checkpoints",
    )
)


def model_types() -> list[str]:
    """Registered model type names."""
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> ModelSpec:
    """The spec of a model type, or a ConfigError listing the known ones."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ConfigError(
            f"unknown model type {model_type!r} (known: {', '.join(model_types())})"
        ) from None


def _attr(model_type: str, which: str) -> Any:
    spec = get_spec(model_type)
    module = importlib.import_module(spec.module)
    return getattr(module, getattr(spec, which))


def encoder_class(model_type: str) -> type:
    """The encoder nn.Module class of a model type."""
    return _attr(model_type, "encoder")


def config_class(model_type: str) -> type:
    """The encoder config dataclass of a model type."""
    return _attr(model_type, "config")


def wrapper_class(model_type: str) -> type:
    """The AudioModel subclass of a model type."""
    return _attr(model_type, "wrapper")


def encoder_config(model_type: str, cfg: Any = None) -> Any:
    """Resolve an encoder config: None (the `base` preset), a preset name, a dict or a config.

    A dict may name a preset under "preset" and override single fields.
    """
    cls = config_class(model_type)
    if cfg is None:
        return cls.preset("base")
    if isinstance(cfg, str):
        return cls.preset(cfg)
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        data = dict(cfg)
        preset = data.pop("preset", None)
        if preset is not None:
            base = dataclasses.asdict(cls.preset(preset))
            base.update(data)
            data = base
        return from_dict(cls, data, where=f"{model_type} encoder config")
    raise ConfigError(f"cannot build a {model_type} encoder config from {type(cfg).__name__}")


def build_encoder(model_type: str, cfg: Any = None) -> Any:
    """An encoder of a model type from a preset name, a dict or a config dataclass."""
    return encoder_class(model_type)(encoder_config(model_type, cfg))
