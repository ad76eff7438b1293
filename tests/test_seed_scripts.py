"""scripts/pretrain.sh, finetune.sh, eval.sh (scripts/seed_flags.py): every seed flag reaches the
option it maps to (the bioaudio command line that `build_command` builds, parsed by the bioaudio
command's own parser), the world-size check, the restore-file rule, one-line errors (exit 2)
before anything runs; then the seed workflow end to end on generated audio: pretrain.sh (2 CPU
processes), finetune.sh on its export, eval.sh on the finetuned model, each run's config.json
holding the mapped values and eval.sh's test_metrics.json equal to the metrics recomputed from
its test_predictions.csv."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from bioaudio.cli import COMMANDS
from bioaudio.config import ArgumentParser, config_from_args
from bioaudio.data.demo import generate_demo_data
from bioaudio.errors import ConfigError
from bioaudio.inference.metrics import classification_report
from bioaudio.models import registry
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import save_export
from bioaudio.training.pretrain import objective_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
import seed_flags  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# helpers


def bio_args(cmd: list[str]) -> list[str]:
    """The bioaudio part of a launch command: [COMMAND, args...]."""
    i = cmd.index("-m")
    assert cmd[i + 1] == "bioaudio"
    return cmd[i + 2 :]


def launch_args(cmd: list[str]) -> list[str]:
    return cmd[: cmd.index("-m")]


def resolve(cmd: list[str]) -> dict[str, Any]:
    """The options the launched bioaudio command resolves from its command line (its own parser
    and options dataclass): every field, objective options as 'eat.mask_ratio', positionals."""
    name, *rest = bio_args(cmd)
    module = importlib.import_module(COMMANDS[name][0])
    parser = ArgumentParser(prog=f"bioaudio {name}")
    module.add_arguments(parser)
    ns = parser.parse_args(rest)
    cls = {
        "pretrain": "bioaudio.training.pretrain:PretrainOptions",
        "finetune": "bioaudio.commands.finetune:FinetuneConfig",
        "evaluate": "bioaudio.inference.evaluate:EvaluateOptions",
    }[name]
    mod, _, attr = cls.partition(":")
    cfg = config_from_args(getattr(importlib.import_module(mod), attr), ns)
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key, value in vars(ns).items():
        obj, _, opt = key.partition(".")
        if name == "pretrain" and opt and obj in registry.objective_names():
            out[key] = getattr(objective_config(obj, {opt: value}), opt)
    for positional in ("data", "manifest", "model"):
        if positional in vars(ns):
            out[positional] = getattr(ns, positional)
    return out


def run_script(name: str, *argv: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPTS / name), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def write_labels(path: Path, root: Path) -> Path:
    """labels.csv (filename,labels) of one-folder-per-class audio, names relative to `root`."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".wav", ".flac", ".ogg"))
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["filename", "labels"])
        w.writerows((p.relative_to(root).as_posix(), p.parent.name) for p in files)
    return path


def make_state(run: Path, step: int = 3, model_type: str = "eat") -> Path:
    """A complete training state as the Trainer leaves it (the files the rule looks at)."""
    state = run / "state" / f"step_{step}"
    state.mkdir(parents=True)
    (state / "COMPLETE").write_text("")
    identity = {"model_type": model_type}
    (state / "trainer_state.json").write_text(json.dumps({"format": 1, "identity": identity}))
    return state


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seed") / "demo"
    generate_demo_data(root, seed=0, n_per_class=4, n_unlabelled=8, soundscapes=0)
    return root


@pytest.fixture(scope="module")
def labels(demo) -> Path:
    """Outside --data_dir, names relative to --data_dir (demo/by_class)."""
    return write_labels(demo.parent / "labels.csv", demo / "by_class")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for t in ("eat", "beats"):
        torch.manual_seed(0)
        out[t] = save_export(build_model(t, "tiny"), root / t)
    return out


@pytest.fixture
def inputs(demo, labels, exports, tmp_path) -> dict[str, Path]:
    weights = tmp_path / "weights.csv"
    weights.write_text("filename,weight\n")
    return {
        "S": tmp_path / "save",
        "D": demo / "by_class",
        "U": demo / "unlabelled",
        "L": labels,
        "M": exports["eat"],
        "weights": weights,
        "state": make_state(tmp_path / "old_run"),
    }


