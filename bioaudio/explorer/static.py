"""Static PNG map grids for headless servers (`bioaudio plot-embeddings`): t-SNE over
perplexities, UMAP over n_neighbors x min_dist, coloured by label or k-means cluster.
matplotlib with the Agg backend; no Streamlit. Every PNG carries a text chunk
`bioaudio: plot-embeddings` (`is_map_grid`), so the command can tell its own PNGs, which it may
replace, from anyone else's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bioaudio.explorer.projections import check_params, fit_projection
from bioaudio.fileio import atomic_path

PNG_KEY, PNG_MARKER = "bioaudio", "plot-embeddings"  # the PNG text chunk of our map grids


def is_map_grid(path: str | Path) -> bool:
    """True for a PNG written by `plot_grid` (it carries our text chunk)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(PNG_KEY) == PNG_MARKER
    except Exception:  # anything unreadable is not ours
        return False


def _colours(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(v) for v in values})
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[str(v)] for v in values]), names


def plot_grid(
    X: np.ndarray,
    colour: np.ndarray,
    out: str | Path,
    method: str,
    grid: Sequence[dict],
    ncols: int,
    title: str,
    seed: int = 0,
) -> Path:
    """One 2-D map per parameter set of `grid` (fit_projection keyword arguments), coloured
    by the category of each point, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for params in grid:  # every parameter set is checked before the first (slow) fit
        check_params(method, len(X), 2, **params)
    codes, names = _colours(colour)
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    nrows = -(-len(grid) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4 * ncols, 4 * nrows), squeeze=False, layout="constrained"
    )
    for ax, params in zip(axes.flat, grid):
        xy = fit_projection(X, method, 2, seed=seed, **params).coords
        ax.scatter(xy[:, 0], xy[:, 1], c=cmap(codes % cmap.N), s=6, linewidths=0)
        ax.set_title(", ".join(f"{k} {v:g}" for k, v in params.items()), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(grid) :]:
        ax.axis("off")
    if len(names) <= 30:
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=n)
            for i, n in enumerate(names)
        ]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, metadata={PNG_KEY: PNG_MARKER})
    plt.close(fig)
    return out
