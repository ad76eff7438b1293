"""Self-supervised pretraining: a weighted mix of objectives as one Trainer task.

    --objective eat:1,memory_bank:0.1     (names from the registry, `name:weight`, comma-separated)

Per micro-batch the task featurises the waveforms on the training device (the model's own
frontend, batched), builds a second view when a term needs one (the dataset's augmented `wav2`,
featurised, then SpecAugment), draws one seeded generator for every random mask, calls each
objective in order and sums `weight * loss`. Terms that compute the student's utterance embedding
anyway (EAT) pass it on to later ones (the memory bank), so the student runs once. After every
applied update each term updates its teachers and queues. The export is the student model
(frontend + encoder, no head), loadable with `load_model` and accepted by `finetune` and `embed`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bioaudio import runinfo, runlog
from bioaudio.config import from_dict
from bioaudio.data.augment import SpecAugmentConfig, spec_augment
from bioaudio.data.datasets import IGNORE_INDEX
from bioaudio.data.pretraining import PretrainDataConfig
from bioaudio.errors import ConfigError
from bioaudio.models import registry
from bioaudio.models.checkpoint import export_classifier
from bioaudio.training.config import EncoderRunOptions, LoopOptions, TrainConfig
from bioaudio.training.memory_bank import utterance_embedding
from bioaudio.training.objectives import Objective, ObjectiveOutput, PretrainInputs
from bioaudio.training.rundir import frontend_identity
from bioaudio.training.sampling import seed_of
from bioaudio.training.task import Task, TaskContext

# Terms that use another term's outputs run last.
_LATE = ("memory_bank", "supervised")


def parse_objectives(spec: str) -> list[tuple[str, float]]:
    """'eat:1,memory_bank:0.1' -> [('eat', 1.0), ('memory_bank', 0.1)] (weight 1 by default)."""
    terms: list[tuple[str, float]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError(f"--objective {spec!r}: weight of {name!r} is not a number") from None
        if not (w >= 0 and np.isfinite(w)):
            raise ConfigError(f"--objective {spec!r}: weight of {name!r} must be >= 0")
        if name in {n for n, _ in terms}:
            raise ConfigError(f"--objective {spec!r}: {name!r} appears twice")
        terms.append((name, w))
    if not terms:
        raise ConfigError("--objective: name at least one objective, e.g. eat:1,memory_bank:0.1")
    if all(w == 0 for _, w in terms):
        raise ConfigError(f"--objective {spec!r}: every weight is 0")
    return terms


def objective_config(name: str, options: dict[str, Any] | Any | None) -> Any:
    """The config dataclass of objective `name` from a dict of options (or None: defaults)."""
    cls = registry.objective_class(name)
    cfg_cls = getattr(cls, "config_class", None)
    if cfg_cls is None:
        return None
    if options is None:
        return cfg_cls()
    if dataclasses.is_dataclass(options):
        return options
    return from_dict(cfg_cls, dict(options), where=f"{name} options")


@dataclass
class SupervisedConfig:
    """Options of the supervised term (labelled clips mixed into pretraining)."""

    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing"})

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("supervised label_smoothing must be in [0, 1)")


class SupervisedObjective(Objective):
    """Cross-entropy (single-label; unlabelled rows ignored) or BCE (multi-label) of a linear
    head on the student's utterance embedding."""

    name = "supervised"
    config_class = SupervisedConfig

    def __init__(self, model: nn.Module, cfg: SupervisedConfig | None = None):
        cfg = cfg or SupervisedConfig()
        cfg.validate()
        super().__init__(model, cfg)
        self.class_names: list[str] = []
        self.multi_label = False
        self.pooling = "cls" if model.encoder.has_cls else "mean"
        self.head: nn.Module | None = None
        self.embed_dim = int(model.encoder.embed_dim)

    def set_classes(self, class_names: list[str], multi_label: bool) -> None:
        if not class_names:
            raise ConfigError(
                "the supervised objective needs labelled clips: --labeled_dir, or a labelled "
                "manifest as the data"
            )
        self.class_names, self.multi_label = list(class_names), bool(multi_label)
        self.head = nn.Sequential(
            nn.LayerNorm(self.embed_dim), nn.Linear(self.embed_dim, len(class_names))
        )

    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        assert self.head is not None, "set_classes was not called"
        emb = inputs.student_utterance
        if emb is None:
            emb = utterance_embedding(model.encoder(inputs.fbank, inputs.frame_mask), self.pooling)
        logits = self.head(emb.float())
        y = inputs.labels
        if y is None:
            return ObjectiveOutput(loss=logits.sum() * 0.0)
        ls = self.cfg.label_smoothing
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, y.float() * (1 - ls) + ls / 2)
            return ObjectiveOutput(loss=loss)
        valid = y != IGNORE_INDEX
        if not bool(valid.any()):
            return ObjectiveOutput(loss=logits.sum() * 0.0)  # touches the head (DDP)
        loss = F.cross_entropy(logits[valid], y[valid], label_smoothing=ls)
        acc = (logits[valid].argmax(1) == y[valid]).float().mean()
        return ObjectiveOutput(loss=loss, logs={"accuracy": acc.detach()})


