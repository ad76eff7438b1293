"""`bioaudio train-baseline`: every artifact of a 2-seed run, summary mean/std = per-run rows,
test metrics = metrics recomputed from the predictions, finished runs skipped, --cv over folds,
--config files, the sanity check, one-line errors before any training, resume after SIGKILL =
straight run, and a real 2-process run = 1-process run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from sklearn import metrics as skm
from test_classify import (
    FRONTEND_FLAGS,
    one_thread,  # noqa: F401  (autouse fixture)
    reset_accelerate,
    write_tone_dataset,
)

from bioaudio.cli import main
from bioaudio.data.demo import generate_demo_data
from bioaudio.data.manifest import PrepareConfig, prepare_manifest, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num_workers", "0", "--no-progress", "--batch_size", "6", "--clip_seconds", "1"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    reset_accelerate()
    code = main(["train-baseline", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root / "d", seed=0, n_per_class=6, n_unlabelled=0, soundscapes=0)
    out = root / "manifest.csv"
    prepare_manifest(root / "d" / "by_class", out, PrepareConfig(progress=False))
    return out


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=6, folds=3)


def weights(run: Path, name: str = "export") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "model.safetensors"))


# --------------------------------------------------------------------------- a 2-seed run


def test_two_seeds_write_every_artifact(demo, tmp_path, capsys):
    out = tmp_path / "runs"
    args = [demo, "--out", out, "--seeds", "3,4", "--epochs", "3", *QUICK, *FRONTEND_FLAGS]
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    classes = sorted(p.name for p in (demo.parent / "d" / "by_class").iterdir() if p.is_dir())
    for seed in (3, 4):
        run = out / f"seed_{seed}"
        for name in (
            "config.json", "metrics.csv", "summary.json", "history.csv", "curves.png",
            "confusion_counts.csv", "confusion_normalised.csv", "confusion.png",
            "confusion_counts.png", "test_metrics.json", "test_predictions.csv",
            "class_names.json", "best/model.safetensors", "export/model.safetensors",
        ):  # fmt: skip
            assert (run / name).is_file(), name
        for png in ("curves.png", "confusion.png", "confusion_counts.png"):
            assert mpimg.imread(run / png).shape[0] > 50
        assert json.loads((run / "class_names.json").read_text()) == classes
        history = pd.read_csv(run / "history.csv")
        assert {"step", "loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(history)
        tm = json.loads((run / "test_metrics.json").read_text())
        assert tm["model"] == "best" and tm["best"]["metric"] == "eval/accuracy"
        counts = pd.read_csv(run / "confusion_counts.csv", index_col=0)
        assert list(counts.columns) == classes and counts.to_numpy().sum() == tm["n"]
        norm = pd.read_csv(run / "confusion_normalised.csv", index_col=0).to_numpy()
        present = counts.to_numpy().sum(axis=1) > 0
        np.testing.assert_allclose(norm[present].sum(axis=1), 1.0, atol=1e-5)
        # the test metrics are those of the predictions written beside them
        pred = pd.read_csv(run / "test_predictions.csv")
        assert len(pred) == tm["n"]
        assert tm["accuracy"] == pytest.approx((pred["predicted"] == pred["labels"]).mean())
        assert tm["balanced_accuracy"] == pytest.approx(
            skm.balanced_accuracy_score(pred["labels"], pred["predicted"])
        )
        assert tm["macro_f1"] == pytest.approx(
            skm.f1_score(pred["labels"], pred["predicted"], average="macro", zero_division=0)
        )  # fmt: skip
        probs = pred[[f"p_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (np.array(classes)[probs.argmax(1)] == pred["predicted"]).all()
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["run"]["seed"] == seed and cfg["train"]["seed"] == seed

    # run_summary.csv: one row per run, then the mean and the sample std of those rows
    table = pd.read_csv(out / "run_summary.csv")
    assert list(table["run"]) == ["seed_3", "seed_4", "mean", "std"]
    runs = table.iloc[:2]
    for col in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1"):
        per_run = [
            json.loads((out / r / "test_metrics.json").read_text())[col[5:]] for r in runs["run"]
        ]
        np.testing.assert_allclose(runs[col], per_run)
        assert table[col].iloc[2] == pytest.approx(np.mean(per_run))
        assert table[col].iloc[3] == pytest.approx(np.std(per_run, ddof=1))
    assert "run_summary.csv" in stdout and "accuracy:" in stdout

    # the same command again: both seeds are finished and skipped, nothing is rewritten
    stamp = (out / "seed_3" / "test_metrics.json").stat().st_mtime_ns
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and stdout.count("finished earlier, skipped") == 2
    assert (out / "seed_3" / "test_metrics.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------- folds, config


def test_cross_validation_over_folds_with_a_config_file(tones, tmp_path, capsys):
    out = tmp_path / "cv"
    config = tmp_path / "cv.yaml"
    config.write_text(
        "cv: true\nseeds: [5]\nmax_steps: 3\nmodel: drone_cnn\nspec_augment: true\n"
        "spec: {time_width: 5, freq_width: 3}\nmixup_alpha: 0.3\nreport_to: tensorboard\n"
        "wave: {noise_p: 0.5, time_mask_p: 0.5}\n"
    )
    code, stdout, err = cli(
        capsys, tones, "--out", out, "--config", config, *QUICK, *FRONTEND_FLAGS
    )
    assert code == 0, err
    df = read_manifest(tones)
    table = pd.read_csv(out / "run_summary.csv")
    assert list(table["run"]) == ["fold_0/seed_5", "fold_1/seed_5", "fold_2/seed_5", "mean", "std"]
    for fold in range(3):
        run = out / f"fold_{fold}" / "seed_5"
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["options"]["model"] == "drone_cnn" and cfg["options"]["spec_augment"]
        assert cfg["options"]["spec"]["time_width"] == 5 and cfg["train"]["max_steps"] == 3
        assert cfg["options"]["wave"]["noise_p"] == 0.5
        assert cfg["run"]["fold"] == fold
        # test = this fold, validation = the next fold, training = the rest
        assert cfg["run"]["n_test_clips"] == int((df["fold"] == fold).sum())
        assert cfg["run"]["n_val_clips"] == int((df["fold"] == (fold + 1) % 3).sum())
        assert cfg["run"]["n_train"] == int((~df["fold"].isin([fold, (fold + 1) % 3])).sum())
        tested = set(pd.read_csv(run / "test_predictions.csv")["path"])
        assert tested == set(df.loc[df["fold"] == fold, "path"])
        assert any((run / "tensorboard").rglob("events.out.tfevents.*"))


def test_sanity_overfit_reports_success_and_failure(tones, tmp_path, capsys):
    out = tmp_path / "sanity"
    # the MLP on raw waveform: no frontend between the samples and the model
    code, stdout, _ = cli(capsys, tones, "--out", out, "--sanity_overfit", "--lr", "1e-3",
                          "--model", "mlp", "--model_options", '{"input": "waveform"}', *QUICK)  # fmt: skip
    assert code == 0 and "sanity check passed" in stdout
    result = json.loads((out / "sanity_overfit" / "result.json").read_text())
    assert result["passed"] and result["final_batch_accuracy"] == 1.0
    assert not (out / "seed_42").exists()  # a check, not a training run
    code, stdout, _ = cli(capsys, tones, "--out", tmp_path / "fail", "--sanity_overfit",
                          "--lr", "1e-7", "--sanity_steps", "2", *QUICK, *FRONTEND_FLAGS)  # fmt: skip
    assert code == 1 and "sanity check FAILED" in stdout


def test_multi_label_manifest_with_a_feature_cache(tones, tmp_path, capsys):
    df = read_manifest(tones)
    df.loc[df.index[::4], "labels"] = df["labels"].iloc[::4] + ",mid"  # some clips: two labels
    df.loc[df["labels"] == "mid,mid", "labels"] = "mid"
    manifest = write_manifest(df.drop(columns="fold"), tmp_path / "multi.csv")
    cache = tmp_path / "cache"
    assert main(["features", str(manifest), "--frontend", "logmel", *FRONTEND_FLAGS,
                 "--out", str(cache), "--num_workers", "0", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "ml"
    code, stdout, err = cli(capsys, manifest, "--out", out, "--max_steps", "4",
                            "--features", cache, *QUICK, *FRONTEND_FLAGS)  # fmt: skip
    assert code == 0, err
    assert "multi-label" in stdout and f"feature cache: {cache}" in stdout
    run = out / "seed_42"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["multi_label"] and cfg["run"]["feature_cache"] == str(cache.resolve())
    tm = json.loads((run / "test_metrics.json").read_text())
    assert {"mAP", "auroc", "macro_f1", "per_class"} <= set(tm) and tm["best"][
        "metric"
    ] == "eval/mAP"
    pred = pd.read_csv(run / "test_predictions.csv")
    probs = pred[[c for c in pred.columns if c.startswith("p_")]].to_numpy()
    assert not np.allclose(probs.sum(axis=1), 1.0)  # sigmoid per class
    assert not (run / "confusion.png").exists()  # no confusion matrix for multi-label
    table = pd.read_csv(out / "run_summary.csv")
    assert "test_mAP" in table.columns and table["test_mAP"].iloc[0] == pytest.approx(tm["mAP"])


# ------------------------------------------------------------------------- bad input


def _unlabelled(tones: Path, tmp: Path) -> Path:
    df = read_manifest(tones)
    df["labels"] = ""
    return write_manifest(df, tmp / "unlabelled.csv")


def _class_only_in_fold_0(tones: Path, tmp: Path) -> Path:
    df = read_manifest(tones)
    df = df[(df["labels"] != "high") | (df["fold"] == 0)]
    return write_manifest(df, tmp / "lonely.csv")


BAD = [
    (["--seeds", "1,x"], "--seeds: 'x' is not a valid int"),
    (["--seeds", "1,1"], "repeated seed"),
    (["--model", "tiny_cnn"], "unknown baseline 'tiny_cnn'"),
    (["--model", "timm:resnet_18"], "unknown timm model"),
    (["--model_options", '{"depth": 3}'], "unknown option(s) depth"),
    (["--batch_size", "999"], "--batch_size 999 is larger than the training set"),
    (["--test_fold", "9"], "--test_fold 9 does not exist"),
    (["--max_steps", "5", "--epochs", "2"], "give --max_steps or --epochs"),
    (["--features", "/nonexistent/cache"], "--features /nonexistent/cache"),
    (["--val", "0.6", "--test", "0.5"], "leaves no training data"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_impossible_flags_fail_in_one_line_before_anything_is_written(
    tones, tmp_path, capsys, extra, message
):
    out = tmp_path / "never"
    code, stdout, err = cli(capsys, tones, "--out", out, *QUICK, *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bioaudio train-baseline: error:")
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(
    "make,extra,message",
    [
        (_unlabelled, [], "has no labels"),
        (
            _class_only_in_fold_0,
            ["--test_fold", "0", "--batch_size", "2"],
            "class 'high' has no training examples",
        ),
    ],
)
def test_unusable_manifests_fail_in_one_line(tones, tmp_path, capsys, make, extra, message):
    out = tmp_path / "never"
    code, _, err = cli(capsys, make(tones, tmp_path), "--out", out, *QUICK, *extra)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_run_directory_of_another_model_is_refused_before_training(tones, tmp_path, capsys):
    out = tmp_path / "runs"
    base = [tones, "--out", out, "--max_steps", "2", *QUICK, *FRONTEND_FLAGS]
    assert cli(capsys, *base, "--seeds", "1", "--model", "mlp")[0] == 0
    listing = sorted(str(p) for p in out.rglob("*"))
    stamp = (out / "seed_1" / "metrics.csv").stat().st_mtime_ns
    # seed 2 would be new, but seed 1's directory holds an mlp: nothing may train
    code, stdout, err = cli(capsys, *base, "--seeds", "2,1", "--model", "tiny_mel_cnn")
    assert code == 2 and err.count("\n") == 1
    assert "holds a run of another model" in err and "seed_1" in err
    assert sorted(str(p) for p in out.rglob("*")) == listing
    assert (out / "seed_1" / "metrics.csv").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------- resume, processes


def _command(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(manifest), "--out", str(out), "--seeds", "11", "--max_steps", "30",
        "--save_every", "10", "--eval_every", "10", "--log_every", "5", "--lr", "3e-3",
        "--model_options", '{"dropout": 0.0}', "--features", "none", *QUICK, *FRONTEND_FLAGS,
        *extra,
    ]  # fmt: skip


# Runs the CLI in a child process that SIGKILLs itself right after the state of step KILL_AT
# is complete: the kill lands at a known point, whatever the machine's speed (no race with the
# child finishing first).
KILL_AFTER_STATE = """
import os, signal, sys
from bioaudio.training import loop
save = loop.Trainer._save_state
def save_then_die(self):
    path = save(self)
    if self.step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.Trainer._save_state = save_then_die
