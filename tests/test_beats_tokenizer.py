"""BEATs tokenizers: official parity, the EMA quantiser, the random-projection tokenizer,
distillation, export / reload, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import beats.quantizer as quantizer_mod
from beats.model import BEATsConfig, BEATsEncoder
from beats.quantizer import NormEMAVectorQuantizer, QuantizerConfig, spherical_kmeans
from beats.tokenizer import (
    BEATsTokenizer,
    BEATsTokenizerConfig,
    RandomProjectionConfig,
    RandomProjectionTokenizer,
    TokenizerDistiller,
    is_official_tokenizer,
    load_official_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from bioaudio.errors import CheckpointError, ConfigError
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import read_torch_file

TOKENIZER = "beats_tokenizer_tiny.pt"


@pytest.fixture(scope="module")
def official(official_fixtures):
    obj = read_torch_file(official_fixtures / TOKENIZER)
    io = torch.load(official_fixtures / "beats_tokenizer_tiny_io.pt", weights_only=True)
    return obj, io


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _quantizer(k: int = 4, d: int = 3, **kw) -> NormEMAVectorQuantizer:
    kw.setdefault("kmeans_init", False)
    kw.setdefault("dead_code_threshold", 0.0)
    return NormEMAVectorQuantizer(QuantizerConfig(codebook_size=k, dim=d, **kw)).train()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Official tokenizer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["plain", "padded"])
def test_official_labels_match(official, case):
    obj, io = official
    tok = load_official_tokenizer(obj, TOKENIZER)
    if case == "plain":
        labels = tok.extract_labels(io["wav"])
    else:
        labels = tok.extract_labels(io["wav_pad"], padding_mask=io["pad_mask"])
    assert labels.shape == (2, 144) and labels.dtype == torch.int64
    ref, margin = io[f"labels_{case}"], io[f"margin_{case}"]
    sure = margin > 1e-3
    assert int(sure.sum()) >= len(sure) - 1  # the fixture has at most one near tie
    assert torch.equal(labels.flatten()[sure], ref[sure])


def test_official_quantize_input_margin_and_feature_path(official):
    obj, io = official
    tok = load_official_tokenizer(obj, TOKENIZER)
    fbank = tok.preprocess(io["wav"])
    torch.testing.assert_close(
        tok.quantize_input(fbank), io["quantize_input_plain"], atol=1e-4, rtol=0
    )
    labels, margin = tok.labels_from_features(fbank, None, return_margin=True)
    assert torch.equal(labels.flatten(), io["labels_plain"])
    torch.testing.assert_close(margin.flatten(), io["margin_plain"], atol=1e-4, rtol=0)


def test_labels_from_features_ignores_padding_tokens(official):
    obj, io = official
    tok = load_official_tokenizer(obj, TOKENIZER)
    fbank = tok.preprocess(io["wav"])
    frame_mask = torch.zeros(fbank.shape[:2], dtype=torch.bool)
    frame_mask[1, 200:] = True  # clip 1 ends inside time patch 12
    labels = tok.labels_from_features(fbank, frame_mask)
    assert (labels[0] >= 0).all()
    assert (labels[1, : 12 * 8] >= 0).all() and (labels[1, 12 * 8 :] == -100).all()


def test_load_tokenizer_reads_the_official_file(official_fixtures, official):
    _, io = official
    tok = load_tokenizer(official_fixtures / TOKENIZER)
    assert isinstance(tok, BEATsTokenizer) and not tok.training
    sure = io["margin_plain"] > 1e-3
    assert torch.equal(tok.extract_labels(io["wav"]).flatten()[sure], io["labels_plain"][sure])


def test_config_from_official_cfg(official):
    obj, _ = official
    cfg = BEATsTokenizerConfig.from_official(obj["cfg"], "x")
    assert cfg == BEATsTokenizerConfig.preset("tiny")
    assert (cfg.quant_n, cfg.quant_dim) == (64, 16)
    # Absent keys take the official TokenizersConfig defaults, not our presets.
    full = BEATsTokenizerConfig.from_official({"input_patch_size": 16}, "x")
    assert (full.encoder.embed_dim, full.encoder.encoder_embed_dim) == (512, 768)
    assert (full.encoder.encoder_layers, full.quant_n, full.quant_dim) == (12, 1024, 256)
    assert full.encoder.dropout == 0.1 and not full.encoder.deep_norm
    with pytest.raises(CheckpointError) as e:  # official default input_patch_size is -1
        BEATsTokenizerConfig.from_official({}, "t.pt")
    assert _one_line(e).startswith("t.pt: unusable tokenizer cfg")
    with pytest.raises(CheckpointError) as e:
        BEATsTokenizerConfig.from_official({**obj["cfg"], "quant_n": 1}, "t.pt")
    assert "a codebook of 1 code" in _one_line(e)


def test_tokenizer_and_model_checkpoints_are_told_apart(official_fixtures, official):
    obj, _ = official
    model_obj = read_torch_file(official_fixtures / "beats_tiny.pt")
    assert is_official_tokenizer(obj)
    assert not is_official_tokenizer(model_obj)
    assert not is_official_tokenizer({"cfg": {}, "model": []}) and not is_official_tokenizer(3)
    with pytest.raises(CheckpointError) as e:
        load_official_tokenizer(model_obj, "beats_tiny.pt")
    assert "not an official BEATs tokenizer" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(official_fixtures / "beats_tiny.pt")
    assert "not a tokenizer" in _one_line(e)


def _edited(obj, drop=(), add=None, reshape=None):
    model = {k: v for k, v in obj["model"].items() if k not in drop}
    model.update(add or {})
    for k, shape in (reshape or {}).items():
        model[k] = torch.zeros(shape)
    return {"cfg": dict(obj["cfg"]), "model": model}


@pytest.mark.parametrize(
    "edit, expect",
    [
        (dict(drop=["quantize.embedding.weight"]), "lacks quantize.embedding.weight"),
        (dict(drop=["quantize_layer.2.bias"]), "missing (quantize_layer.2.bias)"),
        (dict(add={"quantize.extra": torch.zeros(1)}), "unexpected key 'quantize.extra'"),
        (dict(reshape={"quantize.embedding.weight": (64, 8)}), "quantize.codebook is (64, 8)"),
        (dict(reshape={"quantize.embedding.embed_avg": (3, 16)}), "embed_avg is (3, 16)"),
        (dict(reshape={"quantize_layer.0.weight": (64, 32)}), "quantize_layer.0.weight is"),
        (dict(reshape={"encoder.layers.0.fc1.weight": (7, 64)}), "fc1.weight is (7, 64)"),
    ],
)
def test_bad_official_tokenizer_files(official, edit, expect):
    obj, _ = official
    with pytest.raises(CheckpointError) as e:
        load_official_tokenizer(_edited(obj, **edit), "t.pt")
    msg = _one_line(e)
    assert msg.startswith("t.pt") and expect in msg


def test_official_load_keeps_codebook_and_usage(official):
    obj, _ = official
    tok = load_official_tokenizer(obj, TOKENIZER)
    q = tok.quantize
    assert torch.equal(q.codebook, obj["model"]["quantize.embedding.weight"])
    assert bool(q.initted)
    # The fixture's usage statistics are empty: every code gets the grace count of 1.
    assert torch.equal(q.cluster_size, torch.ones(64))
    torch.testing.assert_close(q.embed_avg, q.codebook)


# ----------------------------------------------------------------------------------------------
# Quantiser
# ----------------------------------------------------------------------------------------------
def _toy_batch():
    """Unit codebook e0..e3 in 3-d (e3 = -e0) and 5 vectors: 3 near e0, 2 near e1, none near
    e2 / e3."""
    codebook = F.normalize(
        torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0.1, 0]]), dim=1
    )
    z = torch.tensor(
        [[2.0, 0.2, 0.1], [1.0, -0.1, 0.0], [3.0, 0.3, -0.3], [0.1, 1.0, 0.2], [-0.1, 2.0, 0.0]]
    )
    return codebook, z


def test_ema_update_official_rule_by_hand():
    codebook, z = _toy_batch()
    decay = 0.9
    q = _quantizer(decay=decay)
    q.codebook.copy_(codebook)
    q.cluster_size.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = q(z)
    zn = z / z.norm(dim=1, keepdim=True)
    assert out.indices.tolist() == [0, 0, 0, 1, 1]
    mean0 = zn[:3].sum(0) / 3
    mean1 = zn[3:].sum(0) / 2
    new0 = decay * codebook[0] + (1 - decay) * mean0 / mean0.norm()
    new1 = decay * codebook[1] + (1 - decay) * mean1 / mean1.norm()
    expected = torch.stack([new0 / new0.norm(), new1 / new1.norm(), codebook[2], codebook[3]])
    torch.testing.assert_close(q.codebook, expected)
    counts = torch.tensor([3.0, 2.0, 0.0, 0.0])
    torch.testing.assert_close(q.cluster_size, decay * torch.tensor([1.0, 2, 3, 4]) + 0.1 * counts)
    # The quantised output is the pre-update codeword; usage of the batch: 2 codes.
    torch.testing.assert_close(out.quantized, codebook[[0, 0, 0, 1, 1]])
    assert float(out.codes_used) == 2.0
    p = torch.tensor([0.6, 0.4])
    torch.testing.assert_close(out.perplexity, torch.exp(-(p * p.log()).sum()))


def test_ema_update_sums_rule_by_hand():
    codebook, z = _toy_batch()
    decay, eps = 0.8, 1e-5
    q = _quantizer(decay=decay, eps=eps, ema_rule="sums")
    sizes = torch.tensor([1.0, 2.0, 3.0, 4.0])
    q.codebook.copy_(codebook)
    q.cluster_size.copy_(sizes)
    q.embed_avg.copy_(codebook * sizes[:, None])
    q(z)
    zn = z / z.norm(dim=1, keepdim=True)
    sums = torch.stack([zn[:3].sum(0), zn[3:].sum(0), torch.zeros(3), torch.zeros(3)])
    counts = torch.tensor([3.0, 2.0, 0.0, 0.0])
    size = decay * sizes + (1 - decay) * counts
    avg = decay * codebook * sizes[:, None] + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + 4 * eps) * n  # Laplace smoothing
    w = avg / smoothed[:, None]
    torch.testing.assert_close(q.cluster_size, size)
    torch.testing.assert_close(q.embed_avg, avg)
    torch.testing.assert_close(q.codebook, w / w.norm(dim=1, keepdim=True))


def test_commitment_loss_straight_through_and_padding():
    codebook, z = _toy_batch()
    q = _quantizer(beta=0.5)
    q.codebook.copy_(codebook)
    q.eval()
    z = z.clone().requires_grad_(True)
    valid = torch.tensor([True, True, False, True, False])
    out = q(z, valid)
    zn = F.normalize(z.detach(), dim=1)
    err = (zn - codebook[out.indices]).pow(2)[valid]
    torch.testing.assert_close(out.loss, 0.5 * err.mean())
    assert float(out.codes_used) == 2.0  # padding rows are not counted
    # Straight-through: d(sum(quantized * g)) / dz equals the gradient of sum(l2norm(z) * g).
    g = torch.randn(5, 3)
    (out.quantized * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)


def _is_kmeans_fixed_point(x: torch.Tensor, means: torch.Tensor) -> bool:
    """Every mean with members is the normalised sum of the rows nearest to it."""
    assign = (x @ means.T).argmax(1)
    for k in assign.unique():
        centre = F.normalize(x[assign == k].sum(0), dim=0)
        if not torch.allclose(centre, means[k], atol=1e-5):
            return False
    return True


def test_spherical_kmeans_converges_on_clusters():
    gen = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    x = F.normalize(centres.repeat(40, 1) + 0.05 * torch.randn(120, 8, generator=gen), dim=1)
    seeds = x[torch.randperm(120, generator=torch.Generator().manual_seed(0))[:3]]
    means, counts = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    assert counts.sum() == 120 and counts.dtype == x.dtype
    torch.testing.assert_close(means.norm(dim=1), torch.ones(3))
    assert _is_kmeans_fixed_point(x, means)
    # the clustering is at least as tight as its random seeds
    fit = (x @ means.T).max(1).values.sum()
    assert fit >= (x @ seeds.T).max(1).values.sum()
    # fewer rows than clusters: seeds are drawn with replacement, nothing breaks
    small, c = spherical_kmeans(x[:2], 5, 3)
    assert small.shape == (5, 8) and c.sum() == 2


def test_kmeans_init_runs_once(monkeypatch):
    calls = []
    real = quantizer_mod.spherical_kmeans

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(quantizer_mod, "spherical_kmeans", counting)
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 6, generator=gen), dim=1)
    batch1 = centres.repeat(20, 1) + 0.02 * torch.randn(80, 6, generator=gen)
    q = _quantizer(k=4, d=6, kmeans_init=True)
    before = q.codebook.clone()
    assert not bool(q.initted)
    q(batch1)
    assert bool(q.initted) and len(calls) == 1
    assert not torch.allclose(q.codebook, before)
    # k-means converged, so the EMA step with the same batch leaves its centroids in place
    assert _is_kmeans_fixed_point(F.normalize(batch1, dim=1), q.codebook)
    assert q.cluster_size.sum() == pytest.approx(80.0)  # k-means counts of the first batch
    after1 = q.codebook.clone()
    # A second batch from elsewhere moves the codes by the EMA only (decay 0.99): no re-init.
    batch2 = F.normalize(torch.randn(80, 6, generator=gen), dim=1)
    q(batch2)
    assert len(calls) == 1
    assert ((q.codebook * after1).sum(1) > 0.97).all()


def test_seeded_kmeans_init_is_deterministic():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(3))
    a, b = _quantizer(k=8, d=5, kmeans_init=True), _quantizer(k=8, d=5, kmeans_init=True)
    a(x)
    b(x)
    assert torch.equal(a.codebook, b.codebook)


def test_dead_codes_are_reinitialised_from_the_batch():
    codebook, z = _toy_batch()
    q = _quantizer(dead_code_threshold=0.5, decay=0.9)
    q.codebook.copy_(codebook)
    q.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.4]))  # code 3 below the threshold
    torch.manual_seed(0)
    q(z)
    zn = F.normalize(z, dim=1)
    # code 3 is now one of the batch's vectors, with the grace count 1
    assert bool((torch.cdist(q.codebook[3:4], zn) < 1e-5).any())
    assert float(q.cluster_size[3]) == 1.0
    torch.testing.assert_close(q.embed_avg[3], q.codebook[3])
    # code 2 was unused too but still above the threshold after the EMA (4.5): kept
    torch.testing.assert_close(q.codebook[2], codebook[2])
    # below-threshold codes stay when the rule is off
    off = _quantizer(dead_code_threshold=0.0)
    off.codebook.copy_(codebook)
    off(z)
    torch.testing.assert_close(off.codebook[3], codebook[3])


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_eval_and_no_grad_change_nothing(mode):
    q = _quantizer(k=8, d=4, kmeans_init=True, dead_code_threshold=0.5)
    tok = BEATsTokenizer(BEATsTokenizerConfig.preset("tiny"))
    z = torch.randn(2, 10, 4)
    fbank = torch.randn(2, 48, 128)
    before_q, before_t = _state(q), _state(tok)
    if mode == "eval":
        q.eval()
        tok.eval()
        out = q(z)
        tok(fbank)
    else:
        with torch.no_grad():
            out = q(z)
            tok(fbank)
    assert _same_state(before_q, _state(q)) and not bool(q.initted)
    assert _same_state(before_t, _state(tok))
    assert out.indices.shape == (2, 10)


def test_labels_do_not_depend_on_mode_or_usage():
    cfg = BEATsTokenizerConfig.preset("tiny")
    cfg.encoder.dropout = 0.3  # labelling must switch dropout off by itself
    tok = BEATsTokenizer(cfg)
    fbank = torch.randn(2, 64, 128)
    ref = tok.eval().labels_from_features(fbank)
    tok.train()
    assert torch.equal(tok.labels_from_features(fbank), ref) and tok.training
    tok.quantize.cluster_size.uniform_(0, 10)
    assert torch.equal(tok.labels_from_features(fbank), ref)


# ----------------------------------------------------------------------------------------------
# torch.distributed: two gloo processes keep one codebook, equal to one process on the union
# ----------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, z, codebook, sizes, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different local RNGs: replacements must be broadcast
        half = z.shape[0] // world
        part = z[rank * half : (rank + 1) * half]
        q = _quantizer(k=codebook.shape[0], d=codebook.shape[1], dead_code_threshold=0.5)
        q.codebook.copy_(codebook)
        q.cluster_size.copy_(sizes)
        q(part)
        km = _quantizer(k=4, d=codebook.shape[1], kmeans_init=True)
        km(part)
        torch.save({"ema": _state(q), "kmeans": _state(km)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_are_all_reduced(tmp_path):
    gen = torch.Generator().manual_seed(0)
    codebook = F.normalize(torch.randn(6, 5, generator=gen), dim=1)
    sizes = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 0.1])  # code 5 is dead
    z = torch.randn(24, 5, generator=gen)
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), z, codebook, sizes, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("ema", "kmeans"):
        assert _same_state(r0[part], r1[part]), part
    single = _quantizer(k=6, d=5, dead_code_threshold=0.5)
    single.codebook.copy_(codebook)
    single.cluster_size.copy_(sizes)
    single(z)
    live = torch.arange(5)
    torch.testing.assert_close(r0["ema"]["codebook"][live], single.codebook[live])
    torch.testing.assert_close(r0["ema"]["cluster_size"][live], single.cluster_size[live])
    # the dead code was replaced by one of rank 0's vectors (broadcast)
    zn = F.normalize(z[:12], dim=1)
    assert bool((torch.cdist(r0["ema"]["codebook"][5:6], zn) < 1e-5).any())
    assert bool(r0["kmeans"]["initted"]) and r0["kmeans"]["cluster_size"].sum() == 24


# ----------------------------------------------------------------------------------------------
# Random-projection tokenizer
# ----------------------------------------------------------------------------------------------
def test_random_projection_is_deterministic_per_seed():
    fbank = torch.randn(2, 80, 128, generator=torch.Generator().manual_seed(0))
    a = RandomProjectionTokenizer(RandomProjectionConfig(seed=3))
    b = RandomProjectionTokenizer(RandomProjectionConfig(seed=3))
    c = RandomProjectionTokenizer(RandomProjectionConfig(seed=4))
    la, lb, lc = (t.labels_from_features(fbank) for t in (a, b, c))
    assert la.shape == (2, 5 * 8) and la.dtype == torch.int64
    assert torch.equal(la, lb) and _same_state(_state(a), _state(b))
    assert not torch.equal(la, lc)
    assert set(a.state_dict()) == {"projection", "codebook"}  # saved with a run
    assert not list(a.parameters())  # frozen: nothing to optimise
    assert la.min() >= 0 and la.max() < 1024


def test_random_projection_labels_by_hand_and_padding():
    cfg = RandomProjectionConfig(patch_size=4, n_mels=8, dim=6, codebook_size=5, layer_norm=False)
    tok = RandomProjectionTokenizer(cfg)
    fbank = torch.randn(1, 9, 8)  # 2 time x 2 frequency patches; the 9th frame is dropped
    labels, margin = tok.labels_from_features(fbank, return_margin=True)
    for t in range(2):
        for f in range(2):
            patch = fbank[0, 4 * t : 4 * t + 4, 4 * f : 4 * f + 4].reshape(-1)
            sim = F.normalize(patch @ tok.projection, dim=0) @ tok.codebook.T
            assert int(labels[0, t * 2 + f]) == int(sim.argmax())
    assert (margin >= 0).all()
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 6:] = True  # time patch 1 is partly padding
    padded = tok.labels_from_features(fbank, mask)
    assert torch.equal(padded[0, :2], labels[0, :2]) and (padded[0, 2:] == -100).all()


def test_padding_label_is_the_datasets_ignore_index():
    from beats.tokenizer import IGNORE_INDEX
    from bioaudio.data.datasets import IGNORE_INDEX as DATA_IGNORE

    assert IGNORE_INDEX == DATA_IGNORE == -100


def test_codebook_of_one_code_and_patch_mismatch_are_refused():
    with pytest.raises(ConfigError) as e:
        RandomProjectionTokenizer(RandomProjectionConfig(codebook_size=1))
    assert _one_line(e).startswith("a codebook of 1 code")
    with pytest.raises(ConfigError) as e:
        BEATsTokenizer(
            dataclasses.replace(
                BEATsTokenizerConfig.preset("tiny"), quantizer=QuantizerConfig(codebook_size=1)
            )
        )
    assert _one_line(e).startswith("a codebook of 1 code")
    model = build_model("beats", encoder="tiny")
    RandomProjectionTokenizer().check_model(model)  # 16 x 16 both: fine
    with pytest.raises(ConfigError) as e:
        RandomProjectionTokenizer(RandomProjectionConfig(patch_size=8)).check_model(model)
    assert "patches are 8x8 but the model's are 16x16" in _one_line(e)
    tok = BEATsTokenizer(BEATsTokenizerConfig.preset("tiny"))
    tok.check_model(model.encoder_cfg)
    with pytest.raises(ConfigError) as e:
        tok.check_model(dataclasses.replace(model.encoder_cfg, input_patch_size=32, n_mels=128))
    assert "16x16 but the model's are 32x32" in _one_line(e)


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------
def _tiny_tokenizer(codes: int = 16, dim: int = 8) -> BEATsTokenizer:
    cfg = BEATsTokenizerConfig.preset("tiny")
    cfg.quantizer = QuantizerConfig(codebook_size=codes, dim=dim)
    return BEATsTokenizer(cfg)


@pytest.mark.parametrize("estimator_layers", [0, 1])
def test_distillation_loss_falls_and_only_the_tokenizer_learns(estimator_layers):
    torch.manual_seed(0)
    teacher = BEATsEncoder(BEATsConfig.preset("tiny"))  # trainable weights, used as a teacher
    distiller = TokenizerDistiller(_tiny_tokenizer(), 64, estimator_layers).train()
    fbank = torch.randn(4, 64, 128)
    frame_mask = torch.zeros(4, 64, dtype=torch.bool)
    frame_mask[3, 40:] = True
    opt = torch.optim.Adam(distiller.parameters(), lr=1e-3)
    out = teacher(fbank, frame_mask)  # with a graph back to the teacher's weights
    losses = []
    for step in range(40):
        loss, logs = distiller(fbank, frame_mask, out.tokens)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            tok = distiller.tokenizer
            assert tok.encoder.patch_embedding.proj.weight.grad.abs().sum() > 0
            assert tok.quantize_layer[0].weight.grad.abs().sum() > 0
            assert distiller.estimator.proj_out.weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in teacher.parameters())
            assert set(logs) == {"cosine", "commit", "codes_used", "perplexity"}
            assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())
            assert bool(distiller.tokenizer.quantize.initted)  # k-means on the first batch
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert 1.0 <= float(logs["codes_used"]) <= 16.0
    if estimator_layers == 0:
        # A per-patch estimator sees only the codes: beating the best constant prediction (the
        # teacher's mean direction) means the codes carry information about the teacher.
        real = out.tokens.detach()[~out.padding_mask]
        mean_dir = F.normalize(real, dim=1).sum(0)
        best_constant = F.cosine_similarity(real, mean_dir[None], dim=1).mean()
        assert float(logs["cosine"]) > float(best_constant) + 0.1


def test_distillation_refuses_misaligned_teacher():
    distiller = TokenizerDistiller(_tiny_tokenizer(), teacher_dim=10, estimator_layers=0)
    with pytest.raises(ConfigError) as e:
        distiller(torch.randn(1, 32, 128), None, torch.randn(1, 7, 10))
    assert "do not match" in _one_line(e)


# ----------------------------------------------------------------------------------------------
# Export / reload
# ----------------------------------------------------------------------------------------------
def test_save_and_load_tokenizer_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = _tiny_tokenizer()
    tok.train()
    tok(torch.randn(2, 48, 128))  # k-means and one EMA update: non-trivial buffers
    tok.eval()
    fbank = torch.randn(2, 64, 128)
    out = save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokenizer_type"] == "beats" and meta["config"]["quantizer"]["codebook_size"] == 16
    back = load_tokenizer(out)
    assert isinstance(back, BEATsTokenizer) and _same_state(_state(tok), _state(back))
    assert torch.equal(back.labels_from_features(fbank), tok.labels_from_features(fbank))
    assert isinstance(load_tokenizer(out / "tokenizer.safetensors"), BEATsTokenizer)

    rp = RandomProjectionTokenizer(RandomProjectionConfig(seed=7, codebook_size=32))
    save_tokenizer(rp, tmp_path / "tok")  # replaces the previous tokenizer folder
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, RandomProjectionTokenizer) and back.cfg == rp.cfg
    assert torch.equal(back.labels_from_features(fbank), rp.labels_from_features(fbank))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers


def test_save_refuses_other_folders_and_load_refuses_junk(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError) as e:
        save_tokenizer(RandomProjectionTokenizer(), other)
    assert "refusing" in _one_line(e)
    assert (other / "keep.txt").exists()
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(other)
    assert "not a bioaudio tokenizer" in _one_line(e)
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(junk)
    assert "not a tokenizer" in _one_line(e)


def test_convert_writes_a_tokenizer_folder_with_the_same_labels(
    official_fixtures, tmp_path, capsys
):
    """`bioaudio convert Tokenizer.pt DIR` -> a tokenizer folder; it labels like the official."""
    from bioaudio.cli import main
    from bioaudio.models.checkpoint import checkpoint_kind, load_tokenizer

    src = official_fixtures / "beats_tokenizer_tiny.pt"
    assert checkpoint_kind(src) == "tokenizer"
    assert main(["convert", str(src), str(tmp_path / "tok")]) == 0
    assert "tokenizer" in capsys.readouterr().out
    assert checkpoint_kind(tmp_path / "tok") == "tokenizer"
    io = torch.load(official_fixtures / "beats_tokenizer_tiny_io.pt", weights_only=True)
    sure = io["margin_plain"] > 1e-3
    tok = load_tokenizer(tmp_path / "tok")
    assert torch.equal(tok.extract_labels(io["wav"]).flatten()[sure], io["labels_plain"][sure])
