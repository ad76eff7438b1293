"""bioaudio.classify: every baseline trains through ClassificationTask + Trainer, export round
trips, batched = one at a time, windows averaged per clip, file input = array input, cached
features = on-the-fly features, unlabelled rows ignored, multi-label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from bioaudio.data.audio import load
from bioaudio.data.augment import SpecAugmentConfig
from bioaudio.data.datasets import IGNORE_INDEX, AudioDataset, collate_batch
from bioaudio.data.features import FeatureDataset, FeaturesConfig, build_cache, frames_for_seconds
from bioaudio.data.frontend import FrontendConfig
from bioaudio.data.manifest import PrepareConfig, prepare_manifest, read_manifest, write_manifest
from bioaudio.errors import CheckpointError, ConfigError
from bioaudio.inference.metrics import score_logits
from bioaudio.inference.predict import (
    aggregate_windows,
    forward_batch,
    load_classifier,
    predict,
    predict_clips,
)
from bioaudio.models.baselines import BaselineClassifier
from bioaudio.models.checkpoint import save_export
from bioaudio.training.classification import ClassificationTask
from bioaudio.training.loop import TrainConfig, Trainer

CLASSES = {"high": 3500.0, "low": 300.0, "mid": 1200.0}  # sorted names = class order
SR = 16000
TINY_FRONTEND = FrontendConfig(kind="logmel", n_mels=16, n_fft=256, hop_length=160)
FRONTEND_FLAGS = ["--n_mels", "16", "--n_fft", "256", "--hop_length", "160"]


def write_tone_dataset(
    root: Path,
    n_per_class: int = 6,
    seconds: tuple[float, float] = (0.6, 1.4),
    folds: int | None = None,
    seed: int = 0,
    classes: dict[str, float] = CLASSES,
) -> Path:
    """One folder per class of noisy tones (a learnable task); returns the manifest path.
    With `folds`, a `fold` column (clip i of each class -> fold i % folds)."""
    rng = np.random.default_rng(seed)
    for name, freq in classes.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            n = int(rng.uniform(*seconds) * SR)
            t = np.arange(n) / SR
            f = freq * (1 + 0.05 * rng.standard_normal())
            x = 0.4 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(n)
            sf.write(d / f"{name}_{i:02d}.wav", x.astype(np.float32), SR)
    manifest = root / "manifest.csv"
    prepare_manifest(root, manifest, PrepareConfig(labels="folders", progress=False))
    if folds:
        df = read_manifest(manifest)
        df["fold"] = [int(Path(p).stem.split("_")[-1]) % folds for p in df["path"]]
        write_manifest(df, manifest)
    return manifest


def reset_accelerate() -> None:
    """Several Trainers live in one pytest process: fresh Accelerate singletons for each."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are fastest on one thread, and much faster on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tone_dataset(tmp_path_factory.mktemp("tones"))


def dataset(manifest: Path, *, train: bool = False, clip: float | None = 1.0, seed: int = 0):
    return AudioDataset(
        manifest, sample_rate=SR, clip_seconds=clip, train=train, seed=seed, min_seconds=0.0
    )


def loop_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=out, max_steps=3, batch_size=6, lr=3e-3, save_every=0, log_every=1,
        num_workers=0, progress=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def fit(out: Path, model, task, train_ds, eval_ds=None, **kw):
    reset_accelerate()
    trainer = Trainer(loop_cfg(out, **kw), model, task, train_ds, eval_ds, collate_fn=collate_batch)
    return trainer.fit(), trainer


# ---------------------------------------------------------------------------------- training

MODELS = [
    ("tiny_mel_cnn", {}),
    ("genre_cnn", {}),
    ("drone_cnn", {}),
    ("mlp", {}),
    ("mlp2", {}),
    ("cel", {}),
    ("cel2", {}),
    ("cel3", {}),
    ("mlp", {"input": "waveform", "input_samples": SR}),
    ("timm:resnet18", {}),
]


@pytest.mark.parametrize(
    "name,options", MODELS, ids=[f"{n}{'-wav' if o else ''}" for n, o in MODELS]
)
def test_every_baseline_trains_a_few_steps(tones, tmp_path, name, options):
    train = dataset(tones, train=True)
    names = train.class_names
    torch.manual_seed(0)
    model = BaselineClassifier.build(name, TINY_FRONTEND, names, **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = ClassificationTask(names, seed=0)
    summary, trainer = fit(tmp_path, model, task, train, dataset(tones), best_metric="accuracy")
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert np.isfinite(summary["final_loss"])
    ev = summary["eval"]
    assert {"eval/loss", "eval/accuracy", "eval/balanced_accuracy", "eval/macro_f1"} <= set(ev)
    assert 0.0 <= ev["eval/accuracy"] <= 1.0
    after = trainer.unwrapped.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k].cpu())]
    assert changed, "no weight moved"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert "train_accuracy" in metrics.columns
    # the export is ours and loads back as the same kind of model
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "baseline" and cfg["class_names"] == names
    back = load_classifier(tmp_path)  # a run directory: best/ is picked
    assert isinstance(back, BaselineClassifier) and back.input == model.input


