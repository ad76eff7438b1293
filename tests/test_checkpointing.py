"""Activation checkpointing changes memory and time, never results: the same loss and gradients
with dropout, drop path / layer drop, dropped tokens and padding active, and `--activation_
checkpointing` reaches the encoder of a pretraining run (EAT objective: student with dropped
tokens, teacher under no_grad; BEATs objective) whose weights equal a run without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_classify import one_thread, reset_accelerate  # noqa: F401  (autouse fixture)

import bioaudio.models.layers as layers
from bioaudio.cli import main
from bioaudio.data.demo import generate_demo_data
from bioaudio.models.audio_model import build_model

# Every source of randomness inside the blocks switched on.
NOISY = {
    "eat": dict(drop_rate=0.1, attn_drop_rate=0.1, activation_dropout=0.1, post_mlp_drop=0.1,
                drop_path_rate=0.3),
    "beats": dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                  encoder_layerdrop=0.2, dropout_input=0.1),
}  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def count_checkpoints(monkeypatch) -> list[int]:
    """Calls of torch.utils.checkpoint.checkpoint made by the encoders' block loops."""
    calls = [0]
    real = layers.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting)
    return calls


def _loss_and_grads(encoder, fbank, frame_mask, keep, seed):
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout, drop path and layer drop draw the same masks
    out = encoder(fbank, frame_mask, keep)
    loss = out.tokens.square().mean()
    if out.cls is not None:
        loss = loss + out.cls.sin().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("model_type", ["eat", "beats"])
def test_same_loss_and_gradients_with_checkpointing(model_type, count_checkpoints):
    torch.manual_seed(0)
    encoder = build_model(model_type, {"preset": "tiny", **NOISY[model_type]}).encoder.train()
    if model_type == "beats":
        encoder.add_cls_token()
    g = torch.Generator().manual_seed(1)
    fbank = torch.randn(3, 160, 128, generator=g)
    frame_mask = torch.zeros(3, 160, dtype=torch.bool)
    frame_mask[1, 100:] = True  # a padded clip
    n = (160 // 16) * 8
    keep = torch.zeros(3, n, dtype=torch.bool)
    for row in range(3):  # the student's view: 30 visible tokens per clip
        keep[row, torch.randperm(n, generator=g)[:30]] = True
    for seed in (0, 1, 2):  # different dropout / drop-path draws, each compared
        assert not encoder.gradient_checkpointing
        plain_loss, plain = _loss_and_grads(encoder, fbank, frame_mask, keep, seed)
        assert count_checkpoints[0] == 0
        encoder.set_activation_checkpointing(True)
        ckpt_loss, ckpt = _loss_and_grads(encoder, fbank, frame_mask, keep, seed)
        encoder.set_activation_checkpointing(False)
        assert count_checkpoints[0] > 0
        count_checkpoints[0] = 0
        torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=1e-6)
        assert plain.keys() == ckpt.keys() and len(plain) > 20
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # The noise is real: another seed gives another loss (otherwise the test proves little).
    other_loss, _ = _loss_and_grads(encoder, fbank, frame_mask, keep, seed=7)
    assert not torch.allclose(other_loss, plain_loss)


def test_no_checkpointing_without_gradients(count_checkpoints):
    encoder = build_model("eat", "tiny").encoder.train()
    encoder.set_activation_checkpointing(True)
    with torch.no_grad():
        encoder(torch.randn(1, 64, 128))
    encoder.eval()
    encoder(torch.randn(1, 64, 128)).tokens.sum().backward()
    assert count_checkpoints[0] == 0


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt") / "demo"
    generate_demo_data(root, seed=0, n_per_class=2, n_unlabelled=8, soundscapes=0)
    return root / "unlabelled"


RUNS = {
    "eat": ["--eat.clone_batch", "2", "--eat.decoder_layers", "1",
            "--encoder_options", '{"drop_path_rate": 0.3, "drop_rate": 0.1}'],
    "beats": ["--encoder_options", '{"dropout": 0.1, "encoder_layerdrop": 0.2}'],
}  # fmt: skip


