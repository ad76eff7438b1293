"""The registry: the one place that names model types, checkpoint formats and pretraining
objectives. Adding a model or a format touches its own package and one `register_*` call here.

Nothing is imported until it is used: a spec names a module and attributes, imported the first
time a model of that type is built or a file of that format is read. So `bioaudio` never imports
`beats` or `eat` at module level (they import `bioaudio`, not the other way round).

- `ModelSpec`: a model type -> its wrapper class (`from_config(config) -> model`, the class an
  export of that type is rebuilt with), and for transformer encoders the encoder class, its
  config dataclass (with `preset(name)`) and the default frontend.
- `FormatSpec`: an official checkpoint format -> `detect(obj) -> bool` and
  `load(obj, source, **options) -> model`. `reads` says what `detect` / `load` receive: "torch"
  (the object of a .pt file read without executing code) or "hf" (a Hugging Face folder: the
  parsed config.json dict for `detect`, (weights path, config path) for `load`). `produces` is
  "model" (an AudioModel, read by `load_model`) or "tokenizer" (read by `load_tokenizer`).
- `ObjectiveSpec`: a pretraining objective name -> its `Objective` class and the model types it
  serves.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Literal

from bioaudio.config import from_dict
from bioaudio.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model type lives and how it preprocesses audio."""

    model_type: str
    module: str  # imported lazily, e.g. "beats.model"
    wrapper: str  # class with `from_config(config)`: AudioModel subclass or BaselineClassifier
    encoder: str = ""  # encoder nn.Module class name in `module` (transformers only)
    config: str = ""  # encoder config dataclass name in `module` (with `preset(name)`)
    frontend: str = ""  # FrontendConfig.official(kind) used by default
    presets: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class FormatSpec:
    """An official checkpoint format: how to recognise it and how to load it."""

    name: str
    module: str
    detect: str
    load: str
    reads: Literal["torch", "hf"] = "torch"
    produces: Literal["model", "tokenizer"] = "model"
    description: str = ""
    saved_reader: str = ""  # reads this product from a folder this toolkit saved (tokenizers)
    saver: str = ""  # writes such a folder


@dataclass(frozen=True)
class ObjectiveSpec:
    """A pretraining objective and the model types it can train."""

    name: str
    module: str
    cls: str
    model_types: tuple[str, ...]
    description: str = ""


_MODELS: dict[str, ModelSpec] = {}
_FORMATS: dict[str, FormatSpec] = {}
_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ModelSpec) -> None:
    """Add (or replace) a model type."""
    _MODELS[spec.model_type] = spec


def register_format(spec: FormatSpec) -> None:
    """Add (or replace) a checkpoint format (tried in registration order)."""
    _FORMATS[spec.name] = spec


def register_objective(spec: ObjectiveSpec) -> None:
    """Add (or replace) a pretraining objective."""
    _OBJECTIVES[spec.name] = spec


# ---------------------------------------------------------------------------------- model types
register(
    ModelSpec(
        "beats",
        "beats.model",
        "BEATsModel",
        encoder="BEATsEncoder",
        config="BEATsConfig",
        frontend="beats_fbank",
        presets=("tiny", "small", "base"),
        description="BEATs (Chen et al. 2022), official microsoft/unilm checkpoints",
    )
)
register(
    ModelSpec(
        "eat",
        "eat.model",
        "EATModel",
        encoder="EATEncoder",
        config="EATConfig",
        frontend="eat_fbank",
        presets=("tiny", "small", "base", "large"),
        description="EAT (Chen et al. 2024), official fairseq and Hugging Face checkpoints",
    )
)
register(
    ModelSpec(
        "baseline",
        "bioaudio.models.baselines",
        "BaselineClassifier",
        description="small CNN / MLP reference classifiers (train-baseline)",
    )
)

# ---------------------------------------------------------------------------- checkpoint formats
register_format(
    FormatSpec(
        "beats_official",
        "beats.convert",
        "is_official_checkpoint",
        "load_official",
        description="official BEATs checkpoint",
    )
)
register_format(
    FormatSpec(
        "eat_fairseq",
        "eat.convert",
        "is_fairseq_checkpoint",
        "load_fairseq",
        description="EAT fairseq checkpoint",
    )
)
register_format(
    FormatSpec(
        "eat_hf",
        "eat.convert",
        "is_hf_config",
        "load_hf",
        reads="hf",
        description="EAT Hugging Face checkpoint",
    )
)

