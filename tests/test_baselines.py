"""CNN / MLP baselines: shapes on every frontend size, training, padding invariance, registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bioaudio.errors import ConfigError
from bioaudio.models.baselines import (
    BASELINES,
    KerasGenreCNN,
    baseline_from_config,
    build_baseline,
    count_parameters,
    keras_max_pool2d,
    keras_same_padding,
    masked_adaptive_avg_pool,
)

NAMES = list(BASELINES)
FEATURE_SIZES = [40, 64, 128, 513]  # mfcc 40, logmel 64, fbank 128, stft n_fft=1024


@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_builds_for_every_frontend_and_length(name):
    torch.manual_seed(0)
    for n_features in FEATURE_SIZES:
        model = build_baseline(name, 5, n_features).eval()
        for frames in (3, 48, 161):
            logits = model(torch.randn(2, frames, n_features))
            assert logits.shape == (2, 5)
            assert torch.isfinite(logits).all()


def _separable(n: int, frames: int, n_features: int, seed: int = 0):
    """Class 0 has energy in the low half of the bins, class 1 in the high half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, frames, n_features, generator=g)
    half = n_features // 2
    x[y == 0, :, :half] += 1.0
    x[y == 1, :, half:] += 1.0
    return x, y


def _train(model, x, y, steps: int = 25, lr: float = 1e-3, **kw) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x, **kw), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    "name, options",
    [(n, {}) for n in NAMES] + [("genre_cnn", {"input_frames": 24}), ("mlp", {"input_frames": 24})],
)
def test_baseline_learns_a_separable_problem(name, options):
    torch.manual_seed(0)
    x, y = _separable(16, 24, 40)
    model = build_baseline(name, 2, 40, **options)
    losses = _train(model, x, y)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["mlp", "mlp2", "cel", "cel2", "cel3"])
def test_mlp_family_on_raw_waveform(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, samples = 16, 800
    y = torch.arange(n) % 2
    t = torch.arange(samples) / 8000.0
    tones = torch.stack([torch.sin(2 * math.pi * 300 * t), torch.sin(2 * math.pi * 1100 * t)])
    x = 0.5 * tones[y] + 0.05 * torch.randn(n, samples, generator=g)
    model = build_baseline(name, 2, 1, input="waveform", input_samples=samples)
    assert model(x[:3]).shape == (3, 2)
    assert model(x[:3, :500]).shape == (3, 2)  # shorter clips are zero-padded
    losses = _train(model, x, y)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


PADDING_INVARIANT = [(n, {}) for n in NAMES if n != "genre_cnn"] + [
    ("genre_cnn", {"input_frames": 64}),
    ("mlp", {"input_frames": 64}),
]


@pytest.mark.parametrize("name, options", PADDING_INVARIANT)
def test_padded_batch_gives_each_clip_its_own_logits(name, options):
    """A clip's logits do not depend on the (zero-padded) clips it is batched with.

    Not tested (does not hold exactly, see the module docstring): genre_cnn without
    input_frames (Keras "same" pooling aligns windows by the padded length) and timm backbones.
    """
    torch.manual_seed(0)
    model = build_baseline(name, 4, 40, **options)
    # Train a couple of steps first so batch-norm running statistics are not the identity.
    x_train, y_train = _separable(8, 30, 40)
    _train(model, x_train, y_train % 4, steps=3)
    model.eval()
    lengths = [51, 34, 17, 9]
    g = torch.Generator().manual_seed(3)
    batch = torch.zeros(len(lengths), max(lengths), 40)
    mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randn(n, 40, generator=g)
        mask[i, :n] = False
    with torch.no_grad():
        batched = model(batch, mask)
        for i, n in enumerate(lengths):
            alone = model(batch[i : i + 1, :n])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "cel3"])
