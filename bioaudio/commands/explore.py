"""Open the embedding explorer (a Streamlit app) on an embeddings file from `bioaudio embed`.

The app draws 2-D / 3-D t-SNE, UMAP and PCA maps, k-means clusters (silhouette, ARI / NMI
against labels), colours points by label, cluster or metadata (site, month, season, hour),
plays the window of a clicked point with its spectrogram, places an uploaded recording on the
map, exports clusters or a lasso selection as a labels.csv for `bioaudio prepare`, shows
training curves and launches training runs. Paths typed into the app must lie under --data_dir
or --runs_dir.

Without EMBEDDINGS, give --data_dir and --checkpoint_path: the app computes the embeddings once
(cached under --cache_dir). On a headless server use `bioaudio plot-embeddings` for PNGs, or
open the app through an SSH tunnel (ssh -L 8501:localhost:8501 server): it serves on this
machine only unless --address says otherwise.

Examples:
  bioaudio explore runs/emb.parquet --data_dir recordings --runs_dir runs
  bioaudio explore --data_dir recordings --checkpoint_path runs/finetune/export --max_samples 2000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bioaudio.errors import ConfigError
from bioaudio.explorer.data import env_with_numba_cache
from bioaudio.inference.embeddings import read_provenance

APP = Path(__file__).resolve().parents[1] / "explorer" / "app.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", nargs="?", type=Path, help="embeddings .parquet file")
    parser.add_argument("--data_dir", action="append", default=[], help="audio folder (repeat)")
    parser.add_argument("--runs_dir", action="append", default=[], help="run folder (repeat)")
    parser.add_argument("--checkpoint_path", help="model: computes embeddings / places uploads")
    parser.add_argument("--max_samples", type=int, help="at most this many files / windows")
    parser.add_argument("--cache_dir", help="where computed embeddings are kept")
    parser.add_argument("--method", choices=("umap", "tsne", "pca"), default="umap")
    parser.add_argument("--max_upload_mb", type=float, default=50.0, help="upload size limit")
    parser.add_argument("--port", type=int, default=8501, help="port of the app")
    parser.add_argument(
        "--address",
        default="127.0.0.1",
        help="interface to serve on (default: this machine only; 0.0.0.0 opens it to the network,"
        " and with it your data folders and the training launcher)",
    )
    parser.add_argument("--headless", action="store_true", help="do not open a browser")


def run(args: argparse.Namespace) -> int:
    if args.embeddings is None and not (args.data_dir and args.checkpoint_path):
        raise ConfigError("give an embeddings file, or --data_dir and --checkpoint_path")
    app_args: list[str] = []
    data_dirs = list(args.data_dir)
    if args.embeddings is not None:
        prov = read_provenance(args.embeddings)  # a wrong file fails here, in one line
        app_args.append(str(args.embeddings.expanduser().resolve()))
        source = Path(str(prov.get("input", "")))
        if not data_dirs and source.is_dir():  # the folder the embeddings were made from
            data_dirs.append(str(source))
            print(f"data folder: {source} (from the embeddings; --data_dir to choose)")
    for d in data_dirs:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"--data_dir {d} is not a folder")
        app_args += ["--data_dir", str(Path(d).expanduser().resolve())]
    for d in args.runs_dir:
        app_args += ["--runs_dir", str(Path(d).expanduser().resolve())]
    for name in ("checkpoint_path", "max_samples", "cache_dir"):
        if getattr(args, name) is not None:
            app_args += [f"--{name}", str(getattr(args, name))]
    app_args += ["--method", args.method, "--max_upload_mb", str(args.max_upload_mb)]
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port)]
    cmd += ["--server.address", args.address]
    cmd += ["--server.maxUploadSize", str(max(1, int(args.max_upload_mb + 0.999)))]
    cmd += ["--browser.gatherUsageStats", "false"]
    if args.headless:
        cmd += ["--server.headless", "true"]
    host = "localhost" if args.address in ("127.0.0.1", "localhost") else args.address
    print(f"explorer: http://{host}:{args.port}  (Ctrl+C stops it)")
    return subprocess.call([*cmd, "--", *app_args], env=env_with_numba_cache())
