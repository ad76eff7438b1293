"""BEATs pretraining, the seed project's command, on the bioaudio engine.

    accelerate launch beats/train.py --data_dir recordings/ --output_dir runs/beats
    python beats/train.py --data_dir recordings/ --output_dir runs/beats --preset tiny --epochs 1
    accelerate launch beats/train.py --data_dir recordings/ --output_dir runs/beats_cont \\
        --model_path BEATs_iter3_plus_AS2M.pt --lr 5e-5
    python beats/train.py ... --tokenizer runs/tokenizer/export      (iteration 2+)

Iteration 2+: train the next tokenizer from this run's export, then pretrain against it:
    bioaudio pretrain recordings/ --model beats --objective beats_tokenizer \\
        --beats_tokenizer.teacher runs/beats/export --out runs/tokenizer

The flags are mapped onto `bioaudio.training.pretrain.PretrainOptions` and the run is
`bioaudio.training.pretrain.pretrain()`: the same loop, run directory (config.json, metrics.csv,
state/, export/, summary.json), resume and export as `bioaudio pretrain --model beats`. The
objective is BEATs masked-token prediction plus the memory-bank term
(`beats:1,memory_bank:0.1`), with `supervised:W` added by --supervised_weight W > 0.
Run the same command again to continue an interrupted run (--resume auto).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python beats/train.py`, `accelerate launch beats/train.py`): Python puts
    # beats/ first on sys.path (its modules would shadow top-level names) and not the repo root.
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "beats"]
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
from typing import Any  # noqa: E402

from bioaudio.config import ArgumentParser, from_dict  # noqa: E402
from bioaudio.errors import BioaudioError, ConfigError  # noqa: E402
from bioaudio.training.pretrain import PretrainOptions  # noqa: E402

PROG = "beats/train.py"

# seed flag -> PretrainOptions field (same meaning, the engine's name)
FLAG_FIELDS = {
    "output_dir": "out",
    "model_path": "model_path",
    "positive_dir": "positive_dir",
    "negative_dir": "negative_dir",
    "labeled_dir": "labeled_dir",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "checkpoint_freq": "save_every",
    "segment_duration": "segment_duration",
    "batch_size": "batch_size",
    "lr": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "preset": "preset",
    "resume": "resume",
    "seed": "seed",
    "num_workers": "num_workers",
    "log_every": "log_every",
}


def build_parser() -> ArgumentParser:
    """The seed command's flags (one-line errors, exit 2)."""
    p = ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--data_dir", type=Path, required=True, help="folder of unlabelled audio (any layout)")
    a("--output_dir", type=Path, default=Path("runs/beats"), help="run directory")
    a("--model_path", type=Path, help="continue from an official BEATs .pt or our BEATs export")
    a("--positive_dir", type=Path, help="clips that are positives of each other (memory bank)")
    a("--negative_dir", type=Path, help="clips that are only ever negatives (memory bank)")
    a("--labeled_dir", type=Path, help="labelled clips (labels.csv or class folders)")
    a(
        "--supervised_weight",
        type=float,
        default=0.0,
        help="weight of the supervised term on --labeled_dir clips (0: off)",
    )
    a(
        "--memory_bank_weight",
        type=float,
        default=0.1,
        help="weight of the memory-bank contrastive term (0: off)",
    )
    a("--epochs", type=float, help="passes over the data (default 10 unless --max_steps)")
    a("--max_steps", type=int, help="optimizer steps (instead of --epochs)")
    a("--checkpoint_freq", type=int, help="save a resumable state every N optimizer steps")
    a("--segment_duration", type=float, help="seconds per training segment")
    a("--batch_size", type=int, help="global batch per optimizer step")
    a("--lr", type=float, help="peak learning rate")
    a("--gradient_accumulation_steps", type=int, help="micro-batches per optimizer step")
    a("--encoder_layers", type=int, help="transformer layers of a new encoder")
    a(
        "--encoder_embed_dim",
        type=int,
        help="width of a new encoder (heads kept dividing it, feed-forward 4x)",
    )
    a("--preset", help="encoder preset of a new model: tiny | small | base")
    a(
        "--tokenizer",
        help="label source: random (iteration 1, default) or a tokenizer folder / official "
        "Tokenizer_iter3*.pt",
    )
    a("--resume", help="auto (default: continue the newest state) | none | a state or run dir")
    a("--seed", type=int, help="seed of initialisation, data order and masks")
    a("--num_workers", type=int, help="DataLoader worker processes")
    a("--log_every", type=int, help="write a metrics.csv row every N steps")
    return p


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(max(1, min(at_most, n)), 0, -1) if n % d == 0)


