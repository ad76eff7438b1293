"""`bioaudio finetune`: every prediction mode trains and predicts (padded batches included), the
linear probe encodes each clip once, official checkpoints finetune, seed flags take effect,
weighted sampling, and one-line errors for what cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_classify import one_thread, reset_accelerate, write_tone_dataset  # noqa: F401

from bioaudio import load_model
from bioaudio.cli import main
from bioaudio.commands.finetune import FinetuneConfig, build_experiment
from bioaudio.config import from_dict
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import save_export

QUICK = ["--num_workers", "0", "--no-progress", "--batch_size", "6", "--clip_seconds", "1",
         "--max_steps", "6", "--eval_every", "3", "--lr", "1e-3"]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=6, folds=3)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Tiny encoder-only exports (as a pretraining run leaves them)."""
    root = tmp_path_factory.mktemp("enc")
    out = {}
    for t in ("eat", "beats"):
        torch.manual_seed(0)
        out[t] = save_export(build_model(t, "tiny"), root / t)
    return out


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    reset_accelerate()
    code = main(["finetune", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "model_type, mode, pooling",
    [
        ("eat", "CLS_TOKEN", "cls"),
        ("eat", "MEAN_POOLING", "mean"),
        ("eat", "LIN_SOFTMAX", "lin_softmax"),
        ("beats", "ATTENTION", "attention"),
        ("beats", "CLS_TOKEN", "cls"),  # BEATs has no CLS: a learned one is added
    ],
)
def test_each_prediction_mode_trains_and_predicts(tones, encoders, tmp_path, capsys,
                                                  model_type, mode, pooling):  # fmt: skip
    out = tmp_path / "ft"
    code, stdout, err = cli(capsys, tones, "--model_path", encoders[model_type], "--out", out,
                            "--prediction_mode", mode, *QUICK)  # fmt: skip
    assert code == 0, err
    model = load_model(out / "seed_42" / "export")
    assert model.head_cfg.pooling == pooling and model.class_names == ["high", "low", "mid"]
    if model_type == "beats" and mode == "CLS_TOKEN":
        assert model.encoder.cls_token is not None
    # padded batch = one clip at a time
    wav = torch.zeros(2, 16000)
    wav[0] = 0.3 * torch.sin(torch.arange(16000) * 2 * torch.pi * 300 / 16000)
    wav[1, :9000] = 0.3 * torch.sin(torch.arange(9000) * 2 * torch.pi * 3500 / 16000)
    mask = torch.zeros(2, 16000, dtype=torch.bool)
    mask[1, 9000:] = True
    both = model.predict(wav, mask)
    one = model.predict(wav[1:, :9000])
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)
    report = (out / "seed_42" / "report.md").read_text()
    assert "| accuracy |" in report and "pr_curves.png" in report
    assert (out / "seed_42" / "pr_curves.png").is_file()


def test_linear_probe_encodes_each_clip_once(tones, encoders, tmp_path):
    """Two seeds x every epoch read the cached encoder outputs: the encoder runs once per
    window, and only the head changes."""
    cfg = from_dict(
        FinetuneConfig,
        {"model_path": encoders["eat"], "out": tmp_path / "lp", "linear_probe": True,
         "seeds": [1, 2], "max_steps": 8, "batch_size": 6, "clip_seconds": 1.0,
         "num_workers": 0, "progress": False, "eval_every": 4, "lr": 1e-2},
    )  # fmt: skip
    exp = build_experiment(tones, cfg)
    assert exp.run() == 0
    cache = exp.encoder_cache
    windows = set(cache.store)
    assert cache.encoded == len(windows) > 0  # every window encoded exactly once, for 2 seeds
    base = load_model(encoders["eat"])
    for seed in (1, 2):
        tuned = load_model(tmp_path / "lp" / f"seed_{seed}" / "export")
        for (k, a), b in zip(
            base.encoder.state_dict().items(), tuned.encoder.state_dict().values()
        ):
            torch.testing.assert_close(a, b, msg=k)  # frozen
    table = pd.read_csv(tmp_path / "lp" / "run_summary.csv")
    assert list(table["run"][:2]) == ["seed_1", "seed_2"]


@pytest.mark.parametrize("name", ["beats_tiny.pt", "eat_tiny_hf.safetensors"])
def test_finetune_from_official_checkpoints(official_fixtures, tones, tmp_path, capsys, name):
    out = tmp_path / "ft"
    code, stdout, err = cli(capsys, tones, "--model_path", official_fixtures / name,
                            "--out", out, *QUICK)  # fmt: skip
    assert code == 0, err
    model = load_model(out / "seed_42" / "export")
    prov = json.loads((out / "seed_42" / "export" / "config.json").read_text())["provenance"]
    assert prov["finetuned_from"] == str(official_fixtures / name)
    assert model.head_cfg.num_classes == 3


