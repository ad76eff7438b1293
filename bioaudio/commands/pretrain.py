"""Self-supervised pretraining of an EAT or BEATs encoder on your own unlabelled recordings.

DATA is a folder of audio (any layout; labels are ignored unless the supervised term is used) or
a manifest from `bioaudio prepare`. Long recordings are cut into --segment_duration windows read
by seeking. The run directory (--out) holds config.json, metrics.csv, state/step_N/ (resumable:
run the same command again), export/ (the pretrained model: `bioaudio finetune`, `bioaudio embed`
and `load_model` take it) and skipped.csv.

Objectives (--objective NAME:WEIGHT,...; options as --NAME.OPTION):
{objectives}

Examples:
  bioaudio pretrain recordings/ --out runs/eat_small --preset small --max_steps 2000
  bioaudio pretrain recordings/ --out runs/eat_cont --model_path EAT-base_epoch30_pt.pt --lr 5e-5
  bioaudio pretrain recordings/ --out runs/pos --positive_dir calls/ --negative_dir noise/
  accelerate launch --multi_gpu --num_processes 4 -m bioaudio pretrain ... (several GPUs)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bioaudio.config import add_dataclass_args, add_options, config_from_args, from_dict
from bioaudio.fileio import check_writable
from bioaudio.models import registry
from bioaudio.training.experiment import say
from bioaudio.training.pretrain import PretrainOptions, pretrain


def _objective_configs() -> dict[str, type]:
    out = {}
    for name in registry.objective_names():
        cls = getattr(registry.objective_class(name), "config_class", None)
        if cls is not None:
            out[name] = cls
    return out


def describe_objectives() -> str:
    lines = []
    for name in registry.objective_names():
        spec = registry.get_objective(name)
        lines.append(f"  {name:<16} ({', '.join(spec.model_types)}) {spec.description}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.format(objectives=describe_objectives())
    parser.add_argument("data", type=Path, help="folder of audio, or a manifest CSV")
    add_options(parser, PretrainOptions)
    for name, cls in _objective_configs().items():
        add_dataclass_args(parser, cls, prefix=f"{name}.")


def run(args: argparse.Namespace) -> int:
    configs = _objective_configs()
    flags = vars(args)
    per_objective: dict[str, dict] = {}
    for key in list(flags):
        name = key.split(".", 1)[0]
        if name in configs and "." in key:
            per_objective.setdefault(name, {})[key.split(".", 1)[1]] = flags.pop(key)
    cfg = config_from_args(PretrainOptions, argparse.Namespace(**flags))
    for name, values in per_objective.items():
        merged = {**cfg.objectives.get(name, {}), **values}
        cfg.objectives[name] = dataclasses.asdict(from_dict(configs[name], merged, where=name))
    check_writable(cfg.out)
    summary = pretrain(args.data, cfg, say=say)
    if summary["status"] != "completed":
        say(f"interrupted at step {summary['steps']}; run the same command again to continue")
        return 130
    loss = summary.get("final_loss")
    say(f"pretrained model: {summary['export']}" + (f" (loss {loss:.4g})" if loss else ""))
    say(f"run directory: {cfg.out} (metrics.csv, config.json, state/)")
    return 0
