"""Checkpoint I/O: export round trips, atomic writes, safe unpickling, format detection, CLI."""

from __future__ import annotations

import argparse
import collections
import enum
import json
import os
import pickle
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from bioaudio import load_model
from bioaudio.cli import main
from bioaudio.errors import CheckpointError
from bioaudio.models import checkpoint as ckpt
from bioaudio.models.audio_model import build_model
from bioaudio.models.checkpoint import read_torch_file, save_export, to_plain
from bioaudio.models.heads import HeadConfig

FIXTURES = [
    "beats_tiny.pt",
    "beats_tiny_ft.pt",
    "eat_tiny_hf.safetensors",
    "eat_tiny_ft_hf.safetensors",
    "eat_tiny_fairseq.pt",
    "eat_tiny_ft_fairseq.pt",
]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(2, 24000, generator=g)
    pad = torch.zeros(2, 24000, dtype=torch.bool)
    pad[1, 14000:] = True
    return wav, pad


def _same_outputs(a, b):
    wav, pad = _batch()
    with torch.no_grad():
        oa, ob = a.features(wav, pad), b.features(wav, pad)
        assert torch.equal(oa.tokens, ob.tokens)
        assert (oa.cls is None) == (ob.cls is None)
        if oa.cls is not None:
            assert torch.equal(oa.cls, ob.cls)
        if a.head is not None:
            assert torch.equal(a(wav, pad), b(wav, pad))


