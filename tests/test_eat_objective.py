"""EAT objective on the tiny preset: teacher, EMA, targets, clone views, padding, learning."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bioaudio.errors import ConfigError
from bioaudio.models.audio_model import build_model
from bioaudio.training.objectives import PretrainInputs
from bioaudio.training.optim import param_groups
from bioaudio.training.task import TaskContext
from eat.objective import EATObjective, EATObjectiveConfig

TINY = dict(clone_batch=4, decoder_layers=2, decoder_groups=4)


def make(seed: int = 0, **over) -> tuple[torch.nn.Module, EATObjective]:
    torch.manual_seed(seed)
    model = build_model("eat", encoder="tiny")
    return model, EATObjective(model, EATObjectiveConfig(**{**TINY, **over}))


def context(step: int = 0) -> TaskContext:
    trainer = SimpleNamespace(
        step=step,
        rank=0,
        num_processes=1,
        device=torch.device("cpu"),
        is_main_process=True,
        cfg=SimpleNamespace(max_steps=100, seed=0),
    )
    return TaskContext(trainer)


def spectrograms(batch: int, frames: int = 128, seed: int = 0) -> torch.Tensor:
    """Spectrogram-like features (B, T, 128): a harmonic stack with a gliding pitch and an
    amplitude envelope per clip, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32)[:, None]
    f = torch.arange(128, dtype=torch.float32)[None, :]
    clips = []
    for _ in range(batch):
        f0 = 8 + 20 * torch.rand((), generator=g)
        glide = (torch.rand((), generator=g) - 0.5) * 0.2
        rate = 0.05 + 0.1 * torch.rand((), generator=g)
        env = 0.5 + 0.5 * torch.sin(rate * t)
        x = torch.zeros(frames, 128)
        for h in (1, 2, 3):
            centre = h * (f0 + glide * t)
            x = x + env / h * torch.exp(-0.5 * ((f - centre) / 1.5) ** 2)
        clips.append(x * 2 - 0.5 + 0.05 * torch.randn(frames, 128, generator=g))
    return torch.stack(clips)


def inputs(fbank, frame_mask=None, seed: int = 0) -> PretrainInputs:
    return PretrainInputs(fbank, frame_mask, torch.Generator().manual_seed(seed))


def test_refuses_other_encoders_and_bad_options():
    with pytest.raises(ConfigError, match="EAT encoders"):
        EATObjective(build_model("beats", encoder="tiny"))
    model = build_model("eat", encoder="tiny")
    with pytest.raises(ConfigError, match="mask_ratio"):
        EATObjective(model, EATObjectiveConfig(mask_ratio=1.0))
    with pytest.raises(ConfigError, match="groups"):
        EATObjective(model, EATObjectiveConfig(decoder_groups=48))
    with pytest.raises(ConfigError, match="unknown option"):
        EATObjective(model, {"mask_prob": 0.8})


