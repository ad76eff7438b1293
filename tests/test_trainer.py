"""The training loop: schedules, accumulation, exact resume (SIGKILL / SIGINT), half-written states,
NaN guard, bf16 autocast on CPU, flag errors, TensorBoard, and a real 2-process run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from train_toy import ToyNet, ToyOptions, build, main

from bioaudio.config import ArgumentParser, add_dataclass_args, config_from_args
from bioaudio.errors import ConfigError
from bioaudio.training.loop import DivergenceError, TrainConfig
from bioaudio.training.optim import ema_update_
from bioaudio.training.rundir import find_resume_state, list_states
from bioaudio.training.schedules import cosine_ramp, linear_ramp, warmup_cosine

TOY = Path(__file__).with_name("train_toy.py")
TIMING = ["samples_per_s", "elapsed_s", "data_wait", "peak_rss_mb"]  # measured, not computed


@pytest.fixture(autouse=True)
def one_thread():
    # A toy model is fastest (and most reproducible) on one thread, even on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=out, max_steps=30, batch_size=8, lr=0.05, warmup_steps=3, save_every=10,
        keep_last=2, log_every=5, eval_every=10, num_workers=0, progress=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def straight_cfg(out: Path, **kw) -> TrainConfig:
    return make_cfg(out, best_metric="accuracy", **kw)


# Noise in __getitem__ and in training_step: resume is only exact if the RNG is restored.
NOISY = dict(item_noise=0.05, step_noise=0.05)


def run(cfg: TrainConfig, opts: ToyOptions):
    """Fresh Accelerate singletons (several runs live in one pytest process), build, fit."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer, task, data = build(cfg, opts)
    summary = trainer.fit()
    return summary, trainer, task, data


def weights(run_dir: Path, name: str = "export") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"weights differ at {k}")


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=TIMING)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 30-step run that the resume tests must reproduce."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    summary, trainer, _, _ = run(straight_cfg(out), ToyOptions(**NOISY))
    return out, summary, {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}


# ------------------------------------------------------------------------------ schedules


