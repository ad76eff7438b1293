"""Embeddings of every window of a folder, a manifest or one recording, written to Parquet.

One row per window (`--window` seconds every `--hop` seconds, read by seeking by the window
runner, `bioaudio.inference.runner`); the columns and the provenance in the file's metadata are
those of `bioaudio.inference.embeddings`.

Resuming: rows are written in parts (whole files only) into a hidden folder beside the output
and merged into it at the end, so a re-run (after a kill, or on a folder with new files) embeds
only the files not yet in the output or in a part. With `accelerate launch` each process embeds
its share of the files into its own parts and process 0 merges. Unreadable files are listed in
`skipped.csv` beside the output with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bioaudio import runinfo, runlog
from bioaudio.data.datasets import segment_windows
from bioaudio.data.manifest import (
    COLUMNS,
    LabelLayout,
    PrepareConfig,
    build_manifest,
    read_manifest,
    scan_audio,
)
from bioaudio.errors import ConfigError, DataError
from bioaudio.fileio import atomic_path, check_writable, is_audio_path, write_csv_atomic
from bioaudio.inference.embeddings import (
    EMBEDDINGS_FORMAT,
    EMBEDDINGS_VERSION,
    read_provenance,
    schema,
    time_columns,
    to_arrow,
)
from bioaudio.inference.runner import (
    Embedder,
    FileEmbeddings,
    WindowOptions,
    fresh_audio,
    iter_file_embeddings,
    load_embedder,
    window_option,
)

MIN_WINDOW_SECONDS = 0.2  # one 16-frame patch of a 10 ms fbank, with margin
PART_ROWS, PART_SECONDS = 4096, 60.0  # a part is written after this many rows or seconds
SKIPPED_COLUMNS = ["path", "reason", "embeddings"]
Progress = Callable[[float, str], None]


@dataclass
class EmbedConfig(WindowOptions):
    """Options of `bioaudio embed` (and of `embed_to_parquet`)."""

    window: float | None = window_option("window")
    hop: float | None = window_option("hop")
    pooling: Literal["mean", "cls", "max"] = field(
        default="mean",
        metadata={"help": "token pooling: mean, cls (encoders with a CLS token only), max"},
    )
    layer: int | None = field(
        default=None,
        metadata={"help": "transformer block whose output is pooled: 0 = first, -1 = last"},
    )
    labels: LabelLayout = field(
        default="auto", metadata={"help": "label layout of a folder (as bioaudio prepare)"}
    )
    hemisphere: Literal["north", "south"] = field(
        default="north", metadata={"help": "hemisphere of the recordings, for the season column"}
    )
    batch_size: int = window_option("batch_size")
    num_workers: int = window_option("num_workers")
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the output even when it holds other embeddings or another file"},
    )
    cpu: bool = window_option("cpu")
    progress: bool = window_option("progress")
    status_every: float = window_option("status_every")

    def validate(self) -> None:
        super().validate()
        if self.window is not None and self.window < MIN_WINDOW_SECONDS:
            raise ConfigError(f"--window must be at least {MIN_WINDOW_SECONDS} s")


# ----------------------------------------------------------------------------------------------
# Input: a folder, a manifest or one audio file -> a manifest table


def input_table(
    source: str | Path, labels: LabelLayout = "auto", progress: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest table with absolute paths, skipped files (path, reason)) of the input."""
    src = Path(source).expanduser()
    if not src.exists():
        raise DataError(f"input not found: {src}")
    if src.is_dir():
        res = build_manifest(src, PrepareConfig(labels=labels, progress=progress))
        table, skipped = res.manifest, res.skipped
    elif src.suffix.lower() == ".csv":
        table = read_manifest(src)
        good, bad = scan_audio(
            [Path(p) for p in table["path"].unique()], verify="header", progress=progress
        )
        table = table[table["path"].isin({str(p) for p in good})]
        skipped = pd.DataFrame([{"path": str(p), "reason": r} for p, r in bad.items()])
    elif is_audio_path(src):
        good, bad = scan_audio([src.resolve()], workers=1, progress=False)
        rows = [
            {"path": str(p), "sample_rate": m.sample_rate, "frames": m.frames}
            | {"duration": m.duration, "channels": m.channels, "start": 0.0, "end": m.duration}
            | {"labels": "", "recording": p.name, "source": "none"}
            for p, m in good.items()
        ]
        table = pd.DataFrame(rows, columns=COLUMNS)
        skipped = pd.DataFrame([{"path": str(p), "reason": r} for p, r in bad.items()])
    else:
        raise DataError(f"{src}: not a folder, a manifest (.csv) or an audio file")
    skipped = skipped.reindex(columns=["path", "reason"])
    return table.reset_index(drop=True), skipped.reset_index(drop=True)


