"""The embedding explorer (Streamlit). Start it with

    bioaudio explore EMBEDDINGS.parquet [--data_dir D] [--runs_dir R]
    streamlit run bioaudio/explorer/app.py -- EMBEDDINGS.parquet [options]
    streamlit run beats/interactive_vis.py -- --data_dir D --checkpoint_path C --max_samples N

With a data folder and a checkpoint instead of an embeddings file, the app computes the
embeddings once (cached under --cache_dir) and reuses them. Maps (PCA / UMAP / t-SNE, 2-D and
3-D) are computed once per parameter set and cached: changing the colouring, a filter or the
selected point never recomputes them. Paths typed into the app must lie under the data and run
folders it was started with.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

from bioaudio.explorer.projections import ensure_numba_cache

ensure_numba_cache()  # before anything imports numba (UMAP)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from bioaudio.errors import BioaudioError, ConfigError  # noqa: E402
from bioaudio.explorer import data as xdata  # noqa: E402
from bioaudio.explorer import figures, projections  # noqa: E402
from bioaudio.explorer.launch import (  # noqa: E402
    LAUNCH_FORMS,
    FormField,
    TrainingJob,
    build_command,
)
from bioaudio.explorer.paths import PathPolicy  # noqa: E402
from bioaudio.inference.embed import embed_table, input_table  # noqa: E402
from bioaudio.inference.embeddings import EmbeddingSet  # noqa: E402
from bioaudio.inference.runner import load_embedder, model_fingerprint  # noqa: E402

PAGES = ("Map", "Training curves", "Launch training")
SPEEDS = {"1x": 1.0, "1/2": 0.5, "1/4": 0.25, "1/10 (ultrasound)": 0.1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The app's options (what follows `--` on the streamlit command line)."""
    p = argparse.ArgumentParser(prog="bioaudio explore", exit_on_error=False, add_help=False)
    p.add_argument("embeddings", nargs="?", default=None)
    p.add_argument("--data_dir", action="append", default=[])
    p.add_argument("--checkpoint_path", default=None)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--runs_dir", action="append", default=[])
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--max_upload_mb", type=float, default=50.0)
    p.add_argument("--method", choices=projections.METHODS, default="umap")
    p.add_argument("--no_warm_up", action="store_true", help="do not pre-compile UMAP")
    try:
        args, unknown = p.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(f"app options: {e}") from None
    if unknown:
        raise ConfigError(f"unknown app option(s): {' '.join(unknown)}")
    if args.max_samples is not None and args.max_samples < 2:
        raise ConfigError("--max_samples must be at least 2")
    return args


# ----------------------------------------------------------------------------------------------
# Cached computations: keyed by the data fingerprint and the parameters only


@st.cache_resource(max_entries=4, show_spinner="reading embeddings ...")
def _load(path: str, fingerprint: str, max_rows: int | None) -> EmbeddingSet:
    return xdata.load_embedding_set(path, max_rows)


@st.cache_resource(max_entries=24, show_spinner=False)
def _projection(
    fingerprint: str, method: str, dims: int, params: tuple, _X: np.ndarray
) -> projections.Projection:
    kw = dict(params)
    return projections.fit_projection(_X, method, dims, **kw)


@st.cache_data(max_entries=32, show_spinner=False)
def _clusters(fingerprint: str, k: int, _X: np.ndarray) -> np.ndarray:
    return projections.kmeans(_X, k)


@st.cache_data(max_entries=32, show_spinner=False)
def _scores(fingerprint: str, k: int, _X: np.ndarray, _c: np.ndarray, _lab: Any) -> dict:
    return projections.cluster_scores(_X, _c, _lab)


@st.cache_data(max_entries=8, show_spinner=False)
def _variance(fingerprint: str, _X: np.ndarray) -> np.ndarray:
    return projections.pca_variance(_X, 10)


@st.cache_resource(max_entries=2, show_spinner="loading the model ...")
def _embedder(path: str, fingerprint: str, pooling: str, layer: int | None):
    return load_embedder(path, pooling, layer, device="cpu")


