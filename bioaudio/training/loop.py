"""The one training loop (HuggingFace Accelerate) for CNN baselines, finetuning and pretraining.

A task (`bioaudio.training.task.Task`) owns the loss and its own trainable parts; the loop owns
everything else: processes, precision, accumulation, clipping, the learning-rate schedule,
evaluation, atomic resumable states, the NaN guard, metrics, progress and the final export.

Data: `cfg.batch_size` is the GLOBAL batch of one optimizer step, split over processes and then
over `grad_accum` micro-batches. A map-style dataset is read in a permutation that is a function of
(seed, epoch); each item is produced under RNG seeded by (seed, epoch, index), so augmentation
does not depend on worker count or on resuming; `dataset.set_epoch(epoch)` is called when present.
An IterableDataset shards itself over processes (each process reads its own rows, as
`StreamingAudioDataset` does) and must derive its randomness from `set_epoch` or its own seeded
generators; each process takes `batch_size / processes` of its items per step. When it has
`set_position(n)`, a resumed run starts reading at item n of the epoch without decoding the items
before it; when it has `__len__` (items of this process per epoch), every process runs the same
number of steps per epoch (the smallest).

Processes: run the same script under `accelerate launch --multi_gpu --num_processes N`. Without
a GPU the Trainer builds `Accelerator(cpu=True)`, so this gives N real CPU (gloo) processes
(`--cpu --num_processes N` silently runs one); `summary.json` records `num_processes`.

Run directory: see `bioaudio.training.rundir` (config.json, metrics.csv, state/step_N/, export/,
best/, summary.json; tensorboard/ with --report_to tensorboard).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    find_batch_size,
    set_seed,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from tqdm.auto import tqdm

from bioaudio import runinfo, runlog
from bioaudio.config import to_dict
from bioaudio.distributed import start_accelerator
from bioaudio.errors import BioaudioError, ConfigError, DataError, first_line
from bioaudio.fileio import replace_dir, save_json_atomic, temp_dir_beside
from bioaudio.training.config import TrainConfig
from bioaudio.training.feed import FeedMixin
from bioaudio.training.optim import make_adamw, param_groups
from bioaudio.training.rundir import (
    MetricsCSV,
    lock_run_dir,
    model_identity,
    read_json_object,
    write_run_config,
)
from bioaudio.training.sampling import (
    rng_preserved,
)
from bioaudio.training.schedules import warmup_cosine
from bioaudio.training.states import StateMixin
from bioaudio.training.task import Task, TaskContext, TrainingModules


class DivergenceError(BioaudioError):
    """Training produced non-finite losses or gradients for more than `max_bad_steps` steps."""


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _flat_hparams(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


# ------------------------------------------------------------------------------ trainer


class Trainer(FeedMixin, StateMixin):
    """Step-based Accelerate loop: accumulation, precision, clipping, schedule, hooks, eval,
    atomic checkpoints with exact resume, NaN guard, metrics, progress, final export."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        task: Task,
        train_dataset: Dataset | IterableDataset,
        eval_dataset: Dataset | IterableDataset | None = None,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        optimizer: torch.optim.Optimizer | Iterable[dict[str, Any]] | None = None,
        run_config: Mapping[str, Any] | Any | None = None,
        identity: Mapping[str, Any] | None = None,
        sample_weights: np.ndarray | None = None,
    ):
        """`optimizer`: None (AdamW, no decay on biases/norms), param groups (a group may set
        `lr`, `lr_scale` relative to --lr, `weight_decay`), or a ready optimizer. `run_config`:
        the caller's resolved config, written to config.json. `identity`: extra keys that must
        match on resume (e.g. preset, number of classes). `sample_weights` (one per item of a
        map-style training set): every epoch draws its items with replacement in proportion to
        them (class-balanced sampling, per-sample weights), seeded by (seed, epoch)."""
        cfg.validate()
        self.cfg, self.task = cfg, task
        self.out_dir = Path(cfg.out_dir)
        self.collate_fn = collate_fn or default_collate
        self.run_config = (
            to_dict(run_config) if dataclasses.is_dataclass(run_config) else dict(run_config or {})
        )

        has_gpu = torch.cuda.is_available()
        use_cpu = cfg.cpu or not has_gpu
        self.precision = self._resolve_precision(cfg.precision, use_cpu)
        log_with = self._tracker(cfg.report_to)
        self.accelerator = start_accelerator(
            cpu=use_cpu,
            mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision],
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "tensorboard")
            ),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
            ],
        )
        acc = self.accelerator
        if acc.num_processes > 1:
            atexit.register(_destroy_process_group)
        self.device = acc.device
        self.num_processes, self.rank = acc.num_processes, acc.process_index
        per_step = self.num_processes * cfg.grad_accum
        if cfg.batch_size % per_step:
            raise ConfigError(
                f"--batch_size {cfg.batch_size} is not divisible by {self.num_processes} "
                f"process(es) x --grad_accum {cfg.grad_accum} (= {per_step})"
            )
        self.micro_batch = cfg.batch_size // per_step

        self.train_dataset = train_dataset
        self._iterable = isinstance(train_dataset, IterableDataset)
        self.dataset_len: int | None = None
        if not self._iterable:
            try:
                self.dataset_len = len(train_dataset)  # type: ignore[arg-type]
            except TypeError as e:
                raise DataError("the training dataset has no length and is not iterable") from e
            if self.dataset_len == 0:
                raise DataError("the training dataset is empty")
            if self.dataset_len < cfg.batch_size:
                raise ConfigError(
                    f"--batch_size {cfg.batch_size} is larger than the training set "
                    f"({self.dataset_len} items)"
                )
            self.steps_per_epoch = self.dataset_len // cfg.batch_size
        self.sample_weights = None
        if sample_weights is not None:
            w = np.asarray(sample_weights, dtype=np.float64)
            if self._iterable or w.shape != (self.dataset_len,):
                raise ConfigError("sample weights need one weight per item of a map-style dataset")
            if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
                raise ConfigError("sample weights must be finite, >= 0 and not all 0")
            self.sample_weights = w / w.sum()
        if cfg.best_metric and eval_dataset is None:
            raise ConfigError(f"--best_metric {cfg.best_metric} needs an evaluation set")
        if (cfg.early_stopping or cfg.stop_at is not None) and not cfg.best_metric:
            raise ConfigError("--early_stopping and --stop_at need --best_metric")

        # The task's own parts exist before anything is prepared, optimised or saved.
        if not isinstance(task, Task):
            raise TypeError(f"{type(task).__name__} is not a bioaudio.training.task.Task subclass")
        self.ctx = TaskContext(self)
        self._micro_index = 0
        parts = task.build(model)
        if parts is not None and not isinstance(parts, nn.Module):
            raise TypeError(f"{type(task).__name__}.build must return an nn.Module or None")
        bundle = TrainingModules(model, parts, self.ctx)

        # Identity and the resume state are checked now, before anything is trained or written.
        self.identity = model_identity(model if parts is None else bundle, task, identity)
        self.resume_dir = self._resolve_resume()
        # One run per out_dir at a time: a second command on the same folder would interleave
        # states and metrics rows.
        self._lock = lock_run_dir(self.out_dir) if acc.is_main_process else None

        bundle.to(self.device)
        opt, self._group_hparams = self._build_optimizer(bundle, optimizer)
        self.model, self.optimizer = acc.prepare(bundle, opt)
        self._trainable = [p for p in self.bundle.parameters() if p.requires_grad]
        if not self._trainable:
            raise ConfigError("the model has no trainable parameters")
        # States hold unwrapped weights, so a run saved with N processes resumes with M.
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

        self.eval_loader = None
        if eval_dataset is not None:
            loader = DataLoader(
                eval_dataset,
                batch_size=cfg.eval_batch_size or self.micro_batch,
                shuffle=False,
                collate_fn=self.collate_fn,
                num_workers=cfg.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            self.eval_loader = acc.prepare(loader)

        # Loop state (everything below goes into trainer_state.json).
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.consecutive_bad = 0
        self.total_bad = 0
        self.best: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.evals_since_best = 0
        self.stopped_early: int | None = None
        self.elapsed_s = 0.0
        self._window = self._empty_window()
        # Seconds waiting for the next batch / in whole steps (wait included), per log window and
        # per session: the data-wait fraction of metrics.csv and summary.json.
        self._wait_s = self._busy_s = self._session_wait_s = self._session_busy_s = 0.0
        self._last_saved_step = -1
        self._stop_signal: int | None = None
        self._metrics = MetricsCSV(self.out_dir / "metrics.csv")

    # ---- public helpers

    @property
    def bundle(self) -> TrainingModules:
        """The prepared module without DDP / compile / precision wrappers (model + task parts)."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def unwrapped(self) -> nn.Module:
        """The model without DDP / compile / precision wrappers (no task parts)."""
        return self.bundle.model

    @property
    def task_parts(self) -> nn.Module | None:
        """The module returned by `task.build` (unwrapped), or None."""
        return self.bundle.parts

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step` (0-based) for a group at --lr: a pure function."""
        cfg = self.cfg
        return cfg.lr * warmup_cosine(
            step,
            total_steps=cfg.max_steps,
            warmup_steps=cfg.warmup_steps,
            min_ratio=cfg.min_lr_ratio,
        )

    # ---- setup

    @staticmethod
    def _resolve_precision(precision: str, use_cpu: bool) -> str:
        if precision == "auto":
            if not use_cpu and torch.cuda.is_bf16_supported():
                return "bf16"
            return "fp32"
        if precision == "fp16" and use_cpu:
            raise ConfigError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        if precision == "bf16" and not use_cpu and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16 is not supported by this GPU; use fp16 or fp32")
        return precision

    @staticmethod
    def _tracker(report_to: str) -> list[str] | None:
        if report_to == "none":
            return None
        module = "tensorboard" if report_to == "tensorboard" else "wandb"
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--report_to {report_to}: the {module} package is not installed "
                f"(pip install {module})"
            )
        return [report_to]

    def _build_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | Iterable[dict] | None
    ) -> tuple[torch.optim.Optimizer, list[dict[str, float]]]:
        cfg = self.cfg
        if isinstance(optimizer, torch.optim.Optimizer):
            opt = optimizer
        else:
            groups = (
                param_groups(model, cfg.weight_decay)
                if optimizer is None
                else [dict(g) for g in optimizer]
            )
            for g in groups:
                g.setdefault("lr", cfg.lr * g.pop("lr_scale", 1.0))
                g.setdefault("weight_decay", cfg.weight_decay)
            opt = make_adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        # The schedule multiplies each group's base lr; kept outside the saved optimizer state so
        # a resumed run follows the current flags.
        hparams = [
            {"base_lr": float(g["lr"]), "weight_decay": float(g.get("weight_decay", 0.0))}
            for g in opt.param_groups
        ]
        return opt, hparams

    # ---- state

    @staticmethod
    def _empty_window() -> dict[str, Any]:
        return {"steps": 0, "good": 0, "loss": 0.0, "grad_norm": 0.0, "logs": {}}

    # ---- data
    # ---- one step

    def _forward_backward(self, micro_batches: list[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        acc, A = self.accelerator, len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        logs_sum: dict[str, Tensor] = {}
        self.ctx.pop_logs()
        for i, batch in enumerate(micro_batches):
            self._micro_index = i
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if i == A - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    out = self.model(self.task.training_step, batch, self.ctx)
                loss, logs = out if isinstance(out, tuple) else (out, {})
                if not isinstance(loss, Tensor) or loss.ndim != 0:
                    raise TypeError("training_step must return a scalar loss tensor")
                acc.backward(loss / A)
            loss_sum += loss.detach().float()
            for k, v in logs.items():
                self.ctx.log(k, v)
            for k, v in self.ctx.pop_logs().items():
                logs_sum[k] = logs_sum[k] + v if k in logs_sum else v
        return loss_sum / A, {k: v / A for k, v in logs_sum.items()}

    def _set_lr(self, step: int) -> float:
        cfg = self.cfg
        factor = warmup_cosine(
            step,
            total_steps=cfg.max_steps,
            warmup_steps=cfg.warmup_steps,
            min_ratio=cfg.min_lr_ratio,
        )
        for g, h in zip(self.optimizer.param_groups, self._group_hparams):
            g["lr"] = h["base_lr"] * factor
        return cfg.lr * factor

    def _train_step(self, micro_batches: list[Any]) -> tuple[bool, bool, float, float, dict]:
        """Forward/backward/update. Returns (update applied, stop requested, loss, grad norm, logs)."""
        acc, cfg = self.accelerator, self.cfg
        loss_local, logs = self._forward_backward(micro_batches)
        self._lr = self._set_lr(self.step)
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
        norm = acc.clip_grad_norm_(self._trainable, max_norm)
        norm_t = (
            norm.detach().float().reshape(())
            if isinstance(norm, Tensor)
            else torch.tensor(float("nan") if norm is None else float(norm), device=self.device)
        )
        stop = 1.0 if self._stop_signal is not None else 0.0
        # One collective per step: every process takes the same skip / stop decision.
        packed = torch.stack([loss_local, torch.tensor(stop, device=self.device), norm_t])
        total = acc.reduce(packed, reduction="sum").tolist()
        P = self.num_processes
        loss, stop_any, grad_norm = total[0] / P, total[1] > 0, total[2] / P
        grads_ok = norm is None or math.isfinite(grad_norm)
        ok = math.isfinite(loss) and grads_ok
        scaler = acc.scaler
        if ok or (scaler is not None and math.isfinite(loss)):
            # With fp16 an overflow is the scaler's business: it skips and lowers the scale.
            self.optimizer.step()
        elif scaler is not None:
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return ok, stop_any, loss, grad_norm, logs

    # ---- eval / export / logging

    def _evaluate(self) -> dict[str, float]:
        acc = self.accelerator
        self.model.eval()
        try:
            with rng_preserved(self.device), torch.no_grad(), acc.autocast():
                self.ctx.parts = self.task_parts
                metrics = self.task.evaluate(self.unwrapped, self.eval_loader, self.ctx)
                if metrics is None:
                    metrics = self._eval_loss()
                self.ctx.pop_logs()  # logs of evaluation forwards are not training logs
        finally:
            self.model.train()
        return {(k if k.startswith("eval/") else f"eval/{k}"): float(v) for k, v in metrics.items()}

    def _eval_loss(self) -> dict[str, float]:
        """Default evaluation: the training loss, sample-weighted over the evaluation set."""
        values = []
        for batch in self.eval_loader or ():
            out = self.model(self.task.training_step, batch, self.ctx)
            loss = out[0] if isinstance(out, tuple) else out
            n = find_batch_size(batch) or 1
            values.append(self.accelerator.gather_for_metrics(loss.detach().float().expand(n)))
        return {"loss": float(torch.cat(values).mean())} if values else {}

    def _update_best(self, metrics: dict[str, float]) -> bool:
        """Track the best evaluation (export best/); True when training should stop early
        (--early_stopping evaluations without improvement, or --stop_at reached)."""
        cfg = self.cfg
        name = cfg.best_metric
        if not name:
            return False
        key = name if name.startswith("eval/") else f"eval/{name}"
        if key not in metrics:
            raise ConfigError(
                f"--best_metric {name}: not among the evaluation metrics "
                f"({', '.join(sorted(metrics)) or 'none'})"
            )
        value = metrics[key]
        better = self.best is None or (
            value > self.best["value"] if cfg.best_mode == "max" else value < self.best["value"]
        )
        if better and math.isfinite(value):
            self.best = {"metric": key, "value": value, "step": self.step}
            self.evals_since_best = 0
            self._export("best")
        else:
            self.evals_since_best += 1
        if cfg.stop_at is not None and math.isfinite(value):
            reached = value >= cfg.stop_at if cfg.best_mode == "max" else value <= cfg.stop_at
            if reached:
                return True
        return bool(cfg.early_stopping and self.evals_since_best >= cfg.early_stopping)

    def _export(self, name: str) -> Path:
        dest = self.out_dir / name
        if self.is_main_process:
            tmp = temp_dir_beside(dest)  # (removes those that killed runs left)
            self.ctx.parts = self.task_parts
            if not self.task.export(self.unwrapped, tmp, self.ctx):
                self._default_export(self.unwrapped, tmp)
            self._stamp_export(tmp)
            replace_dir(tmp, dest)
        self.accelerator.wait_for_everyone()
        return dest

    def _stamp_export(self, folder: Path) -> None:
        """Every export of a run carries the run's provenance, whichever task wrote it."""
        path = folder / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(cfg, dict):
            return
        prov = cfg.get("provenance") if isinstance(cfg.get("provenance"), dict) else {}
        prov.setdefault("environment", runinfo.environment())
        prov["training"] = {**self.training_provenance(), "step": self.step}
        cfg["provenance"] = prov
        path.write_text(json.dumps(cfg, indent=2, default=str) + "\n")

    def _default_export(self, model: nn.Module, out: Path) -> None:
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        save_json_atomic(
            out / "config.json",
            {"identity": self.identity, "step": self.step, "run_config": self.run_config},
        )

    def _flush_window(self, epoch_pos: float) -> dict[str, Any]:
        w, now = self._window, time.perf_counter()
        good = max(w["good"], 1)
        dt = max(now - self._window_t0, 1e-9)
        logs: dict[str, float] = {}
        if w["logs"]:
            # One synchronisation for every logged value of the window.
            keys = sorted(w["logs"])
            packed = torch.stack(
                [torch.as_tensor(w["logs"][k], device=self.device).float() for k in keys]
            )
            if self.num_processes > 1:
                packed = self.accelerator.reduce(packed, reduction="sum") / self.num_processes
            logs = dict(zip(keys, packed.tolist()))
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": round(epoch_pos, 6),
            "loss": w["loss"] / good if w["good"] else float("nan"),
            "lr": self._lr,
            "grad_norm": w["grad_norm"] / good if w["good"] else float("nan"),
            "bad_steps": self.total_bad,
            "samples_per_s": round(self._session_steps_window * self.cfg.batch_size / dt, 2),
            "elapsed_s": round(self.elapsed_s + (now - self._t0), 2),
        }
        row.update(self._resources(self._wait_s, self._busy_s))
        row.update({k: logs[k] / good for k in sorted(logs)})
        self._window = self._empty_window()
        self._session_wait_s += self._wait_s
        self._session_busy_s += self._busy_s
        self._wait_s = self._busy_s = 0.0
        self._window_t0, self._session_steps_window = now, 0
        return row

    def _log(self, row: dict[str, Any]) -> None:
        if self.is_main_process:
            self._metrics.append(row)
        if self.cfg.report_to != "none":
            self.accelerator.log(
                {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                step=self.step,
            )

    # ---- the loop

    def fit(self) -> dict[str, Any]:
        """Train to `max_steps` (or until interrupted), then final evaluation, state, export and
        summary.json, which always happen. Returns the summary."""
        try:
            # Everything printed during the run is appended to its log.txt (main process).
            with runlog.session(main=self.is_main_process):
                runlog.attach(self.out_dir / "log.txt", replay=False)
                return self._fit()
        finally:
            self.release()

    def _end_trackers(self) -> None:
        # Not `accelerator.end_training()`: it also destroys the process group, which a command
        # running several seeds / folds (and its test evaluation) still needs. The group is
        # destroyed once, at interpreter exit.
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def release(self) -> None:
        """Release the run-directory lock (done by `fit`; call it when not fitting)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def __del__(self) -> None:
        self.release()

    def _fit(self) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.cfg
        if self.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in (self.out_dir / "state").glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        resumed_from = self.resume_dir
        if resumed_from is not None:
            self._load_state(resumed_from)
            if self.step > cfg.max_steps:
                raise ConfigError(
                    f"the run to resume is at step {self.step}, past --max_steps "
                    f"{cfg.max_steps} ({resumed_from}); give at least {self.step} steps, or "
                    "another --out for a shorter run"
                )
            if self.is_main_process:
                self._set_aside_newer_states(self.step)
                self._note_changed_options()
        else:
            set_seed(cfg.seed, device_specific=True)
        if self.is_main_process:
            write_run_config(
                self.out_dir,
                {
                    **self.run_config,
                    "train": to_dict(cfg),
                    "identity": self.identity,
                    "environment": self._environment(),
                    "provenance": {
                        "environment": runinfo.environment(),
                        "training": self.training_provenance(),
                    },
                },
            )
            self._metrics.start(keep_up_to=self.step if resumed_from is not None else None)
        self._init_trackers(resumed=resumed_from is not None)

        self._t0 = self._session_t0 = time.perf_counter()
        self._session_loop_s = 0.0
        self._session_start_step = self.step
        status, error, ended_bad = "completed", None, False
        previous = self._install_signal_handlers()
        try:
            status = self._loop()
            # A run that ends on non-finite steps diverged, however few (a short run, or one
            # blown up by its last updates): its last losses say the model is not trained.
            ended_bad = status == "completed" and self.consecutive_bad > 0
            if ended_bad:
                status = "diverged"
            # A run whose weights went NaN / inf (steps skipped too rarely to trip the guard)
            # must not export them as a finished model.
            self._finite_weights = self._weights_finite()
            if not self._finite_weights:
                status = "diverged"
            final_eval = self._finish(status)
        except BaseException as e:
            if self.is_main_process:
                save_json_atomic(
                    self.out_dir / "summary.json",
                    self._summary("failed", None, resumed_from, error=first_line(e)),
                )
            self._end_trackers()
            raise
        finally:
            self._restore_signal_handlers(previous)
        if status == "diverged":
            state = self.out_dir / "state" / f"step_{self.step}"
            error = (
                f"training diverged: {self.consecutive_bad} non-finite steps in a row up to step "
                f"{self.step} (--max_bad_steps {cfg.max_bad_steps}); state saved in {state}"
                if self._finite_weights and not ended_bad
                else f"training diverged: it ended on {self.consecutive_bad} non-finite step(s) "
                f"in a row (up to step {self.step}); the export holds the last good step's "
                f"weights, state saved in {state}"
                if self._finite_weights
                else f"training diverged: non-finite weights (NaN / inf) at step {self.step}, "
                f"not exported; state saved in {state}"
            ) + "; try a lower --lr, --clip_grad or --precision fp32"
        summary = self._summary(status, final_eval, resumed_from, error=error)
        if self.is_main_process:
            save_json_atomic(self.out_dir / "summary.json", summary)
        self._end_trackers()
        if status == "diverged":
            raise DivergenceError(error)
        return summary

    def _loop(self) -> str:
        cfg = self.cfg
        self._lr = self.lr_at(self.step)
        self._window_t0, self._session_steps_window = time.perf_counter(), 0
        if self.step >= cfg.max_steps or self.stopped_early is not None:
            return "completed"
        self.model.train()
        batches = self._step_batches()
        bar = runlog.Progress.steps(
            cfg.max_steps,
            batch_size=cfg.batch_size,
            initial=self.step,
            enabled=cfg.progress and self.is_main_process,
            status_every=cfg.status_every,
            elapsed_offset=self.elapsed_s,
        )
        try:
            while self.step < cfg.max_steps:
                t_wait = time.perf_counter()
                epoch, pos, micro = next(batches)
                t_step = time.perf_counter()
                ok, stop, loss, grad_norm, logs = self._train_step(micro)
                t_done = time.perf_counter()
                self._wait_s += t_step - t_wait
                self._busy_s += t_done - t_wait
                self.step += 1
                self.epoch, self.batch_in_epoch = epoch, pos
                self._session_steps_window += 1
                w = self._window
                w["steps"] += 1
                if ok:
                    self.consecutive_bad = 0
                    w["good"] += 1
                    w["loss"] += loss
                    w["grad_norm"] += grad_norm
                    for k, v in logs.items():
                        w["logs"][k] = w["logs"][k] + v if k in w["logs"] else v
                    self.ctx.parts = self.task_parts
                    self.task.on_step_end(self.unwrapped, self.ctx)
                else:
                    self.consecutive_bad += 1
                    self.total_bad += 1
                    if self.is_main_process:
                        tqdm.write(
                            f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; "
                            f"update skipped ({self.consecutive_bad} in a row)"
                        )
                if self.num_processes == 1 and self._stop_signal is not None:
                    stop = True  # a signal that arrived during this step's hook
                epoch_pos = epoch + (pos / self.steps_per_epoch if not self._iterable else 0.0)
                diverged = self.consecutive_bad > cfg.max_bad_steps
                last = self.step >= cfg.max_steps
                row: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or last or diverged:
                    row = self._flush_window(epoch_pos)
                    bar.set(loss=row["loss"], lr=f"{row['lr']:.3g}")
                bar.update(1, epoch=f"{epoch_pos:.2f}")
                if (
                    self.eval_loader is not None
                    and not diverged
                    and not stop
                    and (last or (cfg.eval_every and self.step % cfg.eval_every == 0))
                ):
                    metrics = self._evaluate()
                    self.last_eval = {"step": self.step, "metrics": metrics}
                    if self._update_best(metrics):
                        self.stopped_early = self.step
                    if not row:
                        row = {"step": self.step, "epoch": round(epoch, 6)}
                    row.update(metrics)
                if row:
                    self._log(row)
                if diverged:
                    return "diverged"
                if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                    self._save_state()
                if stop:
                    return "interrupted"
                if self.stopped_early is not None:
                    if self.is_main_process:
                        tqdm.write(
                            f"step {self.step}: stopping early ({self.cfg.best_metric} "
                            f"{'reached --stop_at' if self.evals_since_best == 0 else 'did not improve for ' + str(self.evals_since_best) + ' evaluations'})"
                        )
                    return "completed"
            return "completed"
        finally:
            batches.close()
            bar.close()
            self._session_wait_s += self._wait_s
            self._session_busy_s += self._busy_s
            self._wait_s = self._busy_s = 0.0
            dt = time.perf_counter() - self._t0
            self.elapsed_s += dt
            self._session_loop_s += dt
            self._t0 = time.perf_counter()

    def _finish(self, status: str) -> dict[str, float] | None:
        """State, final evaluation and export; runs for completed, interrupted and diverged runs."""
        if self._last_saved_step != self.step:
            self._save_state()
        final_eval = None
        if self.eval_loader is not None:
            if self.last_eval is not None and self.last_eval.get("step") == self.step:
                final_eval = self.last_eval["metrics"]
            else:
                # Out of schedule (interrupted): reported in summary.json, not in metrics.csv,
                # so a resumed run's metrics.csv equals an uninterrupted one.
                final_eval = self._evaluate()
        # A finished run started again (nothing trained in this session) keeps its export.
        unchanged = self.step == self._session_start_step and self._export_is_current()
        if getattr(self, "_finite_weights", True) and not unchanged:
            self._export("export")
        return final_eval

    # Training options whose change on resume is worth a line (the rest is logistics).
    _NOTED_OPTIONS = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "batch_size",
                      "grad_accum", "weight_decay", "clip_grad", "precision", "seed")  # fmt: skip

    def _note_changed_options(self) -> None:
        """Say which training options differ from the run's previous session (config.json is
        rewritten with the new ones: the note is the record that they changed)."""
        old = (read_json_object(self.out_dir / "config.json") or {}).get("train")
        if not isinstance(old, dict):
            return
        new = to_dict(self.cfg)
        changed = [
            f"--{k} {old[k]} -> {new[k]}"
            for k in self._NOTED_OPTIONS
            if k in old and k in new and old[k] != new[k]
        ]
        if changed:
            tqdm.write(
                f"note: resuming at step {self.step} with changed options: {', '.join(changed)}"
            )

    def _export_is_current(self) -> bool:
        """True when export/ was written at the current step (its config records the step)."""
        try:
            cfg = json.loads((self.out_dir / "export" / "config.json").read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(cfg, dict):
            return False
        training = (cfg.get("provenance") or {}).get("training") or {}
        return training.get("step", cfg.get("step")) == self.step

    def _weights_finite(self) -> bool:
        """True when every floating-point weight and buffer (model and task parts) is finite."""
        return all(
            bool(torch.isfinite(t).all())
            for t in self.bundle.state_dict().values()
            if t.is_floating_point()
        )

    def _summary(
        self,
        status: str,
        final_eval: dict[str, float] | None,
        resumed_from: Path | None,
        error: str | None = None,
    ) -> dict[str, Any]:
        now = time.perf_counter()
        session = now - getattr(self, "_session_t0", now)
        session_steps = self.step - getattr(self, "_session_start_step", self.step)
        loop_s = getattr(self, "_session_loop_s", 0.0)
        last_row = next((r for r in reversed(self._metrics.rows) if "loss" in r), None)
        return {
            "status": status,
            "error": error,
            "steps": self.step,
            "max_steps": self.cfg.max_steps,
            "epoch": self.epoch,
            "samples_seen": self.step * self.cfg.batch_size,
            "train_time_s": round(self.elapsed_s, 3),
            "samples_per_s": (
                round(session_steps * self.cfg.batch_size / max(loop_s, 1e-9), 2)
                if session_steps
                else None
            ),
            "final_loss": float(last_row["loss"]) if last_row else None,
            "eval": final_eval,
            "best": self.best,
            "bad_steps": self.total_bad,
            "stopped_early": self.stopped_early,
            "num_processes": self.num_processes,
            "precision": self.precision,
            "device": str(self.device),
            "resumed_from": str(resumed_from) if resumed_from else None,
            "export": str(self.out_dir / "export"),
            "best_export": str(self.out_dir / "best") if self.best else None,
            "state": str(self.out_dir / "state" / f"step_{self._last_saved_step}"),
            "session_time_s": round(session, 3),
            **self._resources(self._session_wait_s, self._session_busy_s),
        }

    def _resources(self, wait_s: float, busy_s: float) -> dict[str, Any]:
        """Data-wait fraction (time waiting for the next batch / step time, waiting included),
        peak RSS of this process and, on CUDA, peak memory allocated by torch (process 0's)."""
        out: dict[str, Any] = {"data_wait": round(wait_s / busy_s, 4) if busy_s > 0 else None}
        rss = runlog.peak_rss_mb()
        if rss is not None:
            out["peak_rss_mb"] = rss
        cuda = runlog.cuda_peak_mb(self.device)
        if cuda is not None:
            out["cuda_peak_mb"] = cuda
        return out

    def training_provenance(self) -> dict[str, Any]:
        """`provenance.training` of config.json and of every export: how this run trained.
        The caller's `run_config["provenance"]` (seeds, data fingerprint) is merged in."""
        extra = self.run_config.get("provenance")
        extra = dict(extra) if isinstance(extra, Mapping) else {}
        seeds = {"seed": self.cfg.seed, **dict(extra.pop("seeds", None) or {})}
        return {
            "run_dir": str(self.out_dir.resolve()),
            "device": str(self.device),
            "num_processes": self.num_processes,
            "precision": self.precision,
            "seeds": seeds,
            **extra,
        }

    def _environment(self) -> dict[str, Any]:
        import accelerate

        return {
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "num_processes": self.num_processes,
            "device": str(self.device),
            "precision": self.precision,
            "micro_batch": self.micro_batch,
        }

    def _init_trackers(self, resumed: bool) -> None:
        cfg = self.cfg
        if cfg.report_to == "none":
            return
        name = cfg.run_name or self.out_dir.resolve().name
        init_kwargs: dict[str, dict[str, Any]] = {}
        if cfg.report_to == "tensorboard" and resumed:
            # Drop events after the resumed step so curves continue without a fold.
            init_kwargs["tensorboard"] = {"purge_step": self.step + 1}
        if cfg.report_to == "wandb":
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline"
            )
            init_kwargs["wandb"] = {"dir": str(self.out_dir), "mode": mode, "name": name}
        self.accelerator.init_trackers(
            name, config=_flat_hparams({"train": to_dict(cfg)}), init_kwargs=init_kwargs
        )

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main_process:
                tqdm.write(
                    f"{signal.Signals(signum).name}: finishing this step, then saving state, "
                    "evaluating and exporting (send again to abort)"
                )

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)
