"""Clip classification on top of any model: the baseline classifier (frontend + CNN baseline), the
classification task the Trainer runs, clip-level prediction over windows, and loading exports.

A *classifier* is any `nn.Module` with
    forward(wav=None, padding_mask=None, *, feats=None, frame_mask=None) -> logits (B, C)
    class_names: list[str]      multi_label: bool
and, optionally, `featurise(wav, padding_mask) -> (feats, frame_mask)` plus `input` ("features" or
"waveform"), which let the task apply SpecAugment and mixup to features. `BaselineClassifier` is
one; an `AudioModel` with a head is one as soon as its forward accepts `feats=` (until then it
trains and predicts from waveforms, without feature-level augmentation).

Evaluation is clip-level: a clip longer than the training clip is cut into windows
(`bioaudio.datasets.segment_windows`), every window is classified, and the clip's score is the
mean of its windows' probabilities (softmax for single-label, sigmoid for multi-label).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .augment import SpecAugmentConfig, mixup, mixup_masked, spec_augment
from .baselines import Baseline, baseline_from_config, build_baseline
from .checkpoint import (
    is_export_dir,
    save_export,
    write_export,
)
from .config import from_dict, to_dict
from .datasets import IGNORE_INDEX, AudioDataset, collate_batch, segment_windows
from .errors import AudioDecodeError, CheckpointError, ConfigError, DataError
from .frontend import FrontendConfig, build_frontend
from .metrics import multi_label_metrics, single_label_metrics
from .trainer import gather_outputs

MODEL_TYPE = "baseline"

__all__ = [
    "BaselineClassifier",
    "ClassificationTask",
    "ClipPredictions",
    "Predictions",
    "aggregate_windows",
    "classification_report",
    "export_classifier",
    "forward_batch",
    "load_classifier",
    "predict",
    "predict_clips",
    "probabilities",
    "resolve_export_dir",
    "score_logits",
]


# ----------------------------------------------------------------------------------------------
# The baseline classifier


class BaselineClassifier(nn.Module):
    """A frontend (waveform -> features) and a `bioaudio.baselines` model, as one exportable
    classifier. Waveform-input models (the MLP family with input="waveform") skip the frontend."""

    model_type: str = MODEL_TYPE

    def __init__(
        self,
        baseline: Baseline,
        frontend: FrontendConfig,
        class_names: Sequence[str],
        multi_label: bool = False,
    ):
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) != baseline.n_classes:
            raise ConfigError(
                f"{baseline.config.get('name')}: {baseline.n_classes} outputs but"
                f" {len(names)} class names"
            )
        if len(set(names)) != len(names):
            raise ConfigError("class names are not unique")
        if baseline.input == "features" and baseline.n_features != frontend.n_features:
            raise ConfigError(
                f"{baseline.config.get('name')} was built for {baseline.n_features} feature bins"
                f" but the {frontend.kind} frontend gives {frontend.n_features}"
            )
        self.frontend_cfg = frontend
        self.frontend = build_frontend(frontend)
        self.baseline = baseline
        self.class_names = names
        self.multi_label = bool(multi_label)
        self.provenance: dict[str, Any] = {}

    @classmethod
    def build(
        cls,
        name: str,
        frontend: FrontendConfig,
        class_names: Sequence[str],
        multi_label: bool = False,
        **options: Any,
    ) -> BaselineClassifier:
        """A fresh classifier: `name` is a `bioaudio.baselines` name or `timm:<arch>`."""
        baseline = build_baseline(name, len(class_names), frontend.n_features, **options)
        return cls(baseline, frontend, class_names, multi_label)

    @property
    def input(self) -> str:
        """ "features" (the frontend runs first) or "waveform" (raw samples in)."""
        return self.baseline.input

    def featurise(
        self, wav: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """wav (B, S) -> normalised features (B, T, F) and frame mask (B, T) | None."""
        return self.frontend(wav, padding_mask)

    def forward(
        self,
        wav: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        feats: Tensor | None = None,
        frame_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, C) from a waveform batch or from features (a cache, or augmented)."""
        if self.input == "waveform":
            if wav is None:
                raise ConfigError(
                    f"{self.baseline.config.get('name')} takes the raw waveform; it cannot be fed"
                    " features (do not use a feature cache with input=waveform)"
                )
            return self.baseline(wav, padding_mask)
        if feats is None:
            if wav is None:
                raise ValueError("forward needs wav or feats")
            feats, frame_mask = self.frontend(wav, padding_mask)
        return self.baseline(feats, frame_mask)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the model; `bioaudio.checkpoint` writes it into exports."""
        return {
            "model_type": MODEL_TYPE,
            "baseline": json_ready(self.baseline.config),
            "frontend": to_dict(self.frontend_cfg),
            "class_names": list(self.class_names),
            "multi_label": self.multi_label,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaselineClassifier:
        """Rebuild (random weights) from `config()` or from a whole export config.json."""
        if not isinstance(config, dict):
            raise ConfigError("a baseline config must be a mapping")
        if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
        missing = [k for k in ("baseline", "frontend", "class_names") if k not in config]
        if missing:
            raise ConfigError(f"baseline config lacks {', '.join(missing)}")
        if not isinstance(config["baseline"], dict) or not isinstance(config["frontend"], dict):
            raise ConfigError("baseline config: 'baseline' and 'frontend' must be mappings")
        names = config["class_names"]
        if not isinstance(names, list) or not names:
            raise ConfigError("baseline config: class_names must be a non-empty list")
        frontend = from_dict(FrontendConfig, config["frontend"], where="frontend")
        baseline = baseline_from_config(config["baseline"])
        return cls(baseline, frontend, names, bool(config.get("multi_label", False)))


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively (model configs go through JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Loading exports


def resolve_export_dir(path: str | Path) -> Path:
    """An export folder from an export folder or a run directory (its best/, else export/)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir() and not is_export_dir(p):
        for name in ("best", "export"):
            if is_export_dir(p / name):
                return p / name
        raise CheckpointError(
            f"{p}: neither an export folder (model.safetensors + config.json) nor a run"
            " directory with best/ or export/"
        )
    return p


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Load a classifier from an export folder or a run directory, whatever its model type:
    baselines here, every other type through `bioaudio.load_model`. Returns it in eval mode."""
    p = resolve_export_dir(path)
    from . import load_model

    return load_model(p, device=device)


def export_classifier(
    model: nn.Module, out_dir: str | Path, provenance: dict[str, Any] | None = None
) -> Path:
    """Write an export; into `out_dir` directly when it is a new empty folder (the Trainer hands
    over one it moves into place itself), else atomically through `save_export`."""
    out = Path(out_dir)
    if out.is_dir() and not any(out.iterdir()):
        write_export(model, out, provenance)
        return out
    return save_export(model, out, provenance)


# ----------------------------------------------------------------------------------------------
# Forward passes, probabilities, metrics


def forward_batch(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits of a collated batch: cached features (`feats`) or waveforms (`wav`)."""
    if "feats" in batch:
        return model(feats=batch["feats"], frame_mask=batch.get("frame_mask"))
    return model(batch["wav"], batch.get("padding_mask"))


