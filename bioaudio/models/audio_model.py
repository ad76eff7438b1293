"""AudioModel: frontend + encoder + optional classification head, the one model object that
finetuning, inference, embedding export and the explorer use, whatever the encoder type.

    wav (B, S) float, padding_mask (B, S) bool True=pad
      -> frontend (Kaldi fbank, per clip on its valid samples)  -> fbank (B, T, F), frame mask
      -> encoder                                                -> EncoderOutput
      -> head (optional)                                        -> logits (B, C)

Model-specific subclasses (beats.model.BEATsModel, eat.model.EATModel) add the official entry
points. Build one with `build_model(model_type, encoder=..., frontend=..., head=...)` or load one
with `bioaudio.load_model(path)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from bioaudio.config import from_dict, to_dict
from bioaudio.data.frontend import FrontendConfig, build_frontend
from bioaudio.errors import ConfigError
from bioaudio.models import registry
from bioaudio.models.heads import EMBED_POOLINGS, HeadConfig, build_head, pool_tokens
from bioaudio.models.layers import EncoderOutput


class AudioModel(nn.Module):
    """Frontend + encoder + optional head. Subclasses set `model_type`."""

    model_type: str = ""

    def __init__(
        self,
        encoder: nn.Module,
        frontend: FrontendConfig | None = None,
        head: HeadConfig | None = None,
        class_names: Sequence[str] | None = None,
        multi_label: bool = False,
    ):
        super().__init__()
        self.frontend_cfg = frontend or FrontendConfig.official(
            registry.get_spec(self.model_type).frontend  # type: ignore[arg-type]
        )
        self.frontend = build_frontend(self.frontend_cfg)
        self.encoder = encoder
        self.head: nn.Module | None = None
        self.head_cfg: HeadConfig | None = None
        self.class_names: list[str] = []
        self.multi_label = bool(multi_label)
        self.provenance: dict[str, Any] = {}  # where the weights came from (exports keep it)
        self.set_head(head, class_names)

    # ----- construction -------------------------------------------------------------------
    @property
    def encoder_cfg(self) -> Any:
        return self.encoder.cfg

    @property
    def embed_dim(self) -> int:
        """Width D of tokens and embeddings."""
        return int(self.encoder.embed_dim)

    @property
    def has_cls(self) -> bool:
        """True when the encoder produces a CLS vector (EAT; BEATs only with cls_token)."""
        return bool(self.encoder.has_cls)

    def set_frontend(self, frontend: FrontendConfig) -> None:
        """Replace the preprocessing (e.g. normalisation statistics recomputed on one's data)."""
        self.frontend_cfg = frontend
        self.frontend = build_frontend(frontend)

    def describe(self) -> str:
        """One line: model type and encoder size."""
        return f"{self.model_type} ({self.encoder.describe()})"

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: the encoder's tokens and position parameters
        (biases and norms are exempt by shape; see bioaudio.training.optim)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    @property
    def num_layers(self) -> int:
        """Transformer blocks of the encoder (for layer-wise learning-rate decay)."""
        return int(self.encoder.num_layers)

    def layer_id(self, name: str) -> int:
        """Layer of a parameter: 0 embeddings, 1..L encoder blocks, L + 1 the head."""
        if name.startswith("encoder."):
            return int(self.encoder.layer_id(name[len("encoder.") :]))
        return self.num_layers + 1

    def set_head(
        self,
        head: HeadConfig | dict | None,
        class_names: Sequence[str] | None = None,
        multi_label: bool | None = None,
    ) -> None:
        """Attach a new (freshly initialised) head, or remove it with None.

        `num_classes` 0 means "one per class name"; without names, classes are `class_<i>`.
        """
        if multi_label is not None:
            self.multi_label = bool(multi_label)
        if head is None:
            self.head, self.head_cfg = None, None
            self.class_names = list(class_names or [])
            return
        if isinstance(head, dict):
            head = from_dict(HeadConfig, head, where="head")
        head = dataclasses.replace(head)
        names = list(class_names) if class_names is not None else []
        if head.num_classes == 0:
            head.num_classes = len(names)
        if names and len(names) != head.num_classes:
            raise ConfigError(
                f"head has {head.num_classes} classes but {len(names)} class names were given"
            )
        if head.pooling == "cls" and not self.has_cls:
            raise ConfigError(
                "head pooling 'cls' needs a CLS token: official BEATs weights have none; "
                "use pooling 'mean' or build the BEATs encoder with cls_token=true"
            )
        self.head = build_head(head, self.embed_dim)
        self.head_cfg = head
        self.class_names = names or [f"class_{i}" for i in range(head.num_classes)]
        param = next(self.encoder.parameters(), None)
        if param is not None:
            self.head.to(device=param.device, dtype=param.dtype)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (written into every export's config.json)."""
        return {
            "model_type": self.model_type,
            "encoder": to_dict(self.encoder_cfg),
            "frontend": to_dict(self.frontend_cfg),
            "head": to_dict(self.head_cfg) if self.head_cfg is not None else None,
            "class_names": list(self.class_names),
            "multi_label": self.multi_label,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AudioModel:
        """Rebuild a model (random weights) from `config()` output."""
        return build_model(
            config["model_type"],
            encoder=config.get("encoder"),
            frontend=config.get("frontend"),
            head=config.get("head"),
            class_names=config.get("class_names") or None,
            multi_label=bool(config.get("multi_label", False)),
        )

    # ----- computation --------------------------------------------------------------------
    def featurise(
        self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """wav (B, S) -> normalised features (B, T, F) and frame padding mask (B, T) | None."""
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f"expected a waveform batch (B, S), got shape {tuple(wav.shape)}")
        return self.frontend(wav, padding_mask)

    def encode(
        self,
        fbank: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encoder on precomputed features (e.g. a feature cache)."""
        return self.encoder(fbank, frame_mask, keep)

    def features(
        self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None, layer: int | None = None
    ) -> EncoderOutput:
        """wav (B, S) -> EncoderOutput (tokens, cls, token padding mask). `layer` takes that
        transformer block's output instead (0 = first, -1 = last; None = the encoder output,
        which for a pre-LN encoder also has the final LayerNorm)."""
        fbank, frame_mask = self.featurise(wav, padding_mask)
        if layer is None:
            return self.encoder(fbank, frame_mask)
        out, layers = self.encoder.forward_layers(fbank, frame_mask)
        if not -len(layers) <= layer < len(layers):
            raise ConfigError(
                f"layer {layer} does not exist: the encoder has {len(layers)} blocks "
                f"(0..{len(layers) - 1}, or -1..-{len(layers)} from the end)"
            )
        x = layers[layer]  # (B, [1 +] N, D), CLS first when the encoder has one
        if self.has_cls:
            return EncoderOutput(x[:, 1:], x[:, 0], out.padding_mask)
        return EncoderOutput(x, None, out.padding_mask)

    def embed(
        self,
        wav: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        pooling: str = "mean",
        layer: int | None = None,
    ) -> torch.Tensor:
        """Clip embeddings (B, D): masked `mean` / `max` of the tokens, or the `cls` vector, of
        the encoder output or of block `layer` (see `features`)."""
        if pooling not in EMBED_POOLINGS:
            raise ConfigError(
                f"pooling must be one of {', '.join(EMBED_POOLINGS)}, got {pooling!r}"
            )
        return pool_tokens(self.features(wav, padding_mask, layer), pooling)

    def classify(self, out: EncoderOutput) -> torch.Tensor:
        """Head on an encoder output -> logits (B, C)."""
        if self.head is None:
            raise ConfigError("this model has no classification head (use embed() or features())")
        return self.head(out)

    def forward(
        self,
        wav: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        feats: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """wav (B, S) -> logits (B, C); or normalised `feats` (B, T, F) with their `frame_mask`
        (a feature cache, or features augmented by SpecAugment) instead of audio. Needs a head."""
        if feats is not None:
            return self.classify(self.encoder(feats, frame_mask))
        if wav is None:
            raise ValueError("forward needs `wav` or `feats`")
        return self.classify(self.features(wav, padding_mask))

    @torch.no_grad()
    def predict(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (B, C): sigmoid when multi-label, softmax otherwise."""
        logits = self(wav, padding_mask).float()
        return torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)


def build_model(
    model_type: str,
    encoder: Any = "base",
    frontend: FrontendConfig | dict | None = None,
    head: HeadConfig | dict | None = None,
    class_names: Sequence[str] | None = None,
    multi_label: bool = False,
) -> AudioModel:
    """A model with fresh weights: `encoder` is a preset name, a dict or a config dataclass;
    `frontend` defaults to the model type's official preprocessing."""
    cls = registry.wrapper_class(model_type)
    enc = registry.build_encoder(model_type, encoder)
    if isinstance(frontend, dict):
        frontend = from_dict(FrontendConfig, frontend, where="frontend")
    return cls(enc, frontend, head, class_names, multi_label)
