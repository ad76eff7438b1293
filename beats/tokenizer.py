"""BEATs acoustic tokenizers: each 16 x 16 fbank patch -> a discrete label (a codebook index), the
targets of BEATs masked-token pretraining (Chen et al. 2022, "BEATs: Audio Pre-Training with
Acoustic Tokenizers").

- `RandomProjectionTokenizer` (iteration 1): frozen. Each patch (optionally LayerNorm-ed) is
  projected by a fixed random matrix and assigned to the most similar of a fixed set of random
  unit codes (cosine). Both are seeded buffers, so they are saved with a run.
- `BEATsTokenizer` (iterations 2+, and the official `Tokenizer_iter3*.pt` files), official layout:
      fbank (B, T, F) -> BEATs encoder (patch embedding, LayerNorm, post_extract_proj,
      transformer: the same blocks as the BEATs model, `beats.model.BEATsEncoder`) -> (B, N, D)
      -> quantize_layer: Linear(D, D) -> Tanh -> Linear(D, quant_dim)
      -> NormEMAVectorQuantizer (beats/quantizer.py): l2-normalised, nearest unit code -> labels
- `TokenizerDistiller` = BEATsTokenizer + `TokenizerEstimator`: trains a tokenizer by
  distillation from a teacher (any AudioModel's last-layer tokens, produced by the caller).
  The estimator maps the quantised vectors back to the teacher's width and predicts the teacher's
  output per patch; loss = mean over real patches of (1 - cos(prediction, teacher)) plus the
  quantiser's commitment loss, as the BEATs paper's self-distilled tokenizer objective (the
  codebook itself moves by EMA, not by gradient). Estimator choice: the released BEATs code has
  no estimator to follow, so we take the paper's description (a Transformer estimator) with
  BEiT v2's VQ-KD decoder depth: `estimator_layers` BEATs layers (default 3) of the tokenizer's
  width, between a Linear from quant_dim and a Linear to the teacher's width, so the prediction
  of a patch can use its neighbours' codes. `estimator_layers=0` gives a per-patch MLP instead.
  The estimator is discarded after training: only the tokenizer is exported.
- `save_tokenizer` / `load_tokenizer`: `tokenizer.safetensors` + `config.json`, or an official
  `.pt`; `is_official_tokenizer` / `load_official_tokenizer` read the official layout.

Padding (BEATsTokenizer). The encoder's attention mask follows the official rule exactly
(`beats.model.official_padding_mask`: frames are grouped into N consecutive runs, a token is
padding when its whole run is; note that the official rule ignores the patch geometry), so labels
equal the official ones. `labels_from_features` then marks IGNORE_INDEX (-100) on the tokens that
are padding by the patch rule of our encoders (a token is padding when any of its frames is), the
tokens a student never sees; `extract_labels` (official semantics) labels every token. The
training path (`forward`, distillation) uses the same attention rule, so a tokenizer is trained
the way it labels; its losses and statistics count the patch-rule real tokens only.

Labels never depend on the module's mode: they are computed in eval mode (dropout off) and the
quantiser never updates while labelling (see beats/quantizer.py for when it does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bioaudio.config import from_dict, to_dict
from bioaudio.data.frontend import FrontendConfig, build_frontend
from bioaudio.errors import CheckpointError, ConfigError, first_line
from bioaudio.fileio import atomic_dir
from bioaudio.models.checkpoint import (
    load_weights,
    read_safetensors,
    read_torch_file,
    read_versioned_config,
)
from bioaudio.models.layers import frames_to_token_mask

from .convert import HEAD_KEYS, OFFICIAL_DEFAULTS, convert_state_dict
from .model import BEATsConfig, BEATsEncoder, BEATsTransformer, official_padding_mask
from .quantizer import NormEMAVectorQuantizer, QuantizerConfig, l2norm

IGNORE_INDEX = -100  # label of padding tokens: cross-entropy's ignore_index, as bioaudio.data
TOKENIZER_FORMAT = "bioaudio.tokenizer"
TOKENIZER_VERSION = 1
TOKENIZER_WEIGHTS = "tokenizer.safetensors"
TOKENIZER_CONFIG = "config.json"

# The official TokenizersConfig defaults (microsoft/unilm beats/Tokenizers.py), plus the
# backbone's default layer-wise gradient decay; a checkpoint's cfg dict overwrites them.
OFFICIAL_TOKENIZER_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in OFFICIAL_DEFAULTS.items() if k not in HEAD_KEYS},
    "quant_n": 1024,
    "quant_dim": 256,
}

# Presets: `tiny` has the sizes of the test fixture, `base` those of TokenizersConfig with the
# BEATs iter3 encoder settings (our BEATsConfig defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(encoder="tiny", codebook_size=64, dim=16),
    "base": dict(encoder="base", codebook_size=1024, dim=256),
}


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run a block with `module` in eval mode, restoring its mode after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _check_patching(patch: int, n_mels: int, model: Any, what: str) -> None:
    """ConfigError unless `model` (an AudioModel, encoder or encoder config) cuts the same
    patches of the same features as the tokenizer."""
    cfg = getattr(model, "encoder_cfg", None) or getattr(model, "cfg", None) or model
    m_patch = getattr(cfg, "input_patch_size", None) or getattr(cfg, "patch_size", None)
    m_mels = getattr(cfg, "n_mels", None)
    if m_patch is None:
        raise ConfigError(f"cannot tell the patch size of {type(model).__name__}")
    if int(m_patch) != patch:
        raise ConfigError(
            f"{what} patches are {patch}x{patch} but the model's are {m_patch}x{m_patch}: "
            "labels would not correspond to the model's tokens"
        )
    if m_mels is not None and int(m_mels) != n_mels:
        raise ConfigError(f"{what} expects {n_mels} mel bins but the model takes {m_mels}")


# ----------------------------------------------------------------------------------------------
# Iteration 1: random projection
# ----------------------------------------------------------------------------------------------
@dataclass
class RandomProjectionConfig:
    """Iteration-1 tokenizer settings."""

    patch_size: int = field(default=16, metadata={"help": "patch size (frames and bins)"})
    n_mels: int = field(default=128, metadata={"help": "input feature bins"})
    dim: int = field(default=256, metadata={"help": "projection dimension"})
    codebook_size: int = field(default=1024, metadata={"help": "random codes (label classes)"})
    layer_norm: bool = field(
        default=False,
        metadata={"help": "normalise each patch (LayerNorm, no affine) before the projection"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the projection and the codebook"})

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ConfigError(
                f"a codebook of {self.codebook_size} code(s) gives every patch the same label: "
                "use codebook_size >= 2"
            )
        if min(self.patch_size, self.dim) < 1:
            raise ConfigError("random-projection patch_size and dim must be positive")
        if self.n_mels < self.patch_size:
            raise ConfigError(f"n_mels {self.n_mels} < patch size {self.patch_size}")


class RandomProjectionTokenizer(nn.Module):
    """Frozen iteration-1 tokenizer: patch (P*P values) -> [LayerNorm] -> fixed random projection
    (Xavier-normal, P*P -> dim) -> nearest of `codebook_size` random unit codes by cosine.

    Per-patch LayerNorm (`layer_norm`, off by default, as in the official method): the
    normalised fbank of a patch is mostly a common offset (its level), so without it fewer codes
    are used (16 ESC-10 clips, 1024 codes: label perplexity 26 without, 249 with). More codes is
    not better: with it the label hashes each patch's fine texture, which its context cannot
    predict, and a short pretraining run learns to ignore the input. Measured (benchmarks/
    ssl_probe.py pool, BEATs small, 300 steps of `beats:1`, ESC-10 ridge probe of the last layer):
    random weights 68.5 %, without LayerNorm 57.5 % (masked-label loss 2.6 against a label
    entropy of 3.2), with it 30.5 % (loss 4.9 against 5.0).
    Everything is fp32 whatever the autocast state, so labels do not depend on precision.
    """

    def __init__(self, cfg: RandomProjectionConfig | None = None):
        super().__init__()
        cfg = cfg or RandomProjectionConfig()
        cfg.validate()
        self.cfg = cfg
        n_in = cfg.patch_size**2
        gen = torch.Generator().manual_seed(cfg.seed)
        std = (2.0 / (n_in + cfg.dim)) ** 0.5  # Xavier-normal
        self.register_buffer("projection", torch.randn(n_in, cfg.dim, generator=gen) * std)
        self.register_buffer(
            "codebook", l2norm(torch.randn(cfg.codebook_size, cfg.dim, generator=gen))
        )

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def check_model(self, model: Any) -> None:
        """ConfigError unless `model` (AudioModel, encoder or config) has the same patching."""
        _check_patching(self.cfg.patch_size, self.cfg.n_mels, model, "random-projection tokenizer")

    def patches(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank (B, T, F) -> patches (B, N, P*P), time-major like the encoders' tokens."""
        p = self.cfg.patch_size
        if fbank.dim() != 3 or fbank.shape[-1] != self.cfg.n_mels:
            raise ValueError(
                f"tokenizer expects features (B, T, {self.cfg.n_mels}), got {tuple(fbank.shape)}"
            )
        b, t, f = fbank.shape
        nt, nf = t // p, f // p
        x = fbank[:, : nt * p, : nf * p].reshape(b, nt, p, nf, p)
        return x.permute(0, 1, 3, 2, 4).reshape(b, nt * nf, p * p)  # (B, T'F', P*P)

    @torch.no_grad()
    def labels_from_features(
        self,
        fbank: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        return_margin: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised fbank (B, T, F), frame padding (B, T) -> labels (B, N) int64, -100 on
        padding tokens; with `return_margin`, also the cosine gap best - second best (B, N)."""
        with torch.autocast(device_type=fbank.device.type, enabled=False):
            x = self.patches(fbank.float())
            if self.cfg.layer_norm:
                x = F.layer_norm(x, x.shape[-1:])
            sim = l2norm(x @ self.projection) @ self.codebook.T  # (B, N, K) cosines
            top = torch.topk(sim, 2, dim=-1)
            labels = sim.argmax(dim=-1)
        padding = frames_to_token_mask(
            frame_mask,
            self.cfg.patch_size,
            self.cfg.n_mels // self.cfg.patch_size,
            fbank.shape[1] // self.cfg.patch_size,
        )
        if padding is not None:
            labels = labels.masked_fill(padding, IGNORE_INDEX)
        if return_margin:
            return labels, top.values[..., 0] - top.values[..., 1]
        return labels


# ----------------------------------------------------------------------------------------------
# Iterations 2+: the BEATs tokenizer
# ----------------------------------------------------------------------------------------------
@dataclass
class BEATsTokenizerConfig:
    """BEATs tokenizer: encoder settings (official field names) and the quantiser."""

    encoder: BEATsConfig = field(
        default_factory=BEATsConfig, metadata={"help": "the tokenizer's BEATs encoder"}
    )
    quantizer: QuantizerConfig = field(
        default_factory=QuantizerConfig, metadata={"help": "codebook and its training"}
    )

    @property
    def quant_n(self) -> int:
        return self.quantizer.codebook_size

    @property
    def quant_dim(self) -> int:
        return self.quantizer.dim

    @classmethod
    def preset(cls, name: str) -> BEATsTokenizerConfig:
        """`tiny` (tests; the fixture's sizes) or `base` (official TokenizersConfig sizes)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown tokenizer preset {name!r} (known: {', '.join(PRESETS)})")
        p = PRESETS[name]
        cfg = cls(
            encoder=BEATsConfig.preset(p["encoder"]),
            quantizer=QuantizerConfig(codebook_size=p["codebook_size"], dim=p["dim"]),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_official(cls, cfg: Any, source: str) -> BEATsTokenizerConfig:
        """An official checkpoint's cfg dict (over the TokenizersConfig defaults) -> config.
        Every size comes from the dict or the official defaults, never from our presets."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: 'cfg' is a {type(cfg).__name__}, expected a dict")
        merged = {**OFFICIAL_TOKENIZER_DEFAULTS, **cfg}
        names = {f.name for f in dataclasses.fields(BEATsConfig)}
        enc = {k: merged[k] for k in OFFICIAL_TOKENIZER_DEFAULTS if k in names}
        try:
            out = cls(
                encoder=from_dict(BEATsConfig, enc, where=f"{source} cfg"),
                quantizer=QuantizerConfig(
                    codebook_size=_as_int(merged["quant_n"], "quant_n"),
                    dim=_as_int(merged["quant_dim"], "quant_dim"),
                ),
            )
            out.validate()
        except ConfigError as e:
            raise CheckpointError(f"{source}: unusable tokenizer cfg: {first_line(e)}") from e
        return out

    def validate(self) -> None:
        self.encoder.validate()
        self.quantizer.validate()
        if self.encoder.cls_token:
            raise ConfigError("a tokenizer labels patches: its encoder has no cls_token")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


class TokenizerOutput(NamedTuple):
    """BEATsTokenizer.forward: quantized (B, N, d) straight-through codewords; indices (B, N);
    loss: commitment loss; codes_used, perplexity: batch usage; padding_mask (B, N) | None: True
    on padding tokens (patch rule, as the encoders' token masks)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codes_used: torch.Tensor
    perplexity: torch.Tensor
    padding_mask: torch.Tensor | None


class BEATsTokenizer(nn.Module):
    """BEATs encoder + quantize_layer + NormEMAVectorQuantizer (see module docstring)."""

    def __init__(self, cfg: BEATsTokenizerConfig | None = None):
        super().__init__()
        cfg = cfg or BEATsTokenizerConfig.preset("base")
        cfg.validate()
        self.cfg = cfg
        d = cfg.encoder.encoder_embed_dim
        self.encoder = BEATsEncoder(cfg.encoder)
        self.quantize_layer = nn.Sequential(
            nn.Linear(d, d), nn.Tanh(), nn.Linear(d, cfg.quantizer.dim)
        )
        self.quantize = NormEMAVectorQuantizer(cfg.quantizer)
        # The BEATs preprocessing (no state: nothing enters the state dict).
        self.frontend_cfg = dataclasses.replace(
            FrontendConfig.official("beats_fbank"), n_mels=cfg.encoder.n_mels
        )
        self.frontend = build_frontend(self.frontend_cfg)

    @property
    def patch_size(self) -> int:
        return self.cfg.encoder.input_patch_size

    @property
    def codebook_size(self) -> int:
        return self.cfg.quantizer.codebook_size

    def check_model(self, model: Any) -> None:
        """ConfigError unless `model` (AudioModel, encoder or config) has the same patching."""
        _check_patching(self.patch_size, self.cfg.encoder.n_mels, model, "BEATs tokenizer")

    # ----- computation --------------------------------------------------------------------
    def preprocess(
        self, wav: torch.Tensor, fbank_mean: float = 15.41663, fbank_std: float = 6.55582
    ) -> torch.Tensor:
        """Official preprocessing: Kaldi fbank of each whole (padded) waveform (B, S) at 16 kHz,
        (x - mean) / (2 * std) -> (B, T, F)."""
        if wav.dim() == 1:
            wav = wav[None]
        fbank, _ = self.frontend.raw(wav)
        return (fbank - fbank_mean) / (2.0 * fbank_std)

    def project(
        self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fbank (B, T, F) -> (quantize_layer output (B, N, d), padding (B, N) | None: patch
        rule). The encoder's attention mask follows the official rule (module docstring)."""
        x = self.encoder.embed(fbank)  # (B, N, E -> D)
        attn_mask = None
        if frame_mask is not None:
            attn_mask = official_padding_mask(frame_mask, x.shape[1])
        tokens = self.encoder.encode(x, attn_mask).tokens
        padding = frames_to_token_mask(
            frame_mask, self.patch_size, self.encoder.n_freq, fbank.shape[1] // self.patch_size
        )
        return self.quantize_layer(tokens), padding

    @torch.no_grad()
    def quantize_input(
        self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The l2-normalised vectors (B, N, d) that labelling matches against the codebook."""
        with _eval_mode(self):
            return l2norm(self.project(fbank, frame_mask)[0].float())

    def forward(
        self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> TokenizerOutput:
        """Training / distillation path: quantised vectors with gradients, commitment loss and
        usage statistics. Updates the codebook when training with gradients enabled."""
        x, padding = self.project(fbank, frame_mask)
        q = self.quantize(x, None if padding is None else ~padding)
        return TokenizerOutput(*q, padding)

    @torch.no_grad()
    def labels_from_features(
        self,
        fbank: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        return_margin: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised fbank (B, T, F), frame padding (B, T) -> labels (B, N) int64 with -100 on
        padding tokens (patch rule); with `return_margin`, also (B, N) the gap between the
        second-best and the best squared distance (a near tie may flip between machines)."""
        with _eval_mode(self):
            x, padding = self.project(fbank, frame_mask)
        labels, margin = self.quantize.nearest(x)
        if padding is not None:
            labels = labels.masked_fill(padding, IGNORE_INDEX)
        return (labels, margin) if return_margin else labels

    @torch.no_grad()
    def extract_labels(
        self,
        wav: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        fbank_mean: float = 15.41663,
        fbank_std: float = 6.55582,
    ) -> torch.Tensor:
        """The official `Tokenizers.extract_labels(source, padding_mask)`: waveforms (B, S) at
        16 kHz, sample padding (B, S) True=pad -> labels (B, N) int64 of every token (padding
        ones too). The official code returns them flat, (B * N,): `labels.flatten()` is that."""
        fbank = self.preprocess(wav, fbank_mean, fbank_std)
        frame_mask = None
        if padding_mask is not None:
            frame_mask = official_padding_mask(padding_mask, fbank.shape[1])
        with _eval_mode(self):
            x, _ = self.project(fbank, frame_mask)
        return self.quantize.nearest(x)[0]


# ----------------------------------------------------------------------------------------------
# Distillation (training a BEATs tokenizer from a teacher)
# ----------------------------------------------------------------------------------------------
class TokenizerEstimator(nn.Module):
    """Quantised vectors (B, N, quant_dim) -> predicted teacher features (B, N, teacher_dim):
    Linear -> `layers` BEATs transformer layers of the tokenizer's width (or, with 0 layers, a
    GELU) -> Linear."""

    def __init__(self, cfg: BEATsTokenizerConfig, teacher_dim: int, layers: int = 3):
        super().__init__()
        if teacher_dim < 1 or layers < 0:
            raise ConfigError("estimator teacher_dim must be positive and layers >= 0")
        d = cfg.encoder.encoder_embed_dim
        self.proj_in = nn.Linear(cfg.quantizer.dim, d)
        self.transformer = None
        if layers > 0:
            est = dataclasses.replace(
                cfg.encoder,
                encoder_layers=layers,
                layer_wise_gradient_decay_ratio=1.0,
                encoder_layerdrop=0.0,
                cls_token=False,
                gradient_checkpointing=False,
            )
            self.transformer = BEATsTransformer(est)
        self.proj_out = nn.Linear(d, teacher_dim)

    def forward(self, q: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(q)
        if self.transformer is not None:
            x = self.transformer(x, padding_mask)[0]
        else:
            x = F.gelu(x)
        return self.proj_out(x)


class TokenizerDistiller(nn.Module):
    """A BEATsTokenizer and its estimator, trained together: `forward` = `distillation_loss`.

    The teacher is the caller's: pass its last-layer tokens (B, N, Dt) for the same features
    (same patching: N must match). They are detached here, so a teacher never gets gradients.
    """

    def __init__(self, tokenizer: BEATsTokenizer, teacher_dim: int, estimator_layers: int = 3):
        super().__init__()
        self.tokenizer = tokenizer
        self.estimator = TokenizerEstimator(tokenizer.cfg, teacher_dim, estimator_layers)

    def forward(
        self,
        fbank: torch.Tensor,
        frame_mask: torch.Tensor | None,
        teacher_features: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.distillation_loss(fbank, frame_mask, teacher_features)

    def distillation_loss(
        self,
        fbank: torch.Tensor,
        frame_mask: torch.Tensor | None,
        teacher_features: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss, logs): loss = mean over real patches of 1 - cos(estimate, teacher) plus the
        commitment loss; logs (detached scalars): cosine, commit, codes_used, perplexity."""
        out = self.tokenizer(fbank, frame_mask)
        if teacher_features.shape[:2] != out.indices.shape:
            raise ConfigError(
                f"teacher features {tuple(teacher_features.shape)} do not match the tokenizer's "
                f"{tuple(out.indices.shape)} tokens: teacher and tokenizer must cut the same patches"
            )
        pred = self.estimator(out.quantized, out.padding_mask)
        cos = F.cosine_similarity(pred.float(), teacher_features.detach().float(), dim=-1)
        if out.padding_mask is None:
            cosine = cos.mean()
        else:
            valid = (~out.padding_mask).to(cos.dtype)
            cosine = (cos * valid).sum() / valid.sum().clamp_min(1.0)
        loss = (1.0 - cosine) + out.loss
        logs = {
            "cosine": cosine.detach(),
            "commit": out.loss.detach(),
            "codes_used": out.codes_used,
            "perplexity": out.perplexity,
        }
        return loss, logs


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------
# Quantiser entries of an official tokenizer (everything else goes through beats.convert's map):
# (official key, our key or None when dropped). Dropped: `quantize.embedding.cluster_size` (the
# k-means counts at initialisation, never updated by the official forward) and
# `quantize.embedding.embed_avg` (never updated by the official forward); our `embed_avg` is
# rebuilt as codebook * cluster_size, the EMA state that reproduces the codebook.
QUANT_KEY_MAP: list[tuple[str, str | None]] = [
    (r"quantize_layer\.(0|2)\.(weight|bias)", r"quantize_layer.\1.\2"),
    (r"quantize\.embedding\.weight", "quantize.codebook"),
    (r"quantize\.embedding\.initted", "quantize.initted"),
    (r"quantize\.cluster_size", "quantize.cluster_size"),
    (r"quantize\.embedding\.cluster_size", None),
    (r"quantize\.embedding\.embed_avg", None),
]
_OFFICIAL_QUANT_KEYS = (
    "quantize.embedding.weight",
    "quantize.embedding.initted",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.cluster_size",
)


def _is_quant_key(key: str) -> bool:
    return key.startswith(("quantize.", "quantize_layer."))


def is_official_tokenizer(obj: Any) -> bool:
    """True for an official BEATs tokenizer checkpoint ({'cfg', 'model'} with `quantize.*` /
    `quantize_layer.*` weights); False for a BEATs model checkpoint and anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        return False
    keys = [k for k in obj["model"] if isinstance(k, str)]
    return "patch_embedding.weight" in keys and any(_is_quant_key(k) for k in keys)


def load_official_tokenizer(obj: Any, source: str) -> BEATsTokenizer:
    """An official tokenizer checkpoint (already read safely) -> BEATsTokenizer in eval mode.
    Anything wrong is a one-line CheckpointError."""
    if not is_official_tokenizer(obj):
        raise CheckpointError(
            f"{source}: not an official BEATs tokenizer checkpoint (expected {{'cfg', 'model'}} "
            "with quantize.* and quantize_layer.* weights)"
        )
    cfg = BEATsTokenizerConfig.from_official(obj.get("cfg") or {}, source)
    sd: dict[str, Any] = obj["model"]
    missing = [k for k in _OFFICIAL_QUANT_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: tokenizer checkpoint lacks {', '.join(missing)}")
    state = convert_state_dict({k: v for k, v in sd.items() if not _is_quant_key(k)}, source)
    k, d = cfg.quant_n, cfg.quant_dim
    dropped_shapes = {
        "quantize.embedding.cluster_size": (k,),
        "quantize.embedding.embed_avg": (k, d),
    }
    for key, value in sd.items():
        if not _is_quant_key(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor")
        for pattern, target in QUANT_KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            if target is None:
                if tuple(value.shape) != dropped_shapes[key]:
                    raise CheckpointError(
                        f"{source}: {key} is {tuple(value.shape)}, expected {dropped_shapes[key]}"
                    )
            elif target == "quantize.initted":
                if value.numel() != 1:
                    raise CheckpointError(f"{source}: {key} has {value.numel()} values, expected 1")
                state[target] = value.reshape(()).bool()
            else:
                state[m.expand(target)] = value.float()
            break
        else:
            raise CheckpointError(f"{source}: unexpected key {key!r} for a BEATs tokenizer")
    codebook, sizes = state["quantize.codebook"], state["quantize.cluster_size"]
    if codebook.shape == (k, d) and sizes.shape == (k,):
        if not bool(sizes.any()):
            # No usage statistics in the file: give every code the count of a freshly
            # re-initialised one, so continued training does not declare them all dead.
            sizes = torch.ones_like(sizes)
            state["quantize.cluster_size"] = sizes
        state["quantize.embed_avg"] = codebook * sizes[:, None]
    tokenizer = BEATsTokenizer(cfg)
    load_weights(tokenizer, state, source)
    return tokenizer.eval()


# ----------------------------------------------------------------------------------------------
# Our export format
# ----------------------------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, type]] = {
    "beats": (BEATsTokenizer, BEATsTokenizerConfig),
    "random_projection": (RandomProjectionTokenizer, RandomProjectionConfig),
}


def _tokenizer_type(tokenizer: nn.Module) -> str:
    for name, (cls, _) in _TYPES.items():
        if isinstance(tokenizer, cls):
            return name
    raise ConfigError(f"not a tokenizer: {type(tokenizer).__name__}")


def _is_tokenizer_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / TOKENIZER_CONFIG).read_text())
        return isinstance(cfg, dict) and cfg.get("format") == TOKENIZER_FORMAT
    except (OSError, ValueError):
        return False


def save_tokenizer(
    tokenizer: nn.Module, out_dir: str | Path, provenance: dict[str, Any] | None = None
) -> Path:
    """Write `tokenizer.safetensors` + `config.json` into `out_dir`, atomically (an existing
    tokenizer folder is replaced only once the new one is whole; any other non-empty folder is
    refused)."""
    from safetensors.torch import save_file

    kind = _tokenizer_type(tokenizer)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_tokenizer_dir(out))):
        raise CheckpointError(f"{out} exists and is not a tokenizer folder; refusing to replace it")
    state = {k: v.detach().to("cpu").contiguous() for k, v in tokenizer.state_dict().items()}
    config = {
        "format": TOKENIZER_FORMAT,
        "format_version": TOKENIZER_VERSION,
        "tokenizer_type": kind,
        "config": to_dict(tokenizer.cfg),
        "provenance": provenance or {},
    }
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / TOKENIZER_WEIGHTS), metadata={"format": "pt"})
        (tmp / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out


def load_tokenizer(path: str | Path) -> BEATsTokenizer | RandomProjectionTokenizer:
    """A tokenizer folder written by `save_tokenizer` (or its .safetensors file), or an official
    tokenizer `.pt` -> the tokenizer in eval mode (gradients left on; freeze with
    `requires_grad_(False)` when it only labels)."""
    p = Path(path)
    if p.is_file() and p.name == TOKENIZER_WEIGHTS:
        p = p.parent
    if p.is_dir():
        cfg_path = p / TOKENIZER_CONFIG
        config = read_versioned_config(cfg_path, TOKENIZER_FORMAT, TOKENIZER_VERSION, "tokenizer")
        kind = config.get("tokenizer_type")
        if kind not in _TYPES:
            raise CheckpointError(f"{cfg_path}: unknown tokenizer_type {kind!r}")
        cls, cfg_cls = _TYPES[kind]
        try:
            cfg = from_dict(cfg_cls, config.get("config") or {}, where=str(cfg_path))
        except ConfigError as e:
            raise CheckpointError(first_line(e)) from e
        tokenizer = cls(cfg)
        weights = p / TOKENIZER_WEIGHTS
        load_weights(tokenizer, read_safetensors(weights), str(weights))
        return tokenizer.eval()
    obj = read_torch_file(p)
    if is_official_tokenizer(obj):
        return load_official_tokenizer(obj, str(p))
    top = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{p}: not a tokenizer (neither a tokenizer folder nor an official BEATs tokenizer "
        f"checkpoint; top level: {top})"
    )
