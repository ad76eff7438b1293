"""Linear probing: train only a head on a frozen encoder, from encoder outputs computed once.

`EncoderOutputCache` runs the frozen encoder once over every window an experiment needs and keeps
its outputs (float16 tokens, with the CLS vector first when the encoder has one); every epoch,
seed and fold then reads them instead of encoding the audio again. `FrozenEncoderClassifier`
wraps the model for the Trainer: from cached outputs (`feats=`) only the head runs; from audio
the whole model runs; its export is the whole model (frontend, frozen encoder, trained head), so
`infer`, `detect` and the test evaluation use it like any finetuned model.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bioaudio.data.datasets import (
    AudioDataset,
    collate_batch,
    length_sorted_batches,
    unlabelled_clips,
)
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.models.layers import EncoderOutput


class FrozenEncoderClassifier(nn.Module):
    """An AudioModel with a frozen encoder whose head trains on cached encoder outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "head", None) is None:
            raise ConfigError("a linear probe needs a model with a classification head")
        self.model = model
        model.encoder.requires_grad_(False)
        model.encoder.eval()

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def multi_label(self) -> bool:
        return self.model.multi_label

    @property
    def frontend_cfg(self) -> Any:
        return self.model.frontend_cfg

    def train(self, mode: bool = True) -> FrozenEncoderClassifier:
        super().train(mode)
        self.model.encoder.eval()  # frozen: no dropout, no drop path
        return self

    def export_target(self) -> nn.Module:
        """What an export of this classifier writes: the whole AudioModel."""
        return self.model

    def forward(
        self,
        wav: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        feats: Tensor | None = None,
        frame_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits from cached encoder outputs `feats` (B, [1 +] N, D) with their padding mask,
        or from audio through the whole model."""
        if feats is None:
            return self.model(wav, padding_mask)
        mask = frame_mask
        if self.model.has_cls:
            cls, tokens = feats[:, 0], feats[:, 1:]
            mask = None if mask is None else mask[:, 1:]
        else:
            cls, tokens = None, feats
        if mask is not None and not bool(mask.any()):
            mask = None
        return self.model.classify(EncoderOutput(tokens.float(), cls, mask))


class EncoderOutputCache:
    """Encoder outputs of manifest windows, computed once per (path, start, end)."""

    def __init__(self, model: nn.Module, batch_size: int = 16, progress: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        self.store: dict[tuple[str, float, float], Tensor] = {}
        self.failed: dict[tuple[str, float, float], str] = {}  # unreadable window -> reason
        self.encoded = 0  # windows run through the encoder (tests: each exactly once)

    @staticmethod
    def key(row: Any) -> tuple[str, float, float]:
        return (str(row.path), round(float(row.start), 4), round(float(row.end), 4))

    @torch.no_grad()
    def fill(self, windows: pd.DataFrame, clip_seconds: float) -> None:
        """Encode the windows not cached yet (batched, padding-aware, in length order). A
        window whose audio cannot be read is recorded in `failed` (key -> reason), not encoded."""
        done = self.store.keys() | self.failed.keys()
        todo = windows[[self.key(r) not in done for r in windows.itertuples()]]
        todo = todo.drop_duplicates(subset=["path", "start", "end"]).reset_index(drop=True)
        if len(todo) == 0:
            return
        model = self.model
        model.eval()
        ds = unlabelled_clips(todo, int(model.frontend_cfg.sample_rate), clip_seconds)
        batches = length_sorted_batches(ds.df, self.batch_size)
        loader = DataLoader(_OrError(ds), batch_sampler=batches, collate_fn=_collate_readable)
        device = next(model.parameters()).device
        bar = tqdm(total=len(ds), desc="encode (once)", unit="clip", disable=not self.progress)
        for batch, errors in loader:
            for i, reason in errors:
                self.failed[self.key(ds.df.iloc[i])] = reason
            bar.update(len(errors))
            if batch is None:
                continue
            out = model.features(batch["wav"].to(device), batch["padding_mask"].to(device))
            tokens = out.tokens
            if out.cls is not None:
                tokens = torch.cat([out.cls[:, None], tokens], dim=1)
            for j, i in enumerate(batch["index"].tolist()):
                n = tokens.shape[1]
                if out.padding_mask is not None:
                    n = int((~out.padding_mask[j]).sum()) + (1 if out.cls is not None else 0)
                row = ds.df.iloc[i]
                self.store[self.key(row)] = tokens[j, :n].to(torch.float16).cpu()
            self.encoded += len(batch["index"])
            bar.update(len(batch["index"]))
        bar.close()


class _OrError(Dataset):
    """Items of `dataset`; an unreadable one becomes {"error": (index, reason)}."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.dataset[i]
        except AudioDecodeError as e:
            return {"error": (int(i), e.reason or str(e))}


def _collate_readable(items: list[dict[str, Any]]) -> tuple[Any, list[tuple[int, str]]]:
    errors = [it["error"] for it in items if "error" in it]
    good = [it for it in items if "error" not in it]
    return (collate_batch(good) if good else None), errors


class CachedWindows(Dataset):
    """Items {feats: cached encoder outputs (n, D), frame_mask, target, index} of windows."""

    def __init__(self, cache: EncoderOutputCache, windows: pd.DataFrame, labelled: AudioDataset):
        self.cache, self.windows = cache, windows.reset_index(drop=True)
        self.targets = labelled  # an AudioDataset over the same rows, for its targets only
        self.keys = [cache.key(r) for r in self.windows.itertuples()]
        missing = [k for k in self.keys if k not in cache.store]
        if missing:
            raise DataError(f"{len(missing)} window(s) are not in the encoder cache")

    @property
    def df(self) -> pd.DataFrame:
        return self.windows

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats = self.cache.store[self.keys[i]]
        return {
            "feats": feats.float(),
            "frame_mask": torch.zeros(feats.shape[0], dtype=torch.bool),
            "target": self.targets.reader.target(self.targets._labels[i]),
            "index": int(i),
        }