from bioaudio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(tones, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert cli(capsys, *_command(tones, straight))[0] == 0

    killed = tmp_path / "killed"
    run = killed / "seed_11"
    proc_args = [sys.executable, "-c", KILL_AFTER_STATE, "train-baseline",
                 *_command(tones, killed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": "10"}  # as this process (one_thread)
    proc = subprocess.run(proc_args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "state" / "step_10" / "COMPLETE").is_file()
    assert not (run / "export").exists() and not (run / "test_metrics.json").exists()

    code, stdout, err = cli(capsys, *_command(tones, killed))
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_10") and summary["steps"] == 30
    ref, got = weights(straight / "seed_11"), weights(run)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=k)
    a = json.loads((straight / "seed_11" / "test_metrics.json").read_text())
    b = json.loads((run / "test_metrics.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["best"] == b["best"]


def test_two_processes_match_one_process(tones, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--max_steps", "6", "--eval_every", "3"]
    cmd = _command(tones, two)
    cmd[cmd.index("--max_steps") : cmd.index("--max_steps") + 2] = extra[:2]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "bioaudio", "train-baseline", *cmd,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("accuracy:") == 1  # printed by the main process only
    cmd1 = _command(tones, one)
    cmd1[cmd1.index("--max_steps") : cmd1.index("--max_steps") + 2] = extra[:2]
    assert cli(capsys, *cmd1)[0] == 0
    s1 = json.loads((one / "seed_11" / "summary.json").read_text())
    s2 = json.loads((two / "seed_11" / "summary.json").read_text())
    assert s2["num_processes"] == 2 and s1["num_processes"] == 1
    # The noise floor of this machine: the same global batch in one process, summed in another
    # order (two accumulated micro-batches, as two processes sum it). Adam turns such rounding
    # differences in near-zero gradients into lr-sized weight differences on some CPUs, so two
    # processes must agree with one process as closely as a reordered one process does.
    floor_dir = tmp_path / "reordered"
    cmd_floor = _command(tones, floor_dir, "--grad_accum", "2")
    cmd_floor[cmd_floor.index("--max_steps") : cmd_floor.index("--max_steps") + 2] = extra[:2]
    assert cli(capsys, *cmd_floor)[0] == 0
    w1, w2 = weights(one / "seed_11"), weights(two / "seed_11")
    w_floor = weights(floor_dir / "seed_11")
    for k in w1:
        floor = float((w_floor[k] - w1[k]).abs().max())
        diff = float((w2[k] - w1[k]).abs().max())
        assert diff <= 10 * floor + 1e-6, (k, diff, floor)
    t1 = json.loads((one / "seed_11" / "test_metrics.json").read_text())
    t2 = json.loads((two / "seed_11" / "test_metrics.json").read_text())
    assert t1["n"] == t2["n"] and t1["accuracy"] == t2["accuracy"]
    p1 = pd.read_csv(one / "seed_11" / "test_predictions.csv")
    p2 = pd.read_csv(two / "seed_11" / "test_predictions.csv")
    assert list(p1["path"]) == list(p2["path"])
    np.testing.assert_allclose(p1["probability"], p2["probability"], atol=1e-4)
    shutil.rmtree(two)