def test_teacher_frozen_eval_and_outside_the_optimiser():
    model, obj = make()
    obj.train()
    model.train()
    assert not obj.teacher.training and obj.decoder.training
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    assert obj.momentum_encoder() is obj.teacher
    assert obj.top_k == 2  # 12 clamped to the tiny depth

    out = obj(model, inputs(spectrograms(2)), context())
    out.loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert all(p.grad is not None for p in obj.decoder.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None

    names = {n for g in param_groups(obj, 0.05) for n in g["names"]}
    assert names and all(n.startswith("decoder.") for n in names)
    teacher_ids = {id(p) for p in obj.teacher.parameters()}
    trainable = [p for p in [*model.parameters(), *obj.parameters()] if p.requires_grad]
    assert not teacher_ids & {id(p) for p in trainable}


def test_outputs_and_logs():
    model, obj = make()
    out = obj(model, inputs(spectrograms(3)), context(5))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    expected = {"frame_loss", "utterance_loss", "ema_decay", "target_var", "pred_var"}
    assert set(out.logs) == expected | {"masked_fraction"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    assert float(out.logs["masked_fraction"]) == pytest.approx(1 - round(64 * 0.2) / 64)
    assert float(out.logs["ema_decay"]) == pytest.approx(obj.ema_decay_at(5))
    torch.testing.assert_close(
        out.loss, out.logs["frame_loss"] + out.logs["utterance_loss"], rtol=1e-6, atol=0
    )
    assert out.utterance.shape == (3, 64) and out.utterance.requires_grad


def test_one_teacher_pass_serves_all_clone_views():
    model, obj = make()
    calls = {"teacher": [], "student": []}
    obj.teacher.register_forward_hook(lambda m, a, o: calls["teacher"].append(a[0].shape[0]))
    keeps = []

    def student_hook(module, args, out):
        calls["student"].append(args[0].shape[0])
        keeps.append(args[2])

    model.encoder.register_forward_hook(student_hook)
    obj(model, inputs(spectrograms(3)), context())
    assert calls == {"teacher": [3], "student": [12]}  # one batched student call, B * C rows
    keep = keeps[0]
    assert keep.sum(1).eq(round(64 * 0.2)).all()
    # The 4 views of each clip are adjacent (repeat_interleave) and masked differently.
    for clip in range(3):
        views = keep[clip * 4 : clip * 4 + 4]
        assert len({tuple(v.tolist()) for v in views}) == 4


def test_utterance_is_the_clone_average_of_the_student_cls():
    model, obj = make()
    cls = []
    model.encoder.register_forward_hook(lambda m, a, o: cls.append(o.cls))
    out = obj(model, inputs(spectrograms(2)), context())
    torch.testing.assert_close(out.utterance, cls[0].view(2, 4, -1).mean(1))


@torch.no_grad()
def test_loss_reductions_match_fairseq():
    """frame: per-patch squared error summed over channels / sqrt(D), averaged over masked
    patches (fairseq divides the summed loss by sample_size = masked patches); utterance: the
    same per clone view, summed over views (it is multiplied by sample_size before that)."""
    model, obj = make()
    seen = {}
    model.encoder.register_forward_hook(lambda m, a, o: seen.update(keep=a[2], cls=o.cls))
    obj.decoder.register_forward_hook(lambda m, a, o: seen.update(pred=o))
    fbank = spectrograms(2)
    out = obj(model, inputs(fbank), context())
    targets, _ = obj.teacher_targets(fbank, None)
    y = targets.repeat_interleave(4, 0)
    masked = ~seen["keep"]
    err = (seen["pred"] - y)[masked]
    torch.testing.assert_close(
        out.logs["frame_loss"], err.square().sum() / 8 / masked.sum(), rtol=1e-5, atol=0
    )
    utt = targets.mean(1).repeat_interleave(4, 0)
    per_view = (seen["cls"] - utt).square().sum(-1) / 8
    torch.testing.assert_close(out.logs["utterance_loss"], per_view.sum(), rtol=1e-5, atol=0)

    _, mean_obj = make(utterance_reduction="mean", utterance_loss_weight=2.0)
    mean_obj.load_state_dict(obj.state_dict())
    out2 = mean_obj(model, inputs(fbank), context())
    torch.testing.assert_close(out2.logs["utterance_loss"], per_view.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        out2.loss, out2.logs["frame_loss"] + 2 * out2.logs["utterance_loss"], rtol=1e-6, atol=0
    )


def ffn_outputs(encoder, fbank):
    """The official target layers, computed by hand: each post-LN block's MLP output."""
    x = encoder.local_encoder(fbank)
    x = x + encoder.fixed_positional_encoder.positions[:, : x.shape[1]]
    x = torch.cat([encoder.extra_tokens.expand(x.shape[0], -1, -1), x], dim=1)
    x = encoder.pre_norm(x)
    outs = []
    for blk in encoder.blocks:
        h = blk.norm1(x + blk.attn(x, None))
        t = blk.mlp(h)
        outs.append(t[:, 1:])
        x = blk.norm2(h + t)
    return outs


@torch.no_grad()
def test_targets_follow_the_official_recipe():
    model, obj = make()
    fbank = spectrograms(2)
    layers = ffn_outputs(obj.teacher, fbank)
    normed = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in layers]
    expected = F.layer_norm(torch.stack(normed).mean(0), (64,))
    got, pad = obj.teacher_targets(fbank, None)
    assert pad is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # average_top_k_layers=1: only the last block; target_source="block": block outputs.
    _, top1 = make(average_top_k_layers=1)
    top1.teacher.load_state_dict(obj.teacher.state_dict())
    exp1 = F.layer_norm(F.instance_norm(layers[-1].transpose(1, 2)).transpose(1, 2), (64,))
    torch.testing.assert_close(top1.teacher_targets(fbank, None)[0], exp1, atol=1e-5, rtol=1e-5)
    _, blocks = make(target_source="block")
    blocks.teacher.load_state_dict(obj.teacher.state_dict())
    _, outs = obj.teacher.forward_layers(fbank)
    normed = [F.instance_norm(y[:, 1:].transpose(1, 2)).transpose(1, 2) for y in outs]
    exp_b = F.layer_norm(torch.stack(normed).mean(0), (64,))
    torch.testing.assert_close(blocks.teacher_targets(fbank, None)[0], exp_b, atol=1e-5, rtol=1e-5)


def test_padding_is_ignored():
    model, obj = make()
    fbank = spectrograms(2, frames=128)
    frame_mask = torch.zeros(2, 128, dtype=torch.bool)
    frame_mask[1, 80:] = True  # clip 1: 5 valid time patches of 8
    out = obj(model, inputs(fbank, frame_mask, seed=3), context())
    assert torch.isfinite(out.loss)

    changed = fbank.clone()
    changed[1, 80:] = 100 * torch.randn(48, 128)
    out2 = obj(model, inputs(changed, frame_mask, seed=3), context())
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-6, atol=0)
    for k in out.logs:
        torch.testing.assert_close(out2.logs[k], out.logs[k], rtol=1e-6, atol=0)

    # The padded clip's targets on its valid patches are those of the clip run alone.
    with torch.no_grad():
        padded, pad = obj.teacher_targets(fbank, frame_mask)
        alone, _ = obj.teacher_targets(fbank[1:, :80], None)
    assert pad[1].sum() == 3 * 8 and not pad[0].any()
    torch.testing.assert_close(padded[1, :40], alone[0], atol=1e-5, rtol=1e-5)
    assert padded[1, 40:].abs().max() == 0


