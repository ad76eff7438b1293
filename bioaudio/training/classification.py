"""The classification task the Trainer runs for every classifier (CNN baselines, finetuned
transformers): cross-entropy or BCE, mixup, SpecAugment on features, label smoothing, clip-level
evaluation.

A *classifier* is any `nn.Module` with
    forward(wav=None, padding_mask=None, *, feats=None, frame_mask=None) -> logits (B, C)
    class_names: list[str]      multi_label: bool
and, optionally, `featurise(wav, padding_mask) -> (feats, frame_mask)` plus `input` ("features" or
"waveform"), which let the task apply SpecAugment and mixup to features. `BaselineClassifier` and
`AudioModel` with a head are classifiers.

Evaluation is clip-level: a clip longer than the training clip is cut into windows
(`bioaudio.data.datasets.segment_windows`), every window is classified, and the clip's score is
the mean of its windows' probabilities (softmax for single-label, sigmoid for multi-label).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bioaudio.data.augment import SpecAugmentConfig, mixup, mixup_masked, spec_augment
from bioaudio.data.datasets import IGNORE_INDEX
from bioaudio.errors import ConfigError
from bioaudio.inference.metrics import score_logits
from bioaudio.inference.predict import forward_batch, gather_outputs
from bioaudio.models.checkpoint import export_classifier
from bioaudio.training.task import Task, TaskContext


class ClassificationTask(Task):
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
        self._calls = 0

    # ---- hooks

    def build(self, model: nn.Module) -> None:
        """Check the model can serve this task (classes, multi-label, augmentations)."""
        self.check_model(model)
        return None

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

    def _generator(self, ctx: TaskContext | None) -> torch.Generator:
        """Seeded by (seed, step, process, micro-batch): resumed runs draw the same numbers."""
        if ctx is not None:
            key = [self.seed, ctx.step, ctx.rank, ctx.micro_step + 1]
        else:  # called outside the Trainer
            self._calls += 1
            key = [self.seed, self._calls, 0, 1]
        seed = np.random.SeedSequence(key).generate_state(2)
        return torch.Generator().manual_seed(int(seed[0]) << 31 | int(seed[1]) >> 1)

    # ---- training

    def _inputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[str, Tensor, Tensor | None]:
        """("feats" | "wav", input, mask): features when an augmentation needs them."""
        if "feats" in batch:
            return "feats", batch["feats"], batch.get("frame_mask")
        wants_feats = self.spec_augment is not None or self.mixup_alpha > 0
        if wants_feats and self._featurises(model):
            with torch.no_grad():  # the frontend has no parameters
                feats, mask = model.featurise(batch["wav"], batch.get("padding_mask"))
            return "feats", feats, mask
        return "wav", batch["wav"], batch.get("padding_mask")

    def _targets(self, y: Tensor) -> Tensor:
        if self.multi_label:
            return y.float()
        return F.one_hot(y, len(self.class_names)).float()

    def training_step(
        self, model: nn.Module, batch: dict[str, Any], ctx: TaskContext | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch (and train accuracy for single-label tasks)."""
        gen = self._generator(ctx)
        kind, x, mask = self._inputs(model, batch)
        y = batch["target"]
        if not self.multi_label:
            keep = y != IGNORE_INDEX
            if not bool(keep.any()):
                # No labelled row: a zero loss that still touches every parameter (DDP sync).
                logits = _call(model, kind, x, mask)
                zero = logits.float().sum() * 0.0
                return zero, {"train_accuracy": zero.detach()}
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
        acc = (logits.detach().argmax(dim=1) == hard).float().mean()
        return loss, {"train_accuracy": acc}

    # ---- evaluation and export

    def evaluate(self, model: nn.Module, loader: Any, ctx: TaskContext) -> dict[str, float]:
        """Logits, targets and indices gathered over processes -> clip-level metrics."""

        def fn(batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
            return forward_batch(model, batch).float(), batch["target"], batch["index"]

        logits, targets, index = gather_outputs(loader, ctx, fn)
        # A dataset that skips unreadable files serves the next readable item in their place:
        # each item counts once.
        _, first = np.unique(index.numpy(), return_index=True)
        if len(first) < len(index):
            keep = torch.from_numpy(np.sort(first))
            logits, targets, index = logits[keep], targets[keep], index[keep]
        groups = None
        if self.eval_groups is not None:
            groups = self.eval_groups[index.numpy()]
        return score_logits(logits, targets, self.class_names, self.multi_label, groups)

    def export(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> bool:
        """An export folder (model.safetensors + config.json) with this task's provenance."""
        export_classifier(model, out_dir, self.provenance)
        return True


def _call(model: nn.Module, kind: str, x: Tensor, mask: Tensor | None) -> Tensor:
    if kind == "feats":
        return model(feats=x, frame_mask=mask)
    return model(x, mask)