def test_warmup_cosine_values():
    f = [warmup_cosine(s, total_steps=20, warmup_steps=4, min_ratio=0.1) for s in range(26)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f[20] == pytest.approx(0.1) and f[25] == pytest.approx(0.1)  # ends at min_lr_ratio
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert warmup_cosine(0, total_steps=10) == 1.0
    assert warmup_cosine(10, total_steps=10, min_ratio=0.0) == pytest.approx(0.0)
    assert linear_ramp(0, start=0.9, end=0.99, ramp_steps=10) == pytest.approx(0.9)
    assert linear_ramp(5, start=0.9, end=0.99, ramp_steps=10) == pytest.approx(0.945)
    assert linear_ramp(50, start=0.9, end=0.99, ramp_steps=10) == 0.99
    assert cosine_ramp(5, start=0.9, end=0.99, ramp_steps=10) == pytest.approx(0.945)
    assert cosine_ramp(10, start=0.9, end=0.99, ramp_steps=10) == pytest.approx(0.99)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    tgt = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    src[1].running_mean += 1.5
    expected = {
        k: 0.9 * tgt.state_dict()[k] + 0.1 * v
        for k, v in src.named_parameters()  # parameters interpolate
    }
    ema_update_(tgt, src, 0.9)
    for k, v in expected.items():
        torch.testing.assert_close(tgt.state_dict()[k], v)
    torch.testing.assert_close(tgt[1].running_mean, src[1].running_mean)  # buffers are copied


# ------------------------------------------------------------------------------ straight run


def test_straight_run_writes_everything(straight):
    out, summary, final = straight
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    # keep_last=2 with save_every=10: only the two newest complete states survive.
    assert [p.name for p in list_states(out / "state")] == ["step_20", "step_30"]
    # The export holds the final weights and loads into a fresh model.
    assert_same_weights(weights(out), final, atol=0)
    ToyNet(16).load_state_dict(weights(out))
    m = pd.read_csv(out / "metrics.csv")
    assert m["step"].tolist() == [5, 10, 15, 20, 25, 30]
    # lr is a pure function of the step: row for step s logs update s-1.
    for step, lr in zip(m["step"], m["lr"]):
        expected = 0.05 * warmup_cosine(step - 1, total_steps=30, warmup_steps=3, min_ratio=0.01)
        assert lr == pytest.approx(expected)
    evals = m.dropna(subset=["eval/accuracy"])
    assert evals["step"].tolist() == [10, 20, 30]
    assert evals["eval/n"].tolist() == [13, 13, 13]  # every eval item counted once
    assert summary["eval"]["eval/accuracy"] == pytest.approx(evals["eval/accuracy"].iloc[-1])
    best = evals.loc[evals["eval/accuracy"].idxmax()]
    assert summary["best"]["step"] == best["step"]
    assert (out / "best" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["batch_size"] == 8 and config["identity"]["hidden"] == 16


def test_grad_accum_equivalence(tmp_path):
    results = []
    for accum in (1, 2, 4):
        cfg = make_cfg(tmp_path / f"a{accum}", max_steps=10, grad_accum=accum, eval_every=0)
        _, trainer, _, _ = run(cfg, ToyOptions(n_eval=0))
        assert trainer.micro_batch == 8 // accum
        opt = trainer.optimizer.optimizer
        assert opt.defaults["fused"] is True  # fused AdamW runs on CPU too
        # No weight decay on biases (1-D parameters).
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
        assert all(p.ndim == 1 for p in opt.param_groups[1]["params"])
        results.append((trainer.unwrapped.state_dict(), metrics(cfg.out_dir)))
    for sd, m in results[1:]:
        assert_same_weights(results[0][0], sd, atol=1e-6)
        pd.testing.assert_frame_equal(results[0][1], m, check_exact=False, rtol=1e-5)


# ------------------------------------------------------------------------------ resume


def test_resume_after_sigkill_matches_straight_run(straight, tmp_path):
    out_ref, _, final = straight
    out = tmp_path / "killed"
    args = [
        sys.executable, str(TOY), "--out_dir", str(out), "--max_steps", "30", "--batch_size", "8",
        "--lr", "0.05", "--warmup_steps", "3", "--save_every", "10", "--keep_last", "2",
        "--log_every", "5", "--eval_every", "10", "--num_workers", "0", "--no-progress",
        "--seed", "0", "--best_metric", "accuracy", "--item_noise", "0.05",
        "--step_noise", "0.05", "--sleep_per_step", "0.15",
    ]  # fmt: skip
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        # Kill once step_10 is saved and the run has logged step 15 (rows to drop on resume).
        while time.time() < deadline and proc.poll() is None:
            csv = out / "metrics.csv"
            if (out / "state" / "step_10" / "COMPLETE").is_file() and csv.is_file():
                rows = [ln.split(",")[0] for ln in csv.read_text().splitlines()[1:]]
                if "15" in rows:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "export").exists()  # it really died mid-run
    resumed_from = find_resume_state(out)
    assert resumed_from is not None and resumed_from.name in ("step_10", "step_20")

    summary, trainer, _, _ = run(straight_cfg(out), ToyOptions(**NOISY))
    assert summary["status"] == "completed"
    assert summary["resumed_from"] == str(resumed_from)
    assert_same_weights(trainer.unwrapped.state_dict(), final)
    pd.testing.assert_frame_equal(metrics(out), metrics(out_ref), check_exact=False, rtol=1e-6)
    best_ref = json.loads((out_ref / "summary.json").read_text())["best"]
    assert summary["best"]["step"] == best_ref["step"]
    assert summary["best"]["value"] == pytest.approx(best_ref["value"])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_exports_then_resume_matches(straight, tmp_path, sig):
    out_ref, _, final = straight
    out = tmp_path / "interrupted"
    handler = signal.getsignal(signal.Signals[sig])
    opts = ToyOptions(**NOISY, interrupt_at=13, interrupt_signal=sig)
    summary, _, _, _ = run(straight_cfg(out), opts)
    assert summary["status"] == "interrupted" and summary["steps"] == 13
    assert (out / "state" / "step_13" / "COMPLETE").is_file()
    assert (out / "export" / "model.safetensors").is_file()
    assert summary["eval"] is not None and "eval/accuracy" in summary["eval"]  # final eval ran
    assert metrics(out)["step"].max() == 10  # logged steps only; the final eval is not a row
    assert signal.getsignal(signal.Signals[sig]) is handler  # the caller's handler is back

    summary, trainer, _, _ = run(straight_cfg(out), ToyOptions(**NOISY))
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("step_13")
    assert_same_weights(trainer.unwrapped.state_dict(), final)
    pd.testing.assert_frame_equal(metrics(out), metrics(out_ref), check_exact=False, rtol=1e-6)


def test_auto_resume_ignores_half_written_states(straight, tmp_path):
    out_ref, _, final = straight
    out = tmp_path / "partial"
    shutil.copytree(out_ref / "state" / "step_20", out / "state" / "step_20")
    # A newer state without its COMPLETE marker (killed while saving) and a leftover temp dir.
    half = out / "state" / "step_25"
    shutil.copytree(out_ref / "state" / "step_20", half)
    (half / "COMPLETE").unlink()
    (half / "model.safetensors").write_bytes(b"truncated")
    (out / "state" / ".tmp-step_28").mkdir()
    assert find_resume_state(out) == out / "state" / "step_20"
    with pytest.raises(ConfigError, match="no complete training state"):
        run(straight_cfg(tmp_path / "x", resume=str(half)), ToyOptions(**NOISY))

    summary, trainer, _, _ = run(straight_cfg(out), ToyOptions(**NOISY))
    assert summary["resumed_from"] == str(out / "state" / "step_20")
    assert_same_weights(trainer.unwrapped.state_dict(), final)
    assert not (out / "state" / ".tmp-step_28").exists()


def test_resuming_with_changed_training_options_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    run(make_cfg(out, max_steps=4, save_every=2, eval_every=0), ToyOptions(n_eval=0))
    capsys.readouterr()
    cfg = make_cfg(out, max_steps=6, lr=0.01, save_every=2, eval_every=0, resume="auto")
    summary, *_ = run(cfg, ToyOptions(n_eval=0))
    assert summary["status"] == "completed" and summary["steps"] == 6
    said = capsys.readouterr().out
    assert "resuming at step 4 with changed options: --lr 0.05 -> 0.01, --max_steps 4 -> 6" in said


def test_resuming_past_a_smaller_max_steps_is_refused(tmp_path):
    out = tmp_path / "run"
    run(make_cfg(out, max_steps=6, save_every=3, eval_every=0), ToyOptions(n_eval=0))
    with pytest.raises(ConfigError, match="at step 6, past --max_steps 4"):
        run(make_cfg(out, max_steps=4, eval_every=0, resume="auto"), ToyOptions(n_eval=0))


def test_resume_into_run_of_another_model_is_refused(straight, tmp_path):
    out_ref, _, _ = straight
    out = tmp_path / "other"
    shutil.copytree(out_ref, out)
    before = (out / "config.json").read_text()
    with pytest.raises(ConfigError, match="different model") as e:
        run(make_cfg(out), ToyOptions(hidden=32))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--batch_size 16 differs"):
        run(make_cfg(out, batch_size=16), ToyOptions())
    with pytest.raises(ConfigError, match="already holds a run"):
        run(make_cfg(out, resume=None), ToyOptions())
    assert (out / "config.json").read_text() == before  # refused before anything was written


# ------------------------------------------------------------------------------ guards, precision


def test_nan_guard_skips_updates(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=8, log_every=1, eval_every=0, save_every=0)
    summary, _, task, _ = run(cfg, ToyOptions(nan_steps="3,4", n_eval=0))
    assert summary["status"] == "completed" and summary["bad_steps"] == 2
    # Steps 3 and 4 changed nothing (weights, EMA teacher); step 5 trained again.
    assert_same_weights(task.before[3], task.snapshots[2], atol=0)
    assert_same_weights(task.before[5], task.snapshots[2], atol=0)
    with pytest.raises(AssertionError):
        assert_same_weights(task.before[6], task.before[5], atol=0)
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert m["bad_steps"].tolist() == [0, 0, 1, 2, 2, 2, 2, 2]
    assert m["loss"].isna().tolist() == [False, False, True, True, False, False, False, False]
    assert all(math.isfinite(v.float().sum()) for v in weights(tmp_path).values())


def test_divergence_stops_with_state_and_export(tmp_path):
    cfg = make_cfg(tmp_path, max_steps=20, max_bad_steps=2, eval_every=0)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer, task, _ = build(cfg, ToyOptions(nan_steps="4-"))
    with pytest.raises(DivergenceError, match="3 non-finite steps in a row") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    assert (tmp_path / "state" / "step_6" / "COMPLETE").is_file()  # bad steps 4, 5, 6 > 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 6
    assert_same_weights(weights(tmp_path), task.snapshots[3], atol=0)  # last good weights


def test_a_run_that_ends_on_non_finite_steps_diverged(tmp_path):
    # fewer bad steps than --max_bad_steps, but the last ones: not a finished model
    cfg = make_cfg(tmp_path, max_steps=6, max_bad_steps=10, eval_every=0, save_every=0)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer, task, _ = build(cfg, ToyOptions(nan_steps="5-", n_eval=0))
    with pytest.raises(DivergenceError, match="ended on 2 non-finite step") as e:
        trainer.fit()
    assert "\n" not in str(e.value)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["bad_steps"] == 2
    assert_same_weights(weights(tmp_path), task.snapshots[4], atol=0)  # last good weights


def test_bf16_autocast_on_cpu(tmp_path):
    seen = {}
    for precision in ("fp32", "bf16"):
        cfg = make_cfg(tmp_path / precision, max_steps=6, precision=precision, eval_every=0)
        summary, trainer, _, _ = run(cfg, ToyOptions(n_eval=0))
        seen[precision] = trainer.unwrapped.last_dtype
        assert summary["precision"] == precision
        assert math.isfinite(summary["final_loss"])
        assert all(v.dtype == torch.float32 for v in weights(cfg.out_dir).values())
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kw, opts, message",
    [
        (dict(batch_size=64), {}, "larger than the training set"),
        (dict(batch_size=10, grad_accum=4), {}, "not divisible by --grad_accum"),
        (dict(warmup_steps=50), {}, "--warmup_steps 50 exceeds --max_steps 30"),
        (dict(best_metric="acc"), dict(n_eval=0), "needs an evaluation set"),
        (dict(resume="/nonexistent/run"), {}, "no such directory"),
        (dict(seed=-1), {}, r"--seed must be an integer in \[0, 2\*\*31\)"),
    ],
)
def test_impossible_flags_fail_before_training(tmp_path, kw, opts, message):
    with pytest.raises(ConfigError, match=message) as e:
        run(make_cfg(tmp_path / "run", **kw), ToyOptions(**opts))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run(make_cfg(tmp_path, precision="fp16"), ToyOptions())