def test_ema_decay_ramp():
    _, obj = make(ema_anneal_end_step=1000)
    assert obj.ema_decay_at(0) == pytest.approx(0.9998)
    assert obj.ema_decay_at(500) == pytest.approx((0.9998 + 0.99999) / 2)  # linear
    assert obj.ema_decay_at(1000) == pytest.approx(0.99999)
    assert obj.ema_decay_at(10**6) == pytest.approx(0.99999)
    ramp = [obj.ema_decay_at(s) for s in range(0, 1001, 50)]
    assert ramp == sorted(ramp)


@pytest.mark.parametrize("encoder_only", [False, True])
@torch.no_grad()
def test_teacher_follows_the_ema_formula(encoder_only):
    model, obj = make(ema_encoder_only=encoder_only, ema_decay=0.9, ema_anneal_end_step=100)
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    for p in model.encoder.parameters():
        p.add_(torch.randn_like(p))
    student = model.encoder.state_dict()
    step = 40
    decay = obj.ema_decay_at(step)
    assert 0.9 < decay < 0.99999
    obj.after_update(model, context(step))
    after = obj.teacher.state_dict()
    for name, value in after.items():
        if name == "fixed_positional_encoder.positions":
            torch.testing.assert_close(value, student[name])  # fixed buffer: copied
        elif encoder_only and not name.startswith("blocks."):
            torch.testing.assert_close(value, student[name])  # the student's own embedding
        else:
            expected = decay * before[name] + (1 - decay) * student[name]
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
            assert not torch.equal(value, before[name])


def test_state_dict_holds_teacher_and_decoder():
    model, obj = make()
    keys = set(obj.state_dict())
    assert any(k.startswith("teacher.blocks.") for k in keys)
    assert {"decoder.blocks.0.0.weight", "decoder.proj.weight"} <= keys
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.mul_(0.5)
        for p in obj.decoder.parameters():
            p.add_(1.0)
    _, fresh = make(seed=1)
    fresh.load_state_dict(obj.state_dict())
    for (n, a), b in zip(obj.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n


def test_loss_falls_with_adamw():
    model, obj = make()
    model.train()
    obj.train()
    params = [p for p in [*model.parameters(), *obj.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    fbank = spectrograms(4, frames=128, seed=1)
    losses, frames = [], []
    for step in range(50):
        out = obj(model, inputs(fbank, seed=step), context(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_update(model, context(step))
        losses.append(float(out.loss.detach()))
        frames.append(float(out.logs["frame_loss"]))
    assert all(math.isfinite(v) for v in losses)
    # Both terms fall (new masks every step, the teacher moving slowly).
    for curve in (losses, frames):
        first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
        assert last < 0.6 * first, (first, last)
