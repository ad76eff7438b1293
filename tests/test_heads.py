"""Pooling heads: padding-aware batching for both encoders, masking, lin-softmax semantics."""

from __future__ import annotations

import functools

import pytest
import torch

from bioaudio.errors import ConfigError
from bioaudio.models.audio_model import build_model
from bioaudio.models.heads import HeadConfig, LinSoftmaxHead, build_head, pool_tokens
from bioaudio.models.layers import EncoderOutput

LENGTHS = [40000, 17000, 26100]  # 2.5 s, 1.06 s, 1.63 s: different token counts


def _batch():
    g = torch.Generator().manual_seed(0)
    wav = torch.zeros(len(LENGTHS), max(LENGTHS))
    pad = torch.ones_like(wav, dtype=torch.bool)
    for i, n in enumerate(LENGTHS):
        wav[i, :n] = 0.1 * torch.randn(n, generator=g)
        pad[i, :n] = False
    return wav, pad


ENCODERS = {"beats": {"preset": "tiny", "cls_token": True}, "eat": "tiny"}


@functools.cache
def _encoded(model_type):
    """The model, its output on the mixed batch, and each clip's output alone (computed once)."""
    torch.manual_seed(0)
    model = build_model(model_type, ENCODERS[model_type]).eval()
    wav, pad = _batch()
    with torch.no_grad():
        out = model.features(wav, pad)
        alone = [model.features(wav[i : i + 1, :n]) for i, n in enumerate(LENGTHS)]
    return model, out, alone