@pytest.mark.parametrize("model_type", ["eat", "beats"])
def test_pretraining_with_the_flag_trains_the_same_weights(
    model_type, audio, tmp_path, capsys, count_checkpoints
):
    """Two steps of `bioaudio pretrain` (objective + memory bank) with and without the flag:
    the flag reaches the student's blocks, and every saved tensor (student, teacher, decoder /
    predictor, heads, queue) is the same."""
    common = [
        audio, "--model", model_type, "--preset", "tiny", "--segment_duration", "1",
        "--batch_size", "4", "--memory_bank.queue_size", "8", "--num_workers", "0",
        "--no-progress", "--max_steps", "2", "--lr", "1e-3", "--save_every", "1",
        *RUNS[model_type],
    ]  # fmt: skip
    states = {}
    for flag in (False, True):
        out = tmp_path / f"run_{flag}"
        argv = [*map(str, common), "--out", str(out)]
        if flag:
            argv.append("--activation_checkpointing")
        count_checkpoints[0] = 0
        reset_accelerate()
        code = main(["pretrain", *argv])
        assert code == 0, capsys.readouterr().err
        # Only passes with gradients checkpoint: the student's blocks (2 blocks x 2 steps, less
        # what layer drop skips), never the teacher / momentum encoder (under no_grad).
        assert (count_checkpoints[0] > 0) if flag else count_checkpoints[0] == 0
        states[flag] = load_file(str(out / "state" / "step_2" / "model.safetensors"))
    a, b = states[False], states[True]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)


def test_finetuning_with_the_flag_trains_the_same_weights(tmp_path, capsys, count_checkpoints):
    """`bioaudio finetune --activation_checkpointing` (drop path on by default): the flag reaches
    the encoder, the exported weights equal a run without it, and the export does not carry the
    switch (a run-time choice, not a model property)."""
    from test_classify import write_tone_dataset

    from bioaudio.models.checkpoint import save_export

    manifest = write_tone_dataset(tmp_path / "tones", n_per_class=4, folds=2)
    torch.manual_seed(0)
    export = save_export(build_model("eat", "tiny"), tmp_path / "eat")
    weights = {}
    for flag in (False, True):
        out = tmp_path / f"ft_{flag}"
        argv = ["finetune", str(manifest), "--model_path", str(export), "--out", str(out),
                "--num_workers", "0", "--no-progress", "--batch_size", "4", "--clip_seconds", "1",
                "--max_steps", "3", "--eval_every", "0", "--lr", "1e-3", "--seeds", "1"]  # fmt: skip
        if flag:
            argv.append("--activation_checkpointing")
        count_checkpoints[0] = 0
        reset_accelerate()
        assert main(argv) == 0, capsys.readouterr().err
        assert (count_checkpoints[0] > 0) if flag else count_checkpoints[0] == 0
        (run,) = out.glob("seed_*")
        weights[flag] = load_file(str(run / "export" / "model.safetensors"))
        config = (run / "export" / "config.json").read_text()
        assert '"gradient_checkpointing": false' in config
    for key in weights[False]:
        torch.testing.assert_close(weights[True][key], weights[False][key], msg=key)


needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile (inductor) on CPU needs a C++ compiler",
)


@needs_compiler
def test_finetuning_with_compile(tmp_path, capsys, monkeypatch):
    """`bioaudio finetune --compile`: the encoder (and only it) is compiled, the run trains and
    exports the same keys, and its weights match a run without the flag up to kernel rounding
    (Adam turns rounding of near-zero gradients into at most lr-sized steps)."""
    from test_classify import write_tone_dataset

    from bioaudio.models.checkpoint import load_model, save_export

    compiled: list[str] = []
    original = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    manifest = write_tone_dataset(tmp_path / "tones", n_per_class=4, folds=2)
    torch.manual_seed(0)
    export = save_export(build_model("eat", "tiny"), tmp_path / "eat")
    weights = {}
    for flag in (False, True):
        out = tmp_path / f"ft_{flag}"
        argv = ["finetune", str(manifest), "--model_path", str(export), "--out", str(out),
                "--num_workers", "0", "--no-progress", "--batch_size", "4", "--clip_seconds", "1",
                "--max_steps", "3", "--eval_every", "0", "--lr", "1e-3", "--seeds", "1",
                "--drop_path", "0"]  # fmt: skip
        if flag:
            argv.append("--compile")
        reset_accelerate()
        assert main(argv) == 0, capsys.readouterr().err
        # every encoder the command builds is compiled (and nothing else); none without the flag
        assert set(compiled) == ({"EATEncoder"} if flag else set()), compiled
        compiled.clear()
        (run,) = out.glob("seed_*")
        weights[flag] = load_file(str(run / "export" / "model.safetensors"))
        assert load_model(run / "export") is not None
    assert weights[True].keys() == weights[False].keys()
    for key in weights[False]:
        diff = (weights[True][key] - weights[False][key]).abs()
        assert float(diff.max()) <= 3 * 1e-3 + 1e-6, key  # 3 Adam steps of lr 1e-3 at most
        assert float(diff.mean()) <= 2e-4, key


def test_pretraining_refuses_compile(audio, tmp_path, capsys):
    reset_accelerate()
    code = main(["pretrain", str(audio), "--model", "eat", "--preset", "tiny", "--max_steps",
                 "1", "--out", str(tmp_path / "run"), "--compile", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "--compile is for finetuning" in err
    assert "Traceback" not in err
