"""How the Trainer feeds batches (a mixin of `bioaudio.training.loop.Trainer`).

Map-style datasets: each epoch's global order is a function of (seed, epoch) (a permutation, or
weighted draws with replacement), each process takes its slice of every global batch
(`RankBatchSampler`) and items are produced under per-item seeds (`SeededItems`), so any split
over processes and accumulation steps sees the same samples per update and a resume continues
the same order. Streaming datasets shard themselves over processes; a resume restores the read
position (`set_position`) without decoding what came before; with a length, every process runs
the same number of steps per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bioaudio.errors import DataError
from bioaudio.training.sampling import RankBatchSampler, SeededItems, seed_of, set_epoch


def _as_is(x: Any) -> Any:
    return x


def _min_all(t: Tensor) -> Tensor:
    """Element-wise minimum over processes."""
    t = t.clone()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t


class FeedMixin:
    """Epochs of micro-batches for the Trainer (see the module docstring)."""

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[list[Any]]:
        cfg, A, m = self.cfg, self.cfg.grad_accum, self.micro_batch
        gen = torch.Generator().manual_seed(seed_of(cfg.seed, epoch, self.rank))
        if not self._iterable:
            dataset = SeededItems(self.train_dataset, cfg.seed)  # type: ignore[arg-type]
            dataset.set_epoch(epoch)
            n = self.dataset_len or 0
            rng = np.random.default_rng([cfg.seed, epoch])
            if self.sample_weights is not None:
                order = rng.choice(n, size=n, replace=True, p=self.sample_weights)
            elif cfg.shuffle:
                order = rng.permutation(n)
            else:
                order = np.arange(n)
            sampler = RankBatchSampler(
                order, batch=cfg.batch_size, micro=m, accum=A, rank=self.rank, start=start
            )
            loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=self.collate_fn,
                num_workers=cfg.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=gen,
            )
            it = iter(loader)
            for _ in range(start, self.steps_per_epoch):
                yield [next(it) for _ in range(A)]
            return
        # Streaming: the dataset shards itself over processes; this process takes A * m of its
        # own items per step. A resume starts reading at the saved position without decoding the
        # items before it (set_position), else they are read and dropped.
        ds, per_step = self.train_dataset, A * m
        set_epoch(ds, epoch)
        skip = start * per_step
        set_position = getattr(ds, "set_position", None)
        if callable(set_position):
            set_position(skip)
            skip = 0
        elif skip and self.is_main_process:
            tqdm.write(f"note: re-reading {skip} items to reach the resumed stream position")
        steps = self._stream_steps(ds, start)
        loader = DataLoader(
            ds,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=cfg.num_workers,
            generator=gen,
        )
        items = iter(loader)
        for _ in islice(items, skip):
            pass
        s = start
        while steps is None or s < steps:
            chunk = list(islice(items, per_step))
            if len(chunk) < per_step:
                return
            s += 1
            yield [self.collate_fn(chunk[a * m : (a + 1) * m]) for a in range(A)]
        if callable(set_position):
            set_position(0)

    def _stream_steps(self, dataset: Any, start: int) -> int | None:
        """Steps per epoch of a streaming dataset with a length: the smallest over processes,
        so no process waits in a collective for one that has a batch more."""
        try:
            n = len(dataset)
        except TypeError:
            return None
        steps = torch.tensor(n // (self.cfg.grad_accum * self.micro_batch), device=self.device)
        if self.num_processes > 1:
            steps = _min_all(steps)
        return int(steps)

    def _step_batches(self) -> Iterator[tuple[int, int, list[Any]]]:
        """(epoch, batches done in that epoch, this step's micro-batches on device), forever."""
        epoch, pos = self.epoch, self.batch_in_epoch
        non_blocking = self.device.type == "cuda"
        while True:
            produced = 0
            for micro in self._epoch_batches(epoch, pos):
                pos += 1
                produced += 1
                yield epoch, pos, [send_to_device(b, self.device, non_blocking) for b in micro]
            if produced == 0 and pos == 0:
                raise DataError(
                    f"the training stream yielded fewer than --batch_size {self.cfg.batch_size} "
                    f"items in epoch {epoch}"
                )
            epoch, pos = epoch + 1, 0