def fill(argv: list[str], inputs: dict[str, Path]) -> list[str]:
    return [str(inputs[a[1:-1]]) if a.startswith("{") else a for a in argv]


# ----------------------------------------------------------------------------------------------
# every flag reaches its option


PRETRAIN = ["pretrain", "--save_dir", "{S}", "--data_dir", "{U}"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"batch_size": 12, "grad_accum": 1, "cpu": True}),
        (["--batch_size", "3"], {"batch_size": 3, "grad_accum": 1}),
        (["--update_freq", "4"], {"batch_size": 48, "grad_accum": 4}),
        (
            ["--batch_size", "3", "--world_size", "2", "--update_freq", "4"],
            {"batch_size": 24, "grad_accum": 4},
        ),
        (["--target_length", "1024"], {"segment_duration": 10.24}),
        (["--mask_ratio", "0.6"], {"eat.mask_ratio": 0.6}),
        (["--mask_ratio", "0.6", "--model", "beats"], {"beats.mask_ratio": 0.6, "model": "beats"}),
        (
            ["--mask_ratio", "0.5", "--objective", "beats:1,memory_bank:0.2"],
            {"beats.mask_ratio": 0.5, "objective": "beats:1,memory_bank:0.2"},
        ),
        (["--num_updates", "7"], {"max_steps": 7}),
        (["--learning_rate", "0.0005"], {"lr": 0.0005}),
        (["--preset", "tiny"], {"preset": "tiny"}),
        (["--model", "beats"], {"model": "beats"}),
        (["--objective", "eat:1"], {"objective": "eat:1"}),
        (["--model_path", "{M}"], {"model_path": "{M}"}),
        (["--restore_file", "{state}"], {"resume": "{state}"}),
        (["--restore_file", "{M}"], {"model_path": "{M}", "resume": "auto"}),
        (["--", "--seed", "5", "--eat.clone_batch", "2"], {"seed": 5, "eat.clone_batch": 2}),
    ],
)
def test_pretrain_flags_reach_the_options(inputs, argv, expected):
    cmd = seed_flags.build_command(fill(PRETRAIN + argv, inputs))
    opts = resolve(cmd)
    assert opts["data"] == inputs["U"] and opts["out"] == inputs["S"]
    for key, value in expected.items():
        if isinstance(value, str) and value.startswith("{"):
            value = inputs[value[1:-1]]
        got = opts[key]
        assert (Path(got) if isinstance(value, Path) else got) == value, key


FINETUNE = ["finetune", "--model_path", "{M}", "--save_dir", "{S}", "--data_dir", "{D}",
            "--labels", "{L}"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"batch_size": 32, "cpu": True, "resume": "auto"}),
        (["--batch_size", "5"], {"batch_size": 5}),
        (["--batch_size", "5", "--world_size", "2"], {"batch_size": 10}),
        (["--target_length", "300"], {"clip_seconds": 3.0}),
        (["--mixup", "0.4"], {"mixup_alpha": 0.4}),
        (["--mask_ratio", "0.3"], {"mask_ratio": 0.3, "spec_augment": True}),
        (["--num_classes", "6"], {"num_classes": 6}),
        (["--prediction_mode", "LIN_SOFTMAX"], {"prediction_mode": "LIN_SOFTMAX"}),
        (["--restore_file", "{state}"], {"resume": "{state}"}),
        (["--weights", "{weights}"], {"weights": "{weights}"}),
        (["--epochs", "3"], {"epochs": 3.0}),
        (["--lr", "0.002"], {"lr": 0.002}),
        (["--", "--seeds", "1,2"], {"seeds": [1, 2]}),
    ],
)
def test_finetune_flags_reach_the_options(inputs, argv, expected):
    cmd = seed_flags.build_command(fill(FINETUNE + argv, inputs))
    opts = resolve(cmd)
    assert opts["manifest"] == inputs["S"] / "manifest.csv" and opts["out"] == inputs["S"]
    assert opts["model_path"] == inputs["M"]
    for key, value in expected.items():
        if isinstance(value, str) and value.startswith("{"):
            value = inputs[value[1:-1]]
        got = opts[key]
        assert (Path(got) if isinstance(value, Path) else got) == value, key