register_format(
    FormatSpec(
        "beats_tokenizer",
        "beats.tokenizer",
        "is_official_tokenizer",
        "load_official_tokenizer",
        produces="tokenizer",
        description="official BEATs tokenizer checkpoint",
        saved_reader="load_tokenizer",
        saver="save_tokenizer",
    )
)

# ------------------------------------------------------------------------ pretraining objectives
register_objective(
    ObjectiveSpec(
        "eat",
        "eat.objective",
        "EATObjective",
        ("eat",),
        "EAT / data2vec 2.0: EMA-teacher targets on inverse-block-masked clone views",
    )
)
register_objective(
    ObjectiveSpec(
        "beats",
        "beats.objective",
        "MaskedTokenObjective",
        ("beats",),
        "BEATs masked-token prediction: tokenizer labels of dropped patches (cross-entropy)",
    )
)
register_objective(
    ObjectiveSpec(
        "beats_tokenizer",
        "beats.objective",
        "TokenizerObjective",
        ("beats",),
        "train a BEATs tokenizer by distillation from --beats_tokenizer.teacher (iteration 2+)",
    )
)
register_objective(
    ObjectiveSpec(
        "memory_bank",
        "bioaudio.training.memory_bank",
        "MemoryBankObjective",
        ("beats", "eat"),
        "InfoNCE of the utterance embedding against a momentum encoder and a queue of keys",
    )
)
register_objective(
    ObjectiveSpec(
        "supervised",
        "bioaudio.training.pretrain",
        "SupervisedObjective",
        ("beats", "eat"),
        "classification loss on labelled clips (multi-label aware)",
    )
)


# ------------------------------------------------------------------------------------- lookups
def _load_attr(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def model_types(kind: Literal["all", "encoder"] = "all") -> list[str]:
    """Registered model type names (`encoder`: transformer encoders only)."""
    return sorted(t for t, s in _MODELS.items() if kind == "all" or s.encoder)


def get_spec(model_type: str) -> ModelSpec:
    """The spec of a model type, or a ConfigError listing the known ones."""
    try:
        return _MODELS[model_type]
    except KeyError:
        raise ConfigError(
            f"unknown model type {model_type!r} (known: {', '.join(model_types())})"
        ) from None


def _encoder_spec(model_type: str) -> ModelSpec:
    spec = get_spec(model_type)
    if not spec.encoder:
        raise ConfigError(
            f"model type {model_type!r} has no transformer encoder "
            f"(encoders: {', '.join(model_types('encoder'))})"
        )
    return spec


def encoder_class(model_type: str) -> type:
    """The encoder nn.Module class of a model type."""
    spec = _encoder_spec(model_type)
    return _load_attr(spec.module, spec.encoder)


def config_class(model_type: str) -> type:
    """The encoder config dataclass of a model type."""
    spec = _encoder_spec(model_type)
    return _load_attr(spec.module, spec.config)


def wrapper_class(model_type: str) -> type:
    """The model class of a model type (its `from_config` rebuilds exports)."""
    spec = get_spec(model_type)
    return _load_attr(spec.module, spec.wrapper)


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


def formats(
    reads: Literal["torch", "hf"] | None = None, produces: str | None = None
) -> list[FormatSpec]:
    """Registered checkpoint formats, in registration order, optionally filtered."""
    return [
        f
        for f in _FORMATS.values()
        if (reads is None or f.reads == reads) and (produces is None or f.produces == produces)
    ]


def get_format(name: str) -> FormatSpec:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown checkpoint format {name!r}") from None


def format_functions(spec: FormatSpec) -> tuple[Any, Any]:
    """(detect, load) functions of a format."""
    module = importlib.import_module(spec.module)
    return getattr(module, spec.detect), getattr(module, spec.load)


def objective_names(model_type: str | None = None) -> list[str]:
    """Registered objectives (those serving `model_type` when given)."""
    return [n for n, s in _OBJECTIVES.items() if model_type is None or model_type in s.model_types]


def get_objective(name: str, model_type: str | None = None) -> ObjectiveSpec:
    """The spec of an objective; ConfigError when unknown or not for `model_type`."""
    spec = _OBJECTIVES.get(name)
    if spec is None:
        raise ConfigError(f"unknown objective {name!r} (known: {', '.join(objective_names())})")
    if model_type is not None and model_type not in spec.model_types:
        raise ConfigError(
            f"objective {name!r} does not train {model_type} models (it serves "
            f"{', '.join(spec.model_types)}; for {model_type}: "
            f"{', '.join(objective_names(model_type))})"
        )
    return spec


def objective_class(name: str) -> type:
    """The Objective subclass of a registered objective."""
    spec = get_objective(name)
    return _load_attr(spec.module, spec.cls)
