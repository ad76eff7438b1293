"""Hostile-input pass, outputs: nothing the user already has is overwritten without --overwrite
(or the command's force flag). `bioaudio evaluate` into a training run or over a user's
report.md, `bioaudio plot-embeddings` over a user's PNG, scripts/finetune.sh / eval.sh rewriting
the --labels file and replacing files in --save_dir (or writing before a flag conflict is
found), `bioaudio convert --force` deleting unrelated files of DST. Every test here failed
before its fix."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_classify import (
    TINY_FRONTEND,
    one_thread,  # noqa: F401  (autouse fixture)
    write_tone_dataset,
)
from test_faults import cli, fresh_accelerate, one_line_error  # noqa: F401  (autouse fixture)

from bioaudio.errors import ConfigError
from bioaudio.explorer.static import is_map_grid
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import seed_flags  # noqa: E402

NAMES = ["high", "low", "mid"]


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"), n_per_class=3)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """An untrained TinyMelCNN export (1 s clips)."""
    torch.manual_seed(0)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, NAMES)
    model.provenance = {"clip_seconds": 1.0}
    return save_export(model, tmp_path_factory.mktemp("clf") / "export")


@pytest.fixture
def labels(tones, tmp_path) -> Path:
    """A seed-style labels file (`filename,labels`, names relative to the tones folder)."""
    rows = [f"{p.relative_to(tones.parent).as_posix()},{p.parent.name}\n"
            for p in sorted(tones.parent.rglob("*.wav"))]  # fmt: skip
    path = tmp_path / "mine" / "labels.csv"
    path.parent.mkdir()
    path.write_text("filename,labels\n" + "".join(rows))
    return path


def run_folder(path: Path) -> Path:
    """What a training run directory holds (its own test results among them)."""
    path.mkdir(parents=True)
    for name, text in [("config.json", '{"command": "finetune"}'), ("summary.json", "{}"),
                       ("test_metrics.json", '{"accuracy": 0.9}'), ("report.md", "# run\n")]:  # fmt: skip
        (path / name).write_text(text)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# bioaudio evaluate --out


def test_evaluate_never_replaces_files_it_did_not_write(classifier, tones, tmp_path, capsys):
    quick = ["--no-progress", "--num_workers", "0"]
    run = run_folder(tmp_path / "runs" / "seed_42")
    before = snapshot(run)
    code, _, err = cli(capsys, "evaluate", classifier, tones, "--out", run, *quick)
    assert code == 2
    one_line_error(err, "training run", "--overwrite")
    assert snapshot(run) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    code, _, err = cli(capsys, "evaluate", classifier, tones, "--out", mine, *quick)
    assert code == 2
    one_line_error(err, "report.md", "--overwrite")
    assert (mine / "report.md").read_text() == "my notes\n" and len(list(mine.iterdir())) == 1
    # its own folder: written, then re-run into it
    out = tmp_path / "eval"
    for _ in range(2):
        code, _, err = cli(capsys, "evaluate", classifier, tones, "--out", out, *quick)
        assert code == 0, err
    assert json.loads((out / "test_metrics.json").read_text())["written_by"] == "bioaudio evaluate"
    # --overwrite: the user asked for it
    code, _, err = cli(capsys, "evaluate", classifier, tones, "--out", mine, *quick, "--overwrite")
    assert code == 0, err
    assert (mine / "report.md").read_text() != "my notes\n"


# ----------------------------------------------------------------------------------------------
# bioaudio plot-embeddings --out


def test_plot_embeddings_never_replaces_a_png_it_did_not_write(classifier, tones, tmp_path, capsys):
    emb = tmp_path / "emb.parquet"
    code, _, err = cli(capsys, "embed", classifier, tones, "--out", emb, "--window", "0.5",
                       "--no-progress", "--num_workers", "0")  # fmt: skip
    assert code == 0, err
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "tsne_grid.png").write_bytes(b"\x89PNG\r\n\x1a\n my own figure")
    argv = ["plot-embeddings", emb, "--out", maps, "--methods", "tsne", "--perplexities", "2"]
    code, _, err = cli(capsys, *argv)
    assert code == 2
    one_line_error(err, "tsne_grid.png", "--overwrite")
    assert (maps / "tsne_grid.png").read_bytes() == b"\x89PNG\r\n\x1a\n my own figure"
    code, _, err = cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert is_map_grid(maps / "tsne_grid.png")
    code, _, err = cli(capsys, *argv)  # now it is ours: replaced without --overwrite
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# scripts/finetune.sh, scripts/eval.sh (scripts/seed_flags.py)


def test_seed_scripts_never_write_the_labels_file_or_files_not_theirs(tones, labels, tmp_path):
    data = tones.parent
    original = labels.read_text()
    # --labels inside --save_dir: read, never written; derived files under their own names
    manifest = seed_flags.prepare_labelled(data, labels, labels.parent)
    assert labels.read_text() == original
    assert manifest == labels.parent / "manifest.csv"
    resolved = (labels.parent / "labels_resolved.csv").read_text().splitlines()
    assert len(resolved) == len(original.splitlines()) and str(data) in resolved[1]
    seed_flags.prepare_labelled(data, labels, labels.parent)  # ours: replaced on a re-run
    # an unrelated labels.csv / manifest.csv in --save_dir is left alone or refused
    save = tmp_path / "save"
    save.mkdir()
    (save / "labels.csv").write_text("filename,labels\nmine.wav,owl\n")
    shutil.copy(tones, save / "manifest.csv")  # the user's own manifest
    before = snapshot(save)
    with pytest.raises(ConfigError, match="manifest.csv exists and was not written by this"):
        seed_flags.prepare_labelled(data, labels, save)
    assert snapshot(save) == before
    (save / "manifest.csv").unlink()
    seed_flags.prepare_labelled(data, labels, save)
    assert (save / "labels.csv").read_text() == "filename,labels\nmine.wav,owl\n"
    with open(save / "manifest.csv", "a") as f:  # changed since: no longer ours
        f.write("\n")
    with pytest.raises(ConfigError, match="changed since"):
        seed_flags.prepare_labelled(data, labels, save)
    # the derived labels file given as --labels: never written to
    with pytest.raises(ConfigError, match="a file this script writes"):
        seed_flags.prepare_labelled(data, labels.parent / "labels_resolved.csv", labels.parent)


def test_seed_scripts_check_every_flag_before_writing(tones, labels, classifier, tmp_path, capsys):
    data = tones.parent
    save = tmp_path / "save"
    base = ["--model_path", str(classifier), "--data_dir", str(data), "--labels", str(labels)]
    for argv, message in [
        (["finetune", *base, "--save_dir", str(save), "--epochs", "1", "--", "--max_steps", "2"],
         "--max_steps or --epochs"),
        (["finetune", *base, "--save_dir", str(save), "--", "--max_steps", "2", "--max_steps",
          "3"], "--max_steps is given twice"),
        (["eval", *base, "--save_dir", str(save), "--", "--bogus"], "unrecognized arguments"),
    ]:  # fmt: skip
        assert seed_flags.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not save.exists()
    # eval into a training run folder: refused before the manifest is written into it
    run = run_folder(tmp_path / "run")
    before = snapshot(run)
    assert seed_flags.main(["eval", *base, "--save_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training run" in err, err
    assert snapshot(run) == before and labels.read_text().startswith("filename,labels\nhigh/")


# ----------------------------------------------------------------------------------------------
# bioaudio convert --force


def test_convert_force_replaces_only_an_export(classifier, tmp_path, capsys):
    dst = tmp_path / "dst"
    shutil.copytree(classifier, dst)
    (dst / "NOTES.md").write_text("my notes\n")
    (dst / "extra").mkdir()
    (dst / "extra" / "call.wav").write_bytes(b"RIFF")
    before = snapshot(dst)
    code, _, err = cli(capsys, "convert", classifier, dst, "--force")
    assert code == 2
    one_line_error(err, "NOTES.md", "extra/")
    assert snapshot(dst) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a\n")
    code, _, err = cli(capsys, "convert", classifier, other, "--force")
    assert code == 2
    one_line_error(err, "not a bioaudio export", "data.csv")
    # an export holding only its own files, and an empty folder: replaced
    (dst / "NOTES.md").unlink()
    shutil.rmtree(dst / "extra")
    (tmp_path / "empty").mkdir()
    for target in (dst, tmp_path / "empty"):
        code, _, err = cli(capsys, "convert", classifier, target, "--force")
        assert code == 0, err
        assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_evaluate_skips_and_lists_unreadable_files_and_counts_unlabelled_ones(
    classifier, tones, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(tones.parent, data)
    manifest = data / tones.name
    df = pd.read_csv(manifest)
    broken = df["path"].iloc[0]
    (data / broken).write_bytes(b"RIFF" + b"\x09" * 300)  # broke after prepare
    df.loc[1, "labels"] = ""  # an unlabelled clip: predicted, not scored
    df.to_csv(manifest, index=False)
    out = tmp_path / "ev"
    code, stdout, err = cli(capsys, "evaluate", classifier, manifest, "--out", out, "--no-progress")
    assert code == 0, err
    record = json.loads((out / "test_metrics.json").read_text())
    assert record["unreadable"] == 1 and record["unlabelled"] == 1
    assert record["n"] == len(df) - 2
    skipped = pd.read_csv(out / "test_skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == [Path(broken).name]
    assert "1 unreadable file(s) skipped" in stdout and "1 unlabelled clip(s)" in stdout