def probabilities(logits: Tensor, multi_label: bool) -> Tensor:
    """Sigmoid per class (multi-label) or softmax over classes (single-label), in float32."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else logits.softmax(dim=-1)


def aggregate_windows(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of `scores` (N, C) per group id -> (sorted unique groups, (G, C))."""
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.zeros((len(uniq), scores.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, scores)
    counts = np.bincount(inverse, minlength=len(uniq))[:, None]
    return uniq, (sums / counts).astype(np.float32)


def _first_per_group(values: np.ndarray, groups: np.ndarray, uniq: np.ndarray) -> np.ndarray:
    first = {}
    for i, g in enumerate(groups.tolist()):
        first.setdefault(g, i)
    return values[[first[g] for g in uniq.tolist()]]


def _labelled(targets: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return np.ones(len(targets), dtype=bool)
    return np.asarray(targets) != IGNORE_INDEX


def classification_report(
    scores: np.ndarray, targets: np.ndarray, class_names: list[str], multi_label: bool
) -> dict[str, Any]:
    """`bioaudio.metrics` on the labelled rows: accuracy, balanced accuracy, macro-F1, per-class
    report and confusion (single-label) or mAP, AUROC, F1 (multi-label); plus n."""
    keep = _labelled(targets, multi_label)
    scores, targets = np.asarray(scores)[keep], np.asarray(targets)[keep]
    if len(targets) == 0:
        raise DataError("no labelled clips to score")
    if multi_label:
        out = multi_label_metrics(targets, scores, class_names)
    else:
        out = single_label_metrics(targets, scores, class_names)
    out["n"] = int(len(targets))
    return out


def score_logits(
    logits: Tensor,
    targets: Tensor,
    class_names: list[str],
    multi_label: bool,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Scalar evaluation metrics: the loss over labelled windows, then clip-level metrics on the
    mean window probabilities per group (no groups: every row is a clip)."""
    logits, targets = logits.float().cpu(), targets.cpu()
    if multi_label:
        loss = F.binary_cross_entropy_with_logits(logits, targets.float()).item()
    else:
        valid = targets != IGNORE_INDEX
        loss = F.cross_entropy(logits[valid], targets[valid]).item() if valid.any() else math.nan
    probs = probabilities(logits, multi_label).numpy()
    y = targets.numpy()
    if groups is not None:
        groups = np.asarray(groups)
        uniq, probs = aggregate_windows(probs, groups)
        y = _first_per_group(y, groups, uniq)
    report = classification_report(probs, y, class_names, multi_label)
    out = {"loss": loss}
    out.update({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
    out.pop("n", None)
    return out


# ----------------------------------------------------------------------------------------------
# The task the Trainer runs


class ClassificationTask:
    """Cross-entropy (single-label; soft targets under mixup; rows labelled -100 ignored) or
    BCE-with-logits (multi-label), with optional mixup, SpecAugment on features and label
    smoothing. Evaluation gathers logits across processes and scores clips (windows averaged
    per `eval_groups[index]` when given). Works with any classifier (see the module docstring).

    Augmentation randomness comes from a generator seeded by (seed, step, process, micro-batch),
    so a resumed run draws the same masks and mixing weights as an uninterrupted one.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        multi_label: bool = False,
        *,
        mixup_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        spec_augment: SpecAugmentConfig | None = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
        eval_groups: np.ndarray | Sequence[int] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        if mixup_alpha < 0:
            raise ConfigError(f"--mixup_alpha must be >= 0, got {mixup_alpha}")
        if not 0.0 <= mixup_prob <= 1.0:
            raise ConfigError(f"--mixup_prob must be in [0, 1], got {mixup_prob}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"--label_smoothing must be in [0, 1), got {label_smoothing}")
        self.class_names = list(class_names)
        self.multi_label = bool(multi_label)
        self.mixup_alpha = float(mixup_alpha)
        self.mixup_prob = float(mixup_prob)
        self.spec_augment = spec_augment
        if spec_augment is not None and spec_augment.time_masks == spec_augment.freq_masks == 0:
            self.spec_augment = None
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self.eval_groups = None if eval_groups is None else np.asarray(eval_groups)
        self.provenance = dict(provenance or {})
        self._trainer: Any = None
        self._calls = 0
        self._last_step = -1
        self._micro = 0

    # ---- hooks

    def setup(self, trainer: Any) -> None:
        """Keep the trainer (step, rank, unwrap) and check the model can take the augmentations."""
        self._trainer = trainer
        self.check_model(trainer.unwrapped)

    def check_model(self, model: nn.Module) -> None:
        """ConfigError when the model cannot serve this task."""
        names = list(getattr(model, "class_names", []) or [])
        if names != self.class_names:
            raise ConfigError("the model's class names differ from the task's")
        if bool(getattr(model, "multi_label", False)) != self.multi_label:
            raise ConfigError("the model and the task disagree on multi-label")
        if self.spec_augment is not None and not self._featurises(model):
            raise ConfigError(
                "SpecAugment needs a model that takes features (forward(..., feats=...));"
                " this one takes the waveform"
            )

    @staticmethod
    def _featurises(model: nn.Module) -> bool:
        """True when features can be computed outside the model and fed back as `feats=`."""
        if getattr(model, "input", "features") != "features":
            return False
        if not callable(getattr(model, "featurise", None)):
            return False
        try:
            return "feats" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return False

    def _unwrap(self, model: nn.Module) -> nn.Module:
        if self._trainer is not None:
            return self._trainer.accelerator.unwrap_model(model)
        return getattr(model, "module", model)

    def _generator(self) -> torch.Generator:
        step = self._trainer.step if self._trainer is not None else self._calls
        rank = self._trainer.rank if self._trainer is not None else 0
        if step != self._last_step:
            self._last_step, self._micro = step, 0
        self._micro += 1
        self._calls += 1
        seed = np.random.SeedSequence([self.seed, step, rank, self._micro]).generate_state(2)
        return torch.Generator().manual_seed(int(seed[0]) << 31 | int(seed[1]) >> 1)

    # ---- training

    def _inputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[str, Tensor, Tensor | None]:
        """("feats" | "wav", input, mask): features when an augmentation needs them."""
        if "feats" in batch:
            return "feats", batch["feats"], batch.get("frame_mask")
        wants_feats = self.spec_augment is not None or self.mixup_alpha > 0
        inner = self._unwrap(model)
        if wants_feats and self._featurises(inner):
            # The frontend has no parameters: running it outside the DDP forward is safe.
            with torch.no_grad():
                feats, mask = inner.featurise(batch["wav"], batch.get("padding_mask"))
            return "feats", feats, mask
        return "wav", batch["wav"], batch.get("padding_mask")

    def _targets(self, y: Tensor) -> Tensor:
        if self.multi_label:
            return y.float()
        return F.one_hot(y, len(self.class_names)).float()

    def training_step(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch (and train accuracy for single-label tasks)."""
        gen = self._generator()
        kind, x, mask = self._inputs(model, batch)
        y = batch["target"]
        if not self.multi_label:
            keep = y != IGNORE_INDEX
            if not bool(keep.any()):
                # No labelled row: a zero loss that still touches every parameter (DDP sync).
                logits = _call(model, kind, x, mask)
                return logits.float().sum() * 0.0, {"train_accuracy": 0.0}
            if not bool(keep.all()):
                x, y = x[keep], y[keep]
                mask = mask[keep] if mask is not None else None
        if kind == "feats" and self.spec_augment is not None:
            x = spec_augment(x, self.spec_augment, mask, generator=gen)[0]
        soft = None
        if self.mixup_alpha > 0:
            t = self._targets(y)
            if mask is not None:
                x, mask, soft, _ = mixup_masked(
                    x, mask, t, self.mixup_alpha, generator=gen, prob=self.mixup_prob
                )
            else:
                x, soft, _ = mixup(x, t, self.mixup_alpha, generator=gen, prob=self.mixup_prob)
        logits = _call(model, kind, x, mask).float()
        ls = self.label_smoothing
        if self.multi_label:
            t = (soft if soft is not None else y.float()) * (1 - ls) + ls / 2
            return F.binary_cross_entropy_with_logits(logits, t), {}
        loss = F.cross_entropy(logits, soft if soft is not None else y, label_smoothing=ls)
        hard = soft.argmax(dim=1) if soft is not None else y
        acc = (logits.detach().argmax(dim=1) == hard).float().mean().item()
        return loss, {"train_accuracy": acc}

    # ---- evaluation and export

    def evaluate(self, model: nn.Module, loader: Any, accelerator: Any) -> dict[str, float]:
        """Logits, targets and indices gathered over processes -> clip-level metrics."""

        def fn(batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
            return forward_batch(model, batch).float(), batch["target"], batch["index"]

        logits, targets, index = gather_outputs(loader, accelerator, fn)
        groups = None
        if self.eval_groups is not None:
            groups = self.eval_groups[index.numpy()]
        return score_logits(logits, targets, self.class_names, self.multi_label, groups)

    def export(self, model: nn.Module, out_dir: str | Path) -> None:
        """An export folder (model.safetensors + config.json) with this task's provenance."""
        export_classifier(model, out_dir, self.provenance)


def _call(model: nn.Module, kind: str, x: Tensor, mask: Tensor | None) -> Tensor:
    if kind == "feats":
        return model(feats=x, frame_mask=mask)
    return model(x, mask)


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
    are). `skip_errors` (single process only) records unreadable items in `errors` instead of
    raising. The model is left in eval mode.
    """
    if skip_errors and accelerator is not None and accelerator.num_processes > 1:
        raise ConfigError("predict: skip_errors works in a single process only")
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
    if accelerator is not None:
        model.to(accelerator.device)
        loader = accelerator.prepare(loader)

        def fn(batch: dict[str, Any]) -> tuple[Tensor, ...]:
            out = (probabilities(forward_batch(model, batch), multi), batch["index"])
            return out + ((batch["target"],) if "target" in batch else ())

        outs = gather_outputs(loader, accelerator, fn)
        if not outs:
            raise DataError("nothing to predict")
        scores, index = outs[0].numpy(), outs[1].numpy()
        targets = outs[2].numpy() if len(outs) > 2 else None
        return _in_order(scores, targets, index, {})
    dev = torch.device(device) if device is not None else _device_of(model)
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


def _device_of(model: nn.Module) -> torch.device:
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
        targets = _first_per_group(pred.targets[ok], seg[index], rows)
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