def test_export_round_trip_gives_the_same_logits(tones, tmp_path):
    train = dataset(tones, train=True)
    torch.manual_seed(1)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, train.class_names)
    task = ClassificationTask(train.class_names, provenance={"clip_seconds": 1.0})
    fit(tmp_path, model, task, train, max_steps=2)
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    back = load_classifier(tmp_path / "export")
    assert back.provenance["clip_seconds"] == 1.0
    fresh = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, train.class_names)
    fresh.load_state_dict(saved)
    batch = collate_batch([dataset(tones)[i] for i in range(5)])
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(back, batch), forward_batch(fresh, batch))
    # a second export through save_export (atomic, replaces) is read back identically
    save_export(back, tmp_path / "again")
    again = load_classifier(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(again, batch), forward_batch(back, batch))


def test_bad_exports_are_one_line_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_classifier(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither an export folder"):
        load_classifier(tmp_path / "empty")
    model = BaselineClassifier.build("mlp", TINY_FRONTEND, ["a", "b"])
    save_export(model, tmp_path / "ok")
    cfg_path = tmp_path / "ok" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["baseline"]["n_classes"] = 5  # disagrees with the two class names
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="5 outputs but 2 class names"):
        load_classifier(tmp_path / "ok")
    with pytest.raises(ConfigError, match="lacks"):
        BaselineClassifier.from_config({"model_type": "baseline", "class_names": ["a"]})


# -------------------------------------------------------------------------------- prediction


def test_predict_batched_equals_one_at_a_time(tones):
    ds = dataset(tones, clip=None)  # whole clips of different lengths: padding in batches
    torch.manual_seed(2)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, ds.class_names)
    many = predict(model, ds, batch_size=7)
    one = predict(model, ds, batch_size=1)
    np.testing.assert_array_equal(many.indices, np.arange(len(ds)))
    np.testing.assert_allclose(many.scores, one.scores, atol=1e-5)
    np.testing.assert_allclose(many.scores.sum(axis=1), 1.0, atol=1e-5)
    scores, targets, indices = many  # unpacks as a 3-tuple
    np.testing.assert_array_equal(targets, [ds[i]["target"].item() for i in range(len(ds))])


def test_predict_clips_averages_windows_of_the_file(tones):
    df = read_manifest(tones)
    torch.manual_seed(3)
    names = sorted(CLASSES)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, names).eval()
    window, hop = 0.4, 0.3
    clips = predict_clips(model, df, window=window, hop=hop, batch_size=4)
    assert list(clips.rows) == list(range(len(df)))
    for r in (0, 5, len(df) - 1):
        path, end = df["path"].iloc[r], df["end"].iloc[r]
        rows = clips.windows[clips.windows["row"] == r]
        assert len(rows) >= 2
        # file input = array input: each window read here and classified alone
        probs = []
        for start in rows["start"]:
            x = load(path, SR, offset=start, duration=min(window, end - start))
            wav = torch.zeros(1, int(window * SR))
            mask = torch.ones(1, int(window * SR), dtype=torch.bool)
            wav[0, : len(x)], mask[0, : len(x)] = torch.from_numpy(x), False
            with torch.no_grad():
                probs.append(model(wav, mask).softmax(-1)[0].numpy())
        np.testing.assert_allclose(rows[names].to_numpy(), np.stack(probs), atol=1e-5)
        np.testing.assert_allclose(clips.scores[r], np.mean(probs, axis=0), atol=1e-5)
    label_of = {n: i for i, n in enumerate(names)}
    np.testing.assert_array_equal(clips.targets, [label_of[v] for v in df["labels"]])


def test_score_logits_groups_windows_by_mean_probability():
    names = ["a", "b", "c"]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 4.0]])
    targets = torch.tensor([1, 1, 2, 2])
    groups = np.array([10, 10, 11, 11])
    out = score_logits(logits, targets, names, multi_label=False, groups=groups)
    p = torch.softmax(logits, dim=1).numpy()
    clip = np.stack([p[:2].mean(0), p[2:].mean(0)])
    assert out["accuracy"] == float((clip.argmax(1) == np.array([1, 2])).mean())
    expected_loss = F.cross_entropy(logits, targets).item()  # over windows
    assert out["loss"] == pytest.approx(expected_loss)
    uniq, mean = aggregate_windows(p, groups)
    np.testing.assert_array_equal(uniq, [10, 11])
    np.testing.assert_allclose(mean, clip, rtol=1e-6)
    # an unlabelled window does not count
    out2 = score_logits(logits, torch.tensor([1, 1, IGNORE_INDEX, 2]), names, False, groups)
    assert out2["loss"] == pytest.approx(
        F.cross_entropy(logits[[0, 1, 3]], torch.tensor([1, 1, 2])).item()
    )