class PretrainTask(Task):
    """A weighted mix of pretraining objectives (see the module docstring)."""

    def __init__(
        self,
        objectives: list[tuple[str, float]],
        options: dict[str, Any] | None = None,
        *,
        class_names: list[str] | None = None,
        multi_label: bool = False,
        spec_augment_view2: SpecAugmentConfig | None = None,
        seed: int = 0,
        global_batch: int | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        self.terms = sorted(objectives, key=lambda t: t[0] in _LATE)
        self.global_batch = global_batch
        self.options = dict(options or {})
        self.class_names = list(class_names or [])
        self.multi_label = multi_label
        self.spec2 = spec_augment_view2
        self.seed = int(seed)
        self.provenance = dict(provenance or {})
        self.weights = dict(self.terms)

    def build(self, model: nn.Module) -> nn.Module:
        """One objective per term, in a ModuleDict saved and resumed with the model."""
        model_type = getattr(model, "model_type", "")
        parts = nn.ModuleDict()
        for name, _ in self.terms:
            registry.get_objective(name, model_type)  # one-line error for a wrong model type
            cls = registry.objective_class(name)
            obj = cls(model, objective_config(name, self.options.get(name)))
            if isinstance(obj, SupervisedObjective):
                obj.set_classes(self.class_names, self.multi_label)
            parts[name] = obj
        for obj in parts.values():
            obj.bind(list(parts.values()))
            if self.global_batch is not None:
                obj.check_batch(self.global_batch)
        self.needs_view2 = any(obj.needs_view2 for obj in parts.values())
        return parts

    # ---- one micro-batch

    def _generator(self, ctx: TaskContext) -> torch.Generator:
        key = [self.seed, ctx.step, ctx.rank, ctx.micro_step, 11]
        s = np.random.SeedSequence(key).generate_state(2)
        return torch.Generator().manual_seed(int(s[0]) << 31 | int(s[1]) >> 1)

    def clip_generators(self, index: Tensor, ctx: TaskContext) -> list[torch.Generator]:
        """One generator per clip, seeded by (seed, step, dataset index): what a clip draws does
        not depend on which process or micro-batch it is in."""
        return [
            torch.Generator().manual_seed(seed_of(self.seed, ctx.step, int(i), 13))
            for i in index.tolist()
        ]

    def inputs(self, model: nn.Module, batch: dict[str, Any], ctx: TaskContext) -> PretrainInputs:
        """Featurise the batch on its device (no gradient through the frontend)."""
        gen = self._generator(ctx)
        index = batch.get("index")
        if index is None:
            index = torch.arange(batch["wav"].shape[0])
        gens = self.clip_generators(index, ctx)
        with torch.no_grad():
            fbank, frame_mask = model.featurise(batch["wav"], batch.get("padding_mask"))
            view2 = view2_mask = None
            if self.needs_view2:
                wav2 = batch.get("wav2", batch["wav"])
                view2, view2_mask = model.featurise(wav2, batch.get("padding_mask"))
                if self.spec2 is not None:
                    view2 = torch.cat([
                        spec_augment(
                            view2[i : i + 1], self.spec2,
                            None if view2_mask is None else view2_mask[i : i + 1],
                            generator=g,
                        )[0]
                        for i, g in enumerate(gens)
                    ])  # fmt: skip
        group = batch.get("pair_group")
        return PretrainInputs(
            fbank=fbank,
            frame_mask=frame_mask,
            generator=gen,
            view2=view2,
            view2_mask=view2_mask,
            labels=batch.get("target"),
            pair_group=torch.as_tensor(group, device=fbank.device) if group is not None else None,
            index=batch.get("index"),
            wav=batch["wav"],
            padding_mask=batch.get("padding_mask"),
            clip_generators=gens,
        )

    def training_step(self, model: nn.Module, batch: dict[str, Any], ctx: TaskContext) -> Tensor:
        parts = ctx.parts
        inputs = self.inputs(model, batch, ctx)
        total: Tensor | None = None
        for name, weight in self.terms:
            out = parts[name](model, inputs, ctx)
            if out.utterance is not None and inputs.student_utterance is None:
                inputs.student_utterance = out.utterance
            term = out.loss * weight
            total = term if total is None else total + term
            ctx.log(f"{name}/loss", out.loss)
            for key, value in out.logs.items():
                ctx.log(f"{name}/{key}", value)
        assert total is not None
        return total

    def on_step_end(self, model: nn.Module, ctx: TaskContext) -> None:
        for obj in ctx.parts.values():
            obj.after_update(model, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def export(self, model: nn.Module, out_dir: Path, ctx: TaskContext) -> bool:
        """The student model (frontend + encoder, no head) as an export folder, unless an
        objective exports its own product (a tokenizer)."""
        provenance = {**self.provenance, "step": ctx.step}
        for obj in ctx.parts.values():
            if obj.export(model, out_dir, provenance):
                return True
        export_classifier(model, out_dir, provenance)
        return True


# ----------------------------------------------------------------------------------------------
# A pretraining run


DEFAULT_OBJECTIVES = {"eat": "eat:1,memory_bank:0.1", "beats": "beats:1,memory_bank:0.1"}


@dataclass
class PretrainOptions(LoopOptions, EncoderRunOptions, PretrainDataConfig):
    """Options of `bioaudio pretrain` (the loop's, the data's, the model's, the objectives')."""

    out: Path = field(
        default=Path("runs/pretrain"),
        metadata={"help": "run directory: config.json, metrics.csv, state/, export/"},
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model type: eat | beats (default: eat, or the --model_path's type)"},
    )
    preset: str = field(
        default="small", metadata={"help": "encoder preset: tiny | small | base | large"}
    )
    encoder_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": 'encoder config overrides as JSON, e.g. {"depth": 4}'},
    )
    model_path: Path | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint: our export or an official BEATs / EAT file"},
    )
    objective: str | None = field(
        default=None,
        metadata={
            "help": "weighted objectives NAME:WEIGHT,... (default eat:1,memory_bank:0.1 for EAT,"
            " beats:1,memory_bank:0.1 for BEATs); see `bioaudio pretrain --help` for the list"
        },
    )
    objectives: dict[str, Any] = field(
        default_factory=dict,
        metadata={"cli": False, "help": "per-objective options (flags --<objective>.<option>)"},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps (alternative to --epochs)"}
    )
    epochs: float | None = field(
        default=None, metadata={"help": "passes over the data; unset: 10 unless --max_steps"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order, masks"})
    save_every: int = field(default=500, metadata={"help": "save a resumable state every N steps"})
    log_every: int = field(default=10, metadata={"help": "write a metrics.csv row every N steps"})
    spec_augment_view2: bool = field(
        default=True, metadata={"help": "SpecAugment the second (key) view (see --spec2.*)"}
    )
    spec2: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)

    def validate(self) -> None:
        self.validate_loop()
        PretrainDataConfig.validate(self)
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give --max_steps or --epochs, not both")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps must be a positive integer, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.save_every < 0 or self.log_every < 1:
            raise ConfigError("--save_every must be >= 0 and --log_every >= 1")
        if not isinstance(self.encoder_options, dict):
            raise ConfigError("--encoder_options must be a JSON object")


def build_pretrain_model(cfg: PretrainOptions) -> nn.Module:
    """A fresh model of `--model` / `--preset`, or the `--model_path` checkpoint without head."""
    from bioaudio.models.audio_model import build_model
    from bioaudio.models.checkpoint import load_model

    if cfg.model_path is not None:
        if cfg.encoder_options:
            raise ConfigError("--encoder_options applies to new models, not to --model_path")
        model = load_model(cfg.model_path)
        model_type = getattr(model, "model_type", "")
        if model_type not in registry.model_types("encoder"):
            raise ConfigError(
                f"--model_path {cfg.model_path}: a {model_type or type(model).__name__} model "
                "has no transformer encoder to pretrain"
            )
        if cfg.model is not None and cfg.model != model_type:
            raise ConfigError(
                f"--model {cfg.model} but --model_path {cfg.model_path} holds a {model_type} "
                "checkpoint"
            )
        model.set_head(None)
        model.provenance = {"continued_from": str(cfg.model_path), **model.provenance}
        model.train()
    else:
        encoder = {"preset": cfg.preset, **cfg.encoder_options}
        model = build_model(cfg.model or "eat", encoder=encoder)
    if cfg.compile:
        # The EAT teacher and the memory bank's key encoder are copies of the student: a copy
        # of a compiled module would run the student's compiled call.
        raise ConfigError("--compile is for finetuning; pretraining objectives copy the encoder")
    cfg.apply_to_encoder(model.encoder)
    return model


def _steps(cfg: PretrainOptions, n_items: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = max(1, n_items // cfg.batch_size)
    return max(1, int(round((cfg.epochs or 10.0) * per_epoch)))


def pretrain(data: Path, cfg: PretrainOptions, say: Any = print) -> dict[str, Any]:
    """Build everything (every check before any step), train, export. Returns the summary."""
    from bioaudio.data.datasets import collate_batch
    from bioaudio.data.pretraining import PretrainDataset, build_pretraining_data
    from bioaudio.fileio import write_csv_atomic
    from bioaudio.training.loop import Trainer
    from bioaudio.training.rundir import check_out_folder

    cfg.validate()
    check_out_folder(cfg.out, "pretrain", "run")
    torch.manual_seed(cfg.seed)  # initial weights are part of what the seed decides
    model = build_pretrain_model(cfg)
    model_type = model.model_type
    terms = parse_objectives(cfg.objective or DEFAULT_OBJECTIVES.get(model_type, "eat:1"))
    for name, _ in terms:
        registry.get_objective(name, model_type)
    options = {n: objective_config(n, cfg.objectives.get(n)) for n, _ in terms}
    cfg.objectives = {n: dataclasses.asdict(o) if o is not None else {} for n, o in options.items()}
    pdata = build_pretraining_data(Path(data), cfg)
    if "supervised" in dict(terms) and not pdata.class_names:
        raise ConfigError(
            "--objective supervised needs labelled clips: --labeled_dir, or labelled data"
        )
    needs_view2 = any(getattr(registry.objective_class(n), "needs_view2", False) for n, _ in terms)
    dataset = PretrainDataset(
        pdata,
        cfg.segment_duration,
        model.frontend_cfg.sample_rate,
        seed=cfg.seed,
        view2=cfg.view2 if needs_view2 else None,
    )
    if len(dataset) < cfg.batch_size:
        raise ConfigError(
            f"--batch_size {cfg.batch_size} is larger than the data ({len(dataset)} clips)"
        )
    max_steps = _steps(cfg, len(dataset))
    provenance = {
        "task": "pretraining",
        "objectives": dict(terms),
        "objective_options": cfg.objectives,
        "data": str(Path(data).resolve()),
        "hours": round(pdata.hours, 3),
        "segment_duration": cfg.segment_duration,
    }
    task = PretrainTask(
        terms,
        options,
        class_names=pdata.class_names,
        multi_label=pdata.multi_label,
        spec_augment_view2=cfg.spec2 if cfg.spec_augment_view2 else None,
        seed=cfg.seed,
        global_batch=cfg.batch_size,
        provenance=provenance,
    )
    loop = TrainConfig.for_run(
        cfg,
        out_dir=cfg.out,
        max_steps=max_steps,
        seed=cfg.seed,
        save_every=cfg.save_every,
        log_every=cfg.log_every,
        eval_every=0,
    )
    fingerprint = runinfo.data_fingerprint(data, None if Path(data).is_file() else pdata.table)
    run_config = {
        "command": "pretrain",
        "options": cfg,
        "data": provenance,
        "provenance": {"seeds": {"seed": cfg.seed}, "data": fingerprint},
    }
    trainer = Trainer(
        loop,
        model,
        task,
        dataset,
        collate_fn=collate_batch,
        run_config=run_config,
        identity={
            "model_type": model_type,
            "objectives": [n for n, _ in terms],
            **frontend_identity(model.frontend_cfg),
        },
    )
    runlog.attach(cfg.out / "log.txt")  # everything checked: the command's output so far, then on
    if trainer.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(pdata.skipped, cfg.out / "skipped.csv")
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"pretraining {model.describe()}, {n_params / 1e6:.1f}M parameters, on "
            f"{len(dataset)} clips ({pdata.hours:.2f} h) for {max_steps} steps; objectives "
            + ", ".join(f"{n} x {w:g}" for n, w in terms)
        )
        for note in pdata.notes:
            say(f"note: {note}")
        if len(pdata.skipped):
            say(f"note: {len(pdata.skipped)} file(s) skipped, reasons in {cfg.out / 'skipped.csv'}")
    summary = trainer.fit()
    _list_unreadable(trainer, dataset, pdata.skipped, cfg.out / "skipped.csv", say)
    return summary


def _list_unreadable(trainer: Any, dataset: Any, skipped: Any, csv: Path, say: Any) -> None:
    """Add the files that failed to decode during training (read by any process or worker,
    this session or an earlier one of a resumed run) to the run's skipped.csv, and say so."""
    import pandas as pd

    from bioaudio.data.audio import decode_failure_reason
    from bioaudio.distributed import any_process
    from bioaudio.fileio import write_csv_atomic
    from bioaudio.training.rundir import read_skipped

    failed = dataset.clips.failed_paths(any_process(trainer.accelerator))
    if not trainer.is_main_process:
        return
    rows = {str(p): str(r) for p, r in zip(skipped["path"], skipped["reason"])}
    before = len(rows)
    for path, reason in read_skipped(csv).items():  # a resumed run's earlier sessions
        rows.setdefault(path, reason)
    for path in failed:
        rows.setdefault(path, decode_failure_reason(path))
    if len(rows) > before:
        table = pd.DataFrame(list(rows.items()), columns=["path", "reason"])
        write_csv_atomic(table, csv)
        say(
            f"note: {len(rows) - before} file(s) could not be read during training and were "
            f"skipped; {len(rows)} in all listed in {csv}"
        )