def window_table(
    table: pd.DataFrame, window: float, hop: float | None = None, hemisphere: str = "north"
) -> pd.DataFrame:
    """Every window of every row, with the output's metadata columns (no embeddings)."""
    # one contiguous run of windows per file (a manifest may list a file's segments apart)
    w = segment_windows(table.sort_values("path", kind="stable"), window, hop)
    w = w[(w["end"] - w["start"]) >= MIN_WINDOW_SECONDS - 1e-9].reset_index(drop=True)
    source = w["source"] if "source" in w else pd.Series("none", index=w.index)
    labelled = source.fillna("none") != "none"
    out = pd.DataFrame(
        {
            "path": w["path"].astype(str),
            "recording": w.get("recording", w["path"]).astype(str),
            "start": w["start"].astype(float),
            "end": w["end"].astype(float),
            "window_index": w["window_index"].astype(np.int32),
            "labels": w["labels"].fillna("").astype(str).where(labelled, None),
            "duration": w["duration"].astype(float),
            "sample_rate": w["sample_rate"].astype(np.int32),
            "channels": w.get("channels", pd.Series(1, index=w.index)).astype(np.int16),
        }
    )
    return pd.concat([out, time_columns(out, hemisphere)], axis=1)


def embed_table(
    embedder: Embedder,
    table: pd.DataFrame,
    window: float,
    hop: float | None = None,
    hemisphere: str = "north",
    batch_size: int = 16,
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """In memory: (window rows, embeddings (N, D), skipped (path, reason)) of a manifest table."""
    embedder.check_window(window)
    windows = window_table(table, window, hop, hemisphere)
    rows, embs, skipped = [], [], []
    for f in iter_file_embeddings(embedder, windows, batch_size):
        if f.error is not None:
            skipped.append({"path": f.path, "reason": f.error})
        else:
            rows.append(f.rows)
            embs.append(f.embeddings)
    if not rows:
        return windows.iloc[:0], np.zeros((0, embedder.dim), np.float32), pd.DataFrame(skipped)
    out = pd.concat(rows, ignore_index=True)
    return out, np.concatenate(embs), pd.DataFrame(skipped, columns=["path", "reason"])


# ----------------------------------------------------------------------------------------------
# The command's job: resumable, multi-process, merged into one Parquet file


@dataclass
class EmbedResult:
    """What `embed_to_parquet` did."""

    out: Path
    skipped_path: Path
    rows: int
    files: int
    new_files: int
    already_done: int
    skipped: int
    not_in_input: int
    dim: int
    processes: int
    audio_seconds: float
    seconds: float

    def summary(self) -> str:
        rate = self.audio_seconds / max(self.seconds, 1e-9)
        lines = [
            f"embedded {self.new_files} file(s) ({self.audio_seconds / 3600:.3f} h of audio,"
            f" {rate / 3600:.3g} audio h/s = {rate:.0f}x real time) on {self.processes}"
            f" process(es); {self.already_done} already done",
            f"{self.out}: {self.rows} window(s) of {self.files} file(s), embedding dim {self.dim}",
        ]
        lines.append(f"skipped {self.skipped} file(s), reasons in {self.skipped_path}")
        if self.not_in_input:
            lines.append(
                f"note: {self.not_in_input} file(s) of {self.out.name} are not in this input "
                "(embedded by an earlier call; --overwrite rebuilds it from this input only)"
            )
        return "\n".join(lines)


def parts_dir(out: Path) -> Path:
    """The hidden folder of not-yet-merged parts beside `out`."""
    return out.with_name(f".{out.name}.parts")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {out}: give a file name ending in .parquet")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .parquet")
    check_writable(out)  # a parent that is a file, a read-only folder: said before any work
    if out.exists() and not overwrite:
        try:
            read_provenance(out)
        except DataError as e:
            raise ConfigError(
                f"--out {out} exists and is not a bioaudio embeddings file ({e}); "
                "use --overwrite to replace it"
            ) from None
    skipped = out.with_name("skipped.csv")
    if skipped.exists() and not overwrite:
        try:
            cols = list(pd.read_csv(skipped, nrows=0).columns)
        except Exception:  # any unreadable file is not ours
            cols = []
        if cols != SKIPPED_COLUMNS:
            raise ConfigError(
                f"{skipped} exists and was not written by bioaudio embed (another command's "
                "skipped.csv?); choose another --out folder or use --overwrite"
            )


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = ["model_fingerprint", "layer", "pooling", "window", "hop", "frontend"]
    keys += ["embedding_dim", "hemisphere"]
    return [k for k in keys if a.get(k) != b.get(k)]


