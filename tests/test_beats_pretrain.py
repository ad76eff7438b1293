"""BEATs pretraining on the tiny preset: masked-token prediction (random, trained and official
tokenizers), tokenizer training (iteration 2, BEATs and EAT teachers), the memory-bank term,
resume, two processes, the seed command `beats/train.py`, and one-line errors before any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from test_classify import one_thread, reset_accelerate  # noqa: F401  (autouse fixture)

from beats.objective import (
    MaskedTokenConfig,
    MaskedTokenObjective,
    TokenizerObjective,
    TokenizerObjectiveConfig,
    grid_positions,
)
from beats.tokenizer import (
    BEATsTokenizer,
    BEATsTokenizerConfig,
    RandomProjectionConfig,
    RandomProjectionTokenizer,
    save_tokenizer,
)
from beats.train import build_options, encoder_overrides
from beats.train import main as train_main
from bioaudio.cli import main as cli_main
from bioaudio.config import to_dict
from bioaudio.errors import ConfigError
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import load_model, load_tokenizer, save_export
from bioaudio.training.masking import random_mask
from bioaudio.training.objectives import PretrainInputs
from bioaudio.training.optim import param_groups
from bioaudio.training.task import TaskContext

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
TINY = [
    "--model", "beats", "--preset", "tiny", "--segment_duration", "1", "--batch_size", "4",
    "--beats.codebook_size", "64", "--beats.codebook_dim", "32", "--beats.predictor_layers", "1",
    "--memory_bank.queue_size", "16", "--num_workers", "0", "--no-progress", "--log_every", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    """16 one-second clips: harmonic calls with gliding pitch and a pulse rhythm, and noise."""
    root = tmp_path_factory.mktemp("beats_audio") / "clips"
    root.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    for i in range(16):
        f0 = 300 + 150 * (i % 8)
        glide = (1 + 0.3 * (i % 3) * t) * f0
        phase = 2 * np.pi * np.cumsum(glide) / SR
        env = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + i % 4) * t)
        x = env * sum(np.sin(h * phase) / h for h in (1, 2, 3))
        if i % 4 == 3:
            x = x * 0.3 + rng.standard_normal(SR) * 0.2
        sf.write(root / f"clip_{i:02d}.wav", (0.3 * x).astype(np.float32), SR)
    return root


def context(step: int = 0) -> TaskContext:
    trainer = SimpleNamespace(
        step=step,
        rank=0,
        num_processes=1,
        device=torch.device("cpu"),
        is_main_process=True,
        cfg=SimpleNamespace(max_steps=100, seed=0),
        _micro_index=0,
    )
    return TaskContext(trainer)


def spectrograms(batch: int, frames: int = 128, seed: int = 0) -> torch.Tensor:
    """Spectrogram-like features (B, T, 128): harmonic stacks with a gliding pitch and an
    amplitude envelope per clip, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32)[:, None]
    f = torch.arange(128, dtype=torch.float32)[None, :]
    clips = []
    for _ in range(batch):
        f0 = 8 + 20 * torch.rand((), generator=g)
        glide = (torch.rand((), generator=g) - 0.5) * 0.2
        env = 0.5 + 0.5 * torch.sin((0.05 + 0.1 * torch.rand((), generator=g)) * t)
        x = torch.zeros(frames, 128)
        for h in (1, 2, 3):
            x = x + env / h * torch.exp(-0.5 * ((f - h * (f0 + glide * t)) / 1.5) ** 2)
        clips.append(x * 2 - 0.5 + 0.05 * torch.randn(frames, 128, generator=g))
    return torch.stack(clips)


def inputs(fbank, frame_mask=None, seed: int = 0, **kw) -> PretrainInputs:
    return PretrainInputs(fbank, frame_mask, torch.Generator().manual_seed(seed), **kw)


def make(seed: int = 0, **over) -> tuple[torch.nn.Module, MaskedTokenObjective]:
    torch.manual_seed(seed)
    model = build_model("beats", encoder="tiny")
    cfg = {"codebook_size": 64, "codebook_dim": 32, "predictor_layers": 1, **over}
    return model, MaskedTokenObjective(model, MaskedTokenConfig(**cfg))