@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    # once per server process, in the background: UMAP's uncacheable JIT (see warm_up_umap)
    thread = threading.Thread(target=projections.warm_up_umap, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


@st.cache_resource
def _computed() -> dict[tuple, str]:
    return {}  # (data dir, checkpoint, max_samples) -> embeddings computed by this server


# ----------------------------------------------------------------------------------------------
# Where the embeddings come from


def _embeddings_path(args: argparse.Namespace, policy: PathPolicy) -> Path | None:
    default = args.embeddings or ""
    text = st.sidebar.text_input("embeddings file (.parquet)", value=default, key="emb_path")
    if text.strip():
        if args.embeddings and text.strip() == args.embeddings:
            return Path(args.embeddings)  # given on the command line: no folder restriction
        return policy.resolve(text, "any", must_exist=True)
    if args.data_dir and args.checkpoint_path:
        key = (args.data_dir[0], args.checkpoint_path, args.max_samples)
        done = _computed()
        if key not in done:
            cache = args.cache_dir or Path.home() / ".cache" / "bioaudio" / "explorer"
            bar = st.progress(0.0, text="computing embeddings (cached for next time) ...")
            path = xdata.compute_cached(
                args.data_dir[0],
                args.checkpoint_path,
                cache,
                args.max_samples,
                progress=lambda f, t: bar.progress(f, text=f"computing embeddings: {t} of audio"),
            )
            bar.empty()
            done[key] = str(path)
        return Path(done[key])
    return None


# ----------------------------------------------------------------------------------------------
# Map page


def _controls(n: int, args: argparse.Namespace) -> dict[str, Any]:
    sb = st.sidebar
    sb.subheader("map")
    method = sb.selectbox(
        "projection",
        projections.METHODS,
        index=projections.METHODS.index(args.method),
        key="method",
    )
    dims = sb.radio("dimensions", (2, 3), horizontal=True, key="dims")
    c: dict[str, Any] = {"method": method, "dims": int(dims), "params": ()}
    if method == "tsne":
        default = float(min(30, max(1, (n - 2) // 3)))
        p = sb.number_input("perplexity", 1.0, 1000.0, default, 1.0, key="perplexity")
        c["params"] = (("perplexity", float(p)),)
        sb.caption(f"t-SNE on {projections.tsne_backend()}")
    elif method == "umap":
        nn = sb.number_input("n_neighbors", 2, 1000, int(min(15, n - 1)), 1, key="n_neighbors")
        md = sb.number_input("min_dist", 0.0, 1.0, 0.1, 0.05, key="min_dist")
        c["params"] = (("n_neighbors", int(nn)), ("min_dist", float(md)))
    sb.subheader("clusters")
    c["k"] = int(sb.number_input("k (k-means)", 2, 1000, int(min(8, max(2, n - 1))), key="k"))
    return c


def _filter(rows: pd.DataFrame) -> np.ndarray:
    cats = [c for c in xdata.colour_columns(rows) if xdata.is_categorical(rows[c])]
    col = st.sidebar.selectbox("filter by", ["(none)", *cats], key="filter_col")
    if col == "(none)":
        return np.ones(len(rows), bool)
    values = rows[col].astype(str)
    choices = sorted(values.unique())
    chosen = st.sidebar.multiselect("show only", choices, default=choices, key="filter_values")
    return values.isin(chosen).to_numpy()


def map_page(args: argparse.Namespace, policy: PathPolicy) -> None:
    path = _embeddings_path(args, policy)
    if path is None:
        st.info(
            "Give an embeddings file (`bioaudio embed MODEL DATA --out EMB.parquet`), or start "
            "the app with --data_dir and --checkpoint_path to compute them."
        )
        return
    fp = xdata.file_fingerprint(path, args.max_samples)
    es = _load(str(path), fp, args.max_samples)
    X, prov = es.vectors, es.provenance
    st.caption(
        f"{path.name}: {len(es)} windows, dim {X.shape[1]}, model {prov.get('model_type')}"
        f" ({Path(str(prov.get('model_path', '?'))).name}), pooling {prov.get('pooling')},"
        f" layer {'last (encoder output)' if prov.get('layer') is None else prov['layer']},"
        f" windows of {prov.get('window')} s"
    )
    c = _controls(len(es), args)
    projections.check_params(c["method"], len(es), c["dims"], **dict(c["params"]))
    with st.spinner(f"computing the {c['method'].upper()} map (once per parameter set) ..."):
        proj = _projection(fp, c["method"], c["dims"], c["params"], X)
    clusters = _clusters(fp, c["k"], X)
    rows = es.rows.copy()  # the cached frame is shared: never modified in place
    rows["cluster"] = clusters
    options = ["cluster", *[x for x in xdata.colour_columns(es.rows) if x != "cluster"]]
    label_col = xdata.labels_of(es.rows)
    first = options.index("labels") if "labels" in options else 0
    color = st.sidebar.selectbox("colour by", options, index=first, key="color")
    visible = _filter(rows)
    scores = _scores(fp, c["k"], X, clusters, None if label_col is None else label_col.to_numpy())
    cols = st.columns(4)
    for col, name in zip(cols, ("silhouette", "ARI", "NMI")):
        col.metric(name, f"{scores[name]:.3f}" if name in scores else "n/a")
    cols[3].metric("PCA var. (2 comp.)", f"{_variance(fp, X)[:2].sum():.1%}")
    if st.session_state.get("point", -1) >= len(rows):  # another, smaller file was loaded
        st.session_state["point"] = -1
    uploads = st.session_state.setdefault("uploads", {})
    extra = {name: _placed(proj, fp, c, name, emb) for name, emb in uploads.items()}
    point = st.session_state.get("point", -1)
    fig = figures.map_figure(
        proj.coords,
        rows,
        color,
        title=f"{c['method'].upper()} {c['dims']}-D",
        visible=visible,
        selected=[point] if point >= 0 else [],
        extra=extra,
    )
    chosen: list[int] = []
    if c["dims"] == 2:
        event = st.plotly_chart(
            fig, key="map", on_select="rerun", selection_mode=("points", "box", "lasso")
        )
        chosen = _selected_rows(event)
        if len(chosen) == 1 and st.session_state.get("_last_click") != chosen[0]:
            st.session_state["_last_click"] = chosen[0]
            st.session_state["point"] = chosen[0]  # before the widget below is created
    else:
        st.plotly_chart(fig, key="map3d")
        st.caption("3-D maps cannot be clicked: pick a point by its row number below.")
    st.number_input("selected point (row number, -1 = none)", -1, len(rows) - 1, key="point")
    if st.session_state["point"] >= 0:
        _section(_point_panel, rows.loc[st.session_state["point"]])
    with st.expander("clusters over the year, PCA variance"):
        hist = figures.monthly_histogram(rows, clusters)
        if hist is not None:
            st.plotly_chart(hist, key="months")
        else:
            st.caption("no dates in the file names: no monthly histogram")
        st.plotly_chart(figures.variance_figure(_variance(fp, X)), key="variance")
    _section(_upload_panel, args, prov, proj)
    _section(_export_panel, rows, clusters, chosen, visible, policy)


def _section(fn: Any, *args: Any) -> None:
    """Run one panel; its error is shown in place and the rest of the page still works."""
    try:
        fn(*args)
    except BioaudioError as e:
        st.error(" ".join(str(e).split()))


def _selected_rows(event: Any) -> list[int]:
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    out = []
    for p in points:
        cd = p.get("customdata")
        if cd is not None and len(cd):
            out.append(int(float(cd[0])))
    return sorted(set(out))


def _placed(proj, fp: str, c: dict, name: str, emb: np.ndarray) -> np.ndarray:
    cache = st.session_state.setdefault("_placements", {})
    key = (fp, c["method"], c["dims"], c["params"], name)
    if key not in cache:
        cache[key] = projections.place(proj, emb)
    return cache[key]


def _point_panel(row: pd.Series) -> None:
    st.subheader(f"{row['file']}  {row['start']:.2f}-{row['end']:.2f} s")
    meta = {k: row[k] for k in row.index if k not in ("path",) and not pd.isna(row[k])}
    st.dataframe(pd.DataFrame([meta]).astype(str), hide_index=True)
    wav, sr = xdata.window_audio(row["path"], row["start"], row["end"])
    spec, dt, top = xdata.spectrogram(wav, sr)
    title = f"spectrogram: {row['file']} @ {row['start']:.2f} s"
    st.plotly_chart(figures.spectrogram_figure(spec, dt, top, title), key="spectrogram")
    speed = st.radio("playback speed", list(SPEEDS), horizontal=True, key="speed")
    st.audio(xdata.wav_bytes(wav, max(1, int(sr * SPEEDS[speed]))), format="audio/wav")


def _upload_panel(args: argparse.Namespace, prov: dict, proj) -> None:
    with st.expander("place a recording on the map"):
        st.caption(f"New points are {proj.placement}.")
        limit = f"recording (up to {args.max_upload_mb:g} MB)"
        up = st.file_uploader(limit, type=list(xdata.UPLOAD_TYPES), key="upload")
        if up is None:
            return
        key = f"{up.name} ({up.size} bytes)"
        if key in st.session_state["uploads"]:
            st.success(f"{key} is on the map (black stars)")
            return
        model = args.checkpoint_path or prov.get("model_path")
        if not model or not Path(model).exists():
            raise ConfigError(
                f"the model that made these embeddings ({model}) is not available: start the "
                "app with --checkpoint_path to place recordings"
            )
        if model_fingerprint(Path(model)) != prov.get("model_fingerprint"):
            raise ConfigError(
                f"{model} is another model than the one that made these embeddings "
                f"({prov.get('model_path')}): uploads would not be comparable"
            )
        pooling = "mean" if prov.get("pooling") == "penultimate" else prov.get("pooling", "mean")
        emb = _embedder(str(model), prov["model_fingerprint"], pooling, prov.get("layer"))
        with xdata.private_upload(up.name, up.getvalue(), args.max_upload_mb) as p:
            table, _ = input_table(p)
            window, hop = float(prov["window"]), float(prov["hop"])
            _, vectors, _ = embed_table(emb, table, window, hop)
        if len(vectors) == 0:
            raise ConfigError(f"{up.name}: too short to embed")
        st.session_state["uploads"][key] = vectors
        st.rerun()


def _export_panel(
    rows: pd.DataFrame, clusters: np.ndarray, chosen: list[int], visible: np.ndarray, policy
) -> None:
    with st.expander("export labels.csv (for bioaudio prepare)"):
        what = st.radio("labels from", ("clusters", "selection"), horizontal=True, key="export")
        if what == "clusters":
            part, labels = rows, pd.Series([f"cluster_{c}" for c in clusters], index=rows.index)
        else:
            idx = chosen or list(rows.index[visible])
            st.caption(
                f"{len(idx)} window(s): "
                + ("the lasso / box selection" if chosen else "the points the filter shows")
            )
            name = xdata.safe_label(st.text_input("label", "selected", key="export_label"))
            part, labels = rows.loc[idx], pd.Series(name, index=idx)
        table = xdata.labels_table(part, labels, None)
        st.dataframe(table.head(20), hide_index=True)
        st.download_button(
            "download labels.csv", table.to_csv(index=False), "labels.csv", key="download"
        )
        target = st.text_input("or save as (under a data or run folder)", "", key="save_path")
        overwrite = st.checkbox("overwrite an existing file", key="save_overwrite")
        if st.button("save", key="save") and target.strip():
            out = policy.resolve(target, "any")
            if out.is_dir():
                out = out / "labels.csv"
            table = xdata.labels_table(part, labels, out.parent)  # names relative to the csv
            written = xdata.save_labels_csv(table, out, overwrite)
            st.success(f"wrote {written} ({len(table)} files): bioaudio prepare {written.parent}")


# ----------------------------------------------------------------------------------------------
# Training curves and the launcher


def curves_page(policy: PathPolicy) -> None:
    st.header("training curves")
    text = st.text_input(f"run folder (under {policy.describe('runs')})", key="run_dir")
    if not text.strip():
        return
    run = policy.resolve(text, "runs", must_exist=True)
    files = [run / "metrics.csv"] if (run / "metrics.csv").is_file() else []
    files = files or sorted(run.rglob("metrics.csv"))
    if not files:
        raise ConfigError(f"{run} holds no metrics.csv (not a run directory?)")
    names = [str(f.relative_to(run)) for f in files]
    which = st.selectbox("metrics file", names, key="metrics_file") if len(files) > 1 else names[0]
    _curves(run / which, "curves")


def _curves(path: Path, key: str) -> None:
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable metrics.csv ({e})") from None
    numeric = [
        c for c in metrics.columns if c != "step" and pd.api.types.is_numeric_dtype(metrics[c])
    ]
    if not numeric:
        st.caption(f"{path.name}: no numeric columns yet")
        return
    default = [c for c in numeric if "loss" in c or "acc" in c] or numeric[:3]
    chosen = st.multiselect("metrics", numeric, default=default, key=f"{key}_columns")
    st.plotly_chart(figures.curves_figure(metrics, chosen), key=f"{key}_chart")


def _form_value(cmd: str, f: FormField) -> Any:
    key = f"launch_{cmd}_{f.name}"
    label = f"{f.name}: {f.help}" if f.help else f.name
    if f.kind == "bool":
        return st.checkbox(label, value=bool(f.default), key=key)
    if f.kind == "choice":
        return st.selectbox(label, f.choices, index=f.choices.index(f.default), key=key)
    if f.kind == "int":
        lo = None if f.minimum is None else int(f.minimum)
        hi = None if f.maximum is None else int(f.maximum)
        return st.number_input(label, lo, hi, int(f.default), 1, key=key)
    if f.kind == "float":
        lo = None if f.minimum is None else float(f.minimum)
        hi = None if f.maximum is None else float(f.maximum)
        return st.number_input(label, lo, hi, float(f.default), format="%g", key=key)
    return st.text_input(label, str(f.default or ""), key=key)


def launch_page(policy: PathPolicy) -> None:
    st.header("launch training")
    job: TrainingJob | None = st.session_state.get("job")
    cmd = st.selectbox("command", list(LAUNCH_FORMS), key="launch_command")
    values = {f.name: _form_value(cmd, f) for f in LAUNCH_FORMS[cmd]}
    n = int(st.number_input("processes", 1, 64, 1, key="launch_processes"))
    argv = build_command(cmd, values, policy, n)  # errors show before anything runs
    st.code(shlex.join(argv), language="bash")
    busy = job is not None and job.running
    if st.button("start", key="launch_start", disabled=busy):
        st.session_state["job"] = job = TrainingJob.start(cmd, values, policy, n)
    if job is not None:
        if st.button("stop", key="launch_stop", disabled=not job.running):
            job.stop()
        _job_status()


@st.fragment(run_every=2.0)
def _job_status() -> None:
    job: TrainingJob | None = st.session_state.get("job")
    if job is None:
        return
    state = "running" if job.running else f"finished (exit {job.returncode})"
    st.write(f"**{state}**: log in {job.log_path}")
    st.code(job.log_tail() or "(no output yet)", language="text")
    metrics = job.metrics_files()
    if metrics:
        _curves(metrics[0], "job")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """The whole page; `argv` are the app's options (default: sys.argv[1:])."""
    st.set_page_config(page_title="bioaudio explorer", layout="wide")
    st.title("bioaudio explorer")
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        policy = PathPolicy(args.data_dir, args.runs_dir or [Path.cwd() / "runs"])
        if not args.no_warm_up:
            _warm_up()
        page = st.sidebar.radio("page", PAGES, key="page")
        if page == "Map":
            map_page(args, policy)
        elif page == "Training curves":
            curves_page(policy)
        else:
            launch_page(policy)
    except BioaudioError as e:
        st.error(" ".join(str(e).split()))


if __name__ == "__main__":
    main()
