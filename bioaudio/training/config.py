"""Options of the training loop.

`LoopOptions` are the flags every training command shares with one meaning everywhere (batch,
optimiser, precision, processes, logging, resume). `TrainConfig` adds what one run needs (its
directory, length, seed and evaluation schedule); commands that plan several runs (seeds x folds)
derive those per run and never redefine a loop option. `EncoderRunOptions` are the flags of the
commands that train a transformer encoder (pretrain, finetune).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bioaudio.errors import ConfigError


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive" if minimum == 1 else "a non-negative"
        raise ConfigError(f"--{name} must be {what} integer, got {value!r}")


@dataclass
class LoopOptions:
    """Options of the training loop shared by every training command."""

    batch_size: int = field(
        default=32,
        metadata={"help": "GLOBAL batch per optimizer step (split over processes and grad_accum)"},
    )
    grad_accum: int = field(
        default=1, metadata={"help": "micro-batches accumulated per optimizer step"}
    )
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(
        default=0.01, metadata={"help": "final learning rate as a fraction of --lr (cosine end)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "AdamW weight decay (not on biases, norms, tokens, positions)"},
    )
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    clip_grad: float = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this value (0 = off)"}
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "auto = bf16 on a CUDA GPU that supports it, fp32 otherwise"},
    )
    eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "per-process evaluation batch (default: training micro-batch)"},
    )
    keep_last: int = field(default=2, metadata={"help": "number of saved states to keep"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle map-style datasets every epoch"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        default="none",
        metadata={"help": "experiment tracker (wandb runs offline without an API key)"},
    )
    run_name: str | None = field(
        default=None, metadata={"help": "tracker run name (default: the run directory name)"}
    )
    resume: str | None = field(
        default="auto",
        metadata={
            "help": "auto = continue the newest complete state in the run directory; a state or "
            "run directory; none = start fresh (refused if the directory already holds a run)"
        },
    )
    max_bad_steps: int = field(
        default=10, metadata={"help": "stop after more than N non-finite steps in a row"}
    )
    best_mode: Literal["max", "min"] = field(
        default="max", metadata={"help": "whether a larger or smaller best metric is better"}
    )
    cpu: bool = field(default=False, metadata={"help": "train on CPU even when a GPU is available"})
    find_unused_parameters: bool = field(
        default=False, metadata={"help": "DDP: allow parameters without gradient in a step"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    status_every: float = field(
        default=30.0,
        metadata={
            "help": "seconds between plain status lines when the output is not a terminal (a "
            "file, a pipe, a SLURM log); 0 = none"
        },
    )

    def validate_loop(self) -> None:
        """Raise ConfigError for loop values that cannot work (checked before any training)."""
        for name in ("batch_size", "grad_accum", "keep_last"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_workers", "max_bad_steps"):
            _check_int(name, getattr(self, name), 0)
        if self.warmup_steps is not None:  # a command may leave it to each run (None)
            _check_int("warmup_steps", self.warmup_steps, 0)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch_size {self.batch_size} is not divisible by --grad_accum {self.grad_accum}"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.eps <= 0 or self.clip_grad < 0:
            raise ConfigError("--weight_decay and --clip_grad must be >= 0 and --eps > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"--betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (isinstance(self.status_every, (int, float)) and self.status_every >= 0):
            raise ConfigError(f"--status_every must be >= 0 seconds, got {self.status_every!r}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"--eval_batch_size must be positive, got {self.eval_batch_size}")
        if isinstance(self.resume, str) and self.resume.strip().lower() in ("", "none", "null"):
            self.resume = None


@dataclass
class EncoderRunOptions:
    """How a transformer encoder runs in training (pretrain, finetune): memory and speed only,
    never results."""

    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each transformer block's activations in backward instead of "
            "keeping them: much less memory for some more time, same losses and gradients"
        },
    )

    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the encoder (inductor; needs a C++ compiler): measured on "
            "CPU 1.13x BEATs / 1.02x EAT base per step after a 25-55 s compile "
            "(benchmarks/bench_compile.py); finetuning only"
        },
    )

    def apply_to_encoder(self, encoder: Any) -> None:
        """Switch the options on for `encoder` (a `bioaudio.models.layers.Encoder`)."""
        if self.activation_checkpointing:
            encoder.set_activation_checkpointing(True)
        if self.compile:
            # In place: the module's call is compiled, its parameters and state_dict keys stay.
            encoder.compile()


@dataclass
class TrainConfig(LoopOptions):
    """Options of one training run: the loop's plus its directory, length and schedule."""

    out_dir: Path = field(
        default=Path("runs/train"),
        metadata={"help": "run directory: config.json, metrics.csv, state/, export/, summary.json"},
    )
    max_steps: int = field(default=1000, metadata={"help": "number of optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, augmentation and init"})
    eval_every: int = field(
        default=0, metadata={"help": "evaluate every N steps (0 = only at the end)"}
    )
    save_every: int = field(
        default=500, metadata={"help": "save a resumable state every N steps (0 = only at the end)"}
    )
    log_every: int = field(default=10, metadata={"help": "write a metrics.csv row every N steps"})
    best_metric: str | None = field(
        default=None, metadata={"help": "evaluation metric that selects best/ (e.g. eval/accuracy)"}
    )
    early_stopping: int = field(
        default=0,
        metadata={"help": "stop after N evaluations without a better best_metric (0 = off)"},
    )
    stop_at: float | None = field(
        default=None, metadata={"help": "stop as soon as best_metric reaches this value"}
    )

    @classmethod
    def for_run(cls, options: LoopOptions, **run: Any) -> TrainConfig:
        """The TrainConfig of one run: the loop fields of `options` plus the run's own."""
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(LoopOptions)}
        values.update(run)
        return cls(**values)

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work (checked before any training)."""
        self.validate_loop()
        for name in ("max_steps", "log_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "save_every", "early_stopping"):
            _check_int(name, getattr(self, name), 0)
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**31
        ):
            raise ConfigError(f"--seed must be an integer in [0, 2**31), got {self.seed!r}")
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"--warmup_steps {self.warmup_steps} exceeds --max_steps {self.max_steps}"
            )