def tiny_tokenizer(path: Path, codes: int = 32) -> Path:
    """A (randomly initialised) BEATs tokenizer of the tiny preset, saved as a folder."""
    torch.manual_seed(1)
    cfg = BEATsTokenizerConfig.preset("tiny")
    cfg.quantizer.codebook_size = codes
    return save_tokenizer(BEATsTokenizer(cfg), path)


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    reset_accelerate()
    code = cli_main(["pretrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def state_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Model + objective tensors of the newest saved state."""
    steps = sorted((run / "state").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return load_file(str(steps[-1] / "model.safetensors"))


# ------------------------------------------------------------------------------ the objective


def test_masked_token_loss_falls():
    model, obj = make()
    model.train()
    obj.train()
    params = [p for p in [*model.parameters(), *obj.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    fbank = spectrograms(4, frames=128, seed=1)
    losses, accs = [], []
    for step in range(40):
        out = obj(model, inputs(fbank, seed=step), context(step))  # a new mask every step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        accs.append(float(out.logs["accuracy"]))
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)
    assert np.mean(accs[-5:]) > np.mean(accs[:5]) + 0.1


def test_masked_patches_are_dropped_and_the_utterance_is_the_visible_mean():
    model, obj = make()
    model.eval()
    fbank = spectrograms(3, frames=96)  # 6 x 8 = 48 patches, 12 kept
    seen = []
    model.encoder.register_forward_hook(lambda m, a, o: seen.append(o.tokens.shape))
    out = obj(model, inputs(fbank, seed=5), context())
    assert seen == [(3, 12, 64)]  # the encoder ran on the visible patches only
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.logs) == {"accuracy", "masked_fraction", "label_perplexity"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())
    assert float(out.logs["masked_fraction"]) == pytest.approx(36 / 48)
    # the same masks, drawn clip by clip from the same generators: utterance = visible mean
    gens = inputs(fbank, seed=5).clip_gens()
    keep = torch.cat([random_mask(1, 48, 0.75, g) for g in gens])
    assert (keep.sum(1) == 12).all()
    with torch.no_grad():
        visible = model.encoder(fbank, None, keep).tokens
    torch.testing.assert_close(out.utterance.detach(), visible.mean(1))
    assert out.utterance.shape == (3, 64) and out.utterance.requires_grad


def test_padding_is_hidden_and_carries_no_loss():
    model, obj = make()
    model.eval()
    fbank = spectrograms(2, frames=96)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 48:] = True  # clip 1: 3 of 6 time patches are padding
    captured = {}
    orig = obj.predictor.forward

    def spy(visible, idx, grid, padding, select):
        captured.update(idx=idx, padding=padding, select=select)
        return orig(visible, idx, grid, padding, select)

    obj.predictor.forward = spy
    a = obj(model, inputs(fbank, mask, seed=3), context())
    pad = captured["padding"]
    assert pad is not None and int(pad[1].sum()) == 24 and not pad[0].any()
    kept = torch.zeros_like(pad).scatter(1, captured["idx"], True)
    # each clip keeps 25 % of its own real patches; the shorter one tops up with padding
    assert (kept & ~pad).sum(1).tolist() == [12, 6] and kept.sum(1).tolist() == [12, 12]
    assert not (captured["select"] & pad).any()  # padding is never a target
    assert captured["select"].sum(1).tolist() == [36, 18]
    # whatever the padded frames hold, nothing changes
    noisy = fbank.clone()
    noisy[1, 48:] = torch.randn(48, 128) * 5
    b = obj(model, inputs(noisy, mask, seed=3), context())
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.utterance, b.utterance)


def test_predictor_positions_are_a_fixed_2d_grid():
    pos = grid_positions(6, 8, 32)
    assert pos.shape == (48, 32)
    grid = pos.view(6, 8, 32)
    # the first half follows the time index only, the second half the frequency band only
    assert torch.equal(grid[:, :1, :16].expand(6, 8, 16), grid[..., :16])
    assert torch.equal(grid[:1, :, 16:].expand(6, 8, 16), grid[..., 16:])
    assert len({tuple(r.tolist()) for r in pos}) == 48  # every patch has its own code


def test_random_tokenizer_is_saved_with_the_objective_and_gets_no_gradient():
    model, obj = make()
    state = obj.state_dict()
    assert {"tokenizer.projection", "tokenizer.codebook"} <= set(state)
    ref = RandomProjectionTokenizer(RandomProjectionConfig(dim=32, codebook_size=64, seed=0))
    assert torch.equal(state["tokenizer.projection"], ref.projection)
    assert not list(obj.tokenizer.parameters())  # buffers only: nothing to optimise
    names = {n for g in param_groups(obj, 0.05) for n in g["names"]}
    assert names and all(n.startswith("predictor.") for n in names)


def test_tokenizer_file_is_frozen_outside_the_state_and_the_optimiser(tmp_path):
    folder = tiny_tokenizer(tmp_path / "tok")
    model, obj = make(tokenizer=str(folder))
    tok = obj.label_source
    assert isinstance(tok, BEATsTokenizer) and obj.n_codes == 32
    assert all(not p.requires_grad for p in tok.parameters())
    assert not any(k.startswith("tokenizer") for k in obj.state_dict())
    tok_ids = {id(p) for p in tok.parameters()}
    assert not tok_ids & {id(p) for p in obj.parameters()}
    assert not tok_ids & {id(p) for g in param_groups(obj, 0.05) for p in g["params"]}
    model.train()
    obj.train()
    out = obj(model, inputs(spectrograms(2)), context())
    out.loss.backward()
    assert all(p.grad is None for p in tok.parameters())
    assert model.encoder.encoder.layers[0].fc1.weight.grad is not None
    assert obj.predictor.head.weight.grad is not None
    # the labels are the tokenizer's own
    fbank = spectrograms(2, seed=4)
    torch.testing.assert_close(obj.labels(fbank, None), tok.labels_from_features(fbank))


def test_official_tokenizer_file_as_target(official_fixtures):
    path = official_fixtures / "beats_tokenizer_tiny.pt"
    model, obj = make(tokenizer=str(path))
    official = load_tokenizer(path)
    fbank = spectrograms(2, frames=96, seed=2)
    labels = obj.labels(fbank, None)
    assert labels.shape == (2, 48) and obj.n_codes == official.codebook_size
    torch.testing.assert_close(labels, official.labels_from_features(fbank))
    out = obj(model, inputs(fbank), context())
    assert torch.isfinite(out.loss)
    assert not any(k.startswith("tokenizer") for k in obj.state_dict())


def test_eat_teacher_grid_is_cropped_to_the_common_patches(tmp_path):
    """EAT pads its frames to a multiple of 16: one more time patch than BEATs here."""
    torch.manual_seed(0)
    teacher = save_export(build_model("eat", encoder="tiny"), tmp_path / "eat")
    model = build_model("beats", encoder="tiny")
    cfg = TokenizerObjectiveConfig(
        teacher=str(teacher), codebook_size=16, codebook_dim=8, estimator_layers=1
    )
    obj = TokenizerObjective(model, cfg)
    assert obj.tokenizer.encoder is model.encoder  # the run's encoder is the tokenizer's
    assert set(obj.state_dict()) and all(
        k.startswith(("quantize_layer.", "quantize.", "estimator.")) for k in obj.state_dict()
    )
    wav = torch.randn(2, SR) * 0.1  # 98 frames: 6 BEATs time patches; EAT pads to 112: 7
    fbank, frame_mask = model.featurise(wav)
    shapes = []
    distiller = obj._distiller[0]
    orig = distiller.distillation_loss

    def spy(fb, fm, teacher_tokens):
        shapes.append((fb.shape, teacher_tokens.shape))
        return orig(fb, fm, teacher_tokens)

    distiller.distillation_loss = spy
    model.train()
    obj.train()
    out = obj(model, inputs(fbank, frame_mask, wav=wav), context())
    assert shapes == [(torch.Size([2, 96, 128]), torch.Size([2, 48, 64]))]
    assert {"cosine", "commit", "codes_used", "perplexity"} <= set(out.logs)
    out.loss.backward()
    assert model.encoder.encoder.layers[0].fc1.weight.grad is not None
    assert all(p.grad is None for p in obj._teacher[0].parameters())


# ------------------------------------------------------------------------------ runs


def test_resumed_run_equals_an_uninterrupted_one(audio, tmp_path, capsys):
    """6 steps straight vs 3 steps then resumed to 6 (constant lr, so the schedule does not
    depend on max_steps): the same encoder, predictor, memory bank and tokenizer buffers."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [audio, *TINY, "--lr", "1e-3", "--min_lr_ratio", "1", "--save_every", "0"]
    assert cli(capsys, *common, "--max_steps", "6", "--out", straight)[0] == 0
    assert cli(capsys, *common, "--max_steps", "3", "--out", resumed)[0] == 0
    code, _, err = cli(capsys, *common, "--max_steps", "6", "--out", resumed)
    assert code == 0, err
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_3") and summary["steps"] == 6
    a, b = state_tensors(straight), state_tensors(resumed)
    assert set(a) == set(b)
    assert "parts.beats.tokenizer.projection" in a and "parts.beats.tokenizer.codebook" in a
    ref = RandomProjectionTokenizer(RandomProjectionConfig(dim=32, codebook_size=64, seed=0))
    assert torch.equal(b["parts.beats.tokenizer.codebook"], ref.codebook)
    assert any(k.startswith("parts.memory_bank.key_encoder.") for k in a)  # BEATs: its own EMA
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    ma, mb = pd.read_csv(straight / "metrics.csv"), pd.read_csv(resumed / "metrics.csv")
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    assert np.isfinite(ma["memory_bank/loss"]).all() and ma["memory_bank/queue_fill"].iloc[-1] > 0
    config = json.loads((straight / "config.json").read_text())
    assert config["identity"]["objectives"] == ["beats", "memory_bank"]  # the BEATs default
    exported = load_file(str(straight / "export" / "model.safetensors"))
    assert not any("tokenizer" in k or "predictor" in k for k in exported)


def resumed_equals_straight(capsys, args: list, straight: Path, resumed: Path, n: int) -> None:
    """Run `args` n steps straight, and n // 2 steps then resumed to n: the same states."""
    assert cli(capsys, *args, "--max_steps", n, "--out", straight)[0] == 0
    assert cli(capsys, *args, "--max_steps", n // 2, "--out", resumed)[0] == 0
    code, _, err = cli(capsys, *args, "--max_steps", n, "--out", resumed)
    assert code == 0, err
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step_{n // 2}")
    a, b = state_tensors(straight), state_tensors(resumed)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


def test_tokenizer_iteration_2_end_to_end(audio, tmp_path, capsys):
    """Iteration-1 export as teacher -> tokenizer export -> masked-token run against it; the
    tokenizer run and the iteration-2 run both resume exactly (teacher and tokenizer file are
    reloaded from their paths, the quantiser's codebook and counts come from the state)."""
    it1 = tmp_path / "it1"
    common = [audio, "--model", "beats", "--preset", "tiny", "--segment_duration", "1",
              "--batch_size", "4", "--num_workers", "0", "--no-progress", "--log_every", "1",
              "--min_lr_ratio", "1", "--save_every", "0"]  # fmt: skip
    # iteration 1: masked-token prediction against the random-projection tokenizer
    assert cli(capsys, *common, "--out", it1, "--max_steps", "2", "--objective", "beats",
               "--beats.codebook_size", "64", "--beats.codebook_dim", "32")[0] == 0  # fmt: skip
    # the tokenizer of iteration 2, distilled from iteration 1's export
    tok, tok_resumed = tmp_path / "tok", tmp_path / "tok_resumed"
    tok_args = [
        *common, "--objective", "beats_tokenizer", "--beats_tokenizer.teacher", it1 / "export",
        "--beats_tokenizer.codebook_size", "16", "--beats_tokenizer.codebook_dim", "8",
        "--beats_tokenizer.estimator_layers", "1", "--lr", "1e-3",
    ]  # fmt: skip
    resumed_equals_straight(capsys, tok_args, tok, tok_resumed, 4)
    m = pd.read_csv(tok / "metrics.csv")
    for name in ("cosine", "commit", "codes_used", "perplexity"):
        assert np.isfinite(m[f"beats_tokenizer/{name}"]).all(), name
    trained = load_tokenizer(tok / "export")
    assert isinstance(trained, BEATsTokenizer) and trained.codebook_size == 16
    config = json.loads((tok / "export" / "config.json").read_text())
    assert config["provenance"]["teacher"] == str(it1 / "export")
    state = state_tensors(tok)
    assert not any("teacher" in k for k in state)  # reloaded from its path, never saved
    assert bool(state["parts.beats_tokenizer.quantize.initted"])  # k-means ran once, saved
    assert any(k.startswith("parts.beats_tokenizer.estimator.") for k in state)
    assert not any(k.startswith("estimator.") for k in trained.state_dict())
    for k, v in trained.state_dict().items():  # the exported tokenizer is the run's final state
        src = f"model.{k}" if k.startswith("encoder.") else f"parts.beats_tokenizer.{k}"
        torch.testing.assert_close(v, state[src], msg=k)
    # iteration 2: masked-token prediction against the trained tokenizer
    it2, it2_resumed = tmp_path / "it2", tmp_path / "it2_resumed"
    it2_args = [*common, "--beats.tokenizer", tok / "export", "--lr", "1e-3"]
    resumed_equals_straight(capsys, it2_args, it2, it2_resumed, 4)
    assert not any(k.startswith("parts.beats.tokenizer") for k in state_tensors(it2))
    m2 = pd.read_csv(it2 / "metrics.csv")
    assert (m2["beats/label_perplexity"] <= 16).all()  # labels from the 16-code tokenizer
    options = json.loads((it2 / "config.json").read_text())["options"]["objectives"]["beats"]
    assert options["tokenizer"] == str(tok / "export")
    assert load_model(it2 / "export").model_type == "beats"


def test_two_processes_run_the_seed_command(audio, tmp_path):
    out = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "beats" / "train.py"), "--data_dir", str(audio), "--output_dir", str(out),
        "--preset", "tiny", "--max_steps", "2", "--batch_size", "4", "--segment_duration", "1",
        "--checkpoint_freq", "1", "--lr", "2e-4", "--num_workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Not from the repo root: the script must find its packages itself.
    proc = subprocess.run(
        launch, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pretrained model:") == 1  # the main process prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["status"] == "completed"
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["model"] == "beats" and options["objective"] == "beats:1,memory_bank:0.1"
    assert (options["save_every"], options["lr"], options["segment_duration"]) == (1, 2e-4, 1.0)
    assert (out / "state" / "step_1" / "COMPLETE").is_file()


# ------------------------------------------------------------------------------ beats/train.py

SEED_FLAGS = [
    # (flags, JSON path in config.json "options", expected value)
    (["--output_dir", "runs/x"], "out", "runs/x"),
    (["--model_path", "BEATs_iter3.pt"], "model_path", "BEATs_iter3.pt"),
    (["--positive_dir", "pos"], "positive_dir", "pos"),
    (["--negative_dir", "neg"], "negative_dir", "neg"),
    (["--labeled_dir", "lab"], "labeled_dir", "lab"),
    (["--supervised_weight", "0.5"], "objective", "beats:1,memory_bank:0.1,supervised:0.5"),
    (["--memory_bank_weight", "0"], "objective", "beats:1"),
    (["--epochs", "3"], "epochs", 3.0),
    (["--max_steps", "9"], "max_steps", 9),
    (["--checkpoint_freq", "7"], "save_every", 7),
    (["--segment_duration", "2.5"], "segment_duration", 2.5),
    (["--batch_size", "6"], "batch_size", 6),
    (["--lr", "3e-4"], "lr", 3e-4),
    (["--gradient_accumulation_steps", "4"], "grad_accum", 4),
    (["--encoder_layers", "3"], "encoder_options", {"encoder_layers": 3}),
    (
        ["--preset", "tiny", "--encoder_embed_dim", "72"],
        "encoder_options",
        {
            "encoder_embed_dim": 72,
            "encoder_attention_heads": 4,
            "conv_pos_groups": 12,
            "encoder_ffn_embed_dim": 288,
        },
    ),
    (["--preset", "tiny"], "preset", "tiny"),
    (["--tokenizer", "tok/export"], "objectives", {"beats": {"tokenizer": "tok/export"}}),
    (["--resume", "none"], "resume", None),
    (["--resume", "runs/old"], "resume", "runs/old"),
    (["--seed", "5"], "seed", 5),
    (["--num_workers", "0"], "num_workers", 0),
    (["--log_every", "3"], "log_every", 3),
]


@pytest.mark.parametrize("flags,key,expected", SEED_FLAGS, ids=[f[0][-2] for f in SEED_FLAGS])
def test_each_seed_flag_reaches_the_run_config(flags, key, expected):
    data, cfg = build_options(["--data_dir", "recordings", *flags])
    assert data == Path("recordings")
    # config.json holds {"options": cfg} as JSON (bioaudio.training.pretrain.pretrain)
    options = json.loads(json.dumps(to_dict({"options": cfg})))["options"]
    assert options[key] == expected
    assert options["model"] == "beats"


def test_a_new_width_keeps_a_buildable_encoder():
    for preset, width in (("tiny", 72), ("tiny", 100), ("small", 200), ("base", 512)):
        over = encoder_overrides(preset, 2, width)
        model = build_model("beats", encoder={"preset": preset, **over})
        cfg = model.encoder.cfg
        assert cfg.encoder_embed_dim == width and cfg.encoder_ffn_embed_dim == 4 * width
        assert width % cfg.encoder_attention_heads == 0 and cfg.encoder_layers == 2


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    small = RandomProjectionTokenizer(RandomProjectionConfig(patch_size=8, codebook_size=16))
    junk = root / "teacher.pt"
    junk.write_bytes(b"not a checkpoint at all")
    return {"patch8": save_tokenizer(small, root / "tok8"), "junk": junk}


BAD = {
    "tokenizer patches": (["--beats.tokenizer", "{patch8}"], "8x8"),
    "teacher unreadable": (
        ["--objective", "beats_tokenizer", "--beats_tokenizer.teacher", "{junk}"],
        "--beats_tokenizer.teacher",
    ),
    "teacher missing": (["--objective", "beats_tokenizer"], "needs a teacher"),
    "codebook 1": (["--beats.codebook_size", "1"], "codebook_size"),
    "tokenizer codebook 1": (
        [
            "--objective",
            "beats_tokenizer",
            "--beats_tokenizer.teacher",
            "{junk}",
            "--beats_tokenizer.codebook_size",
            "1",
        ],
        "codebook",
    ),  # fmt: skip
    "mask ratio 0": (["--beats.mask_ratio", "0"], "mask_ratio"),
    "mask ratio 1": (["--beats.mask_ratio", "1"], "mask_ratio"),
    "mask ratio 1.5": (["--beats.mask_ratio", "1.5"], "mask_ratio"),
    "tokenizer not alone": (
        [
            "--objective",
            "beats_tokenizer,memory_bank:0.1",
            "--beats_tokenizer.teacher",
            "{teacher}",
        ],
        "runs alone",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_step(case, audio, bad_files, tmp_path, capsys):
    flags, message = BAD[case]
    teacher = tmp_path / "teacher"
    if "{teacher}" in " ".join(flags):
        save_export(build_model("beats", encoder="tiny"), teacher)
    flags = [f.format(teacher=teacher, **bad_files) for f in flags]
    out = tmp_path / "run"
    code, _, err = cli(capsys, audio, *TINY, "--max_steps", "2", "--out", out, *flags)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (out / "state").exists() and not (out / "metrics.csv").exists()


def test_seed_command_errors_exit_2(audio, bad_files, tmp_path, capsys):
    base = ["--data_dir", str(audio), "--output_dir", str(tmp_path / "run"), "--preset", "tiny",
            "--max_steps", "1", "--batch_size", "4", "--segment_duration", "1",
            "--num_workers", "0"]  # fmt: skip
    for extra, message in (
        (["--tokenizer", str(bad_files["patch8"])], "8x8"),
        (["--model_path", str(bad_files["junk"]), "--encoder_layers", "2"], "new encoder"),
        (["--supervised_weight", "-1"], "--supervised_weight"),
        (["--encoder_embed_dim", "0"], "--encoder_embed_dim"),
    ):
        reset_accelerate()
        assert train_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run" / "state").exists()
    with pytest.raises(SystemExit) as e:
        build_options(["--data_dir", "x", "--lr", "fast"])
    assert e.value.code == 2
    with pytest.raises(ConfigError, match="mask_ratio"):
        MaskedTokenObjective(build_model("beats", encoder="tiny"), {"mask_ratio": 1.0})
    with pytest.raises(ConfigError, match="BEATs encoders"):
        MaskedTokenObjective(build_model("eat", encoder="tiny"))
