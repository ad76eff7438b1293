"""What a run directory, an experiment root or an export is: its provenance (command line,
versions, git commit, machine, seeds, data fingerprint), the model's size and the training
summary (status, steps, final loss, best metric, test metrics). `bioaudio info` prints it.

    run directory     config.json written by a training command (+ summary.json, export/, ...)
    experiment root   run directories below it (seed_N/, fold_K/seed_N/) and run_summary.csv
    export            config.json with the bioaudio.export marker + model.safetensors
    official file     a BEATs / EAT checkpoint `load_model` reads (not ours: said so)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bioaudio.config import is_run_config
from bioaudio.errors import BioaudioError, ConfigError, first_line

TEST_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "mAP", "auroc", "micro_f1")


@dataclass
class Description:
    """`kind` (run, experiment, export, official, product), its `path` and the facts (`data`,
    JSON-ready); `text()` is what `bioaudio info` prints."""

    kind: str
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return {
            "run": _run_text,
            "experiment": _experiment_text,
            "export": _export_text,
            "product": _export_text,
            "official": _official_text,
        }[self.kind](self)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({first_line(e)})") from e


def describe(path: str | Path) -> Description:
    """Describe a run directory, an experiment root, an export or an official checkpoint file;
    ConfigError (one line) for anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{p}: no such file or folder")
    if p.is_file() and p.name in ("config.json", "summary.json"):
        p = p.parent
    if p.is_dir():
        cfg = _read_json(p / "config.json")
        if cfg is not None:
            if not isinstance(cfg, dict):
                raise ConfigError(f"{p / 'config.json'}: not a bioaudio config (not a mapping)")
            fmt = cfg.get("format")
            if fmt == "bioaudio.export":
                return _export(p, cfg)
            if isinstance(fmt, str) and fmt.startswith("bioaudio."):
                return Description("product", p, _export_facts(p, cfg, load=False))
            if is_run_config(cfg) or {"identity", "train"} <= set(cfg):
                return _run(p, cfg)
            return _official(p, other_config=p / "config.json")
        if (p / "summary.json").is_file():
            raise ConfigError(f"{p}: a run directory without its config.json")
        runs = find_runs(p)
        if runs:
            return _experiment(p, runs)
        raise ConfigError(
            f"{p}: not a run directory, an experiment root or an export (no config.json, "
            "and no run directories below it)"
        )
    return _official(p)


def find_runs(root: Path) -> list[Path]:
    """Run directories one or two levels below `root` (seed_N/, fold_K/seed_N/, ...)."""
    found = []
    for cfg_path in sorted([*root.glob("*/config.json"), *root.glob("*/*/config.json")]):
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and (is_run_config(cfg) or {"identity", "train"} <= set(cfg)):
            found.append(cfg_path.parent)
    return found


# ----------------------------------------------------------------------------------------------
# Facts


def _parameters(path: Path, problems: list[str] | None = None) -> int | None:
    """Parameter count of a loadable model; None (and why, in `problems`) when it cannot load."""
    from bioaudio.models.checkpoint import load_model

    try:
        model = load_model(path)
    except BioaudioError as e:
        if problems is not None:
            problems.append(f"{path} cannot be loaded: {e}")
        return None
    return int(sum(p.numel() for p in model.parameters()))


def _export_facts(p: Path, cfg: dict[str, Any], load: bool = True) -> dict[str, Any]:
    enc = cfg.get("encoder") if isinstance(cfg.get("encoder"), dict) else {}
    base = cfg.get("baseline") if isinstance(cfg.get("baseline"), dict) else {}
    problems: list[str] = []
    return {
        "path": str(p.resolve()),
        "format": cfg.get("format"),
        "model_type": cfg.get("model_type") or cfg.get("tokenizer_type"),
        "architecture": base.get("name") or enc.get("preset") or None,
        "parameters": _parameters(p, problems) if load else None,
        "problems": problems,
        "class_names": cfg.get("class_names") or [],
        "multi_label": cfg.get("multi_label"),
        "provenance": cfg.get("provenance") or {},
    }


def _export(p: Path, cfg: dict[str, Any]) -> Description:
    return Description("export", p, _export_facts(p, cfg))


def _official(p: Path, other_config: Path | None = None) -> Description:
    from bioaudio.models import registry
    from bioaudio.models.checkpoint import detect_format, load_model

    try:
        kind, _, _ = detect_format(p)
        if kind == "export":  # a file of one of our exports
            return _export(p.parent, _read_json(p.parent / "config.json"))
        model = load_model(p)
    except BioaudioError as e:
        if other_config is not None:
            raise ConfigError(
                f"{other_config}: not written by bioaudio (neither a run's config nor an "
                "export's) and not a checkpoint bioaudio reads"
            ) from e
        reason = first_line(e).removeprefix(f"{p}: ")
        raise ConfigError(
            f"{p}: not a run directory, an export or a checkpoint bioaudio reads ({reason})"
        ) from e
    fmt = (getattr(model, "provenance", None) or {}).get("source_format")
    try:
        what = registry.get_format(fmt).description if fmt else None
    except Exception:  # an unknown name only loses the description
        what = None
    return Description(
        "official",
        p,
        {
            "path": str(p.resolve()),
            "source_format": fmt,
            "format_description": what,
            "model_type": getattr(model, "model_type", None),
            "model": model.describe() if hasattr(model, "describe") else type(model).__name__,
            "parameters": int(sum(t.numel() for t in model.parameters())),
            "class_names": list(getattr(model, "class_names", None) or []),
        },
    )


