"""Plotly figures of the explorer: the map (2-D / 3-D, coloured by any column, hover with file,
window and metadata), per-cluster monthly histograms, spectrograms and training curves.
Building a figure is cheap next to a projection: re-colouring never recomputes the map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from bioaudio.explorer.data import is_categorical

HOVER_COLUMNS = ("labels", "cluster", "site", "datetime", "season")
WEBGL_ABOVE = 3000  # SVG markers (clickable, crisp) for small maps, WebGL for large ones
PALETTE = (
    "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf "
    "#393b79 #637939 #8c6d31 #843c39 #7b4173 #3182bd #e6550d #31a354 #756bb1 #636363"
).split()


def _hover(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    cols = ["file", "window"] + [c for c in HOVER_COLUMNS if c in rows]
    text = [rows[c].astype(object).where(rows[c].notna(), "-").astype(str) for c in cols]
    custom = np.column_stack([rows.index.to_numpy()] + [t.to_numpy() for t in text])
    lines = ["<b>%{customdata[1]}</b> %{customdata[2]}"]
    lines += [f"{c}: %{{customdata[{i + 3}]}}" for i, c in enumerate(cols[2:])]
    return custom, "<br>".join(lines) + "<extra></extra>"


def map_figure(
    coords: np.ndarray,
    rows: pd.DataFrame,
    color: str | None = None,
    title: str = "",
    visible: np.ndarray | None = None,
    selected: Sequence[int] = (),
    extra: dict[str, np.ndarray] | None = None,
) -> go.Figure:
    """Scatter of `coords` (N, 2|3) with `rows` (index = row number) as hover text and
    customdata[0]; one trace per category of `color` (a legend) or one colour scale.
    `visible` filters points without changing the map; `extra` adds named point sets
    (uploaded recordings) as stars."""
    dims = coords.shape[1]
    keep = np.ones(len(rows), bool) if visible is None else np.asarray(visible, bool)
    rows = rows[keep]
    xyz = coords[keep]
    custom, template = _hover(rows)
    three = dims == 3
    scatter = go.Scatter3d if three else (go.Scattergl if len(rows) > WEBGL_ABOVE else go.Scatter)
    size = 3 if three else 6

    def trace(mask: np.ndarray, name: str, marker: dict) -> go.BaseTraceType:
        kw = {"x": xyz[mask, 0], "y": xyz[mask, 1]}
        if three:
            kw["z"] = xyz[mask, 2]
        return scatter(
            **kw,
            mode="markers",
            name=name,
            marker={"size": size, **marker},
            customdata=custom[mask],
            hovertemplate=template,
        )

    fig = go.Figure()
    if color is None or color not in rows:
        fig.add_trace(trace(np.ones(len(rows), bool), "windows", {"color": PALETTE[0]}))
    elif is_categorical(rows[color]):
        values = rows[color].astype(object).where(rows[color].notna(), "(none)").astype(str)
        for i, v in enumerate(sorted(values.unique(), key=_natural)):
            fig.add_trace(trace((values == v).to_numpy(), v, {"color": PALETTE[i % 20]}))
    else:
        values = pd.to_numeric(rows[color], errors="coerce").to_numpy()
        marker = {"color": values, "colorscale": "Viridis", "showscale": True}
        marker["colorbar"] = {"title": color}
        fig.add_trace(trace(np.ones(len(rows), bool), color, marker))
    if len(selected):
        sel = np.isin(rows.index.to_numpy(), np.asarray(selected))
        if sel.any():
            ring = {"color": "rgba(0,0,0,0)", "size": size + 8, "line": {"width": 2}}
            fig.add_trace(trace(sel, "selected", {**ring, "line": {"color": "black", "width": 2}}))
    for name, pts in (extra or {}).items():
        kw = {"x": pts[:, 0], "y": pts[:, 1]} | ({"z": pts[:, 2]} if three else {})
        fig.add_trace(
            scatter(
                **kw,
                mode="markers",
                name=name,
                marker={"symbol": "diamond" if three else "star", "size": size + 10},
                marker_color="black",
                hovertemplate=f"{name}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        height=620,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"itemsizing": "constant"},
        # no dragmode / clickmode: Streamlit sets "pan" + click-to-select for point
        # selection (a lasso dragmode would turn clicks off); lasso is in the mode bar
        uirevision=title,  # keep zoom / camera when only the colours change
    )
    return fig


def _natural(v: str) -> tuple:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def monthly_histogram(rows: pd.DataFrame, clusters: np.ndarray) -> go.Figure | None:
    """Windows per month for each cluster (the seed app's view); None without dates."""
    if "month" not in rows or rows["month"].notna().sum() == 0:
        return None
    df = pd.DataFrame({"month": rows["month"], "cluster": clusters}).dropna()
    counts = df.groupby(["cluster", "month"]).size().rename("windows").reset_index()
    fig = go.Figure()
    for c in sorted(counts["cluster"].unique()):
        part = counts[counts["cluster"] == c]
        fig.add_trace(go.Bar(x=part["month"], y=part["windows"], name=f"cluster {c}"))
    fig.update_layout(
        barmode="group",
        xaxis={"title": "month", "tickmode": "array", "tickvals": list(range(1, 13))},
        yaxis={"title": "windows"},
        height=320,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        title="windows per month, per cluster",
    )
    return fig


def spectrogram_figure(spec: np.ndarray, frame_seconds: float, top_hz: float, title: str):
    """Log-mel dB image (F, T): time in seconds, mel bins labelled up to the top frequency."""
    t = np.arange(spec.shape[1]) * frame_seconds
    fig = go.Figure(go.Heatmap(z=spec, x=t, colorscale="Magma", showscale=False))
    fig.update_layout(
        title=title,
        height=300,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis={"title": "time (s)"},
        yaxis={"title": f"mel bin (0 - {top_hz / 1000:.1f} kHz)"},
    )
    return fig


def curves_figure(metrics: pd.DataFrame, columns: Sequence[str]) -> go.Figure:
    """Training curves: each chosen metrics.csv column against step."""
    fig = go.Figure()
    x = metrics["step"] if "step" in metrics else np.arange(len(metrics))
    for c in columns:
        y = pd.to_numeric(metrics[c], errors="coerce")
        ok = y.notna().to_numpy()
        fig.add_trace(go.Scatter(x=np.asarray(x)[ok], y=y[ok], mode="lines+markers", name=c))
    fig.update_layout(
        height=380, xaxis={"title": "step"}, margin={"l": 10, "r": 10, "t": 30, "b": 10}
    )
    return fig


def variance_figure(ratios: np.ndarray) -> go.Figure:
    """PCA explained variance per component and cumulated."""
    k = np.arange(1, len(ratios) + 1)
    fig = go.Figure(go.Bar(x=k, y=ratios, name="per component"))
    fig.add_trace(go.Scatter(x=k, y=np.cumsum(ratios), name="cumulative", mode="lines+markers"))
    fig.update_layout(
        height=260,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        title="PCA explained variance",
        xaxis={"title": "component"},
    )
    return fig
