"""Convert an official BEATs / EAT checkpoint (or re-export one of ours) to a bioaudio export
folder (model.safetensors + config.json), verified by reloading it and comparing outputs.
SRC is an official BEATs .pt, an EAT fairseq .pt, an EAT Hugging Face folder or .safetensors
file, or an export. Example: bioaudio convert BEATs_iter3_plus_AS2M.pt checkpoints/beats_iter3p.
An existing DST is replaced only with --force, and only when it is an empty folder or an export
(tokenizer) folder holding nothing but its config.json and weights: anything else in it is refused.
See checkpoints/README.md for every official checkpoint and its command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bioaudio.config import add_dataclass_args, config_from_args
from bioaudio.errors import CheckpointError, ConfigError
from bioaudio.fileio import check_writable, temp_dir_beside
from bioaudio.models import registry
from bioaudio.models.checkpoint import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    WEIGHTS_FILE,
    checkpoint_kind,
    detect_format,
    install_dir,
    load_export,
    load_model,
    load_tokenizer,
    save_tokenizer,
    write_export,
)


@dataclass
class ConvertOptions:
    """Options of `bioaudio convert` (SRC and DST are positional)."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "config.json of a bare EAT .safetensors file (default: the one beside it)"
        },
    )
    force: bool = field(
        default=False,
        metadata={"help": "replace DST if it is an existing export (config.json + weights only)"},
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "class names: a text file (one per line) or a CSV with a display_name / name "
            "/ label column, e.g. AudioSet's class_labels_indices.csv"
        },
    )
    ema: bool = field(
        default=False, metadata={"help": "EAT fairseq pretraining file: export the EMA teacher"}
    )
    verify: bool = field(
        default=True, metadata={"help": "reload the export and compare outputs with the source"}
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official checkpoint file or folder, or a bioaudio export")
    parser.add_argument("dst", help="export folder to write")
    add_dataclass_args(parser, ConvertOptions)


def read_class_names(path: str | Path) -> list[str]:
    """One name per line, or the name column of a CSV with a header."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--class_names: no such file {p}")
    text = p.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text.strip() else ""
    if p.suffix.lower() in (".csv", ".tsv") or "," in first:
        rows = list(
            csv.DictReader(text.splitlines(), delimiter="\t" if p.suffix == ".tsv" else ",")
        )
        for col in ("display_name", "name", "label", "class"):
            if rows and col in rows[0]:
                return [r[col].strip() for r in rows]
        raise ConfigError(f"--class_names: {p} has no display_name / name / label / class column")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"--class_names: {p} is empty")
    return names


# What an export / a tokenizer folder holds: --force replaces a DST holding nothing else
OWN_ENTRIES = {
    EXPORT_FORMAT: {CONFIG_FILE, WEIGHTS_FILE},
    "bioaudio.tokenizer": {CONFIG_FILE, "tokenizer.safetensors"},
}


def _folder_format(folder: Path) -> str | None:
    """The "format" marker of the config.json in `folder`, if any."""
    try:
        marker = json.loads((folder / CONFIG_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return marker if isinstance(marker, str) else None


def check_replaceable(dst: Path) -> None:
    """One-line ConfigError unless the existing `dst` may be replaced (--force): an empty folder,
    or an export / tokenizer folder holding only its own files (config.json and weights)."""
    if not dst.is_dir():
        raise ConfigError(f"{dst} exists and is not a folder; refusing to replace it")
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in dst.iterdir())
    fmt = _folder_format(dst)
    extra = [e for e in entries if e not in OWN_ENTRIES.get(fmt or "", set())]
    if not extra:
        return
    shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    if fmt not in OWN_ENTRIES:
        raise ConfigError(
            f"{dst} exists and is not a bioaudio export (it holds {shown}); refusing to replace it"
        )
    raise ConfigError(
        f"{dst} holds {shown} besides the export; refusing to replace it (--force replaces only "
        "an export folder or an empty one: move those away or choose another DST)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def compare_outputs(a: torch.nn.Module, b: torch.nn.Module, seed: int = 0) -> float:
    """Max |difference| of tokens, CLS and logits of two models on a padded random batch
    (logits only for models without an encoder, e.g. CNN baselines)."""
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(2, 32000, generator=g)
    pad = torch.zeros(2, 32000, dtype=torch.bool)
    pad[1, 20800:] = True
    wav[pad] = 0.0
    if not hasattr(a, "features"):
        return float((a(wav, pad) - b(wav, pad)).abs().max())
    oa, ob = a.features(wav, pad), b.features(wav, pad)
    diffs = [(oa.tokens - ob.tokens).abs().max()]
    if oa.cls is not None and ob.cls is not None:
        diffs.append((oa.cls - ob.cls).abs().max())
    if a.head is not None and b.head is not None:
        diffs.append((a.classify(oa) - b.classify(ob)).abs().max())
    return float(torch.stack(diffs).max())


def _describe(model) -> list[str]:
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"  model       {model.describe()}, {n_params / 1e6:.1f}M parameters"]
    head_cfg = getattr(model, "head_cfg", None)
    kind = "multi-label" if model.multi_label else "single-label"
    if head_cfg is not None:
        lines.append(
            f"  head        {head_cfg.pooling} pooling, {head_cfg.num_classes} classes ({kind})"
        )
    elif getattr(model, "class_names", None) and not hasattr(model, "encoder"):
        lines.append(f"  classes     {len(model.class_names)} ({kind})")
    else:
        lines.append("  head        none (encoder only: embeddings / features)")
    fe = model.frontend_cfg
    stats = fe.normalisation()
    norm = f", mean {stats[0]}, std {stats[1]}" if stats else ""
    lines.append(f"  frontend    {fe.kind}, {fe.sample_rate} Hz{norm}")
    return lines


def _convert_tokenizer(src: Path, dst: Path) -> int:
    """An official BEATs tokenizer -> a tokenizer folder (tokenizer.safetensors + config.json)."""
    tok = load_tokenizer(src)
    provenance = (
        {"source": str(src.resolve()), "source_sha256": _sha256(src)} if src.is_file() else {}
    )
    save_tokenizer(tok, dst, provenance)
    again = load_tokenizer(dst)
    n = sum(t.numel() for t in tok.state_dict().values())
    same = all(
        torch.equal(a, b) for a, b in zip(tok.state_dict().values(), again.state_dict().values())
    )
    if not same:
        raise CheckpointError("verification failed: the reloaded tokenizer differs")
    print(f"converted {src} (tokenizer, {n / 1e6:.1f}M values) -> {dst}")
    print(f"  use it with: bioaudio pretrain DATA --model beats --beats.tokenizer {dst}")
    return 0


def run(args: argparse.Namespace) -> int:
    opts = config_from_args(ConvertOptions, args)
    src, dst = Path(args.src), Path(args.dst)
    check_writable(dst, "DST")
    kind, weights, _ = detect_format(src, opts.config)
    if (dst.exists() or dst.is_symlink()) and not opts.force:
        raise ConfigError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() or dst.is_symlink():
        check_replaceable(dst)
    if dst.resolve() == src.resolve():
        raise ConfigError("SRC and DST are the same path")
    if checkpoint_kind(src, opts.config) == "tokenizer":
        return _convert_tokenizer(src, dst)
    names = read_class_names(opts.class_names) if opts.class_names else None
    steps = 4 + int(opts.verify)
    # disable=None: no bar when stderr is not a terminal (logs, CI).
    with tqdm(total=steps, desc="convert", unit="step", leave=False, disable=None) as bar:
        bar.set_postfix_str(f"reading {src.name}")
        model = load_model(src, config=opts.config, ema=opts.ema)
        bar.update()
        if names is not None:
            if getattr(model, "head_cfg", None) is None:
                raise ConfigError(f"--class_names given but {src} has no classification head")
            if len(names) != model.head_cfg.num_classes:
                raise ConfigError(
                    f"--class_names: {len(names)} names for {model.head_cfg.num_classes} classes"
                )
            model.class_names = names
        bar.set_postfix_str("hashing the source")
        source_file = weights if weights.is_file() else weights / WEIGHTS_FILE
        provenance = {"source_sha256": _sha256(source_file) if source_file.is_file() else None}
        bar.update()
        tmp = temp_dir_beside(dst)
        try:
            bar.set_postfix_str("writing")
            write_export(model, tmp, provenance)
            bar.update()
            diff = None
            if opts.verify:
                bar.set_postfix_str("verifying")
                diff = compare_outputs(model, load_export(tmp))
                if diff > 1e-5:
                    raise CheckpointError(
                        f"verification failed: the reloaded export differs by {diff:.2e}"
                    )
                bar.update()
            install_dir(tmp, dst)
            bar.update()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fmt = model.provenance.get("source_format")
    what = registry.get_format(fmt).description if fmt else "bioaudio export"
    print(f"converted {src} ({what}) -> {dst}")
    for line in _describe(model):
        print(line)
    if diff is not None:
        print(f"  verified    reloaded export reproduces the source (max |diff| {diff:.1e})")
    size = (dst / WEIGHTS_FILE).stat().st_size / 2**20
    print(f"  wrote       {dst / WEIGHTS_FILE} ({size:.1f} MiB), {dst / 'config.json'}")
    return 0