def encoder_overrides(preset: str, layers: int | None, embed_dim: int | None) -> dict[str, Any]:
    """--encoder_layers / --encoder_embed_dim as BEATs config overrides of `preset`. A new
    width keeps the preset's heads (and positional-conv groups) when they divide it, else the
    largest count below that does, and sets the feed-forward width to 4x."""
    from beats.model import BEATsConfig

    out: dict[str, Any] = {}
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--encoder_layers must be a positive integer, got {layers}")
        out["encoder_layers"] = layers
    if embed_dim is not None:
        if embed_dim < 1:
            raise ConfigError(f"--encoder_embed_dim must be a positive integer, got {embed_dim}")
        base = BEATsConfig.preset(preset)
        out["encoder_embed_dim"] = embed_dim
        out["encoder_attention_heads"] = _largest_divisor(embed_dim, base.encoder_attention_heads)
        out["conv_pos_groups"] = _largest_divisor(embed_dim, base.conv_pos_groups)
        out["encoder_ffn_embed_dim"] = 4 * embed_dim
    return out


def objective_spec(memory_bank_weight: float, supervised_weight: float) -> str:
    """The objective mix: masked-token prediction, plus the memory bank and supervised terms."""
    for flag, w in (
        ("--memory_bank_weight", memory_bank_weight),
        ("--supervised_weight", supervised_weight),
    ):
        if not w >= 0:
            raise ConfigError(f"{flag} must be >= 0, got {w}")
    terms = ["beats:1"]
    if memory_bank_weight > 0:
        terms.append(f"memory_bank:{memory_bank_weight:g}")
    if supervised_weight > 0:
        terms.append(f"supervised:{supervised_weight:g}")
    return ",".join(terms)


def build_options(argv: list[str] | None = None) -> tuple[Path, PretrainOptions]:
    """Parse the seed flags -> (data folder, resolved PretrainOptions). Nothing is trained."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {"model": "beats"}
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            values[name] = value
    if args.encoder_layers is not None or args.encoder_embed_dim is not None:
        if args.model_path is not None:
            raise ConfigError(
                "--encoder_layers / --encoder_embed_dim shape a new encoder; --model_path "
                "continues an existing one"
            )
        preset = args.preset or PretrainOptions.preset
        values["encoder_options"] = encoder_overrides(
            preset, args.encoder_layers, args.encoder_embed_dim
        )
    values["objective"] = objective_spec(args.memory_bank_weight, args.supervised_weight)
    if args.tokenizer is not None:
        values["objectives"] = {"beats": {"tokenizer": args.tokenizer}}
    cfg = from_dict(PretrainOptions, values, where=PROG)
    cfg.validate()
    return args.data_dir, cfg


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 when done, 2 for bad input (one line on stderr), 130 if interrupted."""
    from bioaudio.cli import one_line
    from bioaudio.training.experiment import say
    from bioaudio.training.pretrain import pretrain

    try:
        data, cfg = build_options(argv)
        if not data.exists():
            raise ConfigError(f"--data_dir {data}: no such folder or manifest")
        summary = pretrain(data, cfg, say=say)
    except BioaudioError as e:
        sys.stderr.write(f"{PROG}: error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    if summary["status"] != "completed":
        say(f"interrupted at step {summary['steps']}; run the same command again to continue")
        return 130
    loss = summary.get("final_loss")  # None on the other processes (the main one logs)
    say(f"pretrained model: {summary['export']}" + (f" (loss {loss:.4g})" if loss else ""))
    say(f"run directory: {cfg.out} (metrics.csv, config.json, state/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
