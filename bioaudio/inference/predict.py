"""Batch prediction over clips and windows: probabilities of every item of a dataset (one or
several processes), clip-level scores from windows, and loading classifiers from run directories.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bioaudio.data.datasets import IGNORE_INDEX, AudioDataset, collate_batch, segment_windows
from bioaudio.errors import AudioDecodeError, CheckpointError, ConfigError, DataError
from bioaudio.inference.metrics import aggregate_windows, first_per_group, probabilities
from bioaudio.models.checkpoint import is_export_dir


def run_export(run_dir: Path) -> Path | None:
    """The model of a run directory: its best/ export, else its export/; None without either."""
    for name in ("best", "export"):
        if is_export_dir(run_dir / name):
            return run_dir / name
    return None


def resolve_export_dir(path: str | Path) -> Path:
    """An export folder from an export folder or a run directory (its best/, else export/)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir() and not is_export_dir(p):
        found = run_export(p)
        if found is None:
            raise CheckpointError(
                f"{p}: neither an export folder (model.safetensors + config.json) nor a run"
                " directory with best/ or export/"
            )
        return found
    return p


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a classifier from an export folder or a run directory, whatever its model type:
    baselines here, every other type through `bioaudio.load_model`. Returns it in eval mode."""
    p = resolve_export_dir(path)
    from bioaudio import load_model

    return load_model(p, device=device)


def forward_batch(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits of a collated batch: cached features (`feats`) or waveforms (`wav`)."""
    if "feats" in batch:
        return model(feats=batch["feats"], frame_mask=batch.get("frame_mask"))
    return model(batch["wav"], batch.get("padding_mask"))


def gather_outputs(
    loader: Iterable[Any],
    gatherer: Any,
    fn: Callable[[Any], Tensor | Sequence[Tensor]],
) -> tuple[Tensor, ...]:
    """Apply `fn(batch)` (batch-first tensors) over a prepared loader; gather across processes
    with `gatherer.gather_for_metrics` (an Accelerator or a task context: it drops the samples
    repeated to even out the last batch) and concatenate on CPU."""
    parts: list[list[Tensor]] | None = None
    for batch in loader:
        out = fn(batch)
        outs = (out,) if isinstance(out, Tensor) else tuple(out)
        outs = gatherer.gather_for_metrics(tuple(o.detach() for o in outs))
        if parts is None:
            parts = [[] for _ in outs]
        for acc, o in zip(parts, outs):
            acc.append(o.cpu())
    return tuple(torch.cat(p) for p in parts) if parts else ()


# ----------------------------------------------------------------------------------------------
# Prediction


@dataclasses.dataclass
class Predictions:
    """Per item: probabilities (N, C), targets (None without labels) and dataset indices, in
    dataset order; `errors` maps the index of each unreadable item to the reason (skip_errors).
    Unpacks as `scores, targets, indices = predict(...)`."""

    scores: np.ndarray
    targets: np.ndarray | None
    indices: np.ndarray
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.scores, self.targets, self.indices))


