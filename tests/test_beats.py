"""BEATs encoder: official parity, key layout, other configurations, keep, checkpointing, bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from beats.convert import config_from_official, convert_state_dict
from beats.model import BEATsConfig, _block_fft_size, fft_size, grouped_conv1d_fft
from bioaudio import load_model
from bioaudio.errors import ConfigError, DataError
from bioaudio.models.audio_model import build_model
from bioaudio.models.heads import HeadConfig
from bioaudio.models.layers import attention_impl


def _io(official_fixtures, name):
    return torch.load(official_fixtures / f"{name}_io.pt", weights_only=True)


@pytest.mark.parametrize("name", ["beats_tiny", "beats_tiny_ft"])
@pytest.mark.parametrize("case", ["plain", "padded"])
def test_extract_features_matches_official(official_fixtures, name, case):
    model = load_model(official_fixtures / f"{name}.pt")
    d = _io(official_fixtures, name)
    with torch.no_grad():
        if case == "plain":
            out, mask = model.extract_features(d["wav"])
        else:
            out, mask = model.extract_features(d["wav_pad"], padding_mask=d["pad_mask"])
    torch.testing.assert_close(out, d[f"out_{case}"], atol=1e-4, rtol=0)
    ref_mask = d[f"padding_mask_out_{case}"]
    if ref_mask is None:
        assert mask is None
    else:
        assert torch.equal(mask, ref_mask)


def _parse_keys(path):
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        out[name] = torch.empty(eval(shape), device="meta")  # shapes like "(768, 512)"
    return out


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("finetuned", [False, True])
def test_base_preset_has_the_iter3_state_dict(official_fixtures, finetuned):
    official = _parse_keys(official_fixtures / "beats_keys_iter3.txt")
    assert len(official) == 250
    head = None
    if finetuned:  # the finetuned iter3 files add predictor (527, 768)
        official["predictor.weight"] = torch.empty(527, 768, device="meta")
        official["predictor.bias"] = torch.empty(527, device="meta")
        head = HeadConfig(pooling="mean", num_classes=527)
    with torch.device("meta"):
        model = build_model("beats", "base", head=head)
    assert _shapes(convert_state_dict(official, "iter3")) == _shapes(model.state_dict())


def test_official_cfg_overrides_official_defaults_not_presets():
    enc, head = config_from_official({"input_patch_size": 16, "encoder_layers": 3}, "x")
    # Unspecified fields take the official BEATsConfig defaults.
    assert (enc.max_distance, enc.deep_norm, enc.dropout, enc.encoder_layers) == (
        1280,
        False,
        0.1,
        3,
    )
    assert head is None
    _, head = config_from_official({"input_patch_size": 16, "finetuned_model": True}, "x")
    assert head.num_classes == 527 and head.pooling == "mean"


def _to_official(model) -> dict:
    """Our BEATsModel state -> the official checkpoint layout (inverse of beats/convert.py)."""
    sd, layers = {}, model.encoder_cfg.encoder_layers
    for k, v in model.state_dict().items():
        if k == "encoder.encoder.relative_attention_bias.weight":
            for i in range(layers):
                sd[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = v
        elif k.endswith("parametrizations.weight.original0"):
            sd["encoder.pos_conv.0.weight_g"] = v
        elif k.endswith("parametrizations.weight.original1"):
            sd["encoder.pos_conv.0.weight_v"] = v
        elif k.startswith("encoder.patch_embedding.proj."):
            sd["patch_embedding." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("encoder.encoder."):
            sd["encoder." + k[len("encoder.encoder.") :]] = v
        elif k.startswith("encoder."):
            sd[k[len("encoder.") :]] = v
        elif k.startswith("head.fc."):
            sd["predictor." + k.rsplit(".", 1)[1]] = v
    return sd


OTHER = dict(
    input_patch_size=16,
    embed_dim=48,
    encoder_layers=3,
    encoder_embed_dim=48,  # no post_extract_proj
    encoder_ffn_embed_dim=96,
    encoder_attention_heads=6,
    conv_pos=15,
    conv_pos_groups=4,
    conv_bias=True,
    num_buckets=64,
    max_distance=100,
)


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(gru_rel_pos=False, deep_norm=False, layer_norm_first=True, activation_fn="relu"),
        dict(relative_position_embedding=False, gru_rel_pos=False),
    ],
)
def test_other_configuration_official_file_round_trip(tmp_path, variant):
    """Another size/variant written in the official layout loads with identical outputs: every
    dimension comes from the file's cfg, none from our presets or the tiny fixture."""
    torch.manual_seed(0)
    cfg = BEATsConfig(**OTHER, **variant)
    model = build_model("beats", cfg, head=HeadConfig(pooling="mean", num_classes=7)).eval()
    with torch.no_grad():  # non-trivial norms, gates and biases
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official_cfg = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("n_mels", "cls_token", "gradient_checkpointing")
    }
    official_cfg.update(finetuned_model=True, predictor_class=7, predictor_dropout=0.0)
    path = tmp_path / "other.pt"
    labels = {i: f"label{i}" for i in range(7)}
    torch.save({"cfg": official_cfg, "model": _to_official(model), "label_dict": labels}, path)

    loaded = load_model(path)
    assert loaded.class_names == [f"label{i}" for i in range(7)]
    wav = 0.1 * torch.randn(2, 24000)
    pad = torch.zeros(2, 24000, dtype=torch.bool)
    pad[1, 15000:] = True
    with torch.no_grad():
        a, b = model.features(wav, pad), loaded.features(wav, pad)
        torch.testing.assert_close(a.tokens, b.tokens, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(wav, pad), loaded(wav, pad), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            model.extract_features(wav, pad)[0], loaded.extract_features(wav, pad)[0]
        )


