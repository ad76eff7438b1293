"""Classify audio files and folders with a trained classifier: per-file window probabilities
averaged over the file, a spectrogram plot with the prediction, predictions.csv for a folder.
(`bioaudio infer` prints the lines `infer` returns.)"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bioaudio.data import audio
from bioaudio.data.manifest import find_audio_files
from bioaudio.errors import AudioDecodeError, ConfigError, DataError
from bioaudio.fileio import check_writable, save_json_atomic, write_csv_atomic
from bioaudio.inference.predict import ClipPredictions, load_classifier, predict_clips
from bioaudio.inference.runner import WindowOptions, training_window, window_option


@dataclass
class InferConfig(WindowOptions):
    """Options of `bioaudio infer` (and of `infer`)."""

    out: Path | None = field(
        default=None, metadata={"help": "output folder (default: ./predictions_<INPUT name>)"}
    )
    window: float | None = window_option(
        "window", "window seconds (default: the model's training clip)"
    )
    hop: float | None = window_option("hop")
    top_k: int = field(default=3, metadata={"help": "classes listed per file"})
    threshold: float = field(
        default=0.5, metadata={"help": "multi-label: a class is present above this probability"}
    )
    batch_size: int = window_option("batch_size")
    num_workers: int = window_option("num_workers")
    plot_seconds: float = field(
        default=300.0,
        metadata={"help": "one file: seconds drawn (spectrogram and window probabilities)"},
    )
    cpu: bool = window_option("cpu")
    progress: bool = window_option("progress")

    def validate(self) -> None:
        super().validate()
        if self.top_k < 1:
            raise ConfigError(f"--top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--threshold must be in (0, 1), got {self.threshold}")
        if not self.plot_seconds > 0:
            raise ConfigError(f"--plot_seconds must be positive, got {self.plot_seconds}")


def _check_finite(scores: np.ndarray, what: str) -> None:
    """A model whose probabilities are NaN / inf gives no prediction: an error, never a table or
    a JSON record of NaN."""
    if not np.isfinite(scores).all():
        raise DataError(
            f"the model gave non-finite probabilities for {what}; its weights or normalisation"
            " statistics are damaged (re-export or retrain it)"
        )


def _top_k(probs: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


def _predicted(probs: np.ndarray, names: list[str], multi: bool, threshold: float) -> str:
    if multi:
        return ",".join(n for n, p in zip(names, probs) if p >= threshold)
    return names[int(np.argmax(probs))]


def plot_file_prediction(
    model: torch.nn.Module,
    path: Path,
    windows: pd.DataFrame,
    title: str,
    out: Path,
    plot_seconds: float,
    hop: float,
) -> Path:
    """The file's spectrogram (first `plot_seconds`) titled with the prediction, and below it the
    per-window class probabilities when there is more than one window."""
    import matplotlib.pyplot as plt

    from bioaudio.inference import plots  # noqa: F401 (selects the Agg backend)

    fcfg = model.frontend_cfg
    wav = audio.load(path, sample_rate=fcfg.sample_rate, duration=plot_seconds)
    device = next(model.parameters()).device
    with torch.no_grad():
        feats, _ = model.featurise(torch.from_numpy(wav)[None].to(device))
    feats = feats[0].float().cpu().numpy()  # (T, F)
    names = list(model.class_names)
    strip = len(windows) > 1
    fig, axes = plt.subplots(
        2 if strip else 1,
        1,
        figsize=(10, 3.2 + (0.25 * len(names) + 1.2 if strip else 0)),
        squeeze=False,
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, max(1.5, 0.25 * len(names))]} if strip else None,
    )
    ax = axes[0, 0]
    seconds = feats.shape[0] / fcfg.frame_rate
    ax.imshow(
        feats.T, origin="lower", aspect="auto", extent=(0, seconds, 0, feats.shape[1]), cmap="magma"
    )
    ax.set_ylabel(f"{fcfg.kind} bin")
    if not strip:
        ax.set_xlabel("time (s)")
    ax.set_xlim(0, seconds)
    shown = float(windows["start"].max()) + hop > seconds + 1e-6
    ax.set_title(title + (f"  (first {seconds:.0f} s shown)" if shown else ""), fontsize=10)
    if strip:
        probs = windows[names].to_numpy().T  # (C, W)
        ax2 = axes[1, 0]
        starts = windows["start"].to_numpy()
        im = ax2.imshow(
            probs,
            origin="lower",
            aspect="auto",
            extent=(starts[0], starts[-1] + hop, -0.5, len(names) - 0.5),
            vmin=0,
            vmax=1,
            cmap="viridis",
            interpolation="nearest",
        )
        ax2.set_yticks(range(len(names)), names, fontsize=7)
        ax2.set_xlabel("time (s)")
        ax2.set_xlim(0, seconds)
        ax2.set_title("class probability per window", fontsize=9)
        fig.colorbar(im, ax=ax2, fraction=0.03)
    from bioaudio.inference.plots import save_figure

    save_figure(fig, out)
    return out


def _probe(paths: list[Path]) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    rows, skipped = [], []
    for p in paths:
        try:
            meta = audio.info(p)
        except AudioDecodeError as e:
            skipped.append({"path": str(p), "reason": e.reason or str(e)})
            continue
        rows.append({"path": str(p), "start": 0.0, "end": meta.duration, "duration": meta.duration})
    return pd.DataFrame(rows, columns=["path", "start", "end", "duration"]), skipped


def _clip_predictions(
    model: torch.nn.Module, df: pd.DataFrame, cfg: InferConfig, window: float, device, skip: bool
) -> ClipPredictions:
    return predict_clips(
        model,
        df.assign(labels=""),
        window=window,
        hop=cfg.hop,
        labels=False,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        skip_errors=skip,
        progress=cfg.progress,
        desc="infer",
    )


def infer_file(
    model: torch.nn.Module, path: Path, out: Path, cfg: InferConfig, window: float, device
) -> dict:
    """Classify one file; write its PNG, per-window CSV and JSON record into `out`. The record
    holds the lines to print under "messages"."""
    meta = audio.info(path)
    df = pd.DataFrame([{"path": str(path), "start": 0.0, "end": meta.duration}])
    clips = _clip_predictions(model, df, cfg, window, device, skip=False)
    if len(clips.rows) == 0:
        raise DataError(f"{path}: too short to classify ({meta.duration:.3f} s)")
    _check_finite(clips.scores, str(path))
    names, multi = list(model.class_names), bool(model.multi_label)
    probs = clips.scores[0]
    top = _top_k(probs, names, cfg.top_k)
    predicted = _predicted(probs, names, multi, cfg.threshold)
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    write_csv_atomic(clips.windows.drop(columns="row"), out / f"{stem}_windows.csv")
    shown = predicted or "(no class over threshold)"
    title = f"{path.name}: {shown} ({float(probs.max()):.0%})"
    if multi:
        title = f"{path.name}: {shown} (max {float(probs.max()):.0%})"
    hop = cfg.hop or window
    png = plot_file_prediction(
        model, path, clips.windows, title, out / f"{stem}.png", cfg.plot_seconds, hop
    )
    record = {
        "file": str(path),
        "predicted": predicted,
        "probability": float(probs.max()),
        "top_k": [{"class": n, "probability": p} for n, p in top],
        "probabilities": {n: float(p) for n, p in zip(names, probs)},
        "windows": len(clips.windows),
        "window_seconds": window,
        "hop_seconds": hop,
        "multi_label": multi,
    }
    save_json_atomic(out / f"{stem}.json", record)
    if multi:
        lines = [f"{path}: {shown} (threshold {cfg.threshold})"]
    else:
        lines = [f"{path}: {predicted} (probability {float(probs.max()):.3f})"]
    lines += [f"  {p:7.3f}  {n}" for n, p in top]
    lines.append(
        f"{len(clips.windows)} window(s) of {window:g} s; wrote {png}, {out / f'{stem}.json'}"
    )
    record["messages"] = lines
    return record


def infer_folder(
    model: torch.nn.Module, folder: Path, out: Path, cfg: InferConfig, window: float, device
) -> pd.DataFrame:
    """Classify every audio file under `folder`: predictions.csv, bar chart, skipped.csv. The
    table's `attrs["messages"]` holds the lines to print."""
    from bioaudio.inference.plots import plot_bar

    paths = find_audio_files(folder)
    if not paths:
        raise DataError(f"no audio files under {folder}")
    df, skipped = _probe(paths)
    names, multi = list(model.class_names), bool(model.multi_label)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if len(df):
        clips = _clip_predictions(model, df, cfg, window, device, skip=True)
        for r, reason in sorted(clips.errors.items()):
            skipped.append({"path": df["path"].iloc[r], "reason": reason})
        # Files with no window long enough for one feature frame get no prediction: say so.
        done = set(clips.rows.tolist()) | set(clips.errors)
        for r in range(len(df)):
            if r not in done:
                skipped.append(
                    {
                        "path": df["path"].iloc[r],
                        "reason": f"too short to classify ({float(df['duration'].iloc[r]):.3f} s,"
                        " less than one feature frame)",
                    }
                )
        _check_finite(clips.scores, "the files under " + str(folder))
        n_windows = clips.windows.groupby("row").size()
        for probs, r in zip(clips.scores, clips.rows):
            p = Path(df["path"].iloc[r])
            row = {
                "file": str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p),
                "duration": round(float(df["duration"].iloc[r]), 3),
                "windows": int(n_windows.get(r, 0)),
                "predicted": _predicted(probs, names, multi, cfg.threshold),
                "probability": float(probs.max()),
                "top_k": "; ".join(f"{n}:{q:.3f}" for n, q in _top_k(probs, names, cfg.top_k)),
            }
            row.update({f"p_{n}": float(q) for n, q in zip(names, probs)})
            rows.append(row)
    columns = ["file", "duration", "windows", "predicted", "probability", "top_k"]
    table = pd.DataFrame(rows, columns=columns + [f"p_{n}" for n in names])
    write_csv_atomic(pd.DataFrame(skipped, columns=["path", "reason"]), out / "skipped.csv")
    if table.empty:
        raise DataError(
            f"none of the {len(paths)} audio file(s) under {folder} could be read; reasons in"
            f" {out / 'skipped.csv'}"
        )
    write_csv_atomic(table, out / "predictions.csv")
    if multi:
        counts = {n: int((table[f"p_{n}"] >= cfg.threshold).sum()) for n in names}
    else:
        counts = {n: int((table["predicted"] == n).sum()) for n in names}
    plot_bar(
        counts,
        out / "predicted_classes.png",
        title=f"predicted classes of {len(table)} file(s) in {folder.name}",
        ylabel="files",
    )
    lines = [f"classified {len(table)} file(s) under {folder}"]
    lines += [f"  {c:6d}  {n}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c]
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable file(s), reasons in {out / 'skipped.csv'}")
    lines.append(f"wrote {out / 'predictions.csv'} and {out / 'predicted_classes.png'}")
    table.attrs["messages"] = lines
    return table


def infer(model_path: str | Path, source: str | Path, cfg: InferConfig) -> list[str]:
    """Classify one audio file (`infer_file`) or every audio file under a folder
    (`infer_folder`) into `cfg.out` (default: ./predictions_<source name>); returns the lines
    to print."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"input not found: {source}")
    out = cfg.out or Path.cwd() / f"predictions_{source.stem or source.name}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_writable(out)
    device = cfg.device()
    model = load_classifier(model_path, device=device)
    names = list(getattr(model, "class_names", []) or [])
    if not names or not hasattr(model, "frontend_cfg"):
        raise ConfigError(f"{model_path}: not a classifier (no class names / head)")
    window = float(cfg.window or training_window(getattr(model, "provenance", None)))
    cfg = dataclasses.replace(cfg, out=out)
    if source.is_dir():
        return infer_folder(model, source.resolve(), out, cfg, window, device).attrs["messages"]
    return infer_file(model, source, out, cfg, window, device)["messages"]
