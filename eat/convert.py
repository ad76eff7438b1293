"""Official EAT checkpoints (Hugging Face and fairseq) -> EATModel.

Every dimension is read from the checkpoint (config + weight shapes, cross-checked), never
assumed: width from `extra_tokens`, depth from the blocks, MLP width from `fc1`, patch size from
the patch conv, `max_length` from the position table (rows // frequency patches), classes from
the head. Heads are read from the config (they cannot be seen in the weights).

Key maps (explicit; anything unlisted is an error):

Hugging Face (`EATModel` wraps `EAT` as `model.`):
    model.{extra_tokens, local_encoder.*, fixed_positional_encoder.positions, pre_norm.*,
           blocks.*}                                  -> encoder.<same>
    model.fc_norm.* / model.head.*                    -> head.norm.* / head.fc.*
fairseq (`Data2VecMultiModel`; finetuned `MaeImageClassificationModel` adds `model.`):
    [model.]modality_encoders.IMAGE.context_encoder.norm.*  -> encoder.pre_norm.*
    [model.]modality_encoders.IMAGE.{extra_tokens, local_encoder.*,
                                     fixed_positional_encoder.positions} -> encoder.<same>
    [model.]blocks.*                                  -> encoder.blocks.*
    fc_norm.* / head.*                                -> head.norm.* / head.fc.*
    modality_encoders.IMAGE.decoder.*, _ema           -> dropped (pretraining only; `ema=True`
                                                         loads the EMA teacher instead)
The finetuned classifier is CLS -> LayerNorm (fc_norm) -> Linear; its LayerNorm eps is 1e-6 in
fairseq and 1e-5 in the Hugging Face port (each as its official code builds it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from bioaudio.data.frontend import FrontendConfig
from bioaudio.errors import CheckpointError
from bioaudio.models.checkpoint import load_weights, read_safetensors, read_torch_file, to_plain
from bioaudio.models.heads import HeadConfig

from .model import EATConfig, EATEncoder, EATModel

HF_FC_NORM_EPS = 1e-5  # the HF port builds fc_norm with PyTorch's default eps
FAIRSEQ_FC_NORM_EPS = 1e-6  # fairseq MaeImageClassificationModel: LayerNorm(D, eps=1e-6)

_ENCODER_PARTS = (
    r"(extra_tokens|local_encoder\.proj\.(?:weight|bias)|fixed_positional_encoder\.positions)"
)

HF_KEY_MAP: list[tuple[str, str | None]] = [
    (rf"model\.{_ENCODER_PARTS}", r"encoder.\1"),
    (r"model\.pre_norm\.(weight|bias)", r"encoder.pre_norm.\1"),
    (r"model\.blocks\.(.+)", r"encoder.blocks.\1"),
    (r"model\.fc_norm\.(weight|bias)", r"head.norm.\1"),
    (r"model\.head\.(weight|bias)", r"head.fc.\1"),
]
FAIRSEQ_KEY_MAP: list[tuple[str, str | None]] = [
    (rf"(?:model\.)?modality_encoders\.IMAGE\.{_ENCODER_PARTS}", r"encoder.\1"),
    (
        r"(?:model\.)?modality_encoders\.IMAGE\.context_encoder\.norm\.(weight|bias)",
        r"encoder.pre_norm.\1",
    ),
    (r"(?:model\.)?blocks\.(.+)", r"encoder.blocks.\1"),
    (r"fc_norm\.(weight|bias)", r"head.norm.\1"),
    (r"head\.(weight|bias)", r"head.fc.\1"),
    # Pretraining-only parts: the CNN decoder and helpers data2vec removes before finetuning.
    (r"(?:model\.)?modality_encoders\.IMAGE\.decoder\..+", None),
    (r"(?:model\.)?modality_encoders\.IMAGE\.encoder_mask", None),
    (r"(?:model\.)?(?:shared_decoder|recon_proj)\..+", None),
]


def _map_keys(
    sd: dict[str, Any], key_map: list[tuple[str, str | None]], source: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for pattern, target in key_map:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if target is not None:
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
                out[m.expand(target)] = value
            break
        else:
            hint = " (alibi / pre-LN EAT variants are not supported)" if "alibi" in key else ""
            raise CheckpointError(f"{source}: unexpected key {key!r} for an EAT checkpoint{hint}")
    return out


def _shape(sd: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: missing {key!r} (not an EAT encoder checkpoint?)")
    return tuple(sd[key].shape)


def _agree(name: str, from_config: Any, from_weights: Any, source: str) -> None:
    if from_config is not None and from_config != from_weights:
        raise CheckpointError(
            f"{source}: config says {name}={from_config} but the weights have {from_weights}"
        )


def encoder_config_from(
    sd: dict[str, torch.Tensor], hints: dict[str, Any], source: str
) -> EATConfig:
    """EATConfig from converted weights (`encoder.*` keys) cross-checked with config values.

    `hints`: num_heads (required), embed_dim, depth, mlp_ratio, max_length, patch_size,
    n_mels, norm_eps and dropouts, as far as the checkpoint's config gives them.
    """
    d = _shape(sd, "encoder.extra_tokens", source)[-1]
    proj = _shape(sd, "encoder.local_encoder.proj.weight", source)  # (D, 1, p, p)
    if proj[1] != 1 or proj[2] != proj[3]:
        raise CheckpointError(f"{source}: patch conv {proj} is not a square one-channel patch")
    patch = proj[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    if depth == 0:
        raise CheckpointError(f"{source}: no transformer blocks in the weights")
    hidden = _shape(sd, "encoder.blocks.0.mlp.fc1.weight", source)[0]
    rows = _shape(sd, "encoder.fixed_positional_encoder.positions", source)[1]
    n_mels = int(hints.get("n_mels") or 128)
    n_freq = n_mels // patch
    if rows % n_freq:
        raise CheckpointError(
            f"{source}: position table has {rows} rows, not a multiple of {n_freq} frequency patches"
        )
    _agree("embed_dim", hints.get("embed_dim"), d, source)
    _agree("depth", hints.get("depth"), depth, source)
    _agree("patch_size", hints.get("patch_size"), patch, source)
    _agree("max_length", hints.get("max_length"), rows // n_freq, source)
    if hints.get("mlp_ratio") is not None:
        _agree("MLP width", int(d * float(hints["mlp_ratio"])), hidden, source)
    heads = hints.get("num_heads")
    if heads is None:
        raise CheckpointError(f"{source}: the config does not give num_heads")
    if d % int(heads):
        raise CheckpointError(f"{source}: embed_dim {d} is not divisible by num_heads {heads}")
    return EATConfig(
        embed_dim=d,
        depth=depth,
        num_heads=int(heads),
        mlp_ratio=hidden / d,
        patch_size=patch,
        n_mels=n_mels,
        max_length=rows // n_freq,
        qkv_bias="encoder.blocks.0.attn.qkv.bias" in sd,
        norm_eps=float(hints.get("norm_eps") or 1e-6),
        norm_affine="encoder.pre_norm.weight" in sd,
        drop_rate=float(hints.get("drop_rate") or 0.0),
        attn_drop_rate=float(hints.get("attn_drop_rate") or 0.0),
        activation_dropout=float(hints.get("activation_dropout") or 0.0),
        post_mlp_drop=float(hints.get("post_mlp_drop") or 0.0),
        drop_path_rate=float(hints.get("drop_path_rate") or 0.0),
    )


def _head_from(
    sd: dict[str, torch.Tensor], pooling: str, eps: float, num_classes: Any, source: str
) -> HeadConfig:
    c = _shape(sd, "head.fc.weight", source)[0]
    _agree("num_classes", num_classes, c, source)
    return HeadConfig(pooling=pooling, num_classes=c, norm="head.norm.weight" in sd, norm_eps=eps)  # type: ignore[arg-type]


def _build(enc: EATConfig, head: HeadConfig | None, sd: dict, source: str) -> EATModel:
    model = EATModel(EATEncoder(enc), FrontendConfig.official("eat_fbank"), head, None, True)
    load_weights(model, sd, source)
    return model.eval()


# ----- Hugging Face ------------------------------------------------------------------------------
def is_hf_config(cfg: dict[str, Any]) -> bool:
    """True for the config.json of an EAT Hugging Face checkpoint (model_type "eat", or the
    EATConfig fields without a model_type); `load_hf` then checks every value it needs."""
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type:
        return model_type == "eat"
    return "embed_dim" in cfg or "mel_bins" in cfg


def load_hf(
    weights: str | Path, config: str | Path, source: str | None = None, **_: Any
) -> EATModel:
    """An EAT Hugging Face checkpoint (model.safetensors or pytorch_model.bin + config.json)."""
    weights, config = Path(weights), Path(config)
    source = source or str(weights)
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: cannot read the EAT config ({e})") from e
    if not isinstance(cfg, dict) or "embed_dim" not in cfg or "num_heads" not in cfg:
        raise CheckpointError(f"{config}: not an EAT Hugging Face config (no embed_dim/num_heads)")
    if cfg.get("layer_norm_first"):
        raise CheckpointError(f"{config}: pre-LN EAT (layer_norm_first) is not supported")
    if int(cfg.get("in_chans", 1)) != 1 or int(cfg.get("stride", cfg.get("patch_size", 16))) != int(
        cfg.get("patch_size", 16)
    ):
        raise CheckpointError(f"{config}: only one-channel, non-overlapping patches are supported")
    if weights.suffix == ".bin":
        raw = read_torch_file(weights)
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    else:
        raw = read_safetensors(weights)
    sd = _map_keys(raw, HF_KEY_MAP, source)
    hints = {
        "num_heads": cfg.get("num_heads"),
        "embed_dim": cfg.get("embed_dim"),
        "depth": cfg.get("depth"),
        "mlp_ratio": cfg.get("mlp_ratio"),
        "patch_size": cfg.get("patch_size"),
        "max_length": cfg.get("max_length"),
        "n_mels": cfg.get("mel_bins"),
        "norm_eps": cfg.get("norm_eps"),
        "drop_rate": cfg.get("drop_rate"),
        "attn_drop_rate": cfg.get("attn_drop_rate"),
        "activation_dropout": cfg.get("activation_dropout"),
        "post_mlp_drop": cfg.get("post_mlp_drop"),
        "drop_path_rate": cfg.get("end_drop_path_rate"),
    }
    enc = encoder_config_from(sd, hints, source)
    finetune = cfg.get("model_variant", "pretrain") == "finetune"
    has_head = "head.fc.weight" in sd
    if finetune != has_head:
        raise CheckpointError(
            f"{source}: config model_variant is {cfg.get('model_variant')!r} but the weights "
            f"{'have' if has_head else 'lack'} a classification head"
        )
    head = (
        _head_from(sd, "cls", HF_FC_NORM_EPS, cfg.get("num_classes"), source) if has_head else None
    )
    return _build(enc, head, sd, source)


# ----- fairseq -------------------------------------------------------------------------------
def is_fairseq_checkpoint(obj: Any) -> bool:
    """True for an EAT fairseq checkpoint dict (pretraining or finetuned)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return False
    return any(
        k.startswith(("modality_encoders.IMAGE.", "model.modality_encoders.IMAGE."))
        for k in obj["model"]
    )