def _tiny(**kw):
    torch.manual_seed(0)
    return build_model("beats", {"preset": "tiny", **kw}).eval()


def _fbank(b=2, t=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 128, generator=g)


@pytest.mark.parametrize("cls_token", [False, True])
def test_keep_equals_masking_the_dropped_tokens(cls_token):
    """Dropping tokens = running with them hidden (zeroed before the positional conv, masked as
    keys) and keeping the visible ones: same tokens, same relative positions."""
    enc = _tiny(cls_token=cls_token).encoder
    fbank = _fbank()
    x = enc.embed(fbank)  # (2, 80, 64)
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(2, x.shape[1], dtype=torch.bool)
    for row in range(2):
        keep[row, torch.randperm(x.shape[1], generator=g)[:30]] = True
    with torch.no_grad():
        dropped = enc.encode(x, keep=keep)
        masked = enc.encode(x, token_mask=~keep)
    assert dropped.tokens.shape == (2, 30, 64)
    torch.testing.assert_close(
        dropped.tokens, masked.tokens[keep].view(2, 30, 64), atol=1e-5, rtol=0
    )
    if cls_token:
        torch.testing.assert_close(dropped.cls, masked.cls, atol=1e-5, rtol=0)
    with torch.no_grad():
        full = enc.encode(x)
        all_kept = enc.encode(x, keep=torch.ones_like(keep))
    torch.testing.assert_close(all_kept.tokens, full.tokens)


def test_gradient_checkpointing_gives_identical_gradients():
    model = _tiny(cls_token=True)
    model.train()
    fbank = _fbank()

    def grads(ckpt):
        model.zero_grad()
        model.encoder.gradient_checkpointing = ckpt
        out = model.encoder(fbank)
        (out.tokens.square().mean() + out.cls.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5, msg=name)


def test_layer_wise_gradient_decay_scales_lower_layers():
    """The official `layer_wise_gradient_decay_ratio` leaves outputs alone and scales gradients."""
    fbank = _fbank()
    a, b = _tiny(), _tiny(layer_wise_gradient_decay_ratio=0.5)
    b.load_state_dict(a.state_dict())
    outs = []
    for m in (a, b):
        m.train()
        out = m.encoder(fbank).tokens
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1])
    ga = a.encoder.patch_embedding.proj.weight.grad
    gb = b.encoder.patch_embedding.proj.weight.grad
    torch.testing.assert_close(gb, ga * 0.25, rtol=1e-4, atol=1e-9)  # two layers: 0.5 ** 2


def test_math_attention_equals_sdpa():
    enc = _tiny().encoder
    fbank = _fbank()
    mask = torch.zeros(2, 160, dtype=torch.bool)
    mask[1, 100:] = True
    with torch.no_grad():
        a = enc(fbank, mask)
        with attention_impl("math"):
            b = enc(fbank, mask)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)


def test_bf16_autocast_runs_and_stays_close():
    enc = _tiny().encoder
    fbank = _fbank()
    with torch.no_grad():
        ref = enc(fbank).tokens
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(fbank).tokens
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 0.05


def test_cls_pooling_requires_a_cls_token():
    with pytest.raises(ConfigError, match="CLS"):
        build_model("beats", "tiny", head=HeadConfig(pooling="cls", num_classes=2))
    with pytest.raises(ConfigError, match="CLS"):
        build_model("beats", "tiny").embed(torch.randn(1, 8000) * 0.1, pooling="cls")
    model = build_model("beats", {"preset": "tiny", "cls_token": True}, head=HeadConfig("cls", 2))
    assert model.embed(torch.randn(1, 8000) * 0.1, pooling="cls").shape == (1, 64)
    assert "cls_token" in dict(model.encoder.named_parameters())


