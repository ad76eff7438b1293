"""Splits: stratified / grouped / k-fold / ESC folds, seeded, no group leakage, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import whole_file_row

from bioaudio.cli import main
from bioaudio.data.datasets import segment_windows
from bioaudio.data.manifest import read_manifest, split_labels, write_manifest
from bioaudio.data.splits import (
    SplitConfig,
    assign_folds,
    assign_splits,
    groups_of,
    split_manifest,
    split_table,
    strata_of,
)
from bioaudio.errors import ConfigError, DataError


def synthetic(n_per_class: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """A manifest table (no audio needed): recordings r0..; shuffled class order."""
    labels = [c for c, n in n_per_class.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    labels = [labels[i] for i in rng.permutation(len(labels))]
    n = len(labels)
    return pd.DataFrame(
        {
            "path": [f"/data/{i:04d}.wav" for i in range(n)],
            "sample_rate": 16000,
            "frames": 16000,
            "duration": 1.0,
            "channels": 1,
            "start": 0.0,
            "end": 1.0,
            "labels": labels,
            "recording": [f"r{i}" for i in range(n)],
            "source": "test",
        }
    )


# --------------------------------------------------------------------------- stratified


def test_stratified_split_is_proportional_exact_and_seeded():
    df = synthetic({"a": 50, "b": 30, "c": 20, "d": 7, "e": 3})
    cfg = SplitConfig(val=0.1, test=0.2, seed=1)
    res = split_manifest(df, cfg)
    s = res.df["split"]
    assert res.column == "split" and set(s) == {"train", "val", "test"}
    assert (s == "test").sum() == 22 and (s == "val").sum() == 11  # exact totals of 110
    for c, n in {"a": 50, "b": 30, "c": 20, "d": 7, "e": 3}.items():
        mine = s[df["labels"] == c]
        assert (
            abs((mine == "test").sum() - 0.2 * n) < 1 and abs((mine == "val").sum() - 0.1 * n) < 1
        )
        assert (mine == "train").sum() >= 1  # every class is trained on
    assert split_manifest(df, cfg).df["split"].tolist() == s.tolist()  # same seed, same split
    other = split_manifest(df, SplitConfig(val=0.1, test=0.2, seed=2)).df["split"]
    assert other.tolist() != s.tolist()
    # the manifest is otherwise untouched
    pd.testing.assert_frame_equal(res.df.drop(columns="split"), df)


def test_tiny_classes_and_tiny_sets():
    # 10 singleton classes and a 10% test split: one test clip, every other class stays in train
    df = synthetic({f"c{i}": 1 for i in range(10)} | {"big": 10})
    s = assign_splits(strata_of(df), val=0.0, test=0.1, seed=0)
    assert (s == "test").sum() == 2 and (s == "val").sum() == 0
    assert set(df["labels"][s == "test"]) == {"big"}  # taken where a class can spare it
    with pytest.raises(DataError, match="too few clips \\(2\\)"):
        split_manifest(synthetic({"a": 2}), SplitConfig(val=0.1, test=0.1))


def test_multi_label_rows_stratified_by_their_rarest_label():
    df = synthetic({"common": 60})
    df.loc[df.index[:10], "labels"] = "common,rare"
    strata = strata_of(df)
    assert (strata[:10] == "rare").all() and (strata[10:] == "common").all()
    s = split_manifest(df, SplitConfig(val=0.2, test=0.2, seed=0)).df["split"]
    rare = s[:10]
    assert (rare == "val").sum() == 2 and (rare == "test").sum() == 2


# --------------------------------------------------------------------------- grouped


def test_grouped_split_keeps_every_window_of_a_recording_together():
    rng = np.random.default_rng(0)
    rec = synthetic({"a": 12, "b": 12, "c": 6})
    rec["end"] = rec["duration"] = rng.uniform(1, 20, len(rec)).round(2)
    windows = segment_windows(rec, window=1.0)  # many rows per recording
    res = split_manifest(windows, SplitConfig(method="group", val=0.15, test=0.15, seed=3))
    owner = res.df.groupby("recording")["split"].nunique()
    assert (owner == 1).all()  # no recording in two splits
    counts = res.df["split"].value_counts(normalize=True)
    assert set(counts.index) == {"train", "val", "test"}
    assert abs(counts["test"] - 0.15) < 0.1 and abs(counts["val"] - 0.15) < 0.1
    again = split_manifest(windows, SplitConfig(method="group", val=0.15, test=0.15, seed=3))
    assert again.df["split"].tolist() == res.df["split"].tolist()


def test_group_given_to_stratified_is_honoured_and_empty_groups_fall_back_to_path():
    df = synthetic({"a": 40, "b": 40})
    df["site"] = [f"s{i % 9}" if i % 10 else "" for i in range(len(df))]
    res = split_manifest(df, SplitConfig(group_column="site", seed=0))
    g = groups_of(df, column="site")
    assert (pd.Series(res.df["split"]).groupby(g).nunique() == 1).all()
    assert all(x.startswith("path:") for x in g[df["site"] == ""])
    # ungrouped split of a manifest with repeated recordings warns about leakage
    df["recording"] = [f"r{i // 4}" for i in range(len(df))]
    res = split_manifest(df, SplitConfig(seed=0))
    assert any("share a recording" in n for n in res.notes)


def test_group_pattern_on_file_names():
    df = synthetic({str(d): 12 for d in range(10)})
    speakers = ["jackson", "nicolas", "theo", "yweweler", "george", "lucas"]
    df["path"] = [f"/fsdd/{lab}_{speakers[i % 6]}_{i}.wav" for i, lab in enumerate(df["labels"])]
    cfg = SplitConfig(method="group", group_pattern=r"^\d+_([a-z]+)_\d+", val=0.2, test=0.2)
    res = split_manifest(df, cfg)
    spk = res.df["path"].str.extract(r"_([a-z]+)_")[0]
    assert (res.df.groupby(spk)["split"].nunique() == 1).all()
    assert set(res.df["split"]) == {"train", "val", "test"}
    with pytest.raises(DataError, match="matches no file name"):
        groups_of(df, pattern=r"^speaker(\d+)")
    df.loc[0, "path"] = "/fsdd/odd name.wav"
    with pytest.raises(DataError, match="does not match 1 of 120 file names"):
        groups_of(df, pattern=r"^\d+_([a-z]+)_\d+")


def test_too_few_groups():
    df = synthetic({"a": 10})
    df["site"] = ["x"] * 5 + ["y"] * 5
    with pytest.raises(DataError, match="too few groups \\(2\\)"):
        split_manifest(df, SplitConfig(method="group", group_column="site"))
    with pytest.raises(DataError, match="too few groups \\(2\\) for 3 folds"):
        split_manifest(df, SplitConfig(method="kfold", folds=3, group_column="site"))


# --------------------------------------------------------------------------- folds


def test_kfold_stratified_and_grouped():
    df = synthetic({"a": 25, "b": 15, "c": 10})
    folds = assign_folds(strata_of(df), folds=5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    per = pd.crosstab(df["labels"], folds)
    assert (per.max(axis=1) - per.min(axis=1) <= 1).all()  # each class spread evenly
    assert (assign_folds(strata_of(df), 5, seed=0) == folds).all()
    df["recording"] = [f"r{i // 3}" for i in range(len(df))]
    res = split_manifest(df, SplitConfig(method="kfold", folds=4, group_column="recording"))
    assert res.column == "fold" and sorted(set(res.df["fold"])) == [0, 1, 2, 3]
    assert (res.df.groupby("recording")["fold"].nunique() == 1).all()


def test_esc_folds_from_file_names():
    df = synthetic({"dog": 10, "rain": 10})
    df["path"] = [f"/esc/{1 + i % 5}-{1000 + i}-A.ogg" for i in range(len(df))]
    res = split_manifest(df, SplitConfig(method="esc"))
    assert (res.df["fold"] == np.arange(len(df)) % 5).all()  # file fold 1..5 -> 0..4
    assert any("1 -> fold 0" in n for n in res.notes)
    df.loc[3, "path"] = "/esc/extra.ogg"
    with pytest.raises(DataError, match="does not match 1 of 20"):
        split_manifest(df, SplitConfig(method="esc"))
    df["path"] = [f"/x/take{i % 3}_{i}.wav" for i in range(len(df))]
    res = split_manifest(df, SplitConfig(method="esc", fold_pattern=r"take(\d)"))
    assert sorted(set(res.df["fold"])) == [0, 1, 2]


def test_split_table_counts():
    df = synthetic({"a": 6, "b": 4})
    df.loc[0, "labels"] = ""
    df.loc[1, "labels"] = "a,b"
    df["split"] = ["train"] * 7 + ["test"] * 3
    t = split_table(df, "split")
    assert list(t.columns) == ["train", "test", "total"]
    assert t.loc["total"].tolist() == [7, 3, 10]
    for c in ("a", "b"):
        has = df["labels"].map(lambda v, c=c: c in split_labels(v))
        assert t.loc[c, "train"] == int((has & (df["split"] == "train")).sum())
    assert t.loc["(unlabelled)", "total"] == 1


# --------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(val=0.5, test=0.6), "leaves no training data"),
        (dict(val=0.0, test=0.0), "nothing to split"),
        (dict(val=-0.1), "--val must be in"),
        (dict(method="kfold", folds=1), "--folds must be at least 2"),
        (dict(group_column="site", group_pattern="x"), "not both"),
        (dict(group_pattern="(unclosed"), "not a valid regular expression"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_manifest(synthetic({"a": 10}), SplitConfig(**kwargs))


def test_unknown_group_column():
    with pytest.raises(DataError, match="--group_column 'site' is not a manifest column"):
        split_manifest(synthetic({"a": 10}), SplitConfig(method="group", group_column="site"))


def test_cli_writes_beside_the_manifest_and_reports(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    write_manifest(synthetic({"a": 20, "b": 10}), manifest)
    before = manifest.read_text()
    assert main(["split", str(manifest), "--val", "0.2", "--test", "0.2", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    result = read_manifest(tmp_path / "m.split.csv")
    assert manifest.read_text() == before  # the input is never overwritten
    assert (result["split"] == "test").sum() == 6 and "m.split.csv" in out and "total" in out
    assert main(["split", str(manifest), "--method", "kfold", "--folds", "3", "--out",
                 str(tmp_path / "k.csv")]) == 0  # fmt: skip
    assert sorted(set(read_manifest(tmp_path / "k.csv")["fold"])) == [0, 1, 2]


@pytest.mark.parametrize(
    "args,match",
    [
        (["missing.csv"], "manifest not found"),
        (["M", "--val", "0.7", "--test", "0.4"], "leaves no training data"),
        (["M", "--method", "group", "--group_column", "site"], "not a manifest column"),
        (["M", "--method", "group", "--group_pattern", "^zz(\\d)"], "matches no file name"),
        (["M", "--method", "nope"], "not one of"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, match):
    manifest = tmp_path / "m.csv"
    write_manifest(synthetic({"a": 20}), manifest)
    args = [str(manifest) if a == "M" else str(tmp_path / a) if a.endswith(".csv") else a
            for a in args]  # fmt: skip
    assert main(["split", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.split.csv").exists()


# --------------------------------------------------------------------------- real data


def _header_manifest(files: list[Path], labels: list[str]) -> pd.DataFrame:
    rows = []
    for p, lab in zip(files, labels):
        rows.append(whole_file_row(p, lab, recording=str(p), source="folder"))
    return pd.DataFrame(rows)


@pytest.mark.shared_data
def test_esc10_official_folds(shared_data):
    files = sorted((shared_data / "esc10").glob("*/*.ogg"))
    assert len(files) == 400
    df = _header_manifest(files, [p.parent.name.split(" - ", 1)[1] for p in files])
    res = split_manifest(df, SplitConfig(method="esc"))
    assert (res.df["fold"] == [int(p.name[0]) - 1 for p in files]).all()
    table = split_table(res.df, "fold")
    assert (table.drop(index="total").drop(columns="total") == 8).all().all()  # 8 per fold


@pytest.mark.shared_data
def test_fsdd_speaker_split(shared_data):
    files = sorted((shared_data / "fsdd" / "recordings").glob("*.wav"))
    df = _header_manifest(files, [p.name.split("_")[0] for p in files])
    cfg = SplitConfig(method="group", group_pattern=r"^\d+_([a-z]+)_\d+", val=0.17, test=0.17)
    res = split_manifest(df, cfg)
    speaker = np.array([p.name.split("_")[1] for p in files])
    per = pd.Series(res.df["split"].to_numpy()).groupby(speaker).nunique()
    assert len(per) == 6 and (per == 1).all()
    assert set(res.df["split"]) == {"train", "val", "test"}
    folds = split_manifest(
        df, SplitConfig(method="kfold", folds=3, group_pattern=cfg.group_pattern)
    )
    assert (pd.Series(folds.df["fold"].to_numpy()).groupby(speaker).nunique() == 1).all()