# ---------------------------------------------------------------------------------- the loss


def test_unlabelled_rows_are_ignored_by_the_loss(tones):
    ds = dataset(tones)
    items = [ds[i] for i in range(6)]
    batch = collate_batch(items)
    torch.manual_seed(4)
    model = BaselineClassifier.build("mlp", TINY_FRONTEND, ds.class_names)
    task = ClassificationTask(ds.class_names)
    loss_labelled, _ = task.training_step(model, collate_batch(items[:3]))
    batch["target"][3:] = IGNORE_INDEX
    loss_mixed, logs = task.training_step(model, batch)
    torch.testing.assert_close(loss_mixed, loss_labelled)
    batch["target"][:] = IGNORE_INDEX
    loss_none, _ = task.training_step(model, batch)
    assert loss_none.item() == 0.0 and loss_none.requires_grad


def test_augmentations_depend_on_seed_and_step_only(tones):
    ds = dataset(tones)
    batch = collate_batch([ds[i] for i in range(6)])
    torch.manual_seed(5)
    model = BaselineClassifier.build("mlp", TINY_FRONTEND, ds.class_names)

    def loss(seed: int) -> float:
        task = ClassificationTask(
            ds.class_names,
            mixup_alpha=0.4,
            spec_augment=SpecAugmentConfig(time_width=10, freq_width=4),
            seed=seed,
        )
        return task.training_step(model, batch)[0].item()

    plain = ClassificationTask(ds.class_names).training_step(model, batch)[0].item()
    assert loss(0) == loss(0) != plain  # a resumed run draws the same masks and weights
    assert loss(0) != loss(1)


def test_multi_label_task_uses_bce_and_reports_map(tmp_path):
    root = tmp_path / "ml"
    manifest = write_tone_dataset(root, n_per_class=4, classes={"a": 400.0, "b": 2500.0})
    df = read_manifest(manifest)
    df.loc[df.index[::3], "labels"] = "a,b"  # some clips carry both labels
    write_manifest(df, manifest)
    ds = dataset(manifest, train=True)
    assert ds.multi_label
    torch.manual_seed(6)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, ds.class_names, True)
    task = ClassificationTask(ds.class_names, multi_label=True, mixup_alpha=0.2)
    batch = collate_batch([ds[i] for i in range(4)])
    loss, _ = task.training_step(model, batch)
    assert 0.0 < loss.item() < 2.0  # a BCE value, not a softmax cross-entropy over 2 classes
    summary, _ = fit(tmp_path / "run", model, task, ds, dataset(manifest), batch_size=4)
    assert {"eval/mAP", "eval/auroc", "eval/macro_f1"} <= set(summary["eval"])
    probs = predict(load_classifier(tmp_path / "run"), dataset(manifest)).scores
    assert ((probs > 0) & (probs < 1)).all() and not np.allclose(probs.sum(1), 1.0)


# ------------------------------------------------------------------------- cached features


def test_cached_features_train_exactly_like_audio(tones, tmp_path):
    """Clips no longer than the training clip are never cropped: the cache's features are the
    frontend's features of the same samples, so logits and a short training run agree."""
    fcfg = FeaturesConfig(
        frontend="logmel", n_mels=16, n_fft=256, hop_length=160, num_workers=0, progress=False
    )
    cache = build_cache(tones, fcfg, out=tmp_path / "cache")
    clip = 1.5  # longer than every clip
    audio_ds = dataset(tones, train=True, clip=clip)
    names = audio_ds.class_names
    feat_ds = FeatureDataset(
        cache,
        class_names=names,
        clip_frames=frames_for_seconds(TINY_FRONTEND, clip),
        train=True,
        frontend=TINY_FRONTEND,
    )
    assert len(feat_ds) == len(audio_ds)
    torch.manual_seed(7)
    model = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, names).eval()
    a = collate_batch([audio_ds[i] for i in range(8)])
    f = collate_batch([feat_ds[i] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(
            forward_batch(model, f), forward_batch(model, a), atol=1e-5, rtol=0
        )

    def train(ds, out):
        torch.manual_seed(8)
        m = BaselineClassifier.build("tiny_mel_cnn", TINY_FRONTEND, names)
        _, trainer = fit(out, m, ClassificationTask(names), ds, max_steps=4)
        return trainer.unwrapped.state_dict()

    w_audio, w_cache = train(audio_ds, tmp_path / "a"), train(feat_ds, tmp_path / "f")
    for k in w_audio:
        torch.testing.assert_close(w_cache[k], w_audio[k], atol=1e-5, rtol=1e-4, msg=k)
