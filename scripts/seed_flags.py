"""The seed project's flags for scripts/pretrain.sh, finetune.sh and eval.sh, run on bioaudio.

    python scripts/seed_flags.py pretrain|finetune|eval [SEED FLAGS] [-- BIOAUDIO FLAGS]

Parses the seed (fairseq-style) flags, maps them onto `bioaudio pretrain`, `bioaudio finetune`
and `bioaudio evaluate`, prints the `accelerate launch ... -m bioaudio ...` command and runs it
(an argument list, no shell). Arguments after `--` are passed to the bioaudio command unchanged
(e.g. `-- --seed 1 --eat.clone_batch 8`); repeating a flag the seed flags already set, or
giving one twice after `--`, is an error, and finetune / eval check the whole command line with
the bioaudio command's own parser and options (e.g. --epochs with --max_steps). Bad input
(missing or unknown flags, more processes than devices, a restore file that is neither a state
nor a checkpoint, labels naming missing files, an eval --save_dir evaluate would refuse) is one
line on stderr and exit status 2 before anything is written or run. `build_command(argv)`
returns the command without running it.

Files: finetune / eval write only S/labels_resolved.csv (the labels file with absolute names),
S/manifest.csv, S/skipped.csv and S/.seed_inputs.json (which lists them). The --labels file is
never written to, and an existing file of those names that an earlier run of these scripts did
not write (or that was changed since) is never replaced: that is refused before anything is
written (move it away or choose another --save_dir).

Processes: `--world_size W` runs W processes (`accelerate launch --multi_gpu --num_processes W`
when W > 1). With `--cuda` they are GPU processes (W <= the CUDA devices); without it they are
CPU (gloo) processes (W <= the CPU cores) and bioaudio gets `--cpu`.

Seed flag -> bioaudio flag:
  --batch_size B       per process per update (fairseq): --batch_size B x W x U (the global
                       batch of one optimizer step), --grad_accum U (pretrain; finetune: B x W)
  --update_freq U      --grad_accum U (pretrain)
  --target_length T    frames (100 per second): --segment_duration T/100 (pretrain),
                       --clip_seconds T/100 (finetune), --window T/100 (eval)
  --mask_ratio R       pretrain: --eat.mask_ratio R or --beats.mask_ratio R (the objective of the
                       model: --model, else an eat / beats term of --objective, else the type of
                       --model_path, else the resumed run's, else eat); finetune: --mask_ratio R
  --num_updates N      --max_steps N
  --learning_rate LR   --lr LR (pretrain); finetune takes --lr
  --restore_file F     pretrain: a training state (state/step_N) or a run directory holding
                       state/ -> --resume F (continue: optimiser, schedule, step, data position;
                       same global batch); a model checkpoint file (.pt, .safetensors) or
                       weights folder (our export, a Hugging Face folder) -> --model_path F (new
                       run from those weights). finetune: a state or run directory -> --resume F
  --save_dir S         --out S
  --data_dir D         pretrain: DATA; finetune / eval: with --labels L (`filename,labels`,
                       names relative to D, else to L's folder, or absolute) prepared into
                       S/labels_resolved.csv (absolute names), S/manifest.csv and S/skipped.csv
                       (never into D, never over L) -> MANIFEST S/manifest.csv
  --mixup X            --mixup_alpha X
  --preset, --model, --objective, --model_path, --num_classes, --prediction_mode, --weights,
  --epochs, --lr       the bioaudio flags of the same name
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bioaudio from this checkout even without installation

from bioaudio.config import ArgumentParser, config_from_args  # noqa: E402
from bioaudio.errors import BioaudioError, ConfigError, DataError  # noqa: E402

PROGS = {
    "pretrain": "scripts/pretrain.sh",
    "finetune": "scripts/finetune.sh",
    "eval": "scripts/eval.sh",
}
MODES = ("auto", "CLS_TOKEN", "MEAN_POOLING", "LIN_SOFTMAX", "ATTENTION")
# the options dataclass of each bioaudio command whose command line is checked before writing
OPTIONS = {
    "finetune": ("bioaudio.commands.finetune", "FinetuneConfig"),
    "evaluate": ("bioaudio.inference.evaluate", "EvaluateOptions"),
}
# what finetune / eval write into S, and the record of what they wrote
LABELS_RESOLVED = "labels_resolved.csv"
DERIVED = (LABELS_RESOLVED, "manifest.csv", "skipped.csv")
RECORD = ".seed_inputs.json"
WRITTEN_BY = "scripts/seed_flags.py"
FRAMES_PER_SECOND = 100

_DOCS = {
    "pretrain": """Self-supervised pretraining (EAT / BEATs) with the seed project's flags:
