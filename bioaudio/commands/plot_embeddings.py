"""Static t-SNE and UMAP map grids of an embeddings file, as PNGs (for headless servers).

Writes OUT/tsne_grid.png (one map per --perplexities value) and OUT/umap_grid.png (one map per
--n_neighbors x --min_dist pair), coloured by label when the embeddings carry labels, else by
k-means cluster (--color to choose). Large files are subsampled to --max_points (seeded).
A PNG of the same name that plot-embeddings did not write is never replaced without --overwrite
(checked before any work).

Examples:
  bioaudio plot-embeddings runs/emb.parquet --out runs/maps
  bioaudio plot-embeddings emb.parquet --perplexities 5,30,100 --n_neighbors 5,15,50 \\
      --min_dist 0.0,0.5 --color cluster --k 6
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bioaudio.config import convert_value
from bioaudio.errors import ConfigError
from bioaudio.explorer.data import labels_of, load_embedding_set
from bioaudio.explorer.projections import ensure_numba_cache, kmeans
from bioaudio.explorer.static import is_map_grid, plot_grid
from bioaudio.fileio import check_writable, guard_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("embeddings", type=Path, help="embeddings .parquet (bioaudio embed)")
    parser.add_argument("--out", type=Path, help="output folder (default: beside EMBEDDINGS)")
    parser.add_argument("--perplexities", default="5,30,50", help="t-SNE perplexities")
    parser.add_argument("--n_neighbors", default="5,15,50", help="UMAP n_neighbors values")
    parser.add_argument("--min_dist", default="0.0,0.1,0.5", help="UMAP min_dist values")
    parser.add_argument("--color", choices=("auto", "label", "cluster"), default="auto")
    parser.add_argument("--k", type=int, default=8, help="k-means clusters (colour by cluster)")
    parser.add_argument("--max_points", type=int, default=20000, help="subsample above this")
    parser.add_argument("--methods", default="tsne,umap", help="grids to draw: tsne, umap")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace tsne_grid.png / umap_grid.png in OUT even when plot-embeddings did not "
        "write them",
    )


def run(args: argparse.Namespace) -> int:
    perps = convert_value(list[float], args.perplexities, "perplexities")
    neigh = convert_value(list[int], args.n_neighbors, "n_neighbors")
    dists = convert_value(list[float], args.min_dist, "min_dist")
    methods = convert_value(list[str], args.methods, "methods")
    if not set(methods) <= {"tsne", "umap"} or not methods:
        raise ConfigError(f"--methods: choose from tsne, umap, got {args.methods}")
    if args.max_points < 10:
        raise ConfigError("--max_points must be at least 10")
    out = args.out or args.embeddings.with_suffix("").with_name(args.embeddings.stem + "_maps")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    check_writable(out)
    for method in methods:
        guard_output(
            out / f"{method}_grid.png",
            what="map grid",
            ours=is_map_grid,
            inputs=(args.embeddings,),
            overwrite=args.overwrite,
        )
    es = load_embedding_set(args.embeddings, max_rows=args.max_points)
    labels = labels_of(es.rows)
    if args.color == "label" and labels is None:
        raise ConfigError(f"{args.embeddings} has no labels: use --color cluster")
    by_label = labels is not None and args.color != "cluster"
    colour = labels.fillna("(none)").to_numpy() if by_label else kmeans(es.vectors, args.k)
    what = "label" if by_label else f"k-means cluster (k={args.k})"
    out.mkdir(parents=True, exist_ok=True)
    ensure_numba_cache()
    n = f"{len(es)} windows"
    if "tsne" in methods:
        grid = [{"perplexity": p} for p in perps]
        title = f"t-SNE of {args.embeddings.name} ({n}), colour: {what}"
        png = plot_grid(es.vectors, colour, out / "tsne_grid.png", "tsne", grid, len(grid), title)
        print(f"wrote {png}")
    if "umap" in methods:
        grid = [{"n_neighbors": k, "min_dist": d} for k in neigh for d in dists]
        title = f"UMAP of {args.embeddings.name} ({n}), colour: {what}"
        png = plot_grid(es.vectors, colour, out / "umap_grid.png", "umap", grid, len(dists), title)
        print(f"wrote {png}")
    return 0
