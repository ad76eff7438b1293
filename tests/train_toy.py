"""A toy model and dataset trained through the real Trainer, for the trainer tests.

It exercises what the three kinds of users need: a classifier with gathered eval metrics
(finetuning), an EMA teacher updated by a per-step hook (EAT), and a memory-bank queue gathered
across processes and saved with the state (contrastive pretraining). Import `run_toy`, or launch:

    python tests/train_toy.py --out_dir /tmp/toy --max_steps 30
    accelerate launch --multi_gpu --num_processes 2 tests/train_toy.py --out_dir /tmp/toy2 \
        --expect_processes 2
(`--multi_gpu` plus the Trainer's `Accelerator(cpu=True)` gives 2 real gloo processes on CPU.)
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from bioaudio.config import ArgumentParser, add_dataclass_args, config_from_args
from bioaudio.errors import BioaudioError
from bioaudio.inference.predict import gather_outputs
from bioaudio.training.loop import TrainConfig, Trainer
from bioaudio.training.optim import ema_update_
from bioaudio.training.schedules import linear_ramp
from bioaudio.training.task import Task, TaskContext

DIM, CLASSES = 8, 3


@dataclass
class ToyOptions:
    n_items: int = field(default=40, metadata={"help": "training items"})
    n_eval: int = field(default=13, metadata={"help": "evaluation items (0 = no evaluation)"})
    hidden: int = field(default=16, metadata={"help": "hidden width"})
    stream: bool = field(default=False, metadata={"help": "training set as an IterableDataset"})
    item_noise: float = field(default=0.0, metadata={"help": "noise added in __getitem__"})
    step_noise: float = field(default=0.0, metadata={"help": "noise added in training_step"})
    ema: bool = field(default=True, metadata={"help": "EMA teacher updated in on_step_end"})
    queue: int = field(default=16, metadata={"help": "memory-bank size (0 = none)"})
    nan_steps: str = field(default="", metadata={"help": "'3,4' or '5-': steps with a NaN loss"})
    interrupt_at: int = field(default=0, metadata={"help": "signal itself after step N"})
    interrupt_signal: str = field(default="SIGINT", metadata={"help": "SIGINT or SIGTERM"})
    sleep_per_step: float = field(default=0.0, metadata={"help": "seconds to sleep per step"})
    expect_processes: int = field(default=0, metadata={"help": "fail unless N processes run"})
    record_seen: bool = field(default=False, metadata={"help": "write seen indices per rank"})
    threads: int = field(default=1, metadata={"help": "torch threads (1 is fastest for a toy)"})


class ToyData(Dataset):
    """Items {x, y, index}: x ~ N(0, 1) in R^8, y = argmax of a fixed projection."""

    def __init__(self, n: int, offset: int = 0, item_noise: float = 0.0):
        g = torch.Generator().manual_seed(1000 + offset)
        self.x = torch.randn(n, DIM, generator=g)
        w = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(7))
        self.y = (self.x @ w).argmax(-1)
        self.item_noise = item_noise
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.x[i]
        if self.item_noise:
            x = x + self.item_noise * torch.randn(DIM)  # global RNG: the Trainer seeds it per item
        return {"x": x, "y": self.y[i], "index": i}


class ToyStream(IterableDataset):
    """The same items as ToyData, streamed in index order every epoch."""

    def __init__(self, data: ToyData):
        self.data = data

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.data)):
            yield self.data[i]


class ToyNet(nn.Module):
    def __init__(self, hidden: int = 16, ema: bool = True):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, CLASSES)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False) if ema else None
        self.last_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        h = self.student(x)
        self.last_dtype = h.dtype  # lets the tests see autocast at work
        t = self.teacher(x) if self.teacher is not None else None
        return self.head(h), h, t


def parse_steps(spec: str) -> tuple[set[int], int | None]:
    """'3,4' -> ({3, 4}, None); '5-' -> (set(), 5)."""
    spec = spec.strip()
    if spec.endswith("-"):
        return set(), int(spec[:-1])
    return {int(s) for s in spec.split(",") if s.strip()}, None


class ToyTask(Task):
    """Cross-entropy + EMA-teacher MSE + memory-bank term; accuracy on gathered predictions."""

    def __init__(self, opts: ToyOptions, hidden: int, out_dir: Path):
        self.opts, self.out_dir = opts, Path(out_dir)
        self.queue = torch.zeros(0, hidden)
        self.nan_set, self.nan_from = parse_steps(opts.nan_steps)
        self._pending: list[Tensor] = []
        self._seen: list[int] = []
        self._pending_step = -1
        # Weights after each applied update / before each step's forward (for the NaN-guard test).
        self.snapshots: dict[int, dict[str, Tensor]] = {}
        self.before: dict[int, dict[str, Tensor]] = {}

    def training_step(self, model: nn.Module, batch: dict[str, Tensor], ctx: TaskContext) -> Any:
        self.queue = self.queue.to(ctx.device)
        step = ctx.step + 1  # the update being computed
        if self._pending_step != step:  # a skipped (NaN) step leaves nothing to enqueue
            self._pending, self._seen, self._pending_step = [], [], step
            self.before[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        x = batch["x"]
        if self.opts.step_noise:
            x = x + self.opts.step_noise * torch.randn_like(x)
        logits, h, t = model(x)
        ce = F.cross_entropy(logits.float(), batch["y"])
        loss, logs = ce, {"ce": ce.detach()}
        if t is not None:
            mse = F.mse_loss(h.float(), t.float())
            loss = loss + 0.1 * mse
            logs["ema_mse"] = mse.detach()
        z = F.normalize(h.float(), dim=-1)
        if self.opts.queue and len(self.queue):
            bank = (z @ self.queue.T).logsumexp(-1).mean()
            loss = loss + 0.05 * bank
            ctx.log("bank", bank)
        self._pending.append(z.detach())
        self._seen.extend(batch["index"].tolist())
        if step in self.nan_set or (self.nan_from is not None and step >= self.nan_from):
            loss = loss * float("nan")
        return loss, logs

    def on_step_end(self, model: ToyNet, ctx: TaskContext) -> None:
        step = ctx.step
        if model.teacher is not None:
            ema_update_(
                model.teacher, model.student, linear_ramp(step, start=0.9, end=0.99, ramp_steps=20)
            )
        if self.opts.queue:
            keys = ctx.gather(torch.cat(self._pending))
            self.queue = torch.cat([keys, self.queue])[: self.opts.queue]
        if self.opts.record_seen:
            path = self.out_dir / f"seen_rank{ctx.rank}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps({"step": step, "indices": self._seen}) + "\n")
        self.snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.opts.sleep_per_step:
            time.sleep(self.opts.sleep_per_step)
        if self.opts.interrupt_at and step == self.opts.interrupt_at:
            os.kill(os.getpid(), signal.Signals[self.opts.interrupt_signal])

    def evaluate(self, model: nn.Module, loader: Any, ctx: TaskContext) -> dict[str, float]:
        logits, y = gather_outputs(loader, ctx, lambda b: (model(b["x"])[0].float(), b["y"]))
        return {
            "accuracy": float((logits.argmax(-1) == y).float().mean()),
            "loss": float(F.cross_entropy(logits, y)),
            "n": float(len(y)),
        }

    def state_dict(self) -> dict[str, Tensor]:
        return {"queue": self.queue}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.queue = state["queue"]


def build(cfg: TrainConfig, opts: ToyOptions) -> tuple[Trainer, ToyTask, ToyData]:
    """Seeded model, data and task, wrapped in a Trainer (nothing trained yet)."""
    cfg.validate()  # before seeding with a seed that may be invalid
    set_seed(cfg.seed)
    model = ToyNet(opts.hidden, ema=opts.ema)
    data = ToyData(opts.n_items, item_noise=opts.item_noise)
    train = ToyStream(data) if opts.stream else data
    eval_data = ToyData(opts.n_eval, offset=1) if opts.n_eval else None
    task = ToyTask(opts, opts.hidden, cfg.out_dir)
    trainer = Trainer(
        cfg, model, task, train, eval_data, identity={"hidden": opts.hidden}, run_config={}
    )
    if opts.expect_processes and trainer.num_processes != opts.expect_processes:
        raise SystemExit(
            f"expected {opts.expect_processes} processes, got {trainer.num_processes} "
            "(launch with --multi_gpu --num_processes N)"
        )
    return trainer, task, data


def run_toy(cfg: TrainConfig, opts: ToyOptions) -> dict[str, Any]:
    trainer, _, _ = build(cfg, opts)
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="train_toy", description=__doc__)
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, ToyOptions)
    ns = parser.parse_args(argv)
    try:
        opts = config_from_args(ToyOptions, ns)
        torch.set_num_threads(opts.threads)
        summary = run_toy(config_from_args(TrainConfig, ns), opts)
    except BioaudioError as e:
        sys.stderr.write(f"train_toy: error: {e}\n")
        return 2
    if summary["num_processes"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"status {summary['status']}; export: {summary['export']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
