"""2-D / 3-D maps of embeddings (PCA, UMAP, t-SNE), k-means clusters and their scores, and the
placement of new points on a fitted map. No Streamlit here: the app caches these calls, the
static `plot-embeddings` grids call them directly.

t-SNE runs on openTSNE when it is installed (FFT-accelerated, and it can place new points into
a fitted map), else on scikit-learn. UMAP and t-SNE first reduce embeddings wider than 50 to 50
PCA components (the usual practice: faster, and the neighbourhoods barely change).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bioaudio.errors import ConfigError

Method = Literal["pca", "umap", "tsne"]
METHODS: tuple[str, ...] = ("pca", "umap", "tsne")
PRE_PCA = 50
NEIGHBOURS_FOR_PLACEMENT = 5


def ensure_numba_cache() -> Path:
    """Point numba (UMAP, pynndescent) at a persistent cache folder so its ~30 s of compilation
    happens once per machine, not once per process. Keeps a NUMBA_CACHE_DIR already set."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("NUMBA_CACHE_DIR", str(base / "bioaudio" / "numba"))
    path = Path(os.environ["NUMBA_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    if "numba" in sys.modules:  # imported before us: make it read the variable again
        from numba.core import config

        config.reload_config()
    return path


def warm_up_umap() -> None:
    """Fit UMAP once on random data above its 4,096-point exact-neighbour limit, so that the
    just-in-time compilation numba cannot cache (pynndescent's, ~30 s per process) is done
    before a user asks for a large map. The app runs this in a background thread."""
    rng = np.random.default_rng(0)
    fit_projection(rng.normal(size=(4200, 8)).astype(np.float32), "umap", n_neighbors=5)


def tsne_backend(backend: str = "auto") -> str:
    """'opentsne' or 'sklearn': the one asked for, or openTSNE when it is installed."""
    if backend not in ("auto", "opentsne", "sklearn"):
        raise ConfigError(f"t-SNE backend must be auto, opentsne or sklearn, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        return "sklearn"
    return "opentsne"


def check_params(
    method: str,
    n_points: int,
    dims: int = 2,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
) -> None:
    """ConfigError with a message a user can act on when a map cannot be made."""
    if method not in METHODS:
        raise ConfigError(f"unknown projection {method!r} (use one of {', '.join(METHODS)})")
    if dims not in (2, 3):
        raise ConfigError(f"a map has 2 or 3 dimensions, not {dims}")
    if n_points < dims + 2:
        raise ConfigError(f"{n_points} point(s) are too few for a {dims}-D map")
    if method == "tsne":
        if not perplexity > 0:
            raise ConfigError(f"perplexity must be positive, got {perplexity}")
        most = (n_points - 2) / 3  # openTSNE needs 3 x perplexity neighbours per point
        if perplexity > most:
            raise ConfigError(
                f"perplexity {perplexity:g} is too large for {n_points} points: t-SNE needs "
                f"3 x perplexity + 2 points; use at most {max(int(most), 1)}"
            )
    if method == "umap":
        if not 2 <= n_neighbors < n_points:
            raise ConfigError(
                f"n_neighbors must be between 2 and {n_points - 1} for {n_points} points, got "
                f"{n_neighbors}"
            )
        if not 0.0 <= min_dist <= 1.0:
            raise ConfigError(f"min_dist must be in [0, 1], got {min_dist}")


@dataclass
class Projection:
    """A fitted map: coordinates (N, dims), the models to place new points, what was done."""

    coords: np.ndarray
    method: str
    params: dict[str, Any]
    pre_pca: Any = None  # PCA to PRE_PCA components (UMAP / t-SNE on wide embeddings)
    model: Any = None  # fitted PCA / UMAP / openTSNE embedding; None for scikit-learn t-SNE
    reference: np.ndarray | None = None  # the (reduced) inputs, for nearest-neighbour placement
    explained: np.ndarray | None = None  # PCA: explained variance ratio per component
    placement: str = ""  # how new points are put on this map (shown in the UI)
    extra: dict[str, Any] = field(default_factory=dict)


def threads() -> int:
    """Threads for the fits: all cores but one, which stays free for the app (on a busy
    machine, every core's worth of OpenMP spinning makes t-SNE many times slower)."""
    return max(1, (os.cpu_count() or 1) - 1)


def fit_projection(
    X: np.ndarray,
    method: str = "pca",
    dims: int = 2,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    backend: str = "auto",
) -> Projection:
    """Fit a `dims`-D map of `X` (N, D) with PCA, UMAP or t-SNE."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ConfigError(
            f"{int(bad.sum())} of {len(X)} embedding(s) hold NaN / inf values (a broken model "
            "or file); they cannot be mapped"
        )
    check_params(method, len(X), dims, perplexity, n_neighbors, min_dist)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads()):
        return _fit(X, method, dims, perplexity, n_neighbors, min_dist, seed, backend)


def _fit(
    X: np.ndarray,
    method: str,
    dims: int,
    perplexity: float,
    n_neighbors: int,
    min_dist: float,
    seed: int,
    backend: str,
) -> Projection:
    from sklearn.decomposition import PCA

    if method == "pca":
        pca = PCA(n_components=dims, random_state=seed).fit(X)
        return Projection(
            pca.transform(X).astype(np.float32),
            "pca",
            {"dims": dims},
            model=pca,
            explained=pca.explained_variance_ratio_,
            placement="projected with the fitted PCA",
        )
    pre = None
    Z = X
    if X.shape[1] > PRE_PCA and len(X) > PRE_PCA:
        pre = PCA(n_components=PRE_PCA, random_state=seed).fit(X)
        Z = pre.transform(X).astype(np.float32)
    if method == "umap":
        ensure_numba_cache()
        import umap

        model = umap.UMAP(
            n_components=dims,
            n_neighbors=int(n_neighbors),
            min_dist=float(min_dist),
            random_state=seed,  # reproducible maps; UMAP then runs single-threaded
            n_jobs=1,
        ).fit(Z)
        params = {"dims": dims, "n_neighbors": int(n_neighbors), "min_dist": float(min_dist)}
        return Projection(
            np.asarray(model.embedding_, np.float32),
            "umap",
            params,
            pre_pca=pre,
            model=model,
            placement="projected with the fitted UMAP transform",
        )
    which = tsne_backend(backend)
    params = {"dims": dims, "perplexity": float(perplexity), "backend": which}
    if which == "opentsne":
        import openTSNE

        emb = openTSNE.TSNE(
            n_components=dims,
            perplexity=float(perplexity),
            random_state=seed,
            n_jobs=threads(),
            # openTSNE's auto: Barnes-Hut below 10,000 points, FFT above (FFT has a fixed
            # cost per iteration that small maps do not repay; it exists for 1-2 dims only)
            negative_gradient_method="auto" if dims <= 2 else "bh",
            verbose=False,
        ).fit(Z)
        return Projection(
            np.asarray(emb, np.float32),
            "tsne",
            params,
            pre_pca=pre,
            model=emb,
            placement="optimised into the fixed t-SNE map (openTSNE transform)",
        )
    from sklearn.manifold import TSNE

    coords = TSNE(
        n_components=dims,
        perplexity=float(perplexity),
        init="pca",
        learning_rate="auto",
        random_state=seed,
        method="barnes_hut",
    ).fit_transform(Z)
    return Projection(
        coords.astype(np.float32),
        "tsne",
        params,
        pre_pca=pre,
        reference=Z,
        placement="t-SNE (scikit-learn) cannot map new points: each is placed at the mean "
        f"position of its {NEIGHBOURS_FOR_PLACEMENT} nearest neighbours in embedding space",
    )


def place(proj: Projection, X_new: np.ndarray) -> np.ndarray:
    """Coordinates of new embeddings (M, D) on a fitted map (see `Projection.placement`)."""
    X_new = np.ascontiguousarray(X_new, dtype=np.float32)
    if proj.method == "pca":
        return proj.model.transform(X_new).astype(np.float32)
    Z = proj.pre_pca.transform(X_new).astype(np.float32) if proj.pre_pca is not None else X_new
    if proj.method == "umap":
        return np.asarray(proj.model.transform(Z), np.float32)
    if proj.model is not None:  # openTSNE: new points' affinities to the map's points
        perplexity = min(5.0, (len(proj.coords) - 1) / 3)
        return np.asarray(proj.model.transform(Z, perplexity=perplexity), np.float32)
    from sklearn.neighbors import NearestNeighbors

    k = min(NEIGHBOURS_FOR_PLACEMENT, len(proj.coords))
    nn = NearestNeighbors(n_neighbors=k).fit(proj.reference)
    _, idx = nn.kneighbors(Z)
    return proj.coords[idx].mean(axis=1)


# ----------------------------------------------------------------------------------------------
# Clusters


def kmeans(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of every row of X (N, D) -> (N,) int."""
    if not 2 <= k < len(X):
        raise ConfigError(f"k must be between 2 and {len(X) - 1} for {len(X)} points, got {k}")
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads()):
        return KMeans(n_clusters=int(k), n_init="auto", random_state=seed).fit_predict(X)


def cluster_scores(
    X: np.ndarray, clusters: np.ndarray, labels: Any = None, sample: int = 5000, seed: int = 0
) -> dict[str, float]:
    """Silhouette (on at most `sample` points), and ARI / NMI against `labels` where they are
    known (None / empty labels are left out; a multi-label 'a,b' counts as its own class)."""
    from sklearn.metrics import (
        adjusted_rand_score,
        normalized_mutual_info_score,
        silhouette_score,
    )

    out: dict[str, float] = {}
    if len(np.unique(clusters)) > 1:
        n = min(sample, len(X))
        out["silhouette"] = float(silhouette_score(X, clusters, sample_size=n, random_state=seed))
    if labels is not None:
        lab = np.asarray([("" if v is None or v != v else str(v)) for v in labels], dtype=object)
        known = lab != ""
        if known.sum() >= 2 and len(np.unique(lab[known])) >= 2:
            out["ARI"] = float(adjusted_rand_score(lab[known], clusters[known]))
            out["NMI"] = float(normalized_mutual_info_score(lab[known], clusters[known]))
    return out


def pca_variance(X: np.ndarray, n: int = 10, seed: int = 0) -> np.ndarray:
    """Explained variance ratio of the first `n` principal components."""
    from sklearn.decomposition import PCA

    n = max(1, min(n, X.shape[0], X.shape[1]))
    return PCA(n_components=n, random_state=seed).fit(X).explained_variance_ratio_
