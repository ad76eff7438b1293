"""Optimiser groups: what gets weight decay, layer-wise learning-rate decay, the EMA update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bioaudio.models.audio_model import build_model
from bioaudio.models.heads import HeadConfig
from bioaudio.training.optim import ema_update_, make_adamw, param_groups
from bioaudio.training.task import TaskContext, TrainingModules


def _decayed(groups: list[dict]) -> set[str]:
    return {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}


def test_eat_decay_group_is_exactly_the_weight_matrices():
    model = build_model("eat", "tiny", head=HeadConfig(pooling="cls", num_classes=3))
    decayed = _decayed(param_groups(model, 0.05))
    # The CLS token is 3-D: only no_weight_decay() keeps it out of the decay group.
    assert "encoder.extra_tokens" not in decayed
    expected = {
        n for n, p in model.named_parameters() if p.ndim >= 2 and n != "encoder.extra_tokens"
    }
    assert decayed == expected
    assert all(not n.endswith(("bias", "norm1.weight", "norm2.weight")) for n in decayed)
    assert "head.fc.weight" in decayed


def test_beats_decay_group_excludes_tokens_positions_and_gates():
    model = build_model("beats", {"preset": "tiny", "cls_token": True})
    decayed = _decayed(param_groups(model, 0.05))
    for name in (
        "encoder.cls_token",
        "encoder.encoder.relative_attention_bias.weight",
        "encoder.encoder.layers.0.self_attn.grep_a",
        "encoder.encoder.layers.1.self_attn.grep_a",
        "encoder.encoder.pos_conv.0.parametrizations.weight.original0",
    ):
        assert name in dict(model.named_parameters())
        assert name not in decayed
    assert "encoder.encoder.layers.0.self_attn.q_proj.weight" in decayed
    assert "encoder.encoder.pos_conv.0.parametrizations.weight.original1" in decayed
    assert not any(n.endswith(".bias") for n in decayed)


def test_exemptions_are_found_through_wrappers():
    """A task bundle (model + task parts) keeps the encoder's exemptions under its prefix."""
    model = build_model("eat", "tiny")
    bundle = TrainingModules(model, nn.Linear(64, 8), TaskContext(None))
    decayed = _decayed(param_groups(bundle, 0.05))
    assert "model.encoder.extra_tokens" not in decayed
    assert "parts.weight" in decayed and "parts.bias" not in decayed


@pytest.mark.parametrize("model_type", ["eat", "beats"])
def test_layer_wise_decay_assigns_the_documented_rate(model_type):
    """lr of layer i = lr * decay ** (L + 1 - i): head at lr, block L at lr * decay, ...,
    embeddings at lr * decay ** (L + 1)."""
    model = build_model(model_type, "tiny", head=HeadConfig(pooling="mean", num_classes=2))
    decay, L = 0.5, model.num_layers
    groups = param_groups(model, 0.01, layer_decay=decay)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    blocks = "encoder.blocks" if model_type == "eat" else "encoder.encoder.layers"
    for i in range(L):
        names = [n for n in scale if n.startswith(f"{blocks}.{i}.")]
        assert names and all(scale[n] == pytest.approx(decay ** (L - i)) for n in names)
    assert scale["head.fc.weight"] == pytest.approx(1.0)
    patch = (
        "encoder.local_encoder.proj.weight"
        if model_type == "eat"
        else ("encoder.patch_embedding.proj.weight")
    )
    assert scale[patch] == pytest.approx(decay ** (L + 1))
    # every parameter is in exactly one group
    assert sorted(scale) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    opt = make_adamw(groups, lr=1e-3)
    assert len(opt.param_groups) == len(groups)


def test_ema_update_follows_the_formula():
    torch.manual_seed(0)
    target, source = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update_(target, source, decay=0.9)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.detach())
