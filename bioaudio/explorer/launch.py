"""The training launcher of the explorer: a form per command, the `accelerate launch -m bioaudio
COMMAND ...` argument list built from it, and the background process with its log.

Safety: only commands of `LAUNCH_FORMS` run, their arguments are built here from typed form
values and passed as a list (no shell); paths are confined by the app's `PathPolicy` (inputs
under the data or run folders, outputs under the run folders); a text value may not start with
'-' (it would be read as a flag). To offer a new command (`pretrain`, `finetune`), add its
fields to `LAUNCH_FORMS` (only what the command's --help lists): the page builds its form
from there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bioaudio.errors import ConfigError
from bioaudio.explorer.paths import PathPolicy

FieldKind = Literal["data_path", "run_path", "int", "float", "choice", "bool", "text"]


@dataclass(frozen=True)
class FormField:
    """One form control and the command-line argument it becomes (`--name value`, a bare
    `--name` for a true bool, or a positional value)."""

    name: str
    kind: FieldKind
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    positional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # text fields: the whole value must match
    required: bool = False


DEFAULT = "(default)"  # a choice that passes no flag: the command decides
BASELINE_MODELS = ("tiny_mel_cnn", "genre_cnn", "drone_cnn", "mlp", "mlp2", "cel", "cel2", "cel3")
FRONTENDS = ("logmel", "stft", "mfcc", "beats_fbank", "eat_fbank")

# command -> its form. The one place to extend when `pretrain` / `finetune` land.
LAUNCH_FORMS: dict[str, tuple[FormField, ...]] = {
    "train-baseline": (
        FormField("manifest", "data_path", "", "labelled manifest CSV", positional=True,
                  required=True),
        FormField("out", "run_path", "baseline", "run folder (under the runs folder)",
                  required=True),
        FormField("model", "choice", "tiny_mel_cnn", "CNN baseline",
                  choices=(*BASELINE_MODELS, "timm:resnet18", "timm:efficientnet_b0")),
        FormField("frontend", "choice", "logmel", "features", choices=FRONTENDS),
        FormField("n_mels", "int", 64, "mel bins", minimum=8, maximum=256),
        FormField("epochs", "float", 30.0, "epochs per run", minimum=0.01, maximum=10000),
        FormField("batch_size", "int", 32, "global batch size", minimum=1, maximum=4096),
        FormField("lr", "float", 1e-3, "peak learning rate", minimum=1e-7, maximum=1.0),
        FormField("clip_seconds", "float", 5.0, "training crop (s)", minimum=0.1, maximum=600),
        FormField("seeds", "text", "42", "comma-separated seeds", pattern=r"\d{1,9}(,\d{1,9})*"),
        FormField("spec_augment", "bool", False, "SpecAugment on training features"),
    ),
    "pretrain": (
        FormField("data", "data_path", "", "folder of audio or a manifest CSV", positional=True,
                  required=True),
        FormField("out", "run_path", "pretrain", "run folder (under the runs folder)",
                  required=True),
        FormField("model", "choice", DEFAULT, "encoder type", choices=(DEFAULT, "eat", "beats")),
        FormField("preset", "choice", "small", "encoder size",
                  choices=("tiny", "small", "base", "large")),
        FormField("model_path", "data_path", "", "continue from this checkpoint (optional)"),
        FormField("objective", "text", "", "NAME:WEIGHT,... (empty: the model's default)",
                  pattern=r"[a-z_]+:[0-9.]+(,[a-z_]+:[0-9.]+)*"),
        FormField("epochs", "float", 10.0, "passes over the data", minimum=0.01, maximum=10000),
        FormField("batch_size", "int", 32, "global batch size", minimum=1, maximum=4096),
        FormField("lr", "float", 1e-4, "peak learning rate", minimum=1e-7, maximum=1.0),
        FormField("segment_duration", "float", 5.0, "clip seconds", minimum=0.5, maximum=60),
    ),
}  # fmt: skip


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("accelerate")
    return [found] if found else [sys.executable, "-m", "accelerate.commands.launch"]


def build_command(
    command: str, values: dict[str, Any], policy: PathPolicy, num_processes: int = 1
) -> list[str]:
    """The argument list of `accelerate launch ... -m bioaudio COMMAND ...` for form `values`;
    ConfigError for anything the form does not allow."""
    if command not in LAUNCH_FORMS:
        raise ConfigError(f"the launcher runs {', '.join(LAUNCH_FORMS)}, not {command!r}")
    if not 1 <= int(num_processes) <= 64:
        raise ConfigError("processes must be between 1 and 64")
    positional: list[str] = []
    flags: list[str] = []
    for f in LAUNCH_FORMS[command]:
        v = values.get(f.name, f.default)
        if v is None or (isinstance(v, str) and not v.strip()):
            if f.required:
                raise ConfigError(f"{f.name}: required")
            continue
        if f.kind == "bool":
            if bool(v):
                flags.append(f"--{f.name}")
            continue
        if f.kind == "choice" and v == DEFAULT:
            continue
        text = _value(f, v, policy)
        if f.positional:
            positional.append(text)
        else:
            flags += [f"--{f.name}", text]
    launch = [*_accelerate(), "launch", "--num_processes", str(int(num_processes))]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        launch.append("--multi_gpu")  # without GPUs: real CPU processes (gloo)
    return [*launch, "-m", "bioaudio", command, *positional, *flags]


def _value(f: FormField, v: Any, policy: PathPolicy) -> str:
    if f.kind == "data_path":
        return str(policy.resolve(str(v), "any", must_exist=True))
    if f.kind == "run_path":
        return str(policy.resolve(str(v), "runs"))
    if f.kind in ("int", "float"):
        try:
            num = int(v) if f.kind == "int" else float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.name}: {v!r} is not a number") from None
        if f.minimum is not None and num < f.minimum or f.maximum is not None and num > f.maximum:
            raise ConfigError(f"{f.name}: {num} is outside [{f.minimum}, {f.maximum}]")
        return str(num)
    text = str(v).strip()
    if f.kind == "choice" and text not in f.choices:
        raise ConfigError(f"{f.name}: {text!r} is not one of {', '.join(f.choices)}")
    if text.startswith("-"):
        raise ConfigError(f"{f.name}: a value may not start with '-'")
    if f.pattern and not re.fullmatch(f.pattern, text):
        raise ConfigError(f"{f.name}: {text!r} is not in the expected form")
    return text


class TrainingJob:
    """A launched command: its process (own process group), log file and output folder."""

    def __init__(self, argv: list[str], out_dir: Path, log_path: Path):
        self.argv = argv
        self.out_dir = out_dir
        self.log_path = log_path
        self.started = time.time()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: Stop ends it and its workers
        )

    @classmethod
    def start(
        cls, command: str, values: dict[str, Any], policy: PathPolicy, num_processes: int = 1
    ) -> TrainingJob:
        """Build the command from form values (see `build_command`) and run it in the
        background; the log goes to OUT/launch.log."""
        argv = build_command(command, values, policy, num_processes)
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else policy.run_dirs[0]
        return cls(argv, out, out / "launch.log")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the job's process group, SIGKILL if it is still there after `timeout`."""
        if self.running:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log (progress bars' carriage returns become new lines)."""
        try:
            data = self.log_path.read_bytes()[-64_000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.replace("\r", "\n").splitlines()[-lines:])

    def metrics_files(self) -> list[Path]:
        """metrics.csv files of the run(s) under the output folder, newest first."""
        if not self.out_dir.is_dir():
            return []
        found = list(self.out_dir.rglob("metrics.csv"))
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