def test_seed_flags_take_effect(tones, encoders, tmp_path):
    cfg = from_dict(
        FinetuneConfig,
        {"model_path": encoders["eat"], "out": tmp_path / "x", "mask_ratio": 0.2,
         "clip_seconds": 2.0, "drop_path": 0.3, "layer_decay": 0.5, "num_classes": 3,
         "balanced_sampling": True, "batch_size": 4},
    )  # fmt: skip
    assert cfg.spec_augment and cfg.spec.time_width == 40 and cfg.spec.freq_width == 25
    exp = build_experiment(tones, cfg)
    model = exp.build_model(0)
    rates = [
        b.drop_path.drop_prob for b in model.encoder.blocks if hasattr(b.drop_path, "drop_prob")
    ]
    assert rates and max(rates) == pytest.approx(0.3)
    groups = exp.param_groups(model)
    scales = sorted({round(g["lr_scale"], 4) for g in groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # tiny EAT: 2 blocks -> d^3 .. d^0
    train_ds, _, _ = exp.datasets(exp.plans[0])
    w = exp.sample_weights(train_ds)
    per_class = pd.Series(w).groupby(train_ds.df["labels"].to_numpy()).sum()
    np.testing.assert_allclose(per_class / per_class.sum(), 1 / 3)  # every class equally often


def test_per_sample_weights_file(tones, encoders, tmp_path):
    df = pd.read_csv(tones)
    weights = tmp_path / "w.csv"
    pd.DataFrame({"filename": [Path(p).name for p in df["path"]],
                  "weight": np.arange(len(df)) + 1.0}).to_csv(weights, index=False)  # fmt: skip
    cfg = from_dict(
        FinetuneConfig,
        {"model_path": encoders["eat"], "out": tmp_path / "x", "weights": weights,
         "batch_size": 4},
    )  # fmt: skip
    exp = build_experiment(tones, cfg)
    train_ds, _, _ = exp.datasets(exp.plans[0])
    w = exp.sample_weights(train_ds)
    names = [Path(p).name for p in train_ds.df["path"]]
    expected = [float(df.index[[Path(p).name == n for p in df["path"]]][0] + 1) for n in names]
    np.testing.assert_allclose(w, expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_classes", "5"], "--num_classes 5 but the labels hold 3 classes"),
        (["--model_path", "README.md"], "not a checkpoint format"),
        (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
        (["--linear_probe", "--spec_augment"], "linear probe"),
        (["--mask_ratio", "1.5"], "--mask_ratio must be in (0, 1)"),
        (["--clip_seconds", "1e9"], "longer than this model's longest input"),
    ],
)
def test_bad_input_fails_in_one_line(tones, encoders, tmp_path, capsys, extra, message):
    out = tmp_path / "ft"
    args = ["--model_path", encoders["eat"], *extra] if "--model_path" not in extra else extra
    code, _, err = cli(capsys, tones, "--out", out, *QUICK, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists() or not any(out.rglob("metrics.csv"))


def test_a_baseline_export_is_not_finetuned(tones, tmp_path, capsys):
    reset_accelerate()
    base = tmp_path / "cnn"
    assert main(["train-baseline", str(tones), "--out", str(base), *QUICK, "--n_mels", "16",
                 "--n_fft", "256", "--hop_length", "160"]) == 0  # fmt: skip
    capsys.readouterr()
    code, _, err = cli(capsys, tones, "--model_path", base / "seed_42" / "export",
                       "--out", tmp_path / "ft", *QUICK)  # fmt: skip
    assert code == 2 and "without a transformer encoder" in err


def test_the_default_learning_rate_follows_what_trains():
    # only the head trains in a linear probe: 1e-3; a whole encoder: 1e-4; a given --lr stays
    from bioaudio.commands.finetune import FinetuneConfig

    full = FinetuneConfig(model_path=Path("m"))
    full.validate()
    probe = FinetuneConfig(model_path=Path("m"), linear_probe=True)
    probe.validate()
    given = FinetuneConfig(model_path=Path("m"), linear_probe=True, lr=5e-3)
    given.validate()
    assert (full.lr, probe.lr, given.lr) == (1e-4, 1e-3, 5e-3)


def test_linear_probe_skips_and_lists_files_that_break_after_prepare(encoders, tmp_path, capsys):
    # full finetuning already skips them; the probe's encode-once pass must too (it stopped on
    # the first unreadable file)
    manifest = write_tone_dataset(tmp_path / "data", n_per_class=6)
    df = pd.read_csv(manifest)
    df["split"] = ["val" if i % 4 == 0 else "test" if i % 4 == 1 else "train"
                   for i in range(len(df))]  # fmt: skip
    bad = [df["path"][df.index[df["split"] == s][0]] for s in ("train", "val")]
    for rel in bad:
        (manifest.parent / rel).write_bytes(b"RIFF" + b"\x05" * 300)
    df.to_csv(manifest, index=False)
    out = tmp_path / "runs"
    code, _, err = cli(capsys, manifest, "--model_path", encoders["eat"], "--linear_probe",
                       "--out", out, *QUICK)  # fmt: skip
    assert code == 0, err
    run = next(out.glob("seed_*"))
    skipped = pd.read_csv(run / "skipped.csv")
    assert sorted(Path(p).name for p in skipped["path"]) == sorted(Path(p).name for p in bad)
    assert skipped["reason"].str.len().gt(0).all()
    assert json.loads((run / "test_metrics.json").read_text())["n"] > 0
