"""Starting Accelerate: the one place that builds an `Accelerator`, so that a launch it cannot
honour (a broken `accelerate config`, FSDP or DeepSpeed, which the toolkit does not support yet)
is a one-line error instead of a traceback from every process."""

from __future__ import annotations

from typing import Any

from bioaudio.errors import ConfigError, first_line


def start_accelerator(**kwargs: Any) -> Any:
    """`accelerate.Accelerator(**kwargs)`; ConfigError naming the cause when it cannot start."""
    from accelerate import Accelerator

    try:
        acc = Accelerator(**kwargs)
    except (RuntimeError, ValueError, ImportError, NotImplementedError) as e:
        hint = ""
        if "device" in str(e).lower() and "found" in str(e).lower():
            hint = " (FSDP and DeepSpeed are not supported: use --multi_gpu, DDP, on CPU too)"
        raise ConfigError(
            f"Accelerate could not start with this launch configuration: {first_line(e)}{hint}"
        ) from None
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type)).upper()
    if kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"{kind} is not supported yet: run states and exports are written from the whole "
            "model on each process, which FSDP and DeepSpeed shard (and Accelerate cannot run "
            "them without a GPU, so they are untested); use DDP (`accelerate launch --multi_gpu`)"
        )
    return acc


def any_process(acc: Any) -> Any:
    """For `AudioDataset.failed_paths(combine=...)`: a function mapping this process's per-row
    flags to "set on any process" (a collective: every process must call it), or None when
    there is one process."""
    if acc.num_processes == 1:
        return None

    def combine(flags: Any) -> Any:
        return acc.reduce(flags.to(acc.device).long(), reduction="sum").cpu() > 0

    return combine