@pytest.mark.parametrize("name", FIXTURES)
def test_export_round_trip_reproduces_the_source(official_fixtures, tmp_path, name):
    src = load_model(official_fixtures / name)
    out = save_export(src, tmp_path / "export", provenance={"note": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "bioaudio.export" and cfg["model_type"] == src.model_type
    assert cfg["provenance"]["note"] == "test" and cfg["provenance"]["source"].endswith(name)
    loaded = load_model(out)
    assert type(loaded) is type(src)
    assert loaded.config() == src.config()
    _same_outputs(src, loaded)
    if src.model_type == "beats":  # the official entry point survives the round trip
        wav, pad = _batch()
        with torch.no_grad():
            assert torch.equal(
                src.extract_features(wav, pad)[0], loaded.extract_features(wav, pad)[0]
            )
    else:
        mel = torch.randn(1, 1, 64, 128)
        with torch.no_grad():
            assert torch.equal(src(mel), loaded(mel))


def test_own_model_round_trip_keeps_head_names_and_frontend(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        "beats",
        {"preset": "tiny", "cls_token": True},
        frontend={"kind": "beats_fbank", "mean": 10.0, "std": 3.0},
        head=HeadConfig(pooling="attention", num_classes=3),
        class_names=["frog", "bird", "bat"],
        multi_label=False,
    )
    loaded = load_model(save_export(model, tmp_path / "m"))
    assert loaded.class_names == ["frog", "bird", "bat"] and loaded.multi_label is False
    assert loaded.frontend_cfg.mean == 10.0 and loaded.head_cfg.pooling == "attention"
    _same_outputs(model.eval(), loaded)


def test_save_export_is_atomic(tmp_path, monkeypatch):
    a = build_model("eat", "tiny")
    out = save_export(a, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()

    def broken(model, tmp, provenance=None):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_export", broken)
    with pytest.raises(OSError, match="disk full"):
        save_export(build_model("eat", "tiny"), out)
    assert (out / "model.safetensors").read_bytes() == before  # old export untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left
    monkeypatch.undo()
    b = build_model("eat", "tiny")
    save_export(b, out)  # a successful write replaces it
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_export_refuses_to_replace_other_folders(tmp_path):
    victim = tmp_path / "my_data"
    victim.mkdir()
    (victim / "recording.wav").write_bytes(b"RIFF")
    with pytest.raises(CheckpointError, match="not a bioaudio export"):
        save_export(build_model("eat", "tiny"), victim)
    assert (victim / "recording.wav").exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_unexpected_class_is_refused_and_nothing_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"cfg": _Evil(marker), "model": {"patch_embedding.weight": torch.zeros(2)}}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_model(path)
    assert not marker.exists()


# A stand-in omegaconf, laid out like omegaconf 2.x pickles: NEWOBJ + BUILD of DictConfig /
# ListConfig / nodes with `_metadata`, `_parent`, `_content` / `_val`, typing.Any and a
# defaultdict in the metadata, and an enum value from the EAT training code.
def _fake_omegaconf_modules():
    made = {}

    def cls(module, name):
        made.setdefault(module.split(".")[0], types.ModuleType(module.split(".")[0]))
        mod = made.setdefault(module, types.ModuleType(module))
        c = type(name, (), {"__module__": module})
        setattr(mod, name, c)
        return c

    C = types.SimpleNamespace(
        DictConfig=cls("omegaconf.dictconfig", "DictConfig"),
        ListConfig=cls("omegaconf.listconfig", "ListConfig"),
        AnyNode=cls("omegaconf.nodes", "AnyNode"),
        EnumNode=cls("omegaconf.nodes", "EnumNode"),
        ContainerMetadata=cls("omegaconf.base", "ContainerMetadata"),
        Metadata=cls("omegaconf.base", "Metadata"),
    )
    mode = enum.Enum(
        "PredictionMode",
        "MEAN_POOLING CLS_TOKEN LIN_SOFTMAX",
        module="models.EAT_audio_classification",
    )
    made.setdefault("models", types.ModuleType("models"))
    made.setdefault("models.EAT_audio_classification", types.ModuleType("x")).PredictionMode = mode
    return made, C, mode


def _wrap(value, C, key=None, parent=None):
    def meta(kind):
        m = kind()
        m.__dict__.update(
            ref_type=typing.Any, object_type=dict, optional=True, key=key, flags={},
            flags_root=False, resolver_cache=collections.defaultdict(dict),
        )  # fmt: skip
        return m

    if isinstance(value, dict):
        node = C.DictConfig()
        node.__dict__.update(_metadata=meta(C.ContainerMetadata), _parent=parent, _flags_cache=None)
        node._content = {k: _wrap(v, C, k, node) for k, v in value.items()}
    elif isinstance(value, list):
        node = C.ListConfig()
        node.__dict__.update(_metadata=meta(C.ContainerMetadata), _parent=parent, _flags_cache=None)
        node._content = [_wrap(v, C, i, node) for i, v in enumerate(value)]
    elif isinstance(value, enum.Enum):
        node = C.EnumNode()
        fields = {m.name: m.value for m in type(value)}
        node.__dict__.update(_metadata=meta(C.Metadata), _parent=parent, _val=value, fields=fields)
        node.__dict__["enum_type"] = type(value)
    else:
        node = C.AnyNode()
        node.__dict__.update(_metadata=meta(C.Metadata), _parent=parent, _val=value)
    return node


@pytest.mark.parametrize("name", ["eat_tiny_fairseq", "eat_tiny_ft_fairseq"])
def test_fairseq_file_with_pickled_dictconfig(official_fixtures, tmp_path, name):
    """A fairseq file whose cfg is an omegaconf DictConfig loads without importing omegaconf
    (weights_only refuses it; the restricted unpickler maps it to inert stand-ins)."""
    original = torch.load(official_fixtures / f"{name}.pt", weights_only=True)
    made, C, mode = _fake_omegaconf_modules()
    cfg = json.loads(json.dumps(original["cfg"]))
    if "prediction_mode" in cfg["model"]:
        cfg["model"]["prediction_mode"] = mode.CLS_TOKEN  # an enum value, as fairseq stores it
    cfg["model"]["some_list"] = [1, 2, {"x": None}]
    saved = dict(sys.modules)
    sys.modules.update(made)
    try:
        extra = {"best": np.float64(0.25), "updates": np.arange(3)}
        state = {"cfg": _wrap(cfg, C), "model": original["model"], "extra_state": extra}
        torch.save({**state, "args": argparse.Namespace(lr=[0.1])}, tmp_path / "f.pt")
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    with pytest.raises(Exception):  # noqa: B017 - what torch's safe loader does with it
        torch.load(tmp_path / "f.pt", weights_only=True)

    obj = read_torch_file(tmp_path / "f.pt")
    assert "omegaconf.dictconfig" not in sys.modules
    assert float(obj["extra_state"]["best"]) == 0.25
    assert list(obj["extra_state"]["updates"]) == [0, 1, 2]
    plain = to_plain(obj["cfg"])
    assert plain["model"]["some_list"] == [1, 2, {"x": None}]
    if "prediction_mode" in cfg["model"]:
        assert plain["model"]["prediction_mode"] == "CLS_TOKEN"

    ours, ref = load_model(tmp_path / "f.pt"), load_model(official_fixtures / f"{name}.pt")
    mel = torch.randn(2, 1, 64, 128)
    with torch.no_grad():
        assert torch.equal(ours(mel), ref(mel))


def test_real_omegaconf_dictconfig(official_fixtures, tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    original = torch.load(official_fixtures / "eat_tiny_ft_fairseq.pt", weights_only=True)
    cfg = omegaconf.OmegaConf.create(original["cfg"])
    torch.save({"cfg": cfg, "model": original["model"]}, tmp_path / "f.pt")
    model = load_model(tmp_path / "f.pt")
    assert model.head_cfg.pooling == "cls" and model.head_cfg.num_classes == 5


def test_truncated_safetensors(official_fixtures, tmp_path):
    data = (official_fixtures / "eat_tiny_hf.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_bytes(
        (official_fixtures / "eat_tiny_hf_config.json").read_bytes()
    )
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)


def test_truncated_torch_archive(official_fixtures, tmp_path):
    data = (official_fixtures / "beats_tiny.pt").read_bytes()
    (tmp_path / "b.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "b.pt")


@pytest.mark.parametrize(
    "content,match",
    [(b"hello, this is not a model\n", "not a checkpoint format"), (b"", "empty file")],
)
def test_files_that_are_no_checkpoint(tmp_path, content, match):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")


def test_hf_config_that_disagrees_with_the_weights(official_fixtures, tmp_path):
    cfg = json.loads((official_fixtures / "eat_tiny_hf_config.json").read_text())
    cfg["embed_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(
        (official_fixtures / "eat_tiny_hf.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="embed_dim=32 but the weights have 64"):
        load_model(tmp_path)


def test_export_config_that_disagrees_with_the_weights(tmp_path):
    out = save_export(build_model("beats", "tiny"), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["encoder"]["encoder_ffn_embed_dim"] = 100
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"disagree with the model config: .*fc1\.\w+ is \(128"
    ):
        load_model(out)


def test_beats_cfg_that_disagrees_with_the_weights(official_fixtures, tmp_path):
    obj = torch.load(official_fixtures / "beats_tiny.pt", weights_only=True)
    obj["cfg"]["encoder_attention_heads"] = 8
    torch.save(obj, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="weights disagree with the model config"):
        load_model(tmp_path / "b.pt")


def test_cli_convert(official_fixtures, tmp_path, capsys):
    names = tmp_path / "labels.csv"
    names.write_text(
        "index,mid,display_name\n" + "".join(f"{i},/m/{i},Call {i}\n" for i in range(5))
    )
    dst = tmp_path / "out"
    src = official_fixtures / "beats_tiny_ft.pt"
    assert main(["convert", str(src), str(dst), "--class_names", str(names)]) == 0
    printed = capsys.readouterr().out
    assert str(dst) in printed and "5 classes" in printed and "verified" in printed
    model = load_model(dst)
    assert model.class_names == [f"Call {i}" for i in range(5)]
    _same_outputs(model, load_model(src))

    assert main(["convert", str(src), str(dst)]) == 2  # exists: refused without --force
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", str(official_fixtures / "beats_tiny.pt"), str(dst), "--force"]) == 0
    assert load_model(dst).head is None


def test_cli_convert_bad_input_is_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"cfg": _Evil(marker), "model": {}}, tmp_path / "evil.pt")
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refusing to unpickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bare_safetensors_needs_its_config(official_fixtures, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(
        (official_fixtures / "eat_tiny_hf.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "w.safetensors")
    model = load_model(
        tmp_path / "w.safetensors", config=official_fixtures / "eat_tiny_hf_config.json"
    )
    assert model.model_type == "eat"
    assert isinstance(Path(model.provenance["source"]), Path)
