"""Official BEATs checkpoints -> BEATsModel.

An official file (microsoft/unilm `beats/`) is `{'cfg': dict, 'model': state_dict}`; finetuned
ones also hold `label_dict` (class index -> label). Loading follows the official semantics:
the cfg dict overwrites the official BEATsConfig defaults (NOT our presets), and the state dict
must match exactly. The key map is explicit:

    patch_embedding.weight                         -> encoder.patch_embedding.proj.weight
    layer_norm.* / post_extract_proj.*             -> encoder.layer_norm.* / ...
    encoder.pos_conv.0.weight_g / weight_v         -> encoder.encoder.pos_conv.0.parametrizations
                                                      .weight.original0 / original1
    encoder.layers.{i}.self_attn.relative_attention_bias.weight
                                                   -> encoder.encoder.relative_attention_bias.weight
                                                      (one shared table; the official file lists it
                                                      under every layer, all aliasing one tensor)
    encoder.*                                      -> encoder.encoder.*
    predictor.weight / bias                        -> head.fc.weight / bias  (mean-pool head)
"""

from __future__ import annotations

import re
from typing import Any

import torch

from bioaudio.config import from_dict
from bioaudio.data.frontend import FrontendConfig
from bioaudio.errors import CheckpointError, ConfigError
from bioaudio.models.checkpoint import load_weights
from bioaudio.models.heads import HeadConfig

from .model import BEATsConfig, BEATsEncoder, BEATsModel

# The official BEATsConfig defaults (beats/BEATs.py); a checkpoint's cfg dict overwrites them.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}
HEAD_KEYS = ("finetuned_model", "predictor_dropout", "predictor_class")

# (official key pattern, our key). First match wins; anything unmatched is an error.
KEY_MAP: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"encoder.patch_embedding.proj.\1"),
    (r"layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.post_extract_proj.\1"),
    (
        r"encoder\.pos_conv\.0\.weight_g",
        "encoder.encoder.pos_conv.0.parametrizations.weight.original0",
    ),
    (
        r"encoder\.pos_conv\.0\.weight_v",
        "encoder.encoder.pos_conv.0.parametrizations.weight.original1",
    ),
    (
        r"encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight",
        "encoder.encoder.relative_attention_bias.weight",
    ),
    (r"encoder\.(.+)", r"encoder.encoder.\1"),
    (r"predictor\.(weight|bias)", r"head.fc.\1"),
]


def is_official_checkpoint(obj: Any) -> bool:
    """True for an official BEATs model checkpoint dict (not a tokenizer: those have a
    `quantize` codebook, see beats/tokenizer.py)."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("model"), dict)
        and "patch_embedding.weight" in obj["model"]
        and not any(str(k).startswith("quantize") for k in obj["model"])
    )


def config_from_official(cfg: dict[str, Any], source: str) -> tuple[BEATsConfig, HeadConfig | None]:
    """Official cfg dict -> (encoder config, head config or None for a pretrained checkpoint)."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: 'cfg' is a {type(cfg).__name__}, expected a dict")
    merged = {**OFFICIAL_DEFAULTS, **cfg}
    ours = {f: merged[f] for f in OFFICIAL_DEFAULTS if f not in HEAD_KEYS}
    try:
        enc = from_dict(BEATsConfig, ours, where=f"{source} cfg")
        enc.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: unusable cfg: {e}") from e
    head = None
    if merged["finetuned_model"]:
        head = HeadConfig(
            pooling="mean",
            num_classes=int(merged["predictor_class"]),
            dropout=float(merged["predictor_dropout"]),
        )
    return enc, head


def convert_state_dict(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename official keys to ours (explicit map; shapes are checked when loading)."""
    out: dict[str, torch.Tensor] = {}
    rel_layer = -1
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        for pattern, target in KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            new = m.expand(target)
            if new.endswith("relative_attention_bias.weight"):
                # Every layer lists the shared table; loading officially leaves the last one.
                layer = int(key.split(".")[2])
                if layer < rel_layer:
                    break
                rel_layer = layer
            out[new] = value
            break
        else:
            raise CheckpointError(f"{source}: unexpected key {key!r} for a BEATs checkpoint")
    return out


def class_names_from(ckpt: dict[str, Any], n: int) -> list[str] | None:
    """Class names from a finetuned checkpoint's `label_dict` (index -> label), if complete."""
    labels = ckpt.get("label_dict")
    if not isinstance(labels, dict):
        return None
    try:
        names = [str(labels[i]) for i in range(n)]
    except KeyError:
        return None
    return names


def load_official(ckpt: dict[str, Any], source: str, **_: Any) -> BEATsModel:
    """An official BEATs checkpoint (already read safely) -> BEATsModel with its weights."""
    if not is_official_checkpoint(ckpt):
        raise CheckpointError(f"{source}: not an official BEATs checkpoint ({{'cfg', 'model'}})")
    enc_cfg, head_cfg = config_from_official(ckpt.get("cfg") or {}, source)
    names = class_names_from(ckpt, head_cfg.num_classes) if head_cfg else None
    model = BEATsModel(
        BEATsEncoder(enc_cfg),
        FrontendConfig.official("beats_fbank"),
        head_cfg,
        names,
        multi_label=True,
    )
    load_weights(model, convert_state_dict(ckpt["model"], source), source)
    return model.eval()
