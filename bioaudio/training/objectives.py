"""Pretraining objectives: the interface every self-supervised (or supervised) term implements.

`bioaudio pretrain --objective eat:1,memory_bank:0.1` builds one `Objective` per named term
(through the registry: each model package registers its own, e.g. `eat.objective`) and the
pretraining task (`bioaudio.training.pretrain`) mixes their losses with the given weights.

An objective is an `nn.Module`: its trainable parts (a decoder, a label predictor, projection
heads) and its frozen parts that must resume exactly (an EMA teacher, a queue buffer) are
registered submodules / buffers, so they are optimised, saved and resumed with the model. Parts
that are rebuilt from a file (a frozen tokenizer) are kept out of the state with
`persistent=False` buffers or plain attributes. Frozen parts call `requires_grad_(False)`.

Per micro-batch the task featurises the audio once and calls every objective with the same
`PretrainInputs`; an objective returns its (unweighted) loss, tensor logs and, when it computed
one anyway, the student's utterance embedding of the main view (the memory-bank term reuses it
instead of running the student again).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bioaudio.config import from_dict
from bioaudio.training.task import TaskContext


@dataclass
class PretrainInputs:
    """What every objective sees for one micro-batch (all on the training device).

    fbank        (B, T, F) normalised features of the main view (the model's frontend)
    frame_mask   (B, T) True on padding frames, or None when no frame is padding
    generator    a CPU torch.Generator seeded by (seed, step, process, micro-batch): draw every
                 random mask from it so a resumed run draws the same masks
    view2        (B, T, F) features of a second augmented view of the same clips (crop, gain,
                 noise, SpecAugment), present when an objective asked for one (`needs_view2`)
    view2_mask   its frame mask
    labels       (B,) class indices (-100 = unlabelled) or (B, C) multi-hot, when labelled
    pair_group   (B,) int64: clips sharing a non-negative id are extra positives of each other
                 (the `positive/` folder); -1 = no group
    index        (B,) dataset indices of the clips
    wav, padding_mask  (B, S) the waveforms and their sample padding mask (True = pad), for
                 terms that featurise differently (a teacher with another frontend)
    clip_generators  one CPU generator per clip, seeded by (seed, step, the clip's dataset
                 index): random choices drawn per clip from these do not depend on the batch
                 composition, so a run split over processes draws what one process draws
    student_utterance  (B, D) the student's utterance embedding of the main view, set by the
                 task from an earlier objective's output (EAT's CLS averaged over its clone
                 views) so a later term (the memory bank) need not run the student again
    """

    fbank: Tensor
    frame_mask: Tensor | None
    generator: torch.Generator
    view2: Tensor | None = None
    view2_mask: Tensor | None = None
    labels: Tensor | None = None
    pair_group: Tensor | None = None
    index: Tensor | None = None
    wav: Tensor | None = None
    padding_mask: Tensor | None = None
    clip_generators: list[torch.Generator] | None = None
    student_utterance: Tensor | None = None

    def clip_gens(self) -> list[torch.Generator]:
        """Per-clip generators (derived from `generator` when the task gave none)."""
        if self.clip_generators is not None:
            return self.clip_generators
        seeds = torch.randint(0, 2**62, (self.fbank.shape[0],), generator=self.generator)
        return [torch.Generator().manual_seed(int(s)) for s in seeds]


@dataclass
class ObjectiveOutput:
    """loss: scalar, unweighted; logs: scalar tensors (detached), named without the objective
    prefix (the task adds `<name>/`); utterance: (B, D) student embedding of the main view."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    utterance: Tensor | None = None


class Objective(nn.Module):
    """Base class of pretraining terms. Subclasses set `name` and `config_class` (a dataclass of
    options, exposed as `--<name>.<field>` flags) and implement `forward`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    needs_view2: ClassVar[bool] = False  # the task builds a second augmented view when True

    def __init__(self, model: nn.Module, cfg: Any = None):
        """Build the objective's parts for `model` (an AudioModel, on CPU, before `prepare`).
        Raise ConfigError for a model or setting it cannot serve. `cfg` is a `config_class`
        instance, a dict of its fields, or None (the defaults); it is validated here."""
        super().__init__()
        cls = type(self).config_class
        if cls is not None:
            if cfg is None:
                cfg = cls()
            elif isinstance(cfg, dict):
                cfg = from_dict(cls, cfg, where=f"{type(self).name} objective")
            validate = getattr(cfg, "validate", None)
            if callable(validate):
                validate()
        self.cfg = cfg

    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        raise NotImplementedError

    def after_update(self, model: nn.Module, ctx: TaskContext) -> None:
        """After each applied optimizer update (EMA teachers, queues). `model` is unwrapped."""

    def bind(self, others: list[Objective]) -> None:
        """Called once with every objective of the mix (itself included), after all are built
        and before anything is prepared: share parts with the others (a momentum encoder)."""

    def check_batch(self, global_batch: int) -> None:
        """ConfigError when the objective cannot work with this global batch size."""

    def momentum_encoder(self) -> nn.Module | None:
        """An EMA copy of the student encoder this objective already keeps (EAT's teacher),
        which the memory-bank term can use as its key encoder instead of keeping another."""
        return None

    def export(self, model: nn.Module, out_dir: Any, provenance: dict[str, Any]) -> bool:
        """Write the run's export into the new empty folder `out_dir` when this objective's
        product is not the model itself (a tokenizer); False: the model is exported."""
        return False

    def state_extra(self) -> dict[str, Any]:
        """Resumable state that is neither a parameter nor a buffer (rarely needed)."""
        return {}

    def load_state_extra(self, state: dict[str, Any]) -> None:
        """Restore `state_extra()` output."""

    def describe(self) -> dict[str, Any]:
        """Options for config.json and export provenance."""
        return {"name": self.name, **(dataclasses.asdict(self.cfg) if self.cfg else {})}