EVAL = ["eval", "--model_path", "{M}", "--data_dir", "{D}", "--labels", "{L}"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--save_dir", "{S}"], {"out": "{S}", "cpu": True, "window": None}),
        ([], {"out": Path("eval_by_class")}),
        (["--batch_size", "7"], {"batch_size": 7}),
        (["--target_length", "250"], {"window": 2.5}),
        (["--", "--hop", "0.5"], {"hop": 0.5}),
    ],
)
def test_eval_flags_reach_the_options(inputs, argv, expected):
    cmd = seed_flags.build_command(fill(EVAL + argv, inputs))
    opts = resolve(cmd)
    assert opts["model"] == inputs["M"] and opts["manifest"] == opts["out"] / "manifest.csv"
    for key, value in expected.items():
        if isinstance(value, str) and value.startswith("{"):
            value = inputs[value[1:-1]]
        assert opts[key] == value, key


# ----------------------------------------------------------------------------------------------
# processes and devices


@pytest.mark.parametrize("script", ["pretrain", "finetune", "eval"])
def test_world_size_sets_the_processes(inputs, script, monkeypatch):
    base = {"pretrain": PRETRAIN, "finetune": FINETUNE, "eval": EVAL}[script]
    one = seed_flags.build_command(fill(base, inputs))
    head = launch_args(one)
    assert head[1] == "launch" or "accelerate.commands.launch" in head
    assert head[head.index("--num_processes") + 1] == "1" and "--multi_gpu" not in head
    assert bio_args(one)[-1] == "--cpu"
    two = seed_flags.build_command(fill(base + ["--world_size", "2"], inputs))
    head = launch_args(two)
    assert head[head.index("--num_processes") + 1] == "2" and "--multi_gpu" in head
    # more processes than cores: refused before anything runs
    with pytest.raises(ConfigError, match="CPU core"):
        seed_flags.build_command(fill(base + ["--world_size", "1000"], inputs))
    # --cuda counts CUDA devices (none here: refused); with two, GPU processes without --cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="0 CUDA device"):
        seed_flags.build_command(fill(base + ["--cuda"], inputs))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = seed_flags.build_command(fill(base + ["--cuda", "--world_size", "2"], inputs))
    assert "--cpu" not in bio_args(gpu) and "--multi_gpu" in launch_args(gpu)
    with pytest.raises(ConfigError, match="3 but this machine has 2 CUDA"):
        seed_flags.build_command(fill(base + ["--cuda", "--world_size", "3"], inputs))


# ----------------------------------------------------------------------------------------------
# --restore_file


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda d, ex: make_state(d / "run"), "--resume"),  # state/step_N itself
        (lambda d, ex: make_state(d / "run").parents[1], "--resume"),  # a run directory
        (lambda d, ex: ex["eat"], "--model_path"),  # our export
        (lambda d, ex: _touch(d / "BEATs_iter3.pt"), "--model_path"),  # a checkpoint file
        (lambda d, ex: _touch(d / "eat.safetensors"), "--model_path"),
        (lambda d, ex: _hf_folder(d / "hf"), "--model_path"),  # a Hugging Face folder
    ],
)
def test_restore_file_rule(inputs, exports, tmp_path, make, flag):
    f = make(tmp_path, exports)
    args = bio_args(seed_flags.build_command(fill(PRETRAIN, inputs) + ["--restore_file", str(f)]))
    assert args[args.index(flag) + 1] == str(f)
    other = "--model_path" if flag == "--resume" else "--resume"
    assert other not in args


def _touch(p: Path) -> Path:
    p.write_bytes(b"\x80\x02}q\x00.")
    return p


def _hf_folder(p: Path) -> Path:
    p.mkdir()
    (p / "config.json").write_text("{}")
    (p / "model.safetensors").write_bytes(b"")
    return p