`accelerate launch [--multi_gpu] --num_processes W -m bioaudio pretrain D --out S ...`.

--batch_size is per process per update (fairseq style): the global batch of one optimizer step
is batch_size x world_size x update_freq (bioaudio --batch_size) and --update_freq is bioaudio
--grad_accum. --target_length is in frames (100 per second): --segment_duration T/100.
--mask_ratio is the mask ratio of the model's objective (--eat.mask_ratio / --beats.mask_ratio).
--num_updates is --max_steps, --learning_rate is --lr.
--restore_file F: a training state (state/step_N) or a run directory holding state/ is resumed
(--resume F: optimiser, schedule, step and data position; keep the same global batch); a model
checkpoint file (.pt, .safetensors) or weights folder (export, Hugging Face) starts a new run from
its weights (--model_path F).
Without --cuda the W processes run on CPU (W <= CPU cores); with --cuda on GPUs (W <= devices).
Arguments after `--` go to `bioaudio pretrain` unchanged (see `bioaudio pretrain --help`).""",
    "finetune": """Finetune a BEATs / EAT checkpoint into a classifier (the seed project's flags).

The labels file L (`filename,labels`, names relative to --data_dir D, else to L's folder, or
absolute) is prepared into S/manifest.csv (and S/labels_resolved.csv, S/skipped.csv; nothing is
written into D or over L, nor over a file of those names these scripts did not write), then
`accelerate launch [--multi_gpu] --num_processes W -m bioaudio finetune S/manifest.csv --out S
...` runs (one run directory S/seed_42/).
--batch_size is per process: the global batch is batch_size x world_size. --target_length is in
frames (100 per second): --clip_seconds T/100. --mixup X is --mixup_alpha X; --mask_ratio turns
SpecAugment on with masks that wide; --restore_file (a state or run directory) is --resume.
Arguments after `--` go to `bioaudio finetune` unchanged (see `bioaudio finetune --help`).""",
    "eval": """Evaluate a classifier (an export, a run directory, or a RUN_ROOT with one run) on a
labelled set with the seed project's flags.

The labels file L (`filename,labels`, names relative to --data_dir D, else to L's folder, or
absolute) is prepared into S/manifest.csv, then `accelerate launch [--multi_gpu]
--num_processes W -m bioaudio evaluate M S/manifest.csv --out S` writes test_metrics.json,
test_predictions.csv, the confusion matrix (CSV + PNG), pr_curves.png and report.md into S.
Files that do not exist or labels the model does not know are an error.
--target_length (frames, 100 per second) sets the window: --window T/100 (default: the model's
training clip). --batch_size is windows per forward pass per process.
Arguments after `--` go to `bioaudio evaluate` unchanged (see `bioaudio evaluate --help`).""",
}


# ----------------------------------------------------------------------------------------------
# Parsers


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_positive_int.__name__ = "positive integer"  # argparse: "invalid positive integer value: 'x'"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


_positive_float.__name__ = "positive number"


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def build_parser(script: str) -> ArgumentParser:
    """The seed flags of `script` (pretrain | finetune | eval); one-line errors, exit 2."""
    p = ArgumentParser(
        prog=PROGS[script],
        description=_DOCS[script],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    a = p.add_argument
    if script == "pretrain":
        a("--save_dir", type=Path, required=True, help="run directory (bioaudio --out)")
        a("--data_dir", type=Path, required=True, help="folder of audio, or a manifest CSV")
        a("--batch_size", type=_positive_int, default=12, help="clips per process per update")
    else:
        a("--model_path", type=Path, required=True, help="checkpoint / classifier to use")
        if script == "finetune":
            a("--save_dir", type=Path, required=True, help="RUN_ROOT (bioaudio --out)")
        else:
            a("--save_dir", type=Path, help="output folder (default: ./eval_<data_dir name>)")
        a("--data_dir", type=Path, required=True, help="folder the labels file's names are in")
        a("--labels", type=Path, required=True, help="labels CSV: filename,labels")
        default_batch = 32 if script == "finetune" else None
        what = "clips per process per step" if script == "finetune" else "windows per process"
        a("--batch_size", type=_positive_int, default=default_batch, help=what)
    a("--world_size", type=_positive_int, default=1, help="number of processes")
    a("--cuda", action="store_true", help="GPU processes (default: CPU processes)")
    a("--target_length", type=_positive_int, help="frames per clip (100 per second)")
    if script == "pretrain":
        a("--update_freq", type=_positive_int, default=1, help="updates accumulated per step")
        a("--mask_ratio", type=_ratio, help="mask ratio of the model's objective")
        a("--num_updates", type=_positive_int, help="optimizer steps (--max_steps)")
        a("--learning_rate", type=_positive_float, help="peak learning rate (--lr)")
        a("--restore_file", type=Path, help="a state / run directory, or a model checkpoint")
        a("--preset", help="encoder preset of a new model: tiny | small | base | large")
        a("--model_path", type=Path, help="continue from a checkpoint (export or official)")
        a("--model", choices=("eat", "beats"), help="model type (default eat)")
        a("--objective", help="weighted objectives NAME:WEIGHT,... (bioaudio --objective)")
    elif script == "finetune":
        a("--mixup", type=_non_negative, help="mixup Beta(alpha, alpha) (--mixup_alpha); 0 = off")
        a("--mask_ratio", type=_ratio, help="SpecAugment masks this fraction wide")
        a("--num_classes", type=_positive_int, help="expected number of classes")
        a("--prediction_mode", choices=MODES, help="head: CLS_TOKEN, MEAN_POOLING, ...")
        a("--restore_file", type=Path, help="a state or run directory to resume (--resume)")
        a("--weights", type=Path, help="per-sample sampling weights: CSV filename,weight")
        a("--epochs", type=_positive_float, help="epochs per run")
        a("--lr", type=_positive_float, help="peak learning rate")
    return p


# ----------------------------------------------------------------------------------------------
# Rules


def available_devices(cuda: bool) -> int:
    """CUDA devices (with --cuda), else the CPU cores this process may use."""
    if cuda:
        import torch

        return torch.cuda.device_count()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_world_size(world_size: int, cuda: bool) -> None:
    """ConfigError when more processes are asked for than there are devices."""
    n = available_devices(cuda)
    if world_size > n:
        what = "CUDA device(s)" if cuda else "CPU core(s) (without --cuda processes run on CPU)"
        raise ConfigError(f"--world_size {world_size} but this machine has {n} {what}")


def restore_kind(path: Path) -> str:
    """'state' for a training state or a run directory holding state/, 'checkpoint' for a model
    checkpoint file or weights folder (export, Hugging Face); ConfigError otherwise."""
    from bioaudio.models.checkpoint import is_export_dir
    from bioaudio.training.rundir import find_resume_state

    if not path.exists():
        raise ConfigError(f"--restore_file {path}: no such file or folder")
    if path.is_file():
        return "checkpoint"
    if find_resume_state(path) is not None or (path / "state").is_dir():
        return "state"
    weights = any((path / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))
    if is_export_dir(path) or (weights and (path / "config.json").is_file()):
        return "checkpoint"
    raise ConfigError(
        f"--restore_file {path}: neither a training state / run directory (state/step_N) nor a"
        " model checkpoint (a file, an export or a Hugging Face folder)"
    )


def checkpoint_model_type(path: Path) -> str:
    """The model type of a checkpoint (an export's config.json, else the loaded model's)."""
    from bioaudio.models.checkpoint import is_export_dir, read_export_config

    if path.is_dir() and is_export_dir(path):
        return str(read_export_config(path).get("model_type", ""))
    from bioaudio import load_model

    return str(getattr(load_model(path), "model_type", ""))


def resumed_model_type(path: Path) -> str | None:
    """The model type recorded by the run a state / run directory belongs to, if any."""
    import json

    from bioaudio.training.rundir import find_resume_state

    state = find_resume_state(path)
    for f in ([state / "trainer_state.json"] if state else []) + [path / "config.json"]:
        try:
            identity = json.loads(f.read_text()).get("identity") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if identity.get("model_type"):
            return str(identity["model_type"])
    return None


def pretrain_model_type(args: argparse.Namespace, model_path: Path | None) -> str:
    """The model whose objective gets --mask_ratio (see the module docstring for the order)."""
    if args.model:
        return args.model
    if args.objective:
        names = [t.split(":")[0].strip() for t in args.objective.split(",")]
        found = [n for n in names if n in ("eat", "beats")]
        if not found:
            raise ConfigError(
                f"--mask_ratio: --objective {args.objective} has no eat or beats term to mask"
            )
        return found[0]
    if model_path is not None:
        return checkpoint_model_type(model_path)
    for run in (args.restore_file, args.save_dir):
        if run is not None and run.is_dir():
            found_type = resumed_model_type(run)
            if found_type:
                return found_type
    return "eat"


def _seconds(frames: int) -> str:
    return repr(frames / FRAMES_PER_SECOND)


# ----------------------------------------------------------------------------------------------
# Commands


def _pretrain(args: argparse.Namespace) -> list[str]:
    if not args.data_dir.exists():
        raise ConfigError(f"--data_dir {args.data_dir}: no such folder or manifest")
    w, u, b = args.world_size, args.update_freq, args.batch_size
    cmd = ["pretrain", str(args.data_dir), "--out", str(args.save_dir)]
    cmd += ["--batch_size", str(b * w * u), "--grad_accum", str(u)]
    if args.target_length is not None:
        cmd += ["--segment_duration", _seconds(args.target_length)]
    if args.num_updates is not None:
        cmd += ["--max_steps", str(args.num_updates)]
    if args.learning_rate is not None:
        cmd += ["--lr", repr(args.learning_rate)]
    for flag in ("preset", "model", "objective"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    model_path = args.model_path
    if args.restore_file is not None:
        if restore_kind(args.restore_file) == "state":
            cmd += ["--resume", str(args.restore_file)]
        elif model_path is not None:
            raise ConfigError(
                f"--restore_file {args.restore_file} is a model checkpoint and --model_path "
                f"{model_path} another; give one of them"
            )
        else:
            model_path = args.restore_file
    if model_path is not None:
        if not model_path.exists():
            raise ConfigError(f"--model_path {model_path}: no such file or folder")
        cmd += ["--model_path", str(model_path)]
    if args.mask_ratio is not None:
        model_type = pretrain_model_type(args, model_path)
        cmd += [f"--{model_type}.mask_ratio", repr(args.mask_ratio)]
    return cmd


def _check_labelled_inputs(args: argparse.Namespace) -> None:
    if not args.model_path.exists():
        raise ConfigError(f"--model_path {args.model_path}: no such file or folder")
    if not args.data_dir.is_dir():
        raise ConfigError(f"--data_dir {args.data_dir}: no such folder")
    if not args.labels.is_file():
        raise ConfigError(f"--labels {args.labels}: no such file")
    if save_dir(args).resolve() == args.data_dir.resolve():
        raise ConfigError("--save_dir must not be --data_dir (the manifest is written into it)")


def save_dir(args: argparse.Namespace) -> Path:
    """S: --save_dir, or for eval ./eval_<data_dir name>."""
    if args.save_dir is not None:
        return args.save_dir
    return Path(f"eval_{args.data_dir.resolve().name}")


def _finetune(args: argparse.Namespace) -> list[str]:
    _check_labelled_inputs(args)
    s = args.save_dir
    cmd = ["finetune", str(s / "manifest.csv"), "--model_path", str(args.model_path)]
    cmd += ["--out", str(s), "--batch_size", str(args.batch_size * args.world_size)]
    if args.target_length is not None:
        cmd += ["--clip_seconds", _seconds(args.target_length)]
    if args.mixup is not None:
        cmd += ["--mixup_alpha", repr(args.mixup)]
    for flag in ("mask_ratio", "epochs", "lr"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", repr(getattr(args, flag))]
    for flag in ("num_classes", "prediction_mode"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.weights is not None:
        if not args.weights.is_file():
            raise ConfigError(f"--weights {args.weights}: no such file")
        cmd += ["--weights", str(args.weights)]
    if args.restore_file is not None:
        if restore_kind(args.restore_file) != "state":
            raise ConfigError(
                f"--restore_file {args.restore_file} is a model checkpoint: finetune starts from"
                " it with --model_path; --restore_file resumes a state or run directory"
            )
        cmd += ["--resume", str(args.restore_file)]
    return cmd


def _eval(args: argparse.Namespace) -> list[str]:
    _check_labelled_inputs(args)
    s = save_dir(args)
    cmd = ["evaluate", str(args.model_path), str(s / "manifest.csv"), "--out", str(s)]
    if args.batch_size is not None:
        cmd += ["--batch_size", str(args.batch_size)]
    if args.target_length is not None:
        cmd += ["--window", _seconds(args.target_length)]
    return cmd


_BUILDERS = {"pretrain": _pretrain, "finetune": _finetune, "eval": _eval}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launcher(world_size: int) -> list[str]:
    """`accelerate launch` with `world_size` processes on this machine."""
    exe = Path(sys.executable).with_name("accelerate")
    if exe.is_file():
        head = [str(exe), "launch"]
    elif shutil.which("accelerate"):
        head = ["accelerate", "launch"]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch"]
    # precision is bioaudio's --precision; these only silence accelerate's "defaults" warning
    head += ["--quiet", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    head += ["--num_processes", str(world_size)]
    if world_size > 1:
        head += ["--multi_gpu", "--main_process_port", str(_free_port())]
    return head


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _plan(argv: Sequence[str]) -> tuple[str, argparse.Namespace, list[str]]:
    argv = list(argv)
    if not argv or argv[0] not in PROGS:
        raise ConfigError(f"usage: seed_flags.py {{{','.join(PROGS)}}} [FLAGS] [-- BIOAUDIO FLAGS]")
    script = argv[0]
    own, extra = _split_extra(argv[1:])
    args = build_parser(script).parse_args(own)
    check_world_size(args.world_size, args.cuda)
    bio = _BUILDERS[script](args)
    if not args.cuda:
        bio.append("--cpu")
    ours = {t for t in bio if t.startswith("--")}
    repeated = [t.split("=")[0] for t in extra if t.split("=")[0] in ours]
    if repeated:
        raise ConfigError(
            f"{repeated[0]} after -- repeats a flag the seed flags set; use the seed flag"
        )
    flags = [t.split("=")[0] for t in extra if t.startswith("--") and t != "--"]
    twice = [f for i, f in enumerate(flags) if f in flags[:i]]
    if twice:
        raise ConfigError(f"{twice[0]} is given twice after --; give it once")
    if bio[0] in OPTIONS:
        cfg = check_bioaudio_args([*bio, *extra])
        if bio[0] == "evaluate":
            from bioaudio.inference.evaluate import check_evaluate_out

            check_evaluate_out(save_dir(args), cfg.overwrite)
    return script, args, [*launcher(args.world_size), "-m", "bioaudio", *bio, *extra]


class _CheckParser(ArgumentParser):
    """The bioaudio command's parser, its errors raised (ConfigError) instead of exiting."""

    def error(self, message: str):  # noqa: D102, ANN201
        raise ConfigError(f"{self.prog}: {message}")


def check_bioaudio_args(bio: list[str]) -> Any:
    """Parse `bio` ([COMMAND, args...]) with the bioaudio command's own parser and resolve its
    options (their checks included), so that a bad or conflicting flag after `--` is refused
    before anything is written. Returns the options."""
    from bioaudio.cli import COMMANDS

    name, *rest = bio
    parser = _CheckParser(prog=f"bioaudio {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    parser.set_defaults(bioaudio_command=name)
    ns = parser.parse_args(rest)
    module, cls = OPTIONS[name]
    cfg = config_from_args(getattr(importlib.import_module(module), cls), ns)
    for check in ("validate_loop", "validate_experiment"):  # what the command checks first
        if hasattr(cfg, check):
            getattr(cfg, check)()
    return cfg


def build_command(argv: Sequence[str]) -> list[str]:
    """The `accelerate launch ... -m bioaudio ...` command of `[script, *seed flags]` (nothing
    is prepared or run). ConfigError / SystemExit(2) for bad input."""
    return _plan(argv)[2]


# ----------------------------------------------------------------------------------------------
# Labelled sets


def _listed_path(data_dir: Path, labels_dir: Path, name: str) -> Path:
    name = name.strip()
    if "\\" in name and "/" not in name:  # a Windows-made csv
        name = PurePosixPath(*PureWindowsPath(name).parts).as_posix()
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    for base in (data_dir, labels_dir):
        if (base / p).is_file():
            return (base / p).resolve()
    return (data_dir / p).resolve()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _written_before(out_dir: Path) -> dict[str, str | None] | None:
    """{file name: sha256 (None: being written)} of what an earlier run wrote into `out_dir`;
    None when `out_dir` holds no record of ours."""
    try:
        record = json.loads((out_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY:
        return None
    files = record.get("files")
    return {str(k): v for k, v in files.items()} if isinstance(files, dict) else {}


def _record(out_dir: Path, files: dict[str, str | None]) -> None:
    from bioaudio.fileio import save_json_atomic

    save_json_atomic(out_dir / RECORD, {"written_by": WRITTEN_BY, "files": files})


def check_derived(out_dir: Path, inputs: Sequence[Path]) -> None:
    """ConfigError, before anything is written, when writing the derived files (`DERIVED`,
    `RECORD`) into `out_dir` would touch an input (--labels, --weights) or replace a file that an
    earlier run of these scripts did not write, or that was changed since."""
    from bioaudio.fileio import check_writable

    check_writable(out_dir, "--save_dir")
    hint = "move it away or choose another --save_dir"
    for name in (*DERIVED, RECORD):
        p = out_dir / name
        for src in inputs:
            try:
                same = p.exists() and src.exists() and os.path.samefile(p, src)
            except OSError:
                same = False
            if same:
                raise ConfigError(
                    f"{src} is {p}, a file this script writes; give an input outside --save_dir "
                    "or another --save_dir"
                )
    record, ours = out_dir / RECORD, _written_before(out_dir)
    if (record.exists() or record.is_symlink()) and ours is None:
        raise ConfigError(f"{record} exists and was not written by this script; {hint}")
    ours = ours or {}
    for name in DERIVED:
        p = out_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() or not p.is_file() or name not in ours:
            raise ConfigError(f"{p} exists and was not written by this script; {hint}")
        if ours[name] is not None and _sha256(p) != ours[name]:
            raise ConfigError(f"{p} was changed since this script wrote it; {hint}")


def prepare_labelled(
    data_dir: Path, labels: Path, out_dir: Path, inputs: Sequence[Path] = ()
) -> Path:
    """Write out_dir/labels_resolved.csv (the labels file with absolute file names), then prepare
    out_dir/manifest.csv and out_dir/skipped.csv from it, and record them in out_dir/RECORD.
    DataError when a listed file does not exist; ConfigError (`check_derived`) when a file would
    be replaced that is not ours; both before anything is written. `labels` and `inputs` are
    never written to. Returns the manifest path."""
    from bioaudio.data.manifest import PrepareConfig, prepare_manifest
    from bioaudio.fileio import atomic_path

    try:
        with open(labels, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"--labels {labels}: cannot read ({str(e).splitlines()[0]})") from e
    header = [c.strip() for c in rows[0]] if rows else []
    if "filename" not in header or "labels" not in header:
        raise DataError(f"--labels {labels}: expected a header `filename,labels`")
    if len(rows) < 2:
        raise DataError(f"--labels {labels}: no rows")
    fi = header.index("filename")
    missing = []
    for row in rows[1:]:
        if fi < len(row):
            path = _listed_path(data_dir, labels.resolve().parent, row[fi])
            if not path.is_file():
                missing.append(row[fi].strip())
            row[fi] = str(path)
    if missing:
        raise DataError(
            f"--labels {labels}: {len(missing)} listed file(s) do not exist under --data_dir "
            f"{data_dir}, e.g. {', '.join(missing[:2])}"
        )
    check_derived(out_dir, [labels, *inputs])
    out_dir.mkdir(parents=True, exist_ok=True)
    # recorded before they are written: an interrupted run's files are still known as ours
    _record(out_dir, dict.fromkeys(DERIVED))
    listed = out_dir / LABELS_RESOLVED
    with atomic_path(listed) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows[1:]])
    cfg = PrepareConfig(labels="csv", labels_csv=str(listed), progress=False)
    try:
        result = prepare_manifest(data_dir, out_dir / "manifest.csv", cfg)
    finally:
        _record(out_dir, {n: _sha256(out_dir / n) for n in DERIVED if (out_dir / n).is_file()})
    print(result.summary(), flush=True)
    return out_dir / "manifest.csv"


def check_eval_labels(model_path: Path, manifest: Path) -> None:
    """The model must be a classifier that knows every label of the manifest."""
    from bioaudio.data.manifest import read_manifest
    from bioaudio.inference.evaluate import check_labelled, classifier_config

    _, config = classifier_config(model_path)
    df = read_manifest(manifest)
    check_labelled(df, list(config["class_names"]), bool(config.get("multi_label", False)))


# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Map, prepare, print and run; the launched command's exit status (2: bad input)."""
    from bioaudio.cli import one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = PROGS.get(argv[0], "seed_flags.py") if argv else "seed_flags.py"
    try:
        script, args, cmd = _plan(argv)
        if script in ("finetune", "eval"):
            if script == "eval":  # a model without classes: refused before anything is written
                from bioaudio.inference.evaluate import classifier_config

                classifier_config(args.model_path)
            inputs = [p for p in (getattr(args, "weights", None),) if p is not None]
            manifest = prepare_labelled(args.data_dir, args.labels, save_dir(args), inputs)
            if script == "eval":
                check_eval_labels(args.model_path, manifest)
    except BioaudioError as e:
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return 2
    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
