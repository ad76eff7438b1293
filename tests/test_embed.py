"""`bioaudio embed`: Parquet schema and provenance, windows read by seeking, labels, file-name
dates, batched == one at a time, resuming, CNN baselines, two real processes == one, bad input."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import make_tone

from bioaudio.cli import main
from bioaudio.data import audio
from bioaudio.data.frontend import FrontendConfig
from bioaudio.inference import embed as E
from bioaudio.inference import embeddings as EF
from bioaudio.models.audio_model import build_model
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export

WINDOW, HOP = 2.0, 1.5
ARGS = ["--window", str(WINDOW), "--hop", str(HOP), "--no-progress", "--cpu"]

# name -> (seconds, sample rate, channels); the .wav / .flac / .ogg containers all seek
FILES = {
    "SITEA_20240501_053000.wav": (3.3, 16000, 1),
    "SITEA_20240115_230000.flac": (7.0, 22050, 2),
    "20240710.wav": (1.2, 32000, 1),
    "nested/plain_recording.ogg": (2.5, 44100, 1),
}


def _write(root: Path, name: str, seconds: float, sr: int, channels: int, seed: int) -> Path:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(p, make_tone(seconds, sr, 300 + 200 * seed, channels, seed), sr)
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recordings")
    for i, (name, spec) in enumerate(FILES.items()):
        _write(root, name, *spec, seed=i)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00not audio at all")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    baseline = BaselineClassifier.build(
        "tiny_mel_cnn", FrontendConfig(kind="logmel", n_mels=64), ["a", "b"]
    )
    return {
        "eat": save_export(build_model("eat", encoder="tiny"), root / "eat"),
        "beats": save_export(build_model("beats", encoder="tiny"), root / "beats"),
        "baseline": save_export(baseline, root / "cnn"),
    }


def _expected_windows(seconds: float) -> list[tuple[float, float]]:
    """The window rule of segment_windows, written out: full windows every HOP, plus one
    partial tail holding at least half a window (or the only window of a short file)."""
    out, s = [], 0.0
    while s + WINDOW <= seconds + 1e-9:
        out.append((s, s + WINDOW))
        s += HOP
    if s < seconds - 1e-9 and (not out or (out[-1][1] < seconds and seconds - s >= WINDOW / 2)):
        out.append((s, seconds))
    return out


def _read(path: Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    es = EF.read_embeddings(path)
    return es.rows, es.vectors, es.provenance


def test_embed_folder_end_to_end(models, data_dir, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(models["eat"]), str(data_dir), "--out", str(out), *ARGS]) == 0
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert [f.name for f in table.schema][:-1] == [n for n, _ in EF.METADATA_FIELDS]
    rows, X, prov = _read(out)
    assert prov["format"] == EF.EMBEDDINGS_FORMAT and prov["embedding_dim"] == 64
    assert prov["model_type"] == "eat" and prov["pooling"] == "mean" and prov["layer"] is None
    assert prov["frontend"]["kind"] == "eat_fbank" and prov["bioaudio_version"]
    assert prov["model_path"] == str(models["eat"].resolve()) and prov["processes"] == 1
    # every window of every readable file, in (path, start) order, none twice
    want = []
    for name, (seconds, _, _) in FILES.items():
        p = str((data_dir / name).resolve())
        want += [(p, round(a, 6), round(b, 6)) for a, b in _expected_windows(seconds)]
    got = list(zip(rows["path"], rows["start"].round(6), rows["end"].round(6)))
    assert sorted(got) == sorted(want) and got == sorted(got)
    assert rows["duration"].round(3).tolist() == [
        round(FILES[Path(p).relative_to(data_dir).as_posix()][0], 3) for p in rows["path"]
    ]
    first = rows[rows["path"].str.endswith("SITEA_20240115_230000.flac")].iloc[0]
    assert (first["sample_rate"], first["channels"]) == (22050, 2)
    assert rows["labels"].isna().all()  # an unlabelled folder: labels unknown, not negative
    # an embedding equals the model on that window decoded independently (array input)
    model = E.load_embedder(models["eat"])
    for i in (0, len(rows) - 1):
        r = rows.iloc[i]
        wav = audio.load(r["path"], 16000, offset=r["start"], duration=r["end"] - r["start"])
        ref = model(torch.from_numpy(wav)[None])[0].numpy()
        np.testing.assert_allclose(X[i], ref, atol=1e-5)
    skipped = pd.read_csv(out.with_name("skipped.csv"))
    assert skipped["path"].str.endswith("broken.wav").tolist() == [True]
    assert skipped["reason"].iloc[0] and skipped["embeddings"].iloc[0] == "emb.parquet"
    printed = capsys.readouterr().out
    assert "audio h/s" in printed and "bioaudio explore" in printed


def test_file_name_dates_and_metadata_columns(models, data_dir, tmp_path):
    out = tmp_path / "emb.parquet"
    assert main(["embed", str(models["eat"]), str(data_dir), "--out", str(out), *ARGS]) == 0
    rows, _, _ = _read(out)
    by = {Path(p).name: g for p, g in rows.groupby("path")}
    a = by["SITEA_20240501_053000.wav"]
    assert a["site"].eq("SITEA").all()
    assert a["datetime"].iloc[1] == pd.Timestamp("2024-05-01 05:30:01.500")  # + window start
    assert a[["month", "hour"]].iloc[0].tolist() == [5, 5] and a["season"].iloc[0] == "spring"
    assert a["date"].iloc[0] == dt.date(2024, 5, 1)
    winter = by["SITEA_20240115_230000.flac"]
    assert (winter["month"].iloc[0], winter["hour"].iloc[0]) == (1, 23)
    assert winter["season"].iloc[0] == "winter"
    date_only = by["20240710.wav"].iloc[0]
    assert date_only["datetime"] == pd.Timestamp("2024-07-10") and pd.isna(date_only["hour"])
    assert pd.isna(date_only["site"]) and date_only["season"] == "summer"
    plain = by["plain_recording.ogg"].iloc[0]
    assert pd.isna(plain["datetime"]) and pd.isna(plain["month"]) and pd.isna(plain["season"])


@pytest.mark.parametrize(
    "name, site, when, has_time",
    [
        ("SITE_20240501_053000.wav", "SITE", "2024-05-01 05:30:00", True),
        ("20240501.wav", None, "2024-05-01 00:00:00", False),
        ("S4A03895_20190522_001500.wav", "S4A03895", "2019-05-22 00:15:00", True),
        ("site_A_20240501_050000.flac", "site_A", "2024-05-01 05:00:00", True),
        ("AM1-2023-12-31T23-59-59.wav", "AM1", "2023-12-31 23:59:59", True),
        ("rec_20240501_0530.wav", "rec", "2024-05-01 05:30:00", True),
        ("x_20240231_120000.wav", None, None, False),  # no 31 February: not a date
        ("clip_0001.wav", None, None, False),
        ("id123420240501.wav", None, None, False),  # digits glued on: not a date
    ],
)
def test_parse_file_time(name, site, when, has_time):
    ft = EF.parse_file_time(name)
    assert ft.site == site and ft.has_time == has_time
    assert ft.start == (None if when is None else dt.datetime.fromisoformat(when))


def test_seasons_by_hemisphere():
    assert [EF.season_of(m) for m in (1, 4, 7, 10)] == ["winter", "spring", "summer", "autumn"]
    assert [EF.season_of(m, "south") for m in (1, 4, 7, 10)] == [
        "summer",
        "autumn",
        "winter",
        "spring",
    ]


@pytest.mark.parametrize(
    "kind, pooling, layer",
    [("eat", "mean", None), ("eat", "cls", 0), ("beats", "mean", -1), ("baseline", "mean", None)],
)
def test_batched_equals_one_at_a_time(models, data_dir, kind, pooling, layer):
    """Padded batches of windows of different lengths give each window its alone-embedding."""
    table, _ = E.input_table(data_dir)
    table = table[~table["path"].str.endswith(".ogg")]  # 8 windows of 4 lengths are enough
    emb = E.load_embedder(models[kind], pooling, layer)
    rows8, X8, _ = E.embed_table(emb, table, WINDOW, HOP, batch_size=8)
    rows1, X1, _ = E.embed_table(emb, table, WINDOW, HOP, batch_size=1)
    lengths = (rows8["end"] - rows8["start"]).round(3)
    assert lengths.nunique() >= 3  # the batches really hold padded windows
    assert rows8[["path", "start"]].equals(rows1[["path", "start"]])
    np.testing.assert_allclose(X8, X1, atol=2e-5, rtol=1e-4)
    assert np.isfinite(X8).all() and X8.std(axis=0).max() > 0


def test_layer_selects_a_block(models, data_dir):
    table, _ = E.input_table(data_dir)
    last = E.embed_table(E.load_embedder(models["eat"], "mean", -1), table, WINDOW)[1]
    first = E.embed_table(E.load_embedder(models["eat"], "mean", 0), table, WINDOW)[1]
    plain = E.embed_table(E.load_embedder(models["eat"]), table, WINDOW)[1]
    np.testing.assert_allclose(last, plain, atol=1e-6)  # EAT (post-LN): last block = output
    assert not np.allclose(first, last, atol=1e-3)


def test_resume_embeds_only_new_files(models, data_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    out = tmp_path / "emb.parquet"
    cfg = E.EmbedConfig(window=WINDOW, hop=HOP, progress=False, cpu=True)
    seen: list[int] = []
    call = E.Embedder.__call__

    def counting(self, wav, mask=None):
        seen.append(len(wav))
        return call(self, wav, mask)

    monkeypatch.setattr(E.Embedder, "__call__", counting)
    first = E.embed_to_parquet(models["eat"], data, out, cfg)
    rows1, X1, _ = _read(out)
    assert first.new_files == 4 and sum(seen) == len(rows1)
    _write(data, "SITEB_20240601_120000.wav", 4.0, 16000, 1, seed=9)
    seen.clear()
    second = E.embed_to_parquet(models["eat"], data, out, cfg)
    rows2, X2, _ = _read(out)
    new = rows2["path"].str.endswith("SITEB_20240601_120000.wav")
    assert (second.new_files, second.already_done) == (1, 4)
    assert sum(seen) == int(new.sum()) == len(_expected_windows(4.0))  # only the new file ran
    assert len(rows2) == len(rows1) + int(new.sum())
    assert not rows2.duplicated(["path", "start"]).any()
    old = rows2[~new].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, rows1)
    np.testing.assert_array_equal(X2[~new.to_numpy()], X1)
    assert not E.parts_dir(out).exists()


def test_resume_after_interruption_equals_straight_run(models, data_dir, tmp_path, monkeypatch):
    cfg = E.EmbedConfig(window=WINDOW, hop=HOP, batch_size=2, progress=False, cpu=True)
    straight = tmp_path / "straight.parquet"
    E.embed_to_parquet(models["eat"], data_dir, straight, cfg)
    monkeypatch.setattr(E, "PART_ROWS", 1)  # a part after every file
    out = tmp_path / "resumed" / "emb.parquet"
    calls = []

    def crash(fraction: float, text: str) -> None:
        calls.append(fraction)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-run: some files are in parts, none merged

    with pytest.raises(KeyboardInterrupt):
        E.embed_to_parquet(models["eat"], data_dir, out, cfg, progress=crash)
    assert not out.exists() and list(E.parts_dir(out).glob("part-*.parquet"))
    result = E.embed_to_parquet(models["eat"], data_dir, out, cfg)
    assert 0 < result.already_done < 4 and result.new_files == 4 - result.already_done
    a, b = EF.read_embeddings(straight), EF.read_embeddings(out)
    pd.testing.assert_frame_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)


def test_labelled_manifest_and_cnn_baseline(models, tmp_path):
    from bioaudio.data.demo import generate_demo_data

    generate_demo_data(tmp_path / "demo", n_per_class=1, n_unlabelled=0, soundscapes=0)
    out = tmp_path / "cnn.parquet"
    by_class = tmp_path / "demo" / "by_class"
    code = main(["embed", str(models["baseline"]), str(by_class), "--out", str(out), *ARGS])
    assert code == 0
    rows, X, prov = _read(out)
    assert X.shape[1] == 128 and prov["pooling"] == "penultimate"  # TinyMelCNN's dense layer
    assert prov["model_type"] == "baseline:tiny_mel_cnn"
    assert (X >= 0).all() and (X > 0).any()  # after ReLU: the penultimate activation
    assert set(rows["labels"]) == {Path(p).parent.name for p in rows["path"]}


@pytest.fixture
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(models, data_dir, tmp_path, _free_port):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert main(["embed", str(models["eat"]), str(data_dir), "--out", str(one), *ARGS]) == 0
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port), "-m", "bioaudio", "embed"]
    cmd += [str(models["eat"]), str(data_dir), "--out", str(two), *ARGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "on 2 process(es)" in res.stdout and res.stdout.count("embedded ") == 1
    a, b = EF.read_embeddings(one), EF.read_embeddings(two)
    assert b.provenance["processes"] == 2
    pd.testing.assert_frame_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=2e-5, rtol=1e-4)
    assert pd.read_csv(two.with_name("skipped.csv"))["path"].str.endswith("broken.wav").all()


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bioaudio embed: error: ") and "\n" not in err, err
    return err


def test_bad_input(models, data_dir, tmp_path, capsys):
    m, d, out = str(models["eat"]), str(data_dir), str(tmp_path / "e.parquet")
    assert "input not found" in _error(capsys, ["embed", m, str(tmp_path / "nope"), "--out", out])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    assert "no audio files" in _error(capsys, ["embed", m, str(empty), "--out", out])
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    assert "not a checkpoint" in _error(capsys, ["embed", str(text), d, "--out", out])
    assert "model not found" in _error(capsys, ["embed", str(tmp_path / "m"), d, "--out", out])
    assert "--window must be positive" in _error(capsys, ["embed", m, d, "--window", "0"])
    assert "--window must be positive" in _error(capsys, ["embed", m, d, "--window", "-1"])
    foreign = tmp_path / "table.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    err = _error(capsys, ["embed", m, d, "--out", str(foreign), *ARGS])
    assert "not a bioaudio embeddings file" in err and "--overwrite" in err
    assert pq.read_table(foreign).num_rows == 2  # left alone
    assert "ending in .parquet" in _error(capsys, ["embed", m, d, "--out", str(tmp_path / "x")])
    (tmp_path / "dir.parquet").mkdir()
    assert "is a folder" in _error(capsys, ["embed", m, d, "--out", str(tmp_path / "dir.parquet")])
    err = _error(capsys, ["embed", str(models["beats"]), d, "--pooling", "cls", *ARGS])
    assert "no CLS token" in err
    assert "has 2 blocks" in _error(capsys, ["embed", m, d, "--layer", "7", *ARGS])
    assert "CNN baseline" in _error(capsys, ["embed", str(models["baseline"]), d, "--layer", "0"])
    # another kind of skipped.csv beside the output (bioaudio prepare's) is not overwritten
    other = tmp_path / "prep"
    other.mkdir()
    (other / "skipped.csv").write_text("path,reason\n")
    err = _error(capsys, ["embed", m, d, "--out", str(other / "e.parquet"), *ARGS])
    assert "skipped.csv" in err and (other / "skipped.csv").read_text() == "path,reason\n"


def test_overwrite_and_changed_settings(models, data_dir, tmp_path, capsys):
    out = tmp_path / "e.parquet"
    assert main(["embed", str(models["eat"]), str(data_dir), "--out", str(out), *ARGS]) == 0
    err = _error(capsys, ["embed", str(models["eat"]), str(data_dir), "--out", str(out),
                          *ARGS, "--pooling", "cls"])  # fmt: skip
    assert "other settings (pooling)" in err
    cmd = ["embed", str(models["eat"]), str(data_dir), "--out", str(out), *ARGS]
    assert main([*cmd, "--pooling", "cls", "--overwrite"]) == 0
    assert EF.read_provenance(out)["pooling"] == "cls"
    foreign = tmp_path / "f.parquet"
    foreign.write_text("a csv, really")
    assert main([*cmd[:4], str(foreign), *ARGS, "--overwrite"]) == 0
    assert json.loads(pq.read_schema(foreign).metadata[b"bioaudio"])["embedding_dim"] == 64


def test_a_model_that_embeds_nan_is_a_clear_error_and_writes_nothing(data_dir, tmp_path, capsys):
    # finite but blown-up weights (what a diverged run exports) give NaN embeddings: refused,
    # no Parquet file claiming success
    torch.manual_seed(0)
    model = build_model("eat", encoder="tiny")
    with torch.no_grad():
        model.encoder.blocks[0].mlp.fc1.weight.mul_(1e30)
        model.encoder.blocks[0].mlp.fc2.weight.mul_(1e30)
    path = save_export(model, tmp_path / "blown")
    out = tmp_path / "e.parquet"
    assert main(["embed", str(path), str(data_dir), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bioaudio embed: error: ") and "\n" not in err, err
    assert "not finite" in err and not out.exists()


def test_a_file_too_short_for_a_window_is_listed_as_skipped(models, data_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(data_dir / "SITEA_20240501_053000.wav", folder / "ok.wav")
    sf.write(folder / "tiny.wav", np.zeros(100, np.float32), 16000)  # 6 ms
    out = tmp_path / "e.parquet"
    assert main(["embed", str(models["eat"]), str(folder), "--out", str(out), *ARGS]) == 0
    stdout = capsys.readouterr().out
    skipped = pd.read_csv(out.with_name("skipped.csv"))
    assert [Path(p).name for p in skipped["path"]] == ["tiny.wav"]
    assert "no window" in skipped["reason"].iloc[0] and "skipped 1 file" in stdout
    assert set(EF.read_embeddings(out).rows["path"].map(lambda p: Path(p).name)) == {"ok.wav"}


def test_a_rerun_says_which_rows_come_from_an_earlier_input(models, data_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("SITEA_20240501_053000.wav", "20240710.wav"):
        shutil.copy(data_dir / name, folder / name)
    out = tmp_path / "e.parquet"
    assert main(["embed", str(models["eat"]), str(folder), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    (folder / "20240710.wav").unlink()
    assert main(["embed", str(models["eat"]), str(folder), "--out", str(out), *ARGS]) == 0
    said = capsys.readouterr().out
    assert "note: 1 file(s) of e.parquet are not in this input" in said
    assert main(["embed", str(models["eat"]), str(folder), "--out", str(out), *ARGS,
                 "--overwrite"]) == 0  # fmt: skip
    assert set(EF.read_embeddings(out).rows["path"].map(lambda p: Path(p).name)) == {
        "SITEA_20240501_053000.wav"
    }


def test_window_groups_decode_once_and_give_the_same_items(tmp_path, monkeypatch):
    """Inference reads neighbouring windows of a file in one decode per batch: every item equals
    the item read alone, and an unreadable window still gets its own reason."""
    from bioaudio.data.datasets import unlabelled_clips
    from bioaudio.inference import runner

    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.wav", tmp_path / "b.flac"
    sf.write(a, (0.2 * rng.standard_normal(16000 * 6)).astype(np.float32), 16000)
    sf.write(b, (0.2 * rng.standard_normal((22050 * 3, 2))).astype(np.float32), 22050)
    rows = [(a, s, s + 1.0) for s in np.arange(0, 5.5, 0.5)]  # hop half a window
    rows += [(a, 5.5, 6.5), (b, 0.0, 1.0), (b, 0.5, 1.5), (b, 2.5, 3.5), (b, 9.0, 10.0)]
    table = pd.DataFrame([(str(p), s, e) for p, s, e in rows], columns=["path", "start", "end"])
    calls = []
    real = audio.load_windows
    monkeypatch.setattr(
        "bioaudio.data.datasets.load_windows",
        lambda p, sr, w: calls.append(len(w)) or real(p, sr, w),
    )
    windows = runner._Windows(table, 16000, batch_size=8)
    one_by_one = unlabelled_clips(table, 16000)
    for i in range(len(table)):
        got = windows[i]
        if i == len(table) - 1:  # past the end of b: its own reason, read alone
            assert "past the end" in got["error"] and got["index"] == i
            continue
        ref = one_by_one[i]
        assert set(got) == set(ref)
        for k in ref:
            same = torch.equal(got[k], ref[k]) if torch.is_tensor(ref[k]) else got[k] == ref[k]
            assert same, (i, k)
    # a: rows 0-7 (the first batch of 8), rows 8-11 (the second batch); b: rows 12-13; row 14
    # starts 1 s (more than half a window) after 13 ends and row 15 is past the end: read alone
    assert calls == [8, 4, 2]


def test_read_groups_rules():
    from bioaudio.inference.runner import read_groups

    t = pd.DataFrame(
        [("x", 0, 2), ("x", 1, 3), ("x", 3.9, 5.9), ("x", 7, 9), ("x", 1, 3), ("y", 1, 3),
         ("y", 2, 4), ("y", 3, 5)],
        columns=["path", "start", "end"],
    )  # fmt: skip
    first, end = read_groups(t, batch_size=7)
    # x 0-2 (row 2 starts 0.9 s after row 1 ends: within half a window), row 3 1.1 s after:
    # new group; row 4 goes back in time: new group; file y: new group; row 7 is a new batch
    assert first.tolist() == [0, 0, 0, 3, 4, 5, 5, 7]
    assert end.tolist() == [3, 3, 3, 4, 5, 7, 7, 8]
    assert read_groups(t.iloc[:0], 4)[0].size == 0