def _done_paths(out: Path, settings: dict[str, Any], overwrite: bool) -> set[str]:
    """Files already in the output or in a part, after checking they used the same settings."""
    if overwrite:
        return set()
    done: set[str] = set()
    if out.exists():
        diff = _same_settings(read_provenance(out), settings)
        if diff:
            raise ConfigError(
                f"--out {out} holds embeddings made with other settings ({', '.join(diff)});"
                " use --overwrite to replace it, or another --out"
            )
        done.update(pq.read_table(out, columns=["path"]).column("path").to_pylist())
    parts = parts_dir(out)
    if parts.is_dir():
        saved = parts / "settings.json"
        if saved.is_file() and _same_settings(json.loads(saved.read_text()), settings):
            raise ConfigError(
                f"{parts} holds an interrupted run with other settings; use --overwrite to"
                " discard it"
            )
        for f in sorted(parts.glob("part-*.parquet")):
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
    return done


def _shard(table: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """This process's files: longest first to the least-loaded process (deterministic)."""
    if world == 1:
        return table
    per_file = table.assign(_len=table["end"] - table["start"]).groupby("path")["_len"].sum()
    load = [0.0] * world
    owner: dict[str, int] = {}
    for path, seconds in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[path] = r
        load[r] += seconds
    return table[table["path"].map(owner) == rank]


class _PartWriter:
    """Whole files' rows -> parquet parts (atomic), every PART_ROWS rows or PART_SECONDS."""

    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = folder, rank
        self.max_rows, self.max_seconds = PART_ROWS, PART_SECONDS
        self.rows: list[pd.DataFrame] = []
        self.embs: list[np.ndarray] = []
        self.skipped: list[dict[str, str]] = []
        self.n = 0
        self.seq = 0
        self.last = time.monotonic()
        # unique per writer: a rerun in the same process and second must not reuse a name
        self.tag = f"r{rank:03d}-{uuid.uuid4().hex[:12]}"

    def add(self, f: FileEmbeddings) -> None:
        if f.error is not None:
            self.skipped.append({"path": f.path, "reason": f.error})
        else:
            self.rows.append(f.rows)
            self.embs.append(f.embeddings)  # type: ignore[arg-type]
            self.n += len(f.rows)
        if self.n >= self.max_rows or time.monotonic() - self.last > self.max_seconds:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.skipped:
            name = self.folder / f"skipped-{self.tag}-{self.seq:05d}.csv"
            write_csv_atomic(pd.DataFrame(self.skipped, columns=["path", "reason"]), name)
        if self.rows:
            table = to_arrow(pd.concat(self.rows, ignore_index=True), np.concatenate(self.embs))
            with atomic_path(self.folder / f"part-{self.tag}-{self.seq:05d}.parquet") as tmp:
                pq.write_table(table, tmp)
        if self.skipped or self.rows:
            self.seq += 1
        self.rows, self.embs, self.skipped, self.n = [], [], [], 0


def _merge(
    out: Path,
    provenance: dict[str, Any],
    input_skipped: pd.DataFrame,
    overwrite: bool,
    current: set[str],
) -> tuple[int, int, int, int]:
    """Existing output + parts -> the output (sorted by path and time); skipped.csv beside it.
    Returns (rows, files, skipped files, files of the output that are not in `current`, the
    input of this call: kept from an earlier one)."""
    parts = parts_dir(out)
    part_files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    tables = []
    if out.exists() and not overwrite:
        tables.append(pq.read_table(out))
    tables += [pq.read_table(f) for f in part_files]
    seen: set[str] = set()
    kept = []
    for t in tables:  # a file is taken from the first table holding it (a crash between the
        # merged write and the parts' removal leaves it in both)
        paths = t.column("path")
        if seen:
            t = t.filter(pc.invert(pc.is_in(paths, pa.array(sorted(seen)))))
        seen.update(t.column("path").unique().to_pylist())
        kept.append(t.replace_schema_metadata(None))
    skipped = [input_skipped]
    if parts.is_dir():
        skipped += [pd.read_csv(f, dtype=str) for f in sorted(parts.glob("skipped-*.csv"))]
    sk = pd.concat(skipped, ignore_index=True).reindex(columns=["path", "reason"]).fillna("")
    sk = sk[~sk["path"].isin(seen)].drop_duplicates("path", keep="last").sort_values("path")
    sk_path = out.with_name("skipped.csv")
    others = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if sk_path.exists() and not overwrite:
        old = pd.read_csv(sk_path, dtype=str).reindex(columns=SKIPPED_COLUMNS)
        others = old[old["embeddings"] != out.name]  # rows of other outputs in this folder
    sk = pd.concat([others, sk.assign(embeddings=out.name)], ignore_index=True)
    write_csv_atomic(sk[SKIPPED_COLUMNS], sk_path)
    n_skipped = int((sk["embeddings"] == out.name).sum())
    if not kept:
        return 0, 0, n_skipped, 0
    merged = pa.concat_tables(kept).sort_by([("path", "ascending"), ("start", "ascending")])
    merged = merged.replace_schema_metadata(
        schema(provenance["embedding_dim"], provenance).metadata
    )
    if part_files or overwrite or not out.exists():
        with atomic_path(out) as tmp:
            pq.write_table(merged, tmp)
    shutil.rmtree(parts, ignore_errors=True)
    return merged.num_rows, len(seen), n_skipped, len(seen - current)


def embed_to_parquet(
    model: str | Path,
    source: str | Path,
    out: str | Path,
    cfg: EmbedConfig | None = None,
    *,
    accelerator: Any = None,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every window of `source` (folder, manifest or audio file) with `model` into the
    Parquet file `out` (see the module doc). With an `accelerator` of several processes each
    embeds its share and process 0 merges; every process returns the same result.
    `progress(fraction, text)` is called as files finish (for a UI)."""
    cfg = cfg or EmbedConfig()
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out).expanduser().absolute()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = rank == 0
    if not Path(source).expanduser().exists():  # before the (slow) model load
        raise DataError(f"input not found: {Path(source).expanduser()}")
    _check_out(out, cfg.overwrite)
    device = accelerator.device if accelerator is not None else cfg.device()
    embedder = load_embedder(model, cfg.pooling, cfg.layer, device)
    window = float(cfg.window or embedder.default_window())
    hop = float(cfg.hop or window)
    embedder.check_window(window)
    table, input_skipped = input_table(source, cfg.labels, progress=cfg.progress and main)
    # a file too short for one window is listed, never dropped without a word
    short = (table["end"] - table["start"]) < MIN_WINDOW_SECONDS - 1e-9
    short_files = set(table.loc[short, "path"]) - set(table.loc[~short, "path"])
    if short_files:
        reason = f"shorter than {MIN_WINDOW_SECONDS} s: no window to embed"
        extra = pd.DataFrame({"path": sorted(map(str, short_files)), "reason": reason})
        input_skipped = pd.concat([input_skipped, extra], ignore_index=True)
        table = table[~table["path"].isin(short_files)].reset_index(drop=True)
    # Input, model and options checked: the log starts (with what was printed so far).
    runlog.attach(out.with_suffix(".log.txt"))
    settings = embedder.provenance(window, hop, cfg.hemisphere)
    done = _done_paths(out, settings, cfg.overwrite)
    files = table["path"].unique()
    todo = table[~table["path"].isin(done)]
    parts = parts_dir(out)
    _barrier(accelerator)  # every process has read the state before anyone writes
    if main:
        if cfg.overwrite:
            shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        (parts / "settings.json").write_text(json.dumps(settings, default=str))
    _barrier(accelerator)
    mine = _shard(todo, rank, world)
    windows = window_table(mine, window, hop, cfg.hemisphere)
    total = float(fresh_audio(windows).sum())
    audio_done = [0.0]
    bar = None
    if main and len(windows):
        # A bar on a terminal, plain status lines (audio h/s, ETA) in a file or a SLURM log.
        bar = runlog.Progress.audio(
            total,
            desc="embed" + (f" (process 0 of {world})" if world > 1 else ""),
            enabled=cfg.progress,
            status_every=cfg.status_every,
            unit_scale=1 / 3600,  # counts seconds, shows hours
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio h "
            "[{elapsed}<{remaining}{postfix}]",
        )

    def on_audio(seconds: float) -> None:
        audio_done[0] += seconds
        if bar is not None:
            bar.update(seconds)
        if progress is not None and main:
            progress(min(audio_done[0] / max(total, 1e-9), 1.0), f"{audio_done[0] / 3600:.3f} h")

    writer = _PartWriter(parts, rank)
    new_files = 0
    for f in iter_file_embeddings(embedder, windows, cfg.batch_size, cfg.num_workers, on_audio):
        writer.add(f)
        new_files += f.error is None
    writer.flush()
    if bar is not None:
        bar.close()
    _barrier(accelerator)
    counts = [0, 0, 0, 0]
    if main:
        prov = {
            "format": EMBEDDINGS_FORMAT,
            "format_version": EMBEDDINGS_VERSION,
            **settings,
            "bioaudio_version": runinfo.bioaudio_version(),
            "processes": world,
            "input": str(Path(source).expanduser().resolve()),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": runinfo.environment(),  # command line, versions, machine
        }
        counts = list(_merge(out, prov, input_skipped, cfg.overwrite, set(map(str, files))))
    counts, new_files, audio = _share(accelerator, counts, new_files, audio_done[0])
    if counts[0] == 0:
        raise DataError(
            f"none of the {len(files)} file(s) could be embedded; reasons in "
            f"{out.with_name('skipped.csv')}"
        )
    return EmbedResult(
        out=out,
        skipped_path=out.with_name("skipped.csv"),
        rows=counts[0],
        files=counts[1],
        new_files=new_files,
        already_done=len(set(files) & done),
        skipped=counts[2],
        not_in_input=counts[3],
        dim=embedder.dim,
        processes=world,
        audio_seconds=audio,
        seconds=time.perf_counter() - t0,
    )


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _share(
    accelerator: Any, counts: list[int], new_files: int, audio: float
) -> tuple[list[int], int, float]:
    """Process 0's merge counts, and the sums of every process's files and audio."""
    if accelerator is None or accelerator.num_processes == 1:
        return counts, new_files, audio
    from accelerate.utils import broadcast_object_list, gather_object

    counts = broadcast_object_list([counts])[0]
    mine = gather_object([(new_files, audio)])
    return counts, sum(n for n, _ in mine), sum(a for _, a in mine)
