"""EAT encoder: official parity (HF + fairseq), key layouts, other sizes, keep, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bioaudio import load_model
from bioaudio.errors import CheckpointError, DataError
from bioaudio.models.audio_model import build_model
from bioaudio.models.heads import HeadConfig
from bioaudio.models.layers import attention_impl
from eat.convert import FAIRSEQ_KEY_MAP, HF_KEY_MAP, _map_keys
from eat.model import EATConfig, sincos_positions

SOURCES = {
    "hf": ("eat_tiny_hf.safetensors", "eat_tiny_io"),
    "fairseq": ("eat_tiny_fairseq.pt", "eat_tiny_io"),
    "hf_ft": ("eat_tiny_ft_hf.safetensors", "eat_tiny_ft_io"),
    "fairseq_ft": ("eat_tiny_ft_fairseq.pt", "eat_tiny_ft_io"),
}


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("case", ["plain", "padded"])
def test_matches_official(official_fixtures, source, case):
    file, io = SOURCES[source]
    model = load_model(official_fixtures / file)
    d = torch.load(official_fixtures / f"{io}.pt", weights_only=True)
    mel = d[f"mel_{case}"]
    with torch.no_grad():
        feats = model.extract_features(mel)
        fwd = model(mel)
    torch.testing.assert_close(feats, d[f"feats_{case}"], atol=1e-4, rtol=0)
    torch.testing.assert_close(fwd, d[f"forward_{case}"], atol=1e-4, rtol=0)


def test_waveform_api_matches_official_features(official_fixtures):
    """Our frontend + encoder on the waveform = the official pipeline (3 s clip, 304 frames)."""
    model = load_model(official_fixtures / "eat_tiny_hf.safetensors")
    d = torch.load(official_fixtures / "eat_tiny_io.pt", weights_only=True)
    with torch.no_grad():
        out = model.features(d["wav"])
    torch.testing.assert_close(out.cls, d["feats_plain"][:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.tokens, d["feats_plain"][:, 1:], atol=1e-4, rtol=0)


def test_sincos_table_equals_the_official_positions(official_fixtures):
    """Our from-scratch position table is the one stored in official checkpoints."""
    sd = torch.load(official_fixtures / "eat_tiny_fairseq.pt", weights_only=True)["model"]
    stored = sd["modality_encoders.IMAGE.fixed_positional_encoder.positions"][0]
    torch.testing.assert_close(sincos_positions(64, 8, 64), stored, atol=1e-5, rtol=0)


def _parse_keys(path, tag):
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        kind, name, shape = line.split(" ", 2)
        if kind == tag:
            out[name.removeprefix("_ema.")] = torch.empty(eval(shape), device="meta")
    return out


@pytest.mark.parametrize(
    "tag,key_map,finetuned",
    [
        ("hf_pretrain", HF_KEY_MAP, False),
        ("hf_finetune", HF_KEY_MAP, True),
        ("fairseq_pretrain", FAIRSEQ_KEY_MAP, False),
        ("fairseq_pretrain_ema", FAIRSEQ_KEY_MAP, False),
        ("fairseq_finetune", FAIRSEQ_KEY_MAP, True),
    ],
)
def test_base_preset_has_the_official_state_dict(official_fixtures, tag, key_map, finetuned):
    official = _parse_keys(official_fixtures / "eat_keys_base.txt", tag)
    assert official
    head = HeadConfig(pooling="cls", num_classes=527, norm=True) if finetuned else None
    with torch.device("meta"):
        model = build_model("eat", "base", head=head)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in _map_keys(official, key_map, tag).items()}
    assert converted == ours


def test_large_preset_dimensions():
    cfg = EATConfig.preset("large")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, int(cfg.embed_dim * cfg.mlp_ratio)) == (
        1024,
        24,
        16,
        4096,
    )


def test_fairseq_ema_teacher(official_fixtures):
    path = official_fixtures / "eat_tiny_fairseq.pt"
    ema = torch.load(path, weights_only=True)["model"]["_ema"]
    model = load_model(path, ema=True)
    got = model.encoder.blocks[1].mlp.fc2.weight
    assert torch.equal(got, ema["blocks.1.mlp.fc2.weight"])
    assert not torch.equal(got, load_model(path).encoder.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="_ema"):
        load_model(official_fixtures / "eat_tiny_ft_fairseq.pt", ema=True)


OTHER = EATConfig(embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, max_length=20)


def _other_model(head: bool):
    torch.manual_seed(0)
    h = HeadConfig(pooling="cls", num_classes=4, norm=True, norm_eps=1e-5) if head else None
    model = build_model("eat", OTHER, head=h).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _compare(a, b):
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(2, 1, 96, 128, generator=g)
    wav = 0.1 * torch.randn(2, 16000, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            a.extract_features(mel), b.extract_features(mel), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(a(mel), b(mel), atol=1e-6, rtol=0)
        torch.testing.assert_close(a.embed(wav, pooling="cls"), b.embed(wav, pooling="cls"))


@pytest.mark.parametrize("head", [False, True])
def test_other_configuration_hf_layout(tmp_path, head):
    """Another size in the Hugging Face layout: every dimension is read from the checkpoint."""
    model = _other_model(head)
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("encoder.", "model.", 1).replace("head.norm.", "model.fc_norm.")
        sd[k.replace("head.fc.", "model.head.")] = v.contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"))
    config = dict(
        embed_dim=48, depth=3, num_heads=3, patch_size=16, stride=16, in_chans=1, mel_bins=128,
        max_length=20, num_classes=4, model_variant="finetune" if head else "pretrain",
        mlp_ratio=2.0, qkv_bias=True, layer_norm_first=False, norm_eps=1e-6, norm_affine=True,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert loaded.encoder_cfg == OTHER
    _compare(model, loaded)
    # The bare safetensors file with its config beside it reads the same.
    _compare(model, load_model(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("head", [False, True])
def test_other_configuration_fairseq_layout(tmp_path, head):
    model = _other_model(head)
    enc_cfg = {
        "_name": "data2vec_multi", "depth": 3, "embed_dim": 48, "num_heads": 3, "mlp_ratio": 2.0,
        "norm_eps": 1e-6, "layer_norm_first": False,
        "modalities": {"image": {"patch_size": 16, "in_chans": 1, "prenet_depth": 0,
                                 "num_extra_tokens": 1, "use_alibi_encoder": False}},
    }  # fmt: skip
    prefix = "model." if head else ""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.blocks."):
            sd[prefix + k.removeprefix("encoder.")] = v
        elif k.startswith("encoder.pre_norm."):
            sd[prefix + "modality_encoders.IMAGE.context_encoder.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("encoder."):
            sd[prefix + "modality_encoders.IMAGE." + k.removeprefix("encoder.")] = v
        else:  # head: the fairseq classifier's fc_norm eps is 1e-6
            sd[k.replace("head.norm.", "fc_norm.").replace("head.fc.", "head.")] = v
    if head:
        cfg = {"model": {"_name": "mae_image_classification", "num_classes": 4,
                         "prediction_mode": "PredictionMode.CLS_TOKEN", "use_fc_norm": True,
                         "pretrained_model_args": {"model": enc_cfg}}}  # fmt: skip
        model.head.norm.eps = 1e-6
    else:
        cfg = {"model": enc_cfg}
        sd["modality_encoders.IMAGE.decoder.proj.weight"] = torch.zeros(48, 48)  # dropped
    torch.save({"cfg": cfg, "model": sd}, tmp_path / "other.pt")
    loaded = load_model(tmp_path / "other.pt")
    assert loaded.encoder_cfg == OTHER
    _compare(model, loaded)


def test_keep_equals_running_only_the_kept_tokens():
    torch.manual_seed(0)
    enc = build_model("eat", "tiny").encoder.eval()
    fbank = torch.randn(2, 96, 128)
    n = (96 // 16) * 8
    g = torch.Generator().manual_seed(1)
    keep = torch.zeros(2, n, dtype=torch.bool)
    for row in range(2):
        keep[row, torch.randperm(n, generator=g)[:10]] = True
    with torch.no_grad():
        out = enc(fbank, keep=keep)
        # Reference: patches + positions, then only the kept tokens through the blocks.
        x = enc.local_encoder(fbank) + enc.fixed_positional_encoder.positions[:, :n]
        x = torch.cat([enc.extra_tokens.expand(2, -1, -1), x[keep].view(2, 10, -1)], dim=1)
        x = enc.pre_norm(x)
        for block in enc.blocks:
            x = block(x, None)
    torch.testing.assert_close(out.tokens, x[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cls, x[:, 0], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    enc = build_model("eat", {"preset": "tiny", "drop_path_rate": 0.0}).encoder.train()
    fbank = torch.randn(2, 64, 128)

    def grads(ckpt):
        enc.zero_grad()
        enc.gradient_checkpointing = ckpt
        out = enc(fbank)
        (out.tokens.square().mean() + out.cls.sum()).backward()
        return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5, msg=name)


def test_math_attention_and_bf16():
    torch.manual_seed(0)
    enc = build_model("eat", "tiny").encoder.eval()
    fbank = torch.randn(2, 64, 128)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[1, 40:] = True
    with torch.no_grad():
        ref = enc(fbank, mask)
        with attention_impl("math"):
            math = enc(fbank, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(fbank, mask)
    torch.testing.assert_close(ref.tokens, math.tokens, atol=1e-5, rtol=0)
    assert low.tokens.dtype == torch.bfloat16
    assert (low.tokens.float() - ref.tokens).norm() / ref.tokens.norm() < 0.05


def test_input_longer_than_the_position_table():
    enc = build_model("eat", "tiny").encoder  # max_length 64 time patches = 1024 frames
    with pytest.raises(DataError, match="position table"):
        enc(torch.zeros(1, 1040, 128))
    assert enc(torch.zeros(1, 1024, 128)).tokens.shape == (1, 512, 64)


def test_forward_layers_lists_every_block():
    torch.manual_seed(0)
    enc = build_model("eat", "tiny").encoder.eval()
    fbank = torch.randn(2, 64, 128)
    with torch.no_grad():
        out, layers = enc.forward_layers(fbank)
    assert len(layers) == 2 and layers[0].shape == (2, 1 + 32, 64)
    torch.testing.assert_close(layers[-1][:, 1:], out.tokens)
    torch.testing.assert_close(layers[-1][:, 0], out.cls)
    assert not torch.allclose(layers[0], layers[1])