class _Tolerant(Dataset):
    """Items of `dataset`, with an unreadable one replaced by a placeholder carrying `error`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            item = dict(self.dataset[i])
            item["error"] = ""
            return item
        except AudioDecodeError as e:
            item = {
                "wav": torch.zeros(1),
                "padding_mask": torch.ones(1, dtype=torch.bool),
                "index": int(i),
                "path": e.path,
                "start": 0.0,
                "error": e.reason or str(e),
            }
            names = getattr(self.dataset, "class_names", None)
            if names:
                multi = getattr(self.dataset, "multi_label", False)
                item["target"] = torch.zeros(len(names)) if multi else torch.tensor(IGNORE_INDEX)
            return item


def _select(batch: dict[str, Any], keep: list[bool]) -> dict[str, Any]:
    idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == len(keep):
            out[k] = v[idx]
        elif isinstance(v, list) and len(v) == len(keep):
            out[k] = [x for x, k2 in zip(v, keep) if k2]
        else:
            out[k] = v
    return out


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator: Any = None,
    device: str | torch.device | None = None,
    skip_errors: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> Predictions:
    """Class probabilities of every item of a dataset (or a ready DataLoader of collated batches).

    With `accelerator` the loader is split over its processes and the outputs gathered (every
    process gets all of them); otherwise the model runs on `device` (default: where its weights
    are). `skip_errors` records unreadable items in `errors` (gathered from every process)
    instead of raising. The model is left in eval mode.
    """
    if skip_errors and isinstance(data, DataLoader):
        raise ConfigError("predict: skip_errors needs a dataset, not a ready DataLoader")
    if accelerator is not None and accelerator.num_processes == 1:  # one process: its device
        device, accelerator = accelerator.device, None
    multi = bool(getattr(model, "multi_label", False))
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(
            _Tolerant(data) if skip_errors else data,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_batch,
        )
    model.eval()
    if accelerator is not None:  # several processes
        model.to(accelerator.device)
        loader = accelerator.prepare(loader)

        local_errors: dict[int, str] = {}
        n_classes = len(getattr(model, "class_names", None) or [])

        def fn(batch: dict[str, Any]) -> tuple[Tensor, ...]:
            # every process sends the same number of rows (gather_for_metrics counts them): an
            # unreadable item keeps its row, with zero scores and ok = False, and is dropped below
            ok = torch.ones(len(batch["index"]), dtype=torch.bool, device=batch["index"].device)
            if "error" in batch:
                ok = torch.tensor([not e for e in batch["error"]], device=ok.device)
                for i, e in zip(batch["index"].tolist(), batch["error"]):
                    if e:
                        local_errors[int(i)] = e
            if bool(ok.all()):
                scores = probabilities(forward_batch(model, batch), multi)
            else:
                scores = torch.zeros(len(ok), n_classes, device=accelerator.device)
                if bool(ok.any()):
                    scores[ok] = probabilities(
                        forward_batch(model, _select(batch, ok.tolist())), multi
                    )
            out = (scores, batch["index"], ok)
            return out + ((batch["target"],) if "target" in batch else ())

        outs = gather_outputs(loader, accelerator, fn)
        if not outs:
            raise DataError("nothing to predict")
        errors: dict[int, str] = {}
        if skip_errors:
            from accelerate.utils import gather_object

            for part in gather_object([local_errors]):
                errors.update(part)
        ok = outs[2].numpy().astype(bool)
        scores, index = outs[0].numpy()[ok], outs[1].numpy()[ok]
        targets = outs[3].numpy()[ok] if len(outs) > 3 else None
        return _in_order(scores, targets, index, errors)
    dev = torch.device(device) if device is not None else device_of(model)
    model.to(dev)
    scores_l, index_l, target_l, errors = [], [], [], {}
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False)
    for batch in bar:
        if "error" in batch:
            keep = [not e for e in batch["error"]]
            for i, e, ok in zip(batch["index"].tolist(), batch["error"], keep):
                if not ok:
                    errors[int(i)] = e
            if not any(keep):
                continue
            batch = _select(batch, keep)
        on_dev = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
        scores_l.append(probabilities(forward_batch(model, on_dev), multi).cpu())
        index_l.append(batch["index"])
        if "target" in batch:
            target_l.append(batch["target"])
    if not scores_l:
        return Predictions(
            np.zeros((0, len(getattr(model, "class_names", []))), np.float32),
            None,
            np.zeros(0, np.int64),
            errors,
        )
    targets = torch.cat(target_l).numpy() if target_l else None
    return _in_order(torch.cat(scores_l).numpy(), targets, torch.cat(index_l).numpy(), errors)


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _in_order(
    scores: np.ndarray, targets: np.ndarray | None, index: np.ndarray, errors: dict[int, str]
) -> Predictions:
    order = np.argsort(index, kind="stable")
    return Predictions(
        scores[order], None if targets is None else targets[order], index[order], errors
    )


@dataclasses.dataclass
class ClipPredictions:
    """Clip-level output of `predict_clips`: one row per manifest row that could be read.

    scores (N, C) mean window probabilities; targets (N,) / (N, C) or None; rows = positions in
    the input table; `windows` one row per window (row, start, end, then one column per class);
    errors: input-table position -> reason for rows with an unreadable window."""

    scores: np.ndarray
    targets: np.ndarray | None
    rows: np.ndarray
    windows: pd.DataFrame
    errors: dict[int, str]


def predict_clips(
    model: nn.Module,
    df: pd.DataFrame,
    *,
    window: float,
    hop: float | None = None,
    labels: bool = True,
    batch_size: int = 16,
    num_workers: int = 0,
    accelerator: Any = None,
    device: str | torch.device | None = None,
    skip_errors: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> ClipPredictions:
    """Classify every row of a manifest table by windows of `window` seconds every `hop` (default
    `window`), averaging each row's window probabilities. `labels=False` ignores the labels
    column (e.g. files of unknown content). Audio is read at the model's sample rate."""
    class_names = list(getattr(model, "class_names", []) or [])
    if not class_names:
        raise ConfigError("the model has no class names (a classifier export is needed)")
    table = df.reset_index(drop=True)
    if not labels:
        table = table.assign(labels="")
    windows = segment_windows(table, window, hop)
    sample_rate = int(model.frontend_cfg.sample_rate)
    with warnings.catch_warnings():
        # windows shorter than one fbank frame are dropped (and reported as not predicted)
        warnings.simplefilter("ignore", UserWarning)
        ds = AudioDataset(
            windows,
            class_names=class_names,
            multi_label=bool(getattr(model, "multi_label", False)),
            sample_rate=sample_rate,
            clip_seconds=window,
            train=False,
        )
    kept = ds.df  # AudioDataset drops windows shorter than min_seconds
    pred = predict(
        model,
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        accelerator=accelerator,
        device=device,
        skip_errors=skip_errors,
        progress=progress,
        desc=desc,
    )
    seg = kept["segment_index"].to_numpy()
    errors: dict[int, str] = {}
    for i, reason in pred.errors.items():
        errors.setdefault(int(seg[i]), reason)
    ok = ~np.isin(seg[pred.indices], list(errors)) if errors else np.ones(len(pred.indices), bool)
    scores, index = pred.scores[ok], pred.indices[ok]
    rows, clip_scores = aggregate_windows(scores, seg[index])
    targets = None
    if labels and pred.targets is not None:
        targets = first_per_group(pred.targets[ok], seg[index], rows)
    win = pd.DataFrame(
        {
            "row": seg[index],
            "start": kept["start"].to_numpy()[index],
            "end": kept["end"].to_numpy()[index],
        }
    )
    for c, name in enumerate(class_names):
        win[name] = scores[:, c]
    return ClipPredictions(clip_scores, targets, rows.astype(np.int64), win, errors)