def test_waveform_mlp_padding_invariant(name):
    torch.manual_seed(0)
    model = build_baseline(name, 3, 1, input="waveform", input_samples=1000).eval()
    wav = torch.randn(2, 900)
    mask = torch.zeros(2, 900, dtype=torch.bool)
    mask[1, 600:] = True
    wav[1, 600:] = 7.0  # garbage under the mask must be ignored
    with torch.no_grad():
        batched = model(wav, mask)
        torch.testing.assert_close(batched[1:], model(wav[1:, :600]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched[:1], model(wav[:1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (3, 1), (1, 2)])
def test_keras_same_pooling_matches_tensorflow_rule(kernel, stride):
    """Output size ceil(n / stride), and values of TF's asymmetric ("extra pad after") rule."""
    g = torch.Generator().manual_seed(0)
    for n in range(1, 26):
        x = torch.randn(1, 1, n, 7, generator=g)
        y = keras_max_pool2d(x, kernel, stride)
        assert y.shape[2] == math.ceil(n / stride)
        assert y.shape[3] == math.ceil(7 / stride)
        # Reference, written from the TF definition: pad_before = total // 2 on each axis.
        out_n = math.ceil(n / stride)
        before = max((out_n - 1) * stride + kernel - n, 0) // 2
        out_w = math.ceil(7 / stride)
        before_w = max((out_w - 1) * stride + kernel - 7, 0) // 2
        for i in range(out_n):
            rows = range(max(i * stride - before, 0), min(i * stride - before + kernel, n))
            for j in range(out_w):
                cols = range(max(j * stride - before_w, 0), min(j * stride - before_w + kernel, 7))
                ref = x[0, 0][list(rows)][:, list(cols)].max()
                assert y[0, 0, i, j] == ref
    assert keras_same_padding(6, 3, 2) == (0, 1)  # even: the single pad goes after
    assert keras_same_padding(7, 3, 2) == (1, 1)


def test_keras_genre_cnn_matches_the_keras_model_summary():
    """For the seed's (130 frames, 13 MFCC) input the Keras summary flattens 15 x 1 x 32."""
    model = build_baseline("genre_cnn", 10, 13, input_frames=130)
    assert KerasGenreCNN.map_size(130) == 15 and KerasGenreCNN.map_size(13) == 1
    assert model.fc.in_features == 15 * 1 * 32
    conv = (1 * 9 + 1) * 32 + (32 * 9 + 1) * 32 + (32 * 4 + 1) * 32
    bn = 3 * 2 * 32  # gamma, beta (Keras also lists its moving mean/var, which are buffers here)
    dense = (480 * 64 + 64) + (64 * 10 + 10)
    assert count_parameters(model) == conv + bn + dense
    # Longer clips are cropped and shorter ones padded to input_frames.
    model.eval()
    for frames in (40, 130, 200):
        assert model(torch.randn(2, frames, 13)).shape == (2, 10)


def test_tiny_mel_cnn_parameter_count_follows_the_spec():
    model = build_baseline("tiny_mel_cnn", 3, 64)
    convs = (1 * 9 + 1) * 16 + (16 * 9 + 1) * 32 + (32 * 9 + 1) * 64
    dense = (64 * 4 * 4 * 128 + 128) + (128 * 3 + 3)
    assert count_parameters(model) == convs + dense
    model.convs[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == convs + dense - (1 * 9 + 1) * 16


def test_masked_adaptive_pool_equals_torch_pool_of_the_cropped_clip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 23, 9, generator=g)
    full = torch.full((3,), 23)
    torch.testing.assert_close(
        masked_adaptive_avg_pool(x, full, (4, 4)), F.adaptive_avg_pool2d(x, (4, 4))
    )
    lengths = torch.tensor([23, 10, 2])
    pooled = masked_adaptive_avg_pool(x, lengths, (4, 3))
    for i, n in enumerate(lengths.tolist()):
        ref = F.adaptive_avg_pool2d(x[i : i + 1, :, :n], (4, 3))
        torch.testing.assert_close(pooled[i : i + 1], ref)


@pytest.mark.parametrize("name", NAMES + ["timm:resnet18"])
def test_config_rebuilds_the_same_model(name):
    options = {"input_frames": 20} if name == "genre_cnn" else {}
    model = build_baseline(name, 3, 40, **options).eval()
    config = json.loads(json.dumps(model.config))  # survives a config.json round trip
    rebuilt = baseline_from_config(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 20, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.config == model.config


@pytest.mark.parametrize("name", ["resnet18", "timm:efficientnet_b0"])
def test_timm_backbones_on_spectrograms(name):
    torch.manual_seed(0)
    model = build_baseline(name, 4, 64)
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    x = torch.randn(2, 50, 64)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    logits = model(x * ~mask[..., None], mask)
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert all(p.grad is not None for p in model.out.parameters())


def test_bad_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="known: tiny_mel_cnn.*timm:<name>"):
        build_baseline("vgg_magic", 2, 40)
    with pytest.raises(ConfigError, match="did you mean tiny_mel_cnn"):
        build_baseline("tiny_mel_cn", 2, 40)
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_baseline("timm:resnet_does_not_exist", 2, 40)
    with pytest.raises(ConfigError, match="unknown option.*dropuot"):
        build_baseline("tiny_mel_cnn", 2, 40, dropuot=0.1)
    with pytest.raises(ConfigError, match="input_samples"):
        build_baseline("mlp", 2, 40, input="waveform")
    with pytest.raises(ConfigError, match="at least 11"):
        build_baseline("genre_cnn", 2, 8)
    with pytest.raises(ConfigError, match="pretrained"):
        build_baseline("timm:resnet18", 2, 40, pretrained=True)
    with pytest.raises(ConfigError, match="n_classes"):
        build_baseline("mlp", 0, 40)
    model = build_baseline("drone_cnn", 2, 64)
    with pytest.raises(ConfigError, match=r"\(B, T, 64\)"):
        model(torch.randn(2, 10, 128))


def test_masked_batch_norm_statistics_skip_padding():
    """Training statistics over a padded batch = plain BatchNorm over the valid frames only."""
    from bioaudio.models.baselines import MaskedBatchNorm2d

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 5, 8])
    x = torch.randn(3, 4, 12, 6, generator=g)
    masked, plain = MaskedBatchNorm2d(4, momentum=0.1), torch.nn.BatchNorm2d(4, momentum=0.1)
    y = masked(x, lengths)
    # (B, C, T, F) valid parts joined along time -> (1, C, sum(T_i), F)
    joined = torch.cat([x[i : i + 1, :, :n] for i, n in enumerate(lengths.tolist())], dim=2)
    ref = plain(joined)
    got = torch.cat([y[i : i + 1, :, :n] for i, n in enumerate(lengths.tolist())], dim=2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)