_PREDICTION_MODES = {1: "MEAN_POOLING", 2: "CLS_TOKEN", 3: "LIN_SOFTMAX"}  # enum auto() values


def _prediction_pooling(mode: Any, source: str) -> str:
    if isinstance(mode, int):
        mode = _PREDICTION_MODES.get(mode, str(mode))
    name = str(mode or "CLS_TOKEN").split(".")[-1]
    if name == "CLS_TOKEN":
        return "cls"
    if name == "MEAN_POOLING":
        return "mean"
    raise CheckpointError(
        f"{source}: EAT prediction_mode {name} is not supported (CLS_TOKEN, MEAN_POOLING)"
    )


def load_fairseq(ckpt: dict[str, Any], source: str, ema: bool = False, **_: Any) -> EATModel:
    """An EAT fairseq checkpoint (already read safely) -> EATModel."""
    cfg = to_plain(ckpt.get("cfg"))
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{source}: EAT fairseq checkpoint without a readable cfg.model")
    model_cfg = cfg["model"]
    finetuned = "pretrained_model_args" in model_cfg or any(
        k.startswith("model.") for k in ckpt["model"]
    )
    enc_cfg = model_cfg
    if finetuned:
        pretrained = to_plain(model_cfg.get("pretrained_model_args"))
        if not isinstance(pretrained, dict) or not isinstance(pretrained.get("model"), dict):
            raise CheckpointError(f"{source}: finetuned EAT cfg lacks pretrained_model_args.model")
        enc_cfg = pretrained["model"]
    image = (enc_cfg.get("modalities") or {}).get("image") or {}
    if enc_cfg.get("layer_norm_first"):
        raise CheckpointError(f"{source}: pre-LN EAT (layer_norm_first) is not supported")
    if int(image.get("prenet_depth", 0) or 0) != 0:
        raise CheckpointError(
            f"{source}: EAT with prenet blocks (prenet_depth > 0) is not supported"
        )
    if int(image.get("num_extra_tokens", 1)) != 1 or image.get("use_alibi_encoder"):
        raise CheckpointError(f"{source}: only EAT with one CLS token and no ALiBi is supported")
    if int(image.get("in_chans", 1)) != 1:
        raise CheckpointError(f"{source}: only one-channel (log-mel) EAT is supported")

    state = ckpt["model"]
    if ema:
        if finetuned or not isinstance(state.get("_ema"), dict):
            raise CheckpointError(f"{source}: no EMA teacher weights (_ema) in this checkpoint")
        state = state["_ema"]
    else:
        state = {k: v for k, v in state.items() if k != "_ema"}
    sd = _map_keys(state, FAIRSEQ_KEY_MAP, source)
    hints = {
        "num_heads": enc_cfg.get("num_heads"),
        "embed_dim": enc_cfg.get("embed_dim"),
        "depth": enc_cfg.get("depth"),
        "mlp_ratio": enc_cfg.get("mlp_ratio"),
        "patch_size": image.get("patch_size"),
        "max_length": image.get("max_length"),
        "norm_eps": enc_cfg.get("norm_eps"),
        "drop_rate": enc_cfg.get("encoder_dropout"),
        "attn_drop_rate": enc_cfg.get("attention_dropout"),
        "activation_dropout": enc_cfg.get("activation_dropout"),
        "post_mlp_drop": enc_cfg.get("post_mlp_drop"),
        "drop_path_rate": enc_cfg.get("end_drop_path_rate"),
    }
    enc = encoder_config_from(sd, hints, source)
    head = None
    if finetuned:
        pooling = _prediction_pooling(model_cfg.get("prediction_mode"), source)
        head = _head_from(sd, pooling, FAIRSEQ_FC_NORM_EPS, model_cfg.get("num_classes"), source)
        if model_cfg.get("use_fc_norm", True) != head.norm:
            raise CheckpointError(f"{source}: cfg use_fc_norm disagrees with the fc_norm weights")
    elif "head.fc.weight" in sd:
        raise CheckpointError(f"{source}: a pretraining cfg but the weights hold a classifier head")
    return _build(enc, head, sd, source)