def test_flags_from_the_command_line(tmp_path, capsys):
    parser = ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    ns = parser.parse_args(["--seed", "abc"])
    with pytest.raises(ConfigError, match="--seed"):
        config_from_args(TrainConfig, ns)
    ns = parser.parse_args(["--betas", "0.9,0.95", "--resume", "none", "--max_steps", "7"])
    cfg = config_from_args(TrainConfig, ns)
    assert cfg.betas == (0.9, 0.95) and cfg.resume is None and cfg.max_steps == 7
    # The toy script (like every command) turns a bad combination into one line and exit 2.
    AcceleratorState._reset_state(reset_partial_state=True)
    code = main(["--out_dir", str(tmp_path), "--batch_size", "64", "--num_workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "larger than the training set" in err


# ------------------------------------------------------------------------------ data


def test_stream_equals_map_and_resumes(tmp_path):
    cfg = make_cfg(tmp_path / "map", max_steps=12, eval_every=0, shuffle=False)
    _, t_map, _, data = run(cfg, ToyOptions(n_eval=0))
    assert data.epochs == [0, 1, 2]  # set_epoch reached the dataset (5 steps per epoch)
    cfg = replace(cfg, out_dir=tmp_path / "stream")
    _, t_stream, _, _ = run(cfg, ToyOptions(n_eval=0, stream=True))
    straight = t_stream.unwrapped.state_dict()
    assert_same_weights(t_map.unwrapped.state_dict(), straight)

    cfg = replace(cfg, out_dir=tmp_path / "stream_resumed")
    summary, _, _, _ = run(cfg, ToyOptions(n_eval=0, stream=True, interrupt_at=7))
    assert summary["steps"] == 7
    summary, t_res, _, _ = run(cfg, ToyOptions(n_eval=0, stream=True))
    assert summary["resumed_from"].endswith("step_7") and summary["steps"] == 12
    assert_same_weights(t_res.unwrapped.state_dict(), straight)


def test_worker_count_does_not_change_results(tmp_path):
    """Items are produced under RNG seeded by (seed, epoch, index): workers change nothing."""
    out = {}
    for workers in (0, 2):
        cfg = make_cfg(tmp_path / f"w{workers}", max_steps=8, num_workers=workers, eval_every=0)
        _, trainer, _, _ = run(cfg, ToyOptions(n_eval=0, item_noise=0.3))
        out[workers] = trainer.unwrapped.state_dict()
    assert_same_weights(out[0], out[2])


def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, max_steps=6, log_every=2, eval_every=0, report_to="tensorboard")
    run(cfg, ToyOptions(n_eval=0))
    events = sorted((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    assert events
    steps = set()
    for f in events:
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            steps |= {e.step for e in acc.Scalars("loss")}
    assert steps == {2, 4, 6}


def test_wandb_offline_without_account(tmp_path, monkeypatch):
    """--report_to wandb works with no account: an offline run folder with the logged steps."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials either
    cfg = make_cfg(tmp_path / "run", max_steps=4, log_every=2, eval_every=0, report_to="wandb")
    run(cfg, ToyOptions(n_eval=0))
    offline = sorted((tmp_path / "run").rglob("offline-run-*"))
    assert offline, "no offline wandb run folder"
    history = list(offline[0].rglob("*.wandb"))
    assert history and history[0].stat().st_size > 0


# ------------------------------------------------------------------------------ 2 processes


def test_two_processes_match_one_process(tmp_path):
    common = [
        "--max_steps", "12", "--batch_size", "8", "--lr", "0.05", "--save_every", "5",
        "--log_every", "2", "--eval_every", "6", "--num_workers", "0", "--no-progress",
        "--record_seen",
    ]  # fmt: skip
    out2 = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(TOY),
        "--out_dir", str(out2), "--grad_accum", "2", "--expect_processes", "2", *common,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary2 = json.loads((out2 / "summary.json").read_text())
    assert summary2["num_processes"] == 2 and summary2["status"] == "completed"

    out1 = tmp_path / "one"
    parser = ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, ToyOptions)
    ns = parser.parse_args(["--out_dir", str(out1), *common])
    summary1, _, _, _ = run(config_from_args(TrainConfig, ns), config_from_args(ToyOptions, ns))
    assert summary1["num_processes"] == 1

    # Same global batches: each step, rank 0 + rank 1 saw exactly the 1-process batch.
    def seen(path):
        return [json.loads(line)["indices"] for line in path.read_text().splitlines()]

    r0, r1, one = (
        seen(out2 / "seen_rank0.jsonl"),
        seen(out2 / "seen_rank1.jsonl"),
        seen(out1 / "seen_rank0.jsonl"),
    )
    assert len(one) == 12
    for a, b, full in zip(r0, r1, one, strict=True):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == full
    assert_same_weights(weights(out2), weights(out1), atol=1e-5)
    pd.testing.assert_frame_equal(metrics(out2), metrics(out1), check_exact=False, rtol=1e-4)
    assert summary2["eval"]["eval/n"] == 13  # gathered eval: no duplicated or lost items
    assert summary2["eval"]["eval/accuracy"] == pytest.approx(summary1["eval"]["eval/accuracy"])

    # States hold unwrapped weights: the 2-process run continues in 1 process like the 1-process run.
    extended = []
    for out in (out2, out1):
        ns = parser.parse_args(["--out_dir", str(out), *common, "--max_steps", "14"])
        cfg, opts = config_from_args(TrainConfig, ns), config_from_args(ToyOptions, ns)
        summary, trainer, _, _ = run(replace(cfg, grad_accum=1), opts)
        assert summary["resumed_from"] == str(out / "state" / "step_12")
        extended.append(trainer.unwrapped.state_dict())
    assert_same_weights(*extended, atol=1e-5)


def test_one_run_per_out_dir_at_a_time(tmp_path):
    """A second training process on the same out_dir is refused while the first one runs."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    first, _, _ = build(make_cfg(tmp_path / "run"), ToyOptions())
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ConfigError, match="another running training process"):
        build(make_cfg(tmp_path / "run"), ToyOptions())
    first.release()  # fit() releases it at the end; then the folder is free again
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    second, _, _ = build(make_cfg(tmp_path / "run"), ToyOptions())
    second.release()