def _run_facts(p: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    summary = _read_json(p / "summary.json") or {}
    test = _read_json(p / "test_metrics.json") or {}
    identity = cfg.get("identity") if isinstance(cfg.get("identity"), dict) else {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    run = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    exports = [n for n in ("export", "best") if (p / n / "config.json").is_file()]
    return {
        "path": str(p.resolve()),
        "command": cfg.get("command"),
        "run": run.get("name") or p.name,
        "status": summary.get("status") or "not finished (no summary.json)",
        "error": summary.get("error"),
        "steps": summary.get("steps"),
        "max_steps": summary.get("max_steps") or train.get("max_steps"),
        "final_loss": summary.get("final_loss"),
        "best": summary.get("best"),
        "eval": summary.get("eval"),
        "test": {k: test[k] for k in TEST_KEYS if isinstance(test.get(k), (int, float))},
        "model": identity.get("model"),
        "architecture": identity.get("baseline") or identity.get("model_type"),
        "parameters": identity.get("parameters"),
        "exports": exports,
        "resources": {
            k: summary.get(k)
            for k in ("peak_rss_mb", "cuda_peak_mb", "data_wait", "samples_per_s", "train_time_s")
            if summary.get(k) is not None
        },
        "provenance": cfg.get("provenance") or {},
    }


def _run(p: Path, cfg: dict[str, Any]) -> Description:
    facts = _run_facts(p, cfg)
    if facts["exports"]:
        # The model as exported (training bundles also count decoders, teachers, ...).
        facts["export_parameters"] = _parameters(p / facts["exports"][0])
    return Description("run", p, facts)


def _experiment(root: Path, runs: list[Path]) -> Description:
    facts = [_run_facts(r, _read_json(r / "config.json")) for r in runs]
    for f, r in zip(facts, runs):
        f["run"] = str(r.relative_to(root))
    summary_path = root / "run_summary.csv"
    spread: dict[str, Any] = {}
    if summary_path.is_file():
        import pandas as pd

        table = pd.read_csv(summary_path)
        rows = table.set_index("run") if "run" in table else None
        if rows is not None and {"mean", "std"} <= set(rows.index):
            for col in [c for c in table.columns if c.startswith("test_")]:
                mean, std = rows.loc["mean", col], rows.loc["std", col]
                spread[col] = {"mean": _num(mean), "std": _num(std)}
    commands = sorted({str(f["command"]) for f in facts})
    return Description(
        "experiment",
        root,
        {
            "path": str(root.resolve()),
            "commands": commands,
            "runs": facts,
            "run_summary": str(summary_path) if summary_path.is_file() else None,
            "summary": spread,
        },
    )


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


# ----------------------------------------------------------------------------------------------
# Text


def _g(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _provenance_lines(prov: dict[str, Any]) -> list[str]:
    env = prov.get("environment") if isinstance(prov.get("environment"), dict) else {}
    tr = prov.get("training") if isinstance(prov.get("training"), dict) else {}
    lines = []
    if env:
        launch = f" (accelerate launch, {env['world_size']} processes)" if (
            env.get("world_size") or 1
        ) > 1 else ""  # fmt: skip
        lines.append(f"  command     {env.get('command_line', '?')}{launch}")
        git = env.get("git_commit")
        git_s = f", git {git[:12]}{' (dirty)' if env.get('git_dirty') else ''}" if git else ""
        lines.append(
            f"  software    bioaudio {env.get('bioaudio_version')}{git_s}; Python "
            f"{env.get('python')}, torch {env.get('torch')}, torchaudio {env.get('torchaudio')}, "
            f"accelerate {env.get('accelerate')}"
        )
        gpus = ", ".join(env.get("gpus") or []) or "none"
        lines.append(
            f"  machine     {env.get('host')}: {env.get('cpu')} x{env.get('cpu_count')}; "
            f"GPUs {gpus}"
        )
    if tr:
        lines.append(
            f"  training    device {tr.get('device')}, {tr.get('num_processes')} process(es), "
            f"{tr.get('precision')}" + (f", step {tr['step']}" if "step" in tr else "")
        )
        seeds = tr.get("seeds") or {}
        if seeds:
            lines.append("  seeds       " + ", ".join(f"{k} {v}" for k, v in seeds.items()))
        data = tr.get("data") if isinstance(tr.get("data"), dict) else None
        if data:
            hours = data.get("duration_s")
            lines.append(
                f"  data        {data.get('path')}: {data.get('rows')} rows, "
                f"{_g(hours / 3600 if hours is not None else None, '.3f')} h, sha256 "
                f"{str(data.get('sha256'))[:16]}"
            )
    if not lines:
        lines.append("  provenance  none recorded (written by an older bioaudio)")
    return lines


def _status(f: dict[str, Any]) -> str:
    s = f"{f['status']}: {f.get('steps', '-')}/{f.get('max_steps', '-')} steps"
    if f.get("final_loss") is not None:
        s += f", final loss {_g(f['final_loss'])}"
    if f.get("error"):
        s += f" ({f['error']})"
    return s


def _best(f: dict[str, Any]) -> str | None:
    b = f.get("best")
    if not isinstance(b, dict):
        return None
    return f"{b.get('metric')} {_g(b.get('value'))} at step {b.get('step')}"


def _run_text(d: Description) -> str:
    f = d.data
    lines = [f"run directory {f['path']} (bioaudio {f['command']}, run {f['run']})"]
    lines.append(f"  status      {_status(f)}")
    if _best(f):
        lines.append(f"  best        {_best(f)}")
    if f["test"]:
        lines.append("  test        " + ", ".join(f"{k} {_g(v)}" for k, v in f["test"].items()))
    size = f.get("export_parameters") or f.get("parameters")
    where = f" ({f['exports'][0]}/)" if f.get("export_parameters") else ""
    # The architecture (tiny_mel_cnn, eat, ...) says more than the training wrapper's class.
    name = f.get("architecture") or f.get("model")
    lines.append(f"  model       {name}, {_g(size, ',')} parameters{where}")
    r = f["resources"]
    if r:
        parts = []
        if "peak_rss_mb" in r:
            parts.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
        if "cuda_peak_mb" in r:
            parts.append(f"peak CUDA memory {r['cuda_peak_mb']:.0f} MB")
        if "data_wait" in r:
            parts.append(f"data wait {100 * r['data_wait']:.1f} %")
        if "samples_per_s" in r:
            parts.append(f"{r['samples_per_s']:.4g} clips/s")
        if "train_time_s" in r:
            parts.append(f"{r['train_time_s']:.0f} s training")
        lines.append("  resources   " + ", ".join(parts))
    return "\n".join(lines + _provenance_lines(f["provenance"]))


def _experiment_text(d: Description) -> str:
    f = d.data
    runs = f["runs"]
    head = f"experiment root {f['path']}: {len(runs)} run(s) of bioaudio {', '.join(f['commands'])}"
    test_keys = [k for k in TEST_KEYS if any(k in r["test"] for r in runs)][:2]
    rows = [["run", "status", "steps", "final loss", "best", *(f"test {k}" for k in test_keys)]]
    for r in runs:
        b = r.get("best") or {}
        rows.append([
            r["run"], r["status"].split(" ")[0], f"{r.get('steps', '-')}/{r.get('max_steps', '-')}",
            _g(r.get("final_loss")), f"{b.get('metric', '-')} {_g(b.get('value'))}" if b else "-",
            *(_g(r["test"].get(k)) for k in test_keys),
        ])  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows
    ]
    spread = [
        f"{col} {v['mean']:.4f}" + (f" +- {v['std']:.4f}" if v["std"] is not None else "")
        for col, v in f["summary"].items()
        if v["mean"] is not None
    ]
    if spread:
        lines.append(f"  mean +- std {', '.join(spread)} ({f['run_summary']})")
    lines.append(f"provenance of {runs[0]['run']}:")
    return "\n".join(lines + _provenance_lines(runs[0]["provenance"]))


def _export_text(d: Description) -> str:
    f = d.data
    what = "export" if d.kind == "export" else f"{f.get('format')} folder"
    lines = [f"{what} {f['path']}"]
    arch = f" ({f['architecture']})" if f.get("architecture") else ""
    size = f", {_g(f['parameters'], ',')} parameters" if f.get("parameters") else ""
    lines.append(f"  model       {f.get('model_type')}{arch}{size}")
    names = f.get("class_names") or []
    if names:
        kind = "multi-label" if f.get("multi_label") else "single-label"
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        lines.append(f"  classes     {len(names)} ({kind}): {shown}")
    prov = f.get("provenance") or {}
    made = [f"{k} {prov[k]}" for k in ("created", "task", "command", "source") if prov.get(k)]
    if made:
        lines.append("  made        " + ", ".join(made))
    lines += [f"  PROBLEM     {problem}" for problem in f.get("problems") or []]
    return "\n".join(lines + _provenance_lines(prov))


def _official_text(d: Description) -> str:
    f = d.data
    what = f.get("format_description") or f.get("source_format") or "a checkpoint"
    lines = [
        f"official checkpoint {f['path']}: {what}",
        f"  model       {f.get('model')}, {_g(f['parameters'], ',')} parameters",
    ]
    if f.get("class_names"):
        lines.append(f"  classes     {len(f['class_names'])}")
    lines.append(
        "  note        not a bioaudio export (no provenance): load_model and every command read "
        "it as is; `bioaudio convert` writes it as an export"
    )
    return "\n".join(lines)
