"""The explorer app driven through Streamlit's AppTest (every control), its path confinement,
the training launcher, uploads, labels export, the seed entry point and the static maps."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import streamlit as st
import torch
from conftest import ROOT, make_tone
from streamlit.testing.v1 import AppTest

from bioaudio.cli import main as cli
from bioaudio.data.manifest import PrepareConfig, build_manifest, write_manifest
from bioaudio.errors import ConfigError
from bioaudio.explorer import launch, projections
from bioaudio.explorer.paths import OutsideRootsError, PathPolicy
from bioaudio.inference import embed as E
from bioaudio.inference import embeddings as EF
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import save_export

CLASSES = {"owl": 500.0, "wren": 3000.0, "frog": 1200.0}
N_PER_CLASS = 6
TIMEOUT = 180


def _script(argv):
    from bioaudio.explorer.app import main

    main(argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """data/<class>/SITE_<date>_<time>.wav (1 s each, over several months), a tiny EAT export,
    its embeddings in runs/emb.parquet and a run with a metrics.csv."""
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("explorer")
    data, runs = base / "data", base / "runs"
    for c, (name, freq) in enumerate(CLASSES.items()):
        for i in range(N_PER_CLASS):
            month = 1 + (3 * c + i) % 12
            p = data / name / f"SITE{i % 2}_2024{month:02d}15_{(6 * i) % 24:02d}0000.wav"
            p.parent.mkdir(parents=True, exist_ok=True)
            sf.write(p, make_tone(1.0, 16000, freq * (1 + 0.05 * i), seed=i), 16000)
    model = save_export(build_model("eat", encoder="tiny"), base / "models" / "eat")
    other = save_export(build_model("beats", encoder="tiny"), base / "models" / "beats")
    emb = runs / "emb.parquet"
    cfg = E.EmbedConfig(window=1.0, progress=False, cpu=True)
    E.embed_to_parquet(model, data, emb, cfg)
    run = runs / "run1"
    run.mkdir()
    steps = np.arange(0, 50, 10)
    pd.DataFrame(
        {"step": steps, "train/loss": 1 / (1 + steps), "eval/accuracy": steps / 50, "lr": 1e-3}
    ).to_csv(run / "metrics.csv", index=False)
    manifest = build_manifest(data, PrepareConfig(progress=False)).manifest
    write_manifest(manifest, data / "manifest.csv")
    return {"base": base, "data": data, "runs": runs, "model": model, "other": other, "emb": emb}


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def _app(world, *extra: str) -> AppTest:
    argv = [str(world["emb"]), "--method", "pca", "--no_warm_up", "--data_dir", str(world["data"])]
    argv += ["--runs_dir", str(world["runs"]), *extra]
    at = AppTest.from_function(_script, args=(argv,), default_timeout=TIMEOUT)
    return at.run()


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _errors(at: AppTest) -> str:
    assert not at.exception, [e.value for e in at.exception]
    return " | ".join(e.value for e in at.error)


def _figure(at: AppTest, key: str = "map") -> dict:
    (chart,) = [c for c in at.get("plotly_chart") if c.proto.id.endswith(key)]
    return json.loads(chart.proto.spec)


def _points(fig: dict, name: str | None = None) -> int:
    return sum(len(t.get("customdata", [])) for t in fig["data"] if name in (None, t["name"]))


N = len(CLASSES) * N_PER_CLASS


def test_map_draws_every_window_and_every_control_works(world):
    at = _app(world)
    _ok(at)
    fig = _figure(at)
    assert _points(fig) == N
    assert {t["name"] for t in fig["data"]} == set(CLASSES)  # coloured by label by default
    assert {m.label for m in at.metric} >= {"silhouette", "ARI", "NMI"}
    assert [m.value for m in at.metric if m.label == "ARI"][0] != "n/a"
    for color in at.selectbox(key="color").options:
        at.selectbox(key="color").set_value(color).run()
        _ok(at)
        assert _points(_figure(at)) == N
    at.selectbox(key="color").set_value("cluster").run()
    assert len(_figure(at)["data"]) == 8  # k = 8 clusters by default
    at.number_input(key="k").set_value(3).run()
    _ok(at)
    assert len(_figure(at)["data"]) == 3
    at.selectbox(key="filter_col").set_value("labels").run()
    at.multiselect(key="filter_values").set_value(["owl"]).run()
    _ok(at)
    assert _points(_figure(at)) == N_PER_CLASS  # the filter hides points, the map stays
    at.selectbox(key="filter_col").set_value("(none)").run()
    at.radio(key="dims").set_value(3).run()
    _ok(at)
    assert _figure(at, "map3d")["data"][0]["type"] == "scatter3d"
    at.radio(key="dims").set_value(2).run()
    at.selectbox(key="method").set_value("umap").run()
    at.number_input(key="n_neighbors").set_value(5).run()
    at.number_input(key="min_dist").set_value(0.3).run()
    _ok(at)
    assert "UMAP" in _figure(at)["layout"]["title"]["text"]
    at.selectbox(key="method").set_value("tsne").run()
    at.number_input(key="perplexity").set_value(4.0).run()
    _ok(at)
    assert "TSNE" in _figure(at)["layout"]["title"]["text"]
    assert _points(_figure(at)) == N
    # a point: its spectrogram, its audio (read by seeking), playback speeds
    at.number_input(key="point").set_value(4).run()
    _ok(at)
    spec = _figure(at, "spectrogram")
    assert spec["data"][0]["type"] == "heatmap" and "spectrogram" in spec["layout"]["title"]["text"]
    assert at.get("audio")
    for speed in at.radio(key="speed").options:
        at.radio(key="speed").set_value(speed).run()
        _ok(at)
    assert any(t["name"] == "selected" for t in _figure(at)["data"])
    assert _figure(at, "months")["data"] and _figure(at, "variance")["data"]


def test_recolour_filter_and_point_never_recompute_the_map(world, monkeypatch):
    calls = []
    fit = projections.fit_projection

    def counting(*a, **kw):
        calls.append(a[1:3])
        return fit(*a, **kw)

    monkeypatch.setattr(projections, "fit_projection", counting)
    at = _app(world, "--method", "umap")
    _ok(at)
    assert len(calls) == 1
    at.selectbox(key="color").set_value("month").run()
    at.selectbox(key="color").set_value("season").run()
    at.selectbox(key="filter_col").set_value("site").run()
    at.number_input(key="point").set_value(2).run()
    at.number_input(key="k").set_value(4).run()
    _ok(at)
    assert len(calls) == 1
    at.number_input(key="n_neighbors").set_value(6).run()
    assert len(calls) == 2
    at.number_input(key="n_neighbors").set_value(15).run()  # the first parameter set: cached
    _ok(at)
    assert len(calls) == 2


def test_bad_values_are_messages_not_crashes(world):
    at = _app(world)
    at.selectbox(key="method").set_value("tsne").run()
    at.number_input(key="perplexity").set_value(100.0).run()
    assert "perplexity 100 is too large for 18 points" in _errors(at)
    at.number_input(key="perplexity").set_value(3.0).run()
    _ok(at)
    at.number_input(key="k").set_value(50).run()
    assert "k must be between 2 and 17" in _errors(at)
    at.number_input(key="k").set_value(3).run()
    at.selectbox(key="method").set_value("umap").run()
    at.number_input(key="n_neighbors").set_value(40).run()
    assert "n_neighbors must be between 2 and 17" in _errors(at)
    # embeddings files: another format, Parquet of another kind, outside the folders, missing
    csv = world["data"] / "manifest.csv"
    at.text_input(key="emb_path").set_value(str(csv)).run()
    assert "not a Parquet file" in _errors(at)
    other = world["runs"] / "other.parquet"
    pq.write_table(pa.table({"x": [1.0]}), other)
    at.text_input(key="emb_path").set_value("other.parquet").run()  # relative: in a folder
    assert "not bioaudio embeddings" in _errors(at)
    for outside in ("../../../etc/passwd", "/etc/hostname", "../emb_elsewhere.parquet"):
        at.text_input(key="emb_path").set_value(outside).run()
        assert "outside the folders this app may use" in _errors(at)
    at.text_input(key="emb_path").set_value("nothing_here.parquet").run()
    assert "no such file" in _errors(at)
    at.text_input(key="emb_path").set_value(str(world["emb"])).run()
    _ok(at)


def test_upload_is_embedded_and_placed(world):
    before = set(Path(tempfile.gettempdir()).glob("bioaudio-upload-*"))
    wav = world["base"] / "up.wav"
    sf.write(wav, make_tone(2.5, 16000, 3000.0, seed=5), 16000)
    at = _app(world)
    at.file_uploader(key="upload").upload("night.wav", wav.read_bytes(), "audio/wav").run()
    _ok(at)
    fig = _figure(at)
    stars = [t for t in fig["data"] if t["name"].startswith("night.wav")]
    assert stars and stars[0]["marker"]["symbol"] == "star"
    assert any("on the map" in s.value for s in at.success)
    for method in ("umap", "tsne"):  # placed with the UMAP transform / openTSNE / neighbours
        at.selectbox(key="method").set_value(method).run()
        _ok(at)
        assert any(t["name"].startswith("night.wav") for t in _figure(at)["data"])
    assert set(Path(tempfile.gettempdir()).glob("bioaudio-upload-*")) == before  # removed
    at = _app(world)
    at.file_uploader(key="upload").upload("notes.wav", b"this is not audio", "audio/wav").run()
    assert "not a readable recording" in _errors(at)
    at = _app(world, "--max_upload_mb", "0.01")
    at.file_uploader(key="upload").upload("big.wav", wav.read_bytes(), "audio/wav").run()
    assert "over the 0.01 MB limit" in _errors(at)
    at = _app(world, "--checkpoint_path", str(world["other"]))
    at.file_uploader(key="upload").upload("night.wav", wav.read_bytes(), "audio/wav").run()
    assert "another model" in _errors(at)


def test_export_labels_csv_that_prepare_reads(world):
    data = world["data"]
    at = _app(world)
    at.selectbox(key="color").set_value("cluster").run()
    assert at.get("download_button")
    at.text_input(key="save_path").set_value("labels.csv").run()  # relative: the data folder
    at.button(key="save").click().run()
    _ok(at)
    try:
        saved = pd.read_csv(data / "labels.csv")
        assert len(saved) == N and saved["labels"].str.startswith("cluster_").all()
        res = build_manifest(data, PrepareConfig(labels="csv", progress=False))
        assert len(res.manifest) == N and res.skipped.empty
        at.button(key="save").click().run()
        assert "exists" in _errors(at)
        at.checkbox(key="save_overwrite").check().run()
        at.radio(key="export").set_value("selection").run()
        at.text_input(key="export_label").set_value("night owl").run()
        at.selectbox(key="filter_col").set_value("labels").run()
        at.multiselect(key="filter_values").set_value(["owl"]).run()
        at.button(key="save").click().run()
        _ok(at)
        saved = pd.read_csv(data / "labels.csv")
        assert len(saved) == N_PER_CLASS and set(saved["labels"]) == {"night owl"}
        assert saved["filename"].str.startswith("owl/").all()
        at.text_input(key="export_label").set_value("a,b").run()
        assert "no comma" in _errors(at)
        at.text_input(key="export_label").set_value("ok").run()
        at.text_input(key="save_path").set_value("../../labels.csv").run()
        at.button(key="save").click().run()
        assert "outside the folders" in _errors(at)
    finally:
        (data / "labels.csv").unlink(missing_ok=True)


def test_training_curves_page(world):
    at = _app(world)
    at.radio(key="page").set_value("Training curves").run()
    _ok(at)
    at.text_input(key="run_dir").set_value("run1").run()
    _ok(at)
    fig = _figure(at, "curves_chart")
    assert {t["name"] for t in fig["data"]} == {"train/loss", "eval/accuracy"}
    at.multiselect(key="curves_columns").set_value(["lr"]).run()
    assert [t["name"] for t in _figure(at, "curves_chart")["data"]] == ["lr"]
    for outside in ("../data", "/etc", str(world["data"])):
        at.text_input(key="run_dir").set_value(outside).run()
        assert "outside the folders" in _errors(at)
    (world["runs"] / "empty_run").mkdir(exist_ok=True)
    at.text_input(key="run_dir").set_value("empty_run").run()
    assert "no metrics.csv" in _errors(at)


def test_launch_page_builds_runs_and_stops_a_command(world):
    at = _app(world)
    at.radio(key="page").set_value("Launch training").run()
    assert "manifest: required" in _errors(at)
    at.text_input(key="launch_train-baseline_manifest").set_value("manifest.csv").run()
    _ok(at)
    code = at.code[0].value
    assert "launch --num_processes 1" in code and "-m bioaudio train-baseline" in code
    assert str(world["data"] / "manifest.csv") in code and str(world["runs"] / "baseline") in code
    at.selectbox(key="launch_train-baseline_model").set_value("mlp").run()
    at.selectbox(key="launch_train-baseline_frontend").set_value("mfcc").run()
    at.number_input(key="launch_train-baseline_epochs").set_value(0.5).run()
    at.number_input(key="launch_train-baseline_batch_size").set_value(4).run()
    at.number_input(key="launch_train-baseline_n_mels").set_value(32).run()
    at.number_input(key="launch_train-baseline_lr").set_value(0.01).run()
    at.number_input(key="launch_train-baseline_clip_seconds").set_value(1.0).run()
    at.checkbox(key="launch_train-baseline_spec_augment").check().run()
    at.number_input(key="launch_processes").set_value(2).run()
    _ok(at)
    code = at.code[0].value
    for part in ("--model mlp", "--frontend mfcc", "--epochs 0.5", "--spec_augment", "--multi_gpu"):
        assert part in code
    at.text_input(key="launch_train-baseline_seeds").set_value("-rf").run()
    assert "may not start with '-'" in _errors(at)
    at.text_input(key="launch_train-baseline_seeds").set_value("1; rm -rf /").run()
    assert "not in the expected form" in _errors(at)
    at.text_input(key="launch_train-baseline_seeds").set_value("1,2").run()
    at.text_input(key="launch_train-baseline_out").set_value("../escape").run()
    assert "outside the folders" in _errors(at)
    at.text_input(key="launch_train-baseline_out").set_value("/tmp/escape").run()
    assert "outside the folders" in _errors(at)
    at.text_input(key="launch_train-baseline_out").set_value("launched").run()
    at.number_input(key="launch_processes").set_value(1).run()
    _ok(at)
    at.button(key="launch_start").click().run()
    job = at.session_state["job"]
    try:
        assert job.argv[0].endswith("accelerate") and job.proc.args == job.argv  # no shell
        assert job.log_path == world["runs"] / "launched" / "launch.log"
        at.button(key="launch_stop").click().run()
        _ok(at)
        assert job.returncode is not None and not job.running
    finally:
        job.stop()


def test_build_command_refuses_what_the_form_does_not_allow(world):
    policy = PathPolicy([world["data"]], [world["runs"]])
    argv = launch.build_command("train-baseline", {"manifest": "manifest.csv"}, policy)
    assert argv[argv.index("bioaudio") + 1 : argv.index("bioaudio") + 3] == [
        "train-baseline",
        str(world["data"] / "manifest.csv"),
    ]
    for values, message in [
        ({"manifest": "/etc/passwd"}, "outside"),
        ({"manifest": "manifest.csv", "out": "../../x"}, "outside"),
        ({"manifest": "manifest.csv", "model": "rm -rf"}, "not one of"),
        ({"manifest": "manifest.csv", "epochs": -1}, "outside ["),
        ({"manifest": "manifest.csv", "seeds": "--config=/etc/x"}, "may not start"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            launch.build_command("train-baseline", values, policy)
    with pytest.raises(ConfigError, match="not 'sh'"):
        launch.build_command("sh", {}, policy)
    argv = launch.build_command("pretrain", {"data": "owl", "objective": "eat:1"}, policy, 2)
    tail = argv[argv.index("pretrain") :]
    assert tail[:4] == [
        "pretrain",
        str(world["data"] / "owl"),
        "--out",
        str(world["runs"] / "pretrain"),
    ]
    assert "--model" not in tail and "--model_path" not in tail and "--multi_gpu" in argv
    with pytest.raises(ConfigError, match="expected form"):
        launch.build_command("pretrain", {"data": "owl", "objective": "eat;rm"}, policy)


def test_path_policy(world, tmp_path):
    policy = PathPolicy([world["data"]], [world["runs"]])
    assert policy.resolve("owl", "data") == world["data"] / "owl"
    assert policy.resolve(str(world["runs"] / "run1"), "runs") == world["runs"] / "run1"
    assert policy.resolve("run1/metrics.csv", "any", must_exist=True).is_file()
    for bad in ("../", "../../etc", "/etc/passwd", "owl/../../runs_x", "~"):
        with pytest.raises(OutsideRootsError):
            policy.resolve(bad, "data")
    link = world["data"] / "escape"
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(OutsideRootsError):  # a symlink out of a data folder
            policy.resolve("escape/x.wav", "data")
    finally:
        link.unlink()
    with pytest.raises(OutsideRootsError, match="no run folder"):
        PathPolicy([world["data"]], []).resolve("x", "runs")


def test_compute_mode_through_the_seed_entry_point(world, tmp_path, monkeypatch):
    """`streamlit run beats/interactive_vis.py -- --data_dir D --checkpoint_path C
    --max_samples N`: embeddings computed once (cached on disk), then reused."""
    cache = tmp_path / "cache"
    argv = ["interactive_vis.py", "--data_dir", str(world["data"]), "--checkpoint_path"]
    argv += [str(world["model"]), "--max_samples", "5", "--cache_dir", str(cache)]
    monkeypatch.setattr(sys, "argv", [*argv, "--method", "pca", "--no_warm_up"])
    script = ROOT / "beats" / "interactive_vis.py"
    at = AppTest.from_file(str(script), default_timeout=TIMEOUT).run()
    _ok(at)
    rows = EF.read_embeddings(next(cache.rglob("embeddings.parquet"))).rows
    assert rows["path"].nunique() == 5 and _points(_figure(at)) == len(rows)
    calls = []
    monkeypatch.setattr(E.Embedder, "__call__", lambda *a: calls.append(1))
    st.cache_resource.clear()
    at = AppTest.from_file(str(script), default_timeout=TIMEOUT).run()
    _ok(at)
    assert calls == [] and _points(_figure(at)) == len(rows)  # read from the disk cache
    empty = tmp_path / "no_audio"
    empty.mkdir()
    monkeypatch.setattr(
        sys,
        "argv",
        [argv[0], "--data_dir", str(empty), *argv[3:], "--method", "pca", "--no_warm_up"],
    )
    at = AppTest.from_file(str(script), default_timeout=TIMEOUT).run()
    assert "no audio files" in _errors(at)


def test_bad_app_options_are_messages(world):
    at = AppTest.from_function(_script, args=(["--bogus"],), default_timeout=TIMEOUT).run()
    assert "unknown app option" in _errors(at)
    at = AppTest.from_function(_script, args=(["--no_warm_up"],), default_timeout=TIMEOUT).run()
    _ok(at)
    assert "Give an embeddings file" in at.info[0].value


def test_plot_embeddings_command(world, tmp_path, capsys):
    out = tmp_path / "maps"
    argv = ["plot-embeddings", str(world["emb"]), "--out", str(out), "--perplexities", "2,4"]
    argv += ["--n_neighbors", "3,6", "--min_dist", "0.0,0.5"]
    assert cli(argv) == 0
    import matplotlib.image as mpimg

    for name in ("tsne_grid.png", "umap_grid.png"):
        img = mpimg.imread(out / name)
        assert img.shape[0] > 200 and img[..., :3].std() > 0.05  # a drawing, not a blank page
    assert cli([*argv, "--color", "cluster", "--k", "3", "--methods", "umap"]) == 0
    assert cli(["plot-embeddings", str(world["data"] / "manifest.csv")]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert cli(["plot-embeddings", str(world["emb"]), "--perplexities", "50"]) == 2
    assert "perplexity 50 is too large" in capsys.readouterr().err


def test_explore_command_refuses_bad_input_before_starting(world, capsys):
    assert cli(["explore"]) == 2
    assert "give an embeddings file" in capsys.readouterr().err
    assert cli(["explore", str(world["data"] / "manifest.csv")]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert cli(["explore", str(world["emb"]), "--data_dir", str(world["base"] / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_numba_cache_dir_is_persistent(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert projections.ensure_numba_cache() == tmp_path / "bioaudio" / "numba"
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "bioaudio" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert projections.ensure_numba_cache() == tmp_path / "mine"  # a set one is kept
    monkeypatch.undo()
    projections.ensure_numba_cache()  # numba back on the real cache for later tests


@pytest.mark.parametrize("method", ["pca", "umap", "tsne"])
def test_embeddings_with_nan_are_a_one_line_refusal(method):
    X = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    X[4, 2] = np.nan
    with pytest.raises(ConfigError, match="1 of 30 embedding"):
        projections.fit_projection(X, method, perplexity=5, n_neighbors=5)