def test_restore_file_errors_and_the_model_type_of_mask_ratio(inputs, exports, tmp_path):
    base = fill(PRETRAIN, inputs)
    (tmp_path / "empty").mkdir()
    for bad, message in [
        (tmp_path / "nothing", "no such file"),
        (tmp_path / "empty", "neither a training state"),
    ]:
        with pytest.raises(ConfigError, match=message):
            seed_flags.build_command(base + ["--restore_file", str(bad)])
    with pytest.raises(ConfigError, match="give one of them"):
        seed_flags.build_command(
            base + ["--restore_file", str(exports["eat"]), "--model_path", str(exports["beats"])]
        )
    # finetune resumes states only; a checkpoint is its --model_path
    with pytest.raises(ConfigError, match="--model_path"):
        seed_flags.build_command(fill(FINETUNE, inputs) + ["--restore_file", str(exports["eat"])])
    # --mask_ratio goes to the objective of the model that trains: the checkpoint's, the run's
    for extra, model_type in [
        (["--model_path", str(exports["beats"])], "beats"),
        (["--restore_file", str(exports["beats"])], "beats"),
        (["--restore_file", str(make_state(tmp_path / "b", model_type="beats"))], "beats"),
        (["--restore_file", str(make_state(tmp_path / "e", model_type="eat"))], "eat"),
    ]:
        args = bio_args(seed_flags.build_command(base + extra + ["--mask_ratio", "0.7"]))
        assert args[args.index(f"--{model_type}.mask_ratio") + 1] == "0.7"
    with pytest.raises(ConfigError, match="no eat or beats term"):
        seed_flags.build_command(base + ["--objective", "memory_bank:1", "--mask_ratio", "0.7"])


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing run


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("pretrain.sh", ["--data_dir", "{U}"], "required: --save_dir"),
        ("pretrain.sh", ["--save_dir", "{S}"], "required: --data_dir"),
        ("pretrain.sh", PRETRAIN[1:] + ["--lr", "1"], "unrecognized arguments: --lr"),
        ("pretrain.sh", PRETRAIN[1:] + ["--world_size", "1000"], "--world_size 1000"),
        ("pretrain.sh", PRETRAIN[1:] + ["--mask_ratio", "1.5"], "between 0 and 1"),
        ("pretrain.sh", PRETRAIN[1:] + ["--learning_rate", "1", "--", "--lr", "2"], "repeats"),
        ("finetune.sh", FINETUNE[1:5], "required: --data_dir, --labels"),
        ("finetune.sh", FINETUNE[1:] + ["--world_size", "1000"], "--world_size 1000"),
        ("eval.sh", EVAL[1:] + ["--bogus"], "unrecognized arguments: --bogus"),
        ("eval.sh", EVAL[1:] + ["--world_size", "1000"], "--world_size 1000"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(inputs, script, argv, message):
    proc = run_script(script, *fill(argv, inputs))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "+ " not in proc.stdout and not inputs["S"].exists()


def test_labels_naming_missing_files_or_unknown_classes_are_one_line(inputs, tmp_path):
    rows = inputs["L"].read_text().splitlines()
    missing = tmp_path / "missing.csv"
    missing.write_text("\n".join([*rows[:3], "chorus_frog/nope.wav,chorus_frog"]) + "\n")
    proc = run_script("finetune.sh", *fill(FINETUNE[1:7], inputs), "--labels", missing)
    assert proc.returncode == 2 and "1 listed file(s) do not exist" in proc.stderr
    assert "nope.wav" in proc.stderr and "+ " not in proc.stdout
    # a classifier that does not know a label: found before launching
    model = tmp_path / "clf"
    torch.manual_seed(0)
    head = {"pooling": "mean", "num_classes": 2}
    save_export(build_model("eat", "tiny", head=head, class_names=["chorus_frog", "owl"]), model)
    proc = run_script("eval.sh", "--model_path", model, "--data_dir", inputs["D"],
                      "--labels", inputs["L"], "--save_dir", tmp_path / "ev")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "label(s) the model does not know: click_beetle" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "+ " not in proc.stdout
    # an encoder without classes
    proc = run_script("eval.sh", "--model_path", inputs["M"], "--data_dir", inputs["D"],
                      "--labels", inputs["L"], "--save_dir", tmp_path / "ev2")  # fmt: skip
    assert proc.returncode == 2 and "has no classes" in proc.stderr


# ----------------------------------------------------------------------------------------------
# the seed workflow end to end: pretrain.sh -> finetune.sh -> eval.sh


@pytest.fixture(scope="module")
def pretrained(demo) -> tuple[Path, subprocess.CompletedProcess]:
    out = demo.parent / "pretrain"
    proc = run_script(
        "pretrain.sh", "--save_dir", out, "--data_dir", demo / "unlabelled", "--preset", "tiny",
        "--batch_size", "2", "--world_size", "2", "--update_freq", "2", "--target_length", "100",
        "--mask_ratio", "0.7", "--num_updates", "3", "--learning_rate", "0.002",
        "--", "--eat.clone_batch", "2", "--eat.decoder_layers", "1",
        "--memory_bank.queue_size", "16", "--num_workers", "0", "--no-progress",
        "--log_every", "1", "--save_every", "0",
    )  # fmt: skip
    return out, proc


@pytest.fixture(scope="module")
def finetuned(demo, labels, pretrained) -> tuple[Path, subprocess.CompletedProcess]:
    out = demo.parent / "finetune"
    weights = demo.parent / "weights.csv"
    names = [Path(r.split(",")[0]).name for r in labels.read_text().splitlines()[1:]]
    weights.write_text("filename,weight\n" + "".join(f"{n},1\n" for n in names))
    proc = run_script(
        "finetune.sh", "--model_path", pretrained[0] / "export", "--save_dir", out,
        "--data_dir", demo / "by_class", "--labels", labels, "--batch_size", "4",
        "--target_length", "100", "--mixup", "0.2", "--mask_ratio", "0.2", "--num_classes", "6",
        "--prediction_mode", "MEAN_POOLING", "--weights", weights, "--epochs", "1",
        "--lr", "0.001", "--", "--num_workers", "0", "--no-progress",
    )  # fmt: skip
    return out, proc


def test_pretrain_sh_end_to_end(pretrained):
    out, proc = pretrained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--num_processes 2 --multi_gpu" in proc.stdout  # the printed command
    cfg = json.loads((out / "config.json").read_text())
    o = cfg["options"]
    assert (o["batch_size"], o["grad_accum"]) == (2 * 2 * 2, 2)
    assert o["segment_duration"] == 1.0 and o["max_steps"] == 3 and o["lr"] == 0.002
    assert o["preset"] == "tiny" and o["cpu"] is True
    assert o["objectives"]["eat"]["mask_ratio"] == 0.7
    assert o["objectives"]["eat"]["clone_batch"] == 2  # passed through after --
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["num_processes"] == 2  # --world_size 2: two real (gloo) CPU processes
    assert (out / "export" / "model.safetensors").is_file()


def test_finetune_sh_end_to_end(demo, finetuned, pretrained):
    out, proc = finetuned
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (demo / "by_class" / "manifest.csv").exists()  # nothing written into D
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 24 and set(manifest["source"]) == {"csv"}
    cfg = json.loads((out / "seed_42" / "config.json").read_text())
    o = cfg["options"]
    assert o["model_path"] == str(pretrained[0] / "export")
    assert o["batch_size"] == 4 and o["clip_seconds"] == 1.0 and o["mixup_alpha"] == 0.2
    assert o["mask_ratio"] == 0.2 and o["spec_augment"] is True and o["spec"]["max_fraction"] == 0.2
    assert o["num_classes"] == 6 and o["prediction_mode"] == "MEAN_POOLING"
    assert o["weights"] == str(demo.parent / "weights.csv")
    assert o["epochs"] == 1.0 and o["lr"] == 0.001 and o["cpu"] is True
    assert (out / "seed_42" / "test_metrics.json").is_file()


def test_eval_sh_metrics_equal_those_of_its_predictions(demo, labels, finetuned, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("eval.sh", "--model_path", finetuned[0], "--data_dir", demo / "by_class",
                      "--labels", labels, "--save_dir", out, "--", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["model"] == str((finetuned[0] / "seed_42" / "best").resolve())
    assert metrics["window"] == 1.0 and metrics["n"] == 24 and metrics["processes"] == 1
    names = json.loads((out / "class_names.json").read_text())
    pred = pd.read_csv(out / "test_predictions.csv")
    assert len(pred) == 24
    scores = pred[[f"p_{n}" for n in names]].to_numpy()
    targets = np.array([names.index(v) for v in pred["labels"]])
    again = classification_report(scores, targets, names, multi_label=False)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "mAP", "auroc"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-6), key
    assert metrics["confusion"] == again["confusion"]
    for name in names:
        for key in ("precision", "recall", "f1-score", "support"):
            assert metrics["per_class"][name][key] == pytest.approx(again["per_class"][name][key])
    counts = pd.read_csv(out / "confusion_counts.csv", index_col=0).to_numpy()
    assert counts.tolist() == metrics["confusion"]
    for f in ("confusion.png", "confusion_counts.png", "pr_curves.png", "report.md"):
        assert (out / f).is_file(), f
    assert "| accuracy |" in (out / "report.md").read_text()
