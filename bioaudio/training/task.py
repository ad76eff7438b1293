"""The task API: what a training objective gives the loop, and the narrow view of the loop it gets.

A task owns the loss and every trainable part that is not the model: a decoder, a label
predictor, projection heads, an EMA teacher, a queue. `build(model)` runs before
`accelerator.prepare`, so the module it returns is moved to the device, wrapped for DDP / FSDP,
optimised (parameters with `requires_grad`), saved in every state and restored on resume together
with the model. Frozen parts (a teacher, a tokenizer) set `requires_grad_(False)` and stay out of
the optimiser; they are still saved when they are registered in the returned module (a teacher
must be, to resume exactly) and left out when they are not (a tokenizer rebuilt from its file).

Hooks are methods of `Task` (all no-ops but `training_step`). A subclass that defines an `on_*`
method the loop does not know is refused when the class is created: a misspelt hook would
otherwise never run.

    class MyTask(Task):
        def build(self, model):                     # optional: own trainable parts
            self.decoder = nn.Linear(...)
            return self.decoder
        def training_step(self, model, batch, ctx):  # loss of one micro-batch
            loss = ...
            ctx.log("my_term", loss.detach())        # stays a tensor until the log step
            return loss
        def on_step_end(self, model, ctx): ...       # after each applied update (EMA, queue)

`training_step` runs inside the prepared (DDP) module's forward, so gradient synchronisation
covers the model and the task's parts; `model` there is the plain model and the task's parts are
`ctx.parts` (use them, not a reference kept from `build`, so wrapped parts are the ones called).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HOOKS = (
    "build",
    "training_step",
    "on_step_end",
    "evaluate",
    "export",
    "state_dict",
    "load_state_dict",
)


class TaskContext:
    """The loop as a task sees it: step, processes, device, collectives, logging."""

    def __init__(self, trainer: Any):
        self._trainer = trainer
        self._logs: dict[str, Tensor] = {}
        self.parts: nn.Module | None = None

    @property
    def step(self) -> int:
        """Optimizer updates applied so far (the update being computed is number `step`)."""
        return int(self._trainer.step)

    @property
    def max_steps(self) -> int:
        return int(self._trainer.cfg.max_steps)

    @property
    def micro_step(self) -> int:
        """Index of the micro-batch within the current optimizer step (gradient accumulation)."""
        return int(self._trainer._micro_index)

    @property
    def rank(self) -> int:
        return int(self._trainer.rank)

    @property
    def world_size(self) -> int:
        return int(self._trainer.num_processes)

    @property
    def device(self) -> torch.device:
        return self._trainer.device

    @property
    def seed(self) -> int:
        return int(self._trainer.cfg.seed)

    @property
    def is_main_process(self) -> bool:
        return bool(self._trainer.is_main_process)

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate `tensor` (same shape on every process) over processes along dim 0."""
        if self.world_size == 1:
            return tensor
        return self._trainer.accelerator.gather(tensor.contiguous())

    def gather_for_metrics(self, tensors: Any) -> Any:
        """Gather tensors (or a tuple of them) over processes, dropping the items repeated to
        even out the last evaluation batch."""
        return self._trainer.accelerator.gather_for_metrics(tensors)

    def mean_over_processes(self, value: Tensor) -> Tensor:
        """The mean of `value` over processes (all-reduce; no gradient flows through it). Use it
        to normalise a loss by a count taken over the whole global micro-batch."""
        if self.world_size == 1:
            return value
        out = value.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The module without DDP / compile / precision wrappers."""
        return self._trainer.accelerator.unwrap_model(module)

    def log(self, name: str, value: Tensor | float) -> None:
        """Add a scalar to this step's logs (averaged over micro-batches, steps and processes
        at the next log step, where it is synchronised once with all the others)."""
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        else:
            value = torch.tensor(float(value), device=self.device)
        prev = self._logs.get(name)
        self._logs[name] = value if prev is None else prev + value

    def pop_logs(self) -> dict[str, Tensor]:
        logs, self._logs = self._logs, {}
        return logs


class Task:
    """Base class of training objectives (see the module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [n for n in vars(cls) if n.startswith("on_") and n not in HOOKS]
        if unknown:
            raise TypeError(
                f"{cls.__name__} defines unknown hook(s) {', '.join(unknown)}; "
                f"the training loop calls: {', '.join(HOOKS)}"
            )

    def build(self, model: nn.Module) -> nn.Module | None:
        """Create the task's own parts (before `prepare`); return them as one module or None."""
        return None

    def training_step(self, model: nn.Module, batch: Any, ctx: TaskContext) -> Tensor:
        """The loss (a scalar tensor) of one micro-batch; may also return (loss, logs dict)."""
        raise NotImplementedError

    def on_step_end(self, model: nn.Module, ctx: TaskContext) -> None:
        """After every applied optimizer update, on every process (EMA teachers, queues)."""

    def evaluate(self, model: nn.Module, loader: Any, ctx: TaskContext) -> dict[str, float] | None:
        """Metrics on the evaluation loader; None: the mean training loss on it."""
        return None

    def export(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> bool:
        """Write the final (or best) model into the new empty folder `out_dir`; return False to
        let the loop write its default export (model.safetensors + config.json)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Extra resumable state that is not a parameter or buffer of `build`'s module."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""


class TrainingModules(nn.Module):
    """The one module the loop prepares: the model and the task's parts.

    `forward(fn, *args)` returns `fn(model, *args)` with the task's parts visible to the task, so
    every computation, the task's included, runs inside the prepared module's forward."""

    def __init__(self, model: nn.Module, parts: nn.Module | None, ctx: TaskContext):
        super().__init__()
        self.model = model
        self.parts = parts
        self._ctx = [ctx]  # a list: not registered as a submodule

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._ctx[0].parts = self.parts
        return fn(self.model, *args, **kwargs)

    def state_for_saving(self) -> dict[str, Tensor]:
        """The state dict written into training states: without task parts, the model's own
        (so run directories of plain models keep their key names)."""
        return self.state_dict() if self.parts is not None else self.model.state_dict()

    def target_for_loading(self) -> nn.Module:
        return self if self.parts is not None else self.model
