"""The one command-line front door: `bioaudio COMMAND ...` (also `python -m bioaudio COMMAND`).

Commands are registered by name with the module that implements them; a module is imported only
when its command runs, so `bioaudio --help` stays instant. A command module defines
`add_arguments(parser)` and `run(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from bioaudio import runinfo, runlog
from bioaudio.config import ArgumentParser
from bioaudio.errors import BioaudioError

# name -> (module, one-line help). Keep in the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bioaudio.commands.demo", "run the whole job end to end on generated demo audio"),
    "demo-data": (
        "bioaudio.commands.demo_data",
        "generate the small synthetic bioacoustic demo dataset",
    ),
    "prepare": (
        "bioaudio.commands.prepare",
        "scan a folder of audio into a manifest (labels, skips)",
    ),
    "split": (
        "bioaudio.commands.split",
        "seeded stratified / grouped / k-fold splits of a manifest",
    ),
    "stats": ("bioaudio.commands.stats", "fbank mean/std over a manifest sample, for training"),
    "features": ("bioaudio.commands.features", "precompute frontend features into a cache"),
    "preview": ("bioaudio.commands.preview", "grid PNG of spectrograms per class"),
    "train-baseline": ("bioaudio.commands.train_baseline", "train CNN baselines over seeds"),
    "pretrain": (
        "bioaudio.commands.pretrain",
        "self-supervised pretraining of an EAT / BEATs encoder on unlabelled audio",
    ),
    "finetune": (
        "bioaudio.commands.finetune",
        "finetune a BEATs / EAT encoder into a classifier over seeds and folds",
    ),
    "infer": ("bioaudio.commands.infer", "classify a file or a folder with a trained model"),
    "evaluate": (
        "bioaudio.commands.evaluate",
        "test metrics, confusion matrix and PR curves of a classifier on a labelled manifest",
    ),
    "detect": (
        "bioaudio.commands.detect",
        "detect calls in long recordings: events, Raven selection tables",
    ),
    "embed": ("bioaudio.commands.embed", "export window embeddings of audio to Parquet"),
    "explore": ("bioaudio.commands.explore", "open the embedding explorer app (Streamlit)"),
    "plot-embeddings": (
        "bioaudio.commands.plot_embeddings",
        "static t-SNE / UMAP map grids of an embeddings file (PNG)",
    ),
    "convert": (
        "bioaudio.commands.convert",
        "convert an official BEATs / EAT checkpoint to our export",
    ),
    "info": (
        "bioaudio.commands.info",
        "provenance, size and results of a run, an experiment or an export",
    ),
    "bench": (
        "bioaudio.commands.bench",
        "run the benchmark suite: speed and memory ratios measured side by side",
    ),
}


def one_line(e: BaseException) -> str:
    """The message of `e` on one line; errors re-raised from DataLoader workers carry a traceback."""
    msg = str(e)
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1]
    return " ".join(msg.split())


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="bioaudio",
        description="Pretrain, finetune, evaluate and explore BEATs / EAT audio encoders.",
    )
    parser.add_argument(
        "--version", action="version", version=f"bioaudio {runinfo.bioaudio_version()}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    # Users see "warning: ..." lines, not source file paths and line numbers.
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        top.parse_args(argv)
    name = argv[0]
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        sys.stderr.write(
            f"bioaudio: error: unknown command {name!r}{hint}; see `bioaudio --help`\n"
        )
        return 2
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = ArgumentParser(
        prog=f"bioaudio {name}",
        description=module.__doc__ or help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    # `--config RUN_DIR/config.json` refuses a run config written by another command.
    parser.set_defaults(bioaudio_command=name)
    args = parser.parse_args(argv[1:])
    runinfo.set_command_line(["bioaudio", *argv])
    # The session tees everything printed (errors included) into the log.txt a command
    # attaches, turns progress into status lines off a terminal and counts repeated warnings.
    with runlog.session():
        try:
            code = module.run(args)
        except BioaudioError as e:
            sys.stderr.write(f"bioaudio {name}: error: {one_line(e)}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write(f"bioaudio {name}: interrupted\n")
            return 130
        except MemoryError:
            sys.stderr.write(
                f"bioaudio {name}: error: out of memory (try a smaller --batch_size)\n"
            )
            return 1
        except FileNotFoundError as e:
            sys.stderr.write(f"bioaudio {name}: error: file not found: {e.filename or e}\n")
            return 2
        except OSError as e:
            # An output that cannot be written (read-only place, a parent that is a file, a
            # full disk): the path and the reason, not a traceback.
            if e.errno is None:
                raise
            reason = e.strerror or one_line(e)
            where = f": {e.filename}" if e.filename else ""
            sys.stderr.write(f"bioaudio {name}: error: {reason}{where}\n")
            return 2
    if os.environ.get("BIOAUDIO_DEBUG"):
        sys.stderr.write(f"bioaudio {name}: exit {code or 0}\n")
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