@pytest.mark.parametrize("model_type", ["beats", "eat"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lin_softmax", "attention"])
def test_batch_equals_one_clip_at_a_time(model_type, pooling):
    """Padding-aware batching: logits and embeddings of a mixed-length batch equal each clip
    run alone, for every head."""
    model, out, alone = _encoded(model_type)
    torch.manual_seed(1)
    model.set_head(HeadConfig(pooling, 4))
    assert out.padding_mask is not None and out.padding_mask.any()
    with torch.no_grad():
        logits = model.classify(out)
        embeds = {p: pool_tokens(out, p) for p in ("mean", "max", "cls")}
        for i, one in enumerate(alone):
            valid = int((~out.padding_mask[i]).sum())
            assert valid == one.tokens.shape[1]
            torch.testing.assert_close(out.tokens[i, :valid], one.tokens[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[i], model.classify(one)[0], atol=1e-5, rtol=0)
            for p, e in embeds.items():
                torch.testing.assert_close(e[i], pool_tokens(one, p)[0], atol=1e-5, rtol=0)


def test_embed_batch_equals_one_clip_at_a_time():
    model, _, _ = _encoded("eat")
    wav, pad = _batch()
    with torch.no_grad():
        batch = model.embed(wav, pad, pooling="mean")
        for i, n in enumerate(LENGTHS):
            torch.testing.assert_close(
                batch[i], model.embed(wav[i : i + 1, :n])[0], atol=1e-5, rtol=0
            )


def _out(b=2, n=6, d=8, seed=0, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=g)
    mask = None
    if pad_from is not None:
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask[1, pad_from:] = True
    return EncoderOutput(tokens, torch.randn(b, d, generator=g), mask)


@pytest.mark.parametrize("pooling", ["mean", "max", "lin_softmax", "attention", "cls"])
def test_padding_tokens_never_contribute(pooling):
    torch.manual_seed(0)
    head = build_head(HeadConfig(pooling, 3, norm=True), 8).eval()
    out = _out(pad_from=3)
    garbage = out.tokens.clone()
    garbage[1, 3:] = 1e4 * torch.randn(3, 8)
    with torch.no_grad():
        a = head(out)
        b = head(EncoderOutput(garbage, out.cls, out.padding_mask))
        alone = head(EncoderOutput(out.tokens[1:, :3], out.cls[1:], None))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[1], alone[0], atol=1e-5, rtol=0)


def test_lin_softmax_pools_probabilities_as_sum_p2_over_sum_p():
    head = LinSoftmaxHead(HeadConfig("lin_softmax", 2), 1)
    with torch.no_grad():
        head.fc.weight.fill_(1.0)
        head.fc.bias.zero_()
    # token logits z (one feature) -> p = sigmoid(z); class 0 and 1 see the same p
    z = torch.tensor([[[0.0], [2.0], [-1.0], [50.0]]])
    mask = torch.tensor([[False, False, False, True]])  # the certain token is padding
    p = torch.sigmoid(z[0, :3, 0])
    expected = (p * p).sum() / p.sum()
    logits = head(EncoderOutput(z, None, mask))
    torch.testing.assert_close(torch.sigmoid(logits[0]), expected.repeat(2))
    # All tokens with the same probability q give exactly q.
    same = head(EncoderOutput(torch.full((1, 5, 1), 0.7), None, None))
    torch.testing.assert_close(torch.sigmoid(same[0, 0]), torch.sigmoid(torch.tensor(0.7)))


def test_attention_head_with_uniform_scores_is_the_mean_of_token_logits():
    head = build_head(HeadConfig("attention", 3), 8)
    with torch.no_grad():
        head.att.weight.zero_()
        head.att.bias.zero_()
    out = _out(pad_from=2)
    logits = head(out)
    per_token = head.fc(out.tokens)
    torch.testing.assert_close(logits[0], per_token[0].mean(0))
    torch.testing.assert_close(logits[1], per_token[1, :2].mean(0))


def test_eat_official_head_is_cls_layernorm_linear():
    head = build_head(HeadConfig("cls", 5, norm=True, norm_eps=1e-5), 8)
    out = _out()
    expected = head.fc(
        torch.nn.functional.layer_norm(out.cls, (8,), head.norm.weight, head.norm.bias, 1e-5)
    )
    torch.testing.assert_close(head(out), expected)


def test_bad_head_configs():
    with pytest.raises(ConfigError, match="num_classes"):
        build_head(HeadConfig("mean", 0), 8)
    with pytest.raises(ConfigError, match="pooling"):
        build_head(HeadConfig("median", 3), 8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="class names"):
        build_model("eat", "tiny", head=HeadConfig("cls", 3), class_names=["a", "b"])
    model = build_model("eat", "tiny", head=HeadConfig("mean"), class_names=["a", "b"])
    assert model.head_cfg.num_classes == 2 and model.class_names == ["a", "b"]
    with pytest.raises(ConfigError, match="pooling must be"):
        model.embed(torch.zeros(1, 16000), pooling="lin_softmax")


def test_standardize_uses_the_valid_vectors_of_the_batch_then_their_running_statistics():
    from bioaudio.models.heads import Standardize

    g = torch.Generator().manual_seed(1)
    data = 3.0 + 2.5 * torch.randn(12, 5, 4, generator=g)  # 12 clips of 5 tokens, D = 4
    mask = torch.zeros(12, 5, dtype=torch.bool)
    mask[:, 3:] = True  # two padding tokens per clip ...
    data[mask] = 1e6  # ... holding garbage that must never count
    std = Standardize(4).train()
    for batch in (slice(0, 4), slice(4, 8), slice(8, 12)):  # one epoch, equal batches
        y = std(data[batch], mask[batch])
        valid = y[~mask[batch]]
        torch.testing.assert_close(valid.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(valid.var(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    # running statistics: the cumulative average of the batch statistics (= the data's mean)
    valid = data[~mask]
    torch.testing.assert_close(std.running_mean, valid.mean(0), atol=1e-4, rtol=1e-5)
    batch_vars = [data[s][~mask[s]].var(0) for s in (slice(0, 4), slice(4, 8), slice(8, 12))]
    torch.testing.assert_close(std.running_var, torch.stack(batch_vars).mean(0))
    std.eval()  # evaluation: by the running statistics, whatever the batch
    one = std(data[:1, :3])
    torch.testing.assert_close(
        one, (data[:1, :3] - std.running_mean) / torch.sqrt(std.running_var + std.eps)
    )


@pytest.mark.parametrize("pooling", ["mean", "cls", "lin_softmax", "attention"])
def test_a_standardizing_head_survives_export_and_load(pooling, tmp_path):
    from bioaudio.models.checkpoint import load_model, save_export

    torch.manual_seed(0)
    head = HeadConfig(pooling, 3, standardize=True)
    model = build_model("eat", "tiny", head=head, class_names=["a", "b", "c"])
    wav, pad = _batch()
    model.train()
    for _ in range(3):  # the standardisation learns its statistics in training mode
        model(wav, pad)
    model.eval()
    assert int(model.head.standardize.num_batches_tracked) == 3
    with torch.no_grad():
        before = model(wav, pad)
    save_export(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.head.cfg.standardize
    with torch.no_grad():
        torch.testing.assert_close(loaded(wav, pad), before)