def test_forward_layers_lists_every_layer():
    enc = _tiny(cls_token=True).encoder
    fbank = _fbank()
    with torch.no_grad():
        out, layers = enc.forward_layers(fbank)
        plain = enc(fbank)
    assert len(layers) == 2 and layers[0].shape == (2, 1 + 80, 64)
    torch.testing.assert_close(layers[-1][:, 1:], out.tokens)
    torch.testing.assert_close(layers[-1][:, 0], out.cls)
    torch.testing.assert_close(plain.tokens, out.tokens)


def test_input_shorter_than_one_patch_is_a_data_error():
    model = _tiny()
    with pytest.raises(DataError, match="shorter than one 16-frame patch"):
        model.embed(torch.zeros(1, 1000))  # 4 frames
    assert model.embed(torch.zeros(1, 3000)).shape == (1, 64)  # 17 frames: one patch


def test_narrow_pos_conv_runs_in_fp32_under_cpu_autocast():
    # oneDNN's AMX bf16 grouped conv1d is wrong for 4 channels per group (the tiny preset):
    # the positional conv must give its fp32 result under CPU autocast on every CPU.
    enc = _tiny().encoder.encoder
    x = torch.randn(2, 80, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = enc.pos_conv_embed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc.pos_conv_embed(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref)


@pytest.mark.parametrize(
    "c, groups, k, pad, n",
    [(64, 16, 128, 64, 80), (64, 16, 128, 64, 3), (48, 4, 7, 3, 50), (32, 1, 5, 0, 9),
     (32, 8, 16, 15, 20), (16, 16, 1, 0, 6), (32, 8, 16, 8, 300), (64, 16, 128, 64, 1500)],
)  # fmt: skip
def test_grouped_conv1d_fft_equals_conv1d(c, groups, k, pad, n):
    """Values and gradients in float64; the last two shapes run several overlap-save blocks."""
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(3, c, n, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, c // groups, k, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    ref = F.conv1d(x, w, bias, padding=pad, groups=groups)
    out = grouped_conv1d_fft(x, w, bias, groups, pad)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * up).sum(), (x, w, bias))
    grads = torch.autograd.grad((out * up).sum(), (x, w, bias))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_grouped_conv1d_fft_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        grouped_conv1d_fft(torch.randn(1, 8, 10), torch.randn(8, 3, 5), None, 2, 2)
    with pytest.raises(ValueError, match="do not fit"):
        grouped_conv1d_fft(torch.randn(1, 8, 10), torch.randn(8, 4, 5), None, 2, 5)


def test_fft_size_is_the_next_5_smooth_length():
    assert [fft_size(n) for n in (1, 7, 11, 13, 127, 623)] == [1, 8, 12, 15, 128, 625]


def test_block_fft_size_is_even_and_short_blocks_for_long_inputs():
    for n_out, k, batch, c_group in [
        (81, 128, 3, 4),
        (301, 16, 3, 4),
        (1501, 128, 3, 4),
        (5, 1, 1, 1),
    ]:
        size = _block_fft_size(n_out, k, batch, c_group)
        assert size % 2 == 0 and size >= k and fft_size(size) == size  # even and 5-smooth
    assert _block_fft_size(1501, 128, 3, 4) < 1501 + 127  # several blocks, not one long FFT
    assert _block_fft_size(301, 16, 3, 4) < 301 + 15


def test_pos_conv_equals_the_direct_weight_normed_conv():
    enc = _tiny().encoder.encoder
    conv = enc.pos_conv[0]
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    direct = F.gelu(conv(x.transpose(1, 2))[:, :, :-1]).transpose(1, 2)
    fft = enc.pos_conv_embed(x)
    torch.testing.assert_close(fft, direct, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(direct.square().sum(), conv.parametrizations.weight.original1)[0]
    g2 = torch.autograd.grad(fft.square().sum(), conv.parametrizations.weight.original1)[0]
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)


def test_attention_with_a_trainable_mask_matches_sdpa():
    """On CPU a mask that needs a gradient takes the explicit path (SDPA's fallback is slower);
    values and gradients are SDPA's."""
    from bioaudio.models.layers import attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 3, 7, 7, generator=g, requires_grad=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    up = torch.randn(ref.shape, generator=g)
    for a, b in zip(
        torch.autograd.grad((out * up).sum(), (q, k, v, mask)),
        torch.autograd.grad((ref * up).sum(), (q, k, v, mask)),
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
