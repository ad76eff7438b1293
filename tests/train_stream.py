"""A StreamingAudioDataset trained through the real Trainer, recording which manifest rows each
process reads at each step, and counting decodes. Used by tests/test_streaming.py, in process or
under `accelerate launch --multi_gpu --num_processes 2 tests/train_stream.py ...`.

    python tests/train_stream.py MANIFEST OUT --max_steps 4 --batch_size 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bioaudio.data import datasets
from bioaudio.data.datasets import StreamingAudioDataset, collate_batch
from bioaudio.training.config import TrainConfig
from bioaudio.training.loop import Trainer
from bioaudio.training.task import Task, TaskContext

DECODES = {"n": 0}


def count_decodes() -> None:
    """Count `_ClipReader.read` calls (each decodes one clip) in this process."""
    read = datasets._ClipReader.read

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        DECODES["n"] += 1
        return read(self, *args, **kwargs)

    datasets._ClipReader.read = counted  # type: ignore[method-assign]


class Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return (wav.mean(dim=1) * self.w).pow(2).mean() + self.w.pow(2).sum()


class RecordRows(Task):
    """A trivial loss; writes the manifest rows of every micro-batch to seen_rank{R}.jsonl."""

    def __init__(self, out: Path):
        self.out = out

    def training_step(self, model: nn.Module, batch: dict[str, Any], ctx: TaskContext) -> Any:
        with (self.out / f"seen_rank{ctx.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": ctx.step + 1, "rows": batch["index"].tolist()}) + "\n")
        return model(batch["wav"])


def train(manifest: Path, out: Path, max_steps: int, batch_size: int, workers: int) -> dict:
    ds = StreamingAudioDataset(manifest, clip_seconds=0.25, train=True, seed=3)
    cfg = TrainConfig(
        out_dir=out,
        max_steps=max_steps,
        batch_size=batch_size,
        save_every=2,
        log_every=1,
        num_workers=workers,
        progress=False,
        lr=1e-2,
    )
    trainer = Trainer(cfg, Mean(), RecordRows(out), ds, collate_fn=collate_batch)
    summary = trainer.fit()
    summary["decodes"] = DECODES["n"]
    summary["rank"] = trainer.rank
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--expect_processes", type=int, default=0)
    a = parser.parse_args(argv)
    count_decodes()
    a.out.mkdir(parents=True, exist_ok=True)
    summary = train(a.manifest, a.out, a.max_steps, a.batch_size, a.num_workers)
    if a.expect_processes and summary["num_processes"] != a.expect_processes:
        print(f"expected {a.expect_processes} processes, got {summary['num_processes']}")
        return 3
    (a.out / f"summary_rank{summary['rank']}.json").write_text(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
