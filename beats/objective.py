"""BEATs pretraining objectives (Chen et al. 2022): masked-token prediction and tokenizer training.

`MaskedTokenObjective` ("beats", the acoustic model, every iteration):

    fbank (B, T, F) -> frozen tokenizer -> labels (B, N) codebook indices, -100 on padding
    keep = random_mask(ratio 0.75): each clip keeps 25 % of its own real patches; a shorter clip
           tops the batch count up with padding patches, which the encoder hides from attention
           and which are never targets (`bioaudio.training.masking`)
    student: model.encoder(fbank, frame_mask, keep) -> visible tokens (B, k, D); the masked
             patches are DROPPED before the transformer (they cost nothing)
    label predictor: Linear D -> P; the visible outputs scattered back to their grid positions,
             a learned mask embedding at every dropped position; + fixed 2-D sin-cos positions;
             `predictor_layers` pre-LN transformer layers over the whole grid; LayerNorm;
             Linear P -> codebook size, evaluated on the masked, non-padding patches only
    loss = cross-entropy against the tokenizer's labels on the masked, non-padding patches
    logs: accuracy on those patches, the fraction masked, the perplexity of the batch's labels

Positions of the predictor. BEATs has no absolute positions: the encoder knows where its tokens
are only through the convolutional positional embedding and the relative position bias, both
computed on the visible tokens (at their original indices). The mask embedding is the same vector
at every dropped position, so without a positional signal the predictor could not tell one
masked patch from another. We add a FIXED 2-D sin-cos table over the time-major (time, frequency)
patch grid (half the channels encode the time index, half the frequency band) to every position,
visible or masked: it has no maximum length (a run on 2 s segments predicts on 10 s clips with
the same weights, which a learned table of a fixed size could not), costs no parameters, and
gives each of the 8 frequency rows its own code, which a 1-D sequence index would blur. The
encoder itself is untouched, so the exported model stays an official-layout BEATs encoder.

Utterance embedding (for the memory bank, so the student runs once): BEATs has no CLS token by
default, so `utterance` is the mean of the student's VISIBLE output tokens (padding excluded),
the CLS vector when the encoder was built with `cls_token`. The memory-bank term takes it as its
query; its key is the momentum encoder's embedding of the full second view.

Tokenizer (`--beats.tokenizer`):
- `random` (iteration 1): a `RandomProjectionTokenizer` seeded by `tokenizer_seed`, frozen. Its
  projection and codebook are buffers of this objective, so they are saved in every training
  state and a resumed run labels exactly like the original (they are not part of the export).
- a PATH: a tokenizer folder written by `save_tokenizer` (e.g. a `beats_tokenizer` run's export)
  or an official `Tokenizer_iter3*.pt`, read by `bioaudio.models.checkpoint.load_tokenizer`.
  Frozen, kept OUTSIDE the module tree (a plain list attribute): it is not optimised, not saved in
  the state, not exported, and is reloaded from its path when a run resumes. It is moved to the
  input's device on first use and labels in float32 with autocast off, so labels do not depend on
  the training precision (a near tie would otherwise flip between bf16 and fp32 runs).
Checks before training (one-line ConfigError): the tokenizer cuts the model's patches of the
model's features (`check_model`: patch size, mel bins; the frontend kind and sample rate for a
BEATs tokenizer), has at least 2 codes, and the mask ratio is in (0, 1).

`TokenizerObjective` ("beats_tokenizer", iterations 2+): trains a `BEATsTokenizer` by
distillation from a frozen teacher (`--beats_tokenizer.teacher PATH`: anything `load_model` reads,
our BEATs or EAT export or an official checkpoint):

    teacher.features(wav, padding_mask).tokens (no grad, the teacher's own frontend) -> (B, Nt, Dt)
    tokenizer = the RUN'S BEATs encoder (--preset / --model_path) + quantize_layer + quantiser
    TokenizerDistiller: estimator(quantised codes) ~ teacher tokens (cosine) + commitment loss

Ownership: the tokenizer's encoder IS `model.encoder`. The run's model is a BEATs encoder of the
chosen size that nothing else uses in this run, so training it as the tokenizer's encoder means
presets, `--model_path` (start the tokenizer from a pretrained BEATs), layer-wise decay, gradient
checkpointing and the resumable state all work unchanged; a separate encoder inside the objective
would leave the model's own encoder unused (DDP refuses parameters without gradients) and double
the memory. The objective registers only the parts that are not the model (quantize_layer, the
quantiser, the estimator); the `BEATsTokenizer` object that ties them to `model.encoder` is a
plain attribute, so no module is registered twice. `export` writes that tokenizer (encoder +
quantize_layer + quantiser; the estimator is discarded) with `save_tokenizer` into the run's
`export/`, which `--beats.tokenizer RUN/export` then uses for the next iteration. This objective
runs alone (`--objective beats_tokenizer`).

Grids: both tokenizer and teacher cut 16 x 16 patches at 100 frames/s from frame 0, so patch t of
one covers the frames of patch t of the other; EAT pads its frames up to a multiple of 16 (and
an official-length frontend pads further), so the teacher may have more time patches: both are
cropped to the common number of time patches. Dead codes: the quantiser re-initialises every
code whose EMA usage falls below `dead_code_threshold` with a vector of the current batch
(`beats/quantizer.py`); `codes_used` and `perplexity` are logged to watch the codebook.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bioaudio.config import to_dict
from bioaudio.errors import BioaudioError, ConfigError, first_line
from bioaudio.models.layers import frames_to_token_mask, keep_indices
from bioaudio.training.masking import per_clip_masks, random_mask
from bioaudio.training.memory_bank import utterance_embedding
from bioaudio.training.objectives import Objective, ObjectiveOutput, PretrainInputs
from bioaudio.training.task import TaskContext

from .model import BEATsEncoder
from .quantizer import QuantizerConfig
from .tokenizer import (
    IGNORE_INDEX,
    BEATsTokenizer,
    BEATsTokenizerConfig,
    RandomProjectionConfig,
    RandomProjectionTokenizer,
    TokenizerDistiller,
    save_tokenizer,
)

__all__ = [
    "LabelPredictor",
    "MaskedTokenConfig",
    "MaskedTokenObjective",
    "TokenizerObjective",
    "TokenizerObjectiveConfig",
    "grid_positions",
]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _beats_encoder(model: nn.Module, what: str) -> BEATsEncoder:
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, BEATsEncoder):
        raise ConfigError(
            f"the {what} objective trains BEATs encoders, not {type(encoder).__name__}"
        )
    return encoder


def _reason(e: BaseException, path: str) -> str:
    """The first line of a loading error without the path it repeats (we name it already)."""
    msg = first_line(e)
    for prefix in (str(path), str(Path(path).expanduser())):
        if msg.startswith(prefix):
            return msg[len(prefix) :].lstrip(": ") or msg
    return msg


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move a module kept outside the module tree to `device` the first time it is needed there."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.device != device:
        module.to(device)
    return module


def grid_positions(
    n_time: int, n_freq: int, dim: int, device: torch.device | None = None
) -> Tensor:
    """Fixed 2-D sin-cos table (n_time * n_freq, dim) over the time-major patch grid: channels
    [0, dim/2) encode the time index, [dim/2, dim) the frequency index, each as [sin, cos] of
    p * w_i with w_i = 10000 ** (-i / (dim / 4)). `dim` must be a multiple of 4."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)

    def axis(n: int) -> Tensor:  # (n, dim / 2)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    t, f = axis(n_time), axis(n_freq)
    table = torch.cat(
        [t[:, None].expand(n_time, n_freq, 2 * q), f[None].expand(n_time, n_freq, 2 * q)], dim=-1
    )  # (T', F', dim)
    return table.reshape(n_time * n_freq, dim).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Masked-token prediction (the acoustic model)
# ----------------------------------------------------------------------------------------------
@dataclass
class MaskedTokenConfig:
    """BEATs masked-token prediction options (`--beats.<option>`)."""

    mask_ratio: float = field(
        default=0.75, metadata={"help": "fraction of patches dropped before the encoder"}
    )
    tokenizer: str = field(
        default="random",
        metadata={
            "help": "label source: 'random' (iteration 1: a seeded random-projection tokenizer) "
            "or a PATH to a tokenizer folder (a beats_tokenizer run's export) or an official "
            "Tokenizer_iter3*.pt"
        },
    )
    tokenizer_seed: int = field(
        default=0, metadata={"help": "seed of the random-projection tokenizer"}
    )
    codebook_size: int = field(
        default=1024, metadata={"help": "codes of the random-projection tokenizer (label classes)"}
    )
    codebook_dim: int = field(
        default=256, metadata={"help": "projection width of the random-projection tokenizer"}
    )
    tokenizer_layer_norm: bool = field(
        default=False,
        metadata={
            "help": "random-projection tokenizer: normalise each patch before projecting (off: "
            "labels the context can predict; see RandomProjectionTokenizer)"
        },
    )
    predictor_layers: int = field(
        default=2, metadata={"help": "transformer layers of the label predictor (>= 1)"}
    )
    predictor_dim: int = field(
        default=0,
        metadata={"help": "label predictor width, a multiple of 4 (0: the encoder width)"},
    )
    predictor_heads: int = field(
        default=0, metadata={"help": "label predictor attention heads (0: width / 64, at least 1)"}
    )

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(
                f"beats mask_ratio must be strictly between 0 and 1, got {self.mask_ratio}"
            )
        if not str(self.tokenizer).strip():
            raise ConfigError("beats tokenizer must be 'random' or a path to a tokenizer")
        if self.codebook_size < 2:
            raise ConfigError(
                f"beats codebook_size {self.codebook_size}: a codebook of fewer than 2 codes "
                "gives every patch the same label; use codebook_size >= 2"
            )
        if self.codebook_dim < 1:
            raise ConfigError(f"beats codebook_dim must be positive, got {self.codebook_dim}")
        if self.predictor_layers < 1:
            raise ConfigError(
                f"beats predictor_layers must be >= 1, got {self.predictor_layers} (a predictor "
                "without attention cannot see the visible patches around a masked one)"
            )
        if self.predictor_dim < 0 or self.predictor_dim % 4:
            raise ConfigError(
                f"beats predictor_dim must be 0 or a positive multiple of 4 (2-D sin-cos "
                f"positions), got {self.predictor_dim}"
            )
        if self.predictor_heads < 0:
            raise ConfigError(f"beats predictor_heads must be >= 0, got {self.predictor_heads}")

    @property
    def is_random(self) -> bool:
        return str(self.tokenizer).strip().lower() == "random"


class LabelPredictor(nn.Module):
    """Visible encoder outputs -> logits over the codebook at the selected grid positions.

    Linear D -> P; visible tokens scattered to their grid positions, `mask_embedding` elsewhere;
    + fixed 2-D sin-cos positions; pre-LN transformer layers over the whole grid (padding hidden
    as keys); LayerNorm; Linear P -> K on the selected positions only.
    """

    def __init__(self, in_dim: int, dim: int, layers: int, heads: int, n_codes: int):
        super().__init__()
        if dim % 4:
            raise ConfigError(f"label predictor width {dim} must be a multiple of 4")
        if dim % heads:
            raise ConfigError(f"label predictor width {dim} is not divisible by {heads} heads")
        self.dim = dim
        self.proj_in = nn.Linear(in_dim, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                4 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_codes)

    def forward(
        self,
        visible: Tensor,
        visible_idx: Tensor,
        grid: tuple[int, int],
        padding: Tensor | None,
        select: Tensor,
    ) -> Tensor:
        """visible (B, k, D) at grid indices visible_idx (B, k); grid (n_time, n_freq); padding
        (B, N) True on padding tokens | None; select (B, N) bool -> logits (M, K), M = select.sum()
        in row-major order of `select`."""
        b = visible.shape[0]
        n = grid[0] * grid[1]
        x = self.proj_in(visible)  # (B, k, P)
        full = self.mask_embedding.to(x.dtype).expand(b, n, self.dim)
        full = full.scatter(1, visible_idx[..., None].expand(-1, -1, self.dim), x)  # (B, N, P)
        full = full + grid_positions(*grid, self.dim, x.device).to(x.dtype)
        key_mask = None
        if padding is not None:
            # A clip without any real patch would attend to nothing (NaN); it carries no loss.
            key_mask = padding & ~padding.all(dim=1, keepdim=True)
        for layer in self.layers:
            full = layer(full, src_key_padding_mask=key_mask)
        return self.head(self.norm(full[select]))


class MaskedTokenObjective(Objective):
    """BEATs masked-token prediction (see the module docstring).

    Parts: `predictor` (trained); `tokenizer` (the random-projection tokenizer, frozen buffers
    saved with the run) or, for a tokenizer file, a frozen tokenizer outside the module tree.
    """

    name = "beats"
    config_class = MaskedTokenConfig

    def __init__(self, model: nn.Module, cfg: MaskedTokenConfig | dict | None = None):
        super().__init__(model, cfg)
        self.cfg: MaskedTokenConfig = cfg
        encoder = _beats_encoder(model, "beats")
        self.patch_size = encoder.cfg.input_patch_size
        self.n_freq = encoder.n_freq
        self.tokenizer: RandomProjectionTokenizer | None = None
        self._external: list[nn.Module] = []  # a list: a file tokenizer is not our submodule
        if cfg.is_random:
            tok: nn.Module = RandomProjectionTokenizer(
                RandomProjectionConfig(
                    patch_size=self.patch_size,
                    n_mels=encoder.cfg.n_mels,
                    dim=cfg.codebook_dim,
                    codebook_size=cfg.codebook_size,
                    layer_norm=cfg.tokenizer_layer_norm,
                    seed=cfg.tokenizer_seed,
                )
            ).requires_grad_(False)
            self.tokenizer = tok  # buffers: saved and resumed with the run
        else:
            tok = self._load_tokenizer(cfg.tokenizer)
            self._external = [tok]
        self._check_tokenizer(tok, model)
        self.n_codes = int(tok.codebook_size)
        dim = cfg.predictor_dim or encoder.embed_dim
        if dim % 4:
            raise ConfigError(
                f"beats predictor width {dim} (the encoder width) is not a multiple of 4; "
                "set --beats.predictor_dim"
            )
        heads = cfg.predictor_heads or max(1, dim // 64)
        while dim % heads:  # the automatic count divides the width
            heads -= 1
        self.predictor = LabelPredictor(
            encoder.embed_dim, dim, cfg.predictor_layers, heads, self.n_codes
        )

    # ----- tokenizer ------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(path: str) -> nn.Module:
        from bioaudio.models.checkpoint import load_tokenizer

        try:
            tok = load_tokenizer(Path(path).expanduser())
        except BioaudioError as e:
            raise ConfigError(
                f"--beats.tokenizer {path}: not a usable tokenizer ({_reason(e, path)}); give "
                "'random', a tokenizer folder (a beats_tokenizer run's export) or an official "
                "Tokenizer_iter3*.pt"
            ) from e
        return tok.requires_grad_(False).eval()

    @staticmethod
    def _check_tokenizer(tok: nn.Module, model: nn.Module) -> None:
        try:
            tok.check_model(model)  # patch size and mel bins
        except ConfigError as e:
            raise ConfigError(f"--beats.tokenizer: {first_line(e)}") from e
        if int(tok.codebook_size) < 2:
            raise ConfigError(
                f"--beats.tokenizer: a codebook of {tok.codebook_size} code(s) gives every patch "
                "the same label"
            )
        tok_fe, model_fe = getattr(tok, "frontend_cfg", None), getattr(model, "frontend_cfg", None)
        if tok_fe is not None and model_fe is not None:
            if (tok_fe.kind, tok_fe.sample_rate) != (model_fe.kind, model_fe.sample_rate):
                raise ConfigError(
                    f"--beats.tokenizer labels {tok_fe.kind} features at {tok_fe.sample_rate} Hz "
                    f"but the model computes {model_fe.kind} at {model_fe.sample_rate} Hz"
                )

    @property
    def label_source(self) -> nn.Module:
        """The tokenizer in use (ours or the external one)."""
        return self.tokenizer if self.tokenizer is not None else self._external[0]

    @torch.no_grad()
    def labels(self, fbank: Tensor, frame_mask: Tensor | None) -> Tensor:
        """(B, N) int64 codebook indices, -100 on padding patches (no gradient, fp32)."""
        tok = self.label_source
        if self.tokenizer is None:
            tok = _on_device(tok, fbank.device)
        with torch.autocast(device_type=fbank.device.type, enabled=False):
            return tok.labels_from_features(fbank.float(), frame_mask)

    # ----- the loss -------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        fbank, frame_mask = inputs.fbank, inputs.frame_mask
        b, dev = fbank.shape[0], fbank.device
        n_time = fbank.shape[1] // self.patch_size
        n = n_time * self.n_freq
        labels = self.labels(fbank, frame_mask)  # (B, N)
        if labels.shape != (b, n):
            raise ConfigError(
                f"the tokenizer labels {tuple(labels.shape)} patches but the encoder cuts "
                f"{(b, n)}: tokenizer and model must cut the same patches"
            )
        padding = frames_to_token_mask(frame_mask, self.patch_size, self.n_freq, n_time)
        keep = per_clip_masks(  # per clip: a clip's mask does not depend on its batch
            lambda rows, gen, pad_rows: random_mask(rows, n, self.cfg.mask_ratio, gen, pad_rows),
            inputs.clip_gens(),
            1,
            padding,
            device=dev,
        )
        out = model.encoder(fbank, frame_mask, keep)  # visible tokens only: (B, k, D)
        idx = keep_indices(keep)  # the order in which the encoder gathered them

        target = labels.masked_fill(keep, IGNORE_INDEX)  # masked, non-padding patches only
        select = target != IGNORE_INDEX
        logits = self.predictor(out.tokens, idx, (n_time, self.n_freq), padding, select)
        y = target[select]
        n_sel = y.numel()
        # Sum / count: an empty selection still touches the predictor (DDP) with loss 0.
        loss = F.cross_entropy(logits.float(), y, reduction="sum") / max(n_sel, 1)

        with torch.no_grad():
            valid = labels != IGNORE_INDEX
            counts = torch.bincount(labels[valid], minlength=self.n_codes).float()
            probs = counts / counts.sum().clamp(min=1.0)
            entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
            hits = (logits.argmax(-1) == y).float().sum()
            logs = {  # tensors: reduced once, at the logging step
                "accuracy": hits / max(n_sel, 1),
                "masked_fraction": select.sum().float() / valid.sum().clamp(min=1).float(),
                "label_perplexity": entropy.exp(),
            }
        pooling = "cls" if out.cls is not None else "mean"
        return ObjectiveOutput(loss=loss, logs=logs, utterance=utterance_embedding(out, pooling))

    def describe(self) -> dict[str, Any]:
        tok = self.label_source
        return {
            "name": self.name,
            **dataclasses.asdict(self.cfg),
            "tokenizer_type": type(tok).__name__,
            "codes": self.n_codes,
        }


# ----------------------------------------------------------------------------------------------
# Tokenizer training (iterations 2+)
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenizerObjectiveConfig:
    """BEATs tokenizer training options (`--beats_tokenizer.<option>`)."""

    teacher: str = field(
        default="",
        metadata={
            "help": "REQUIRED: the model to distil from: our BEATs / EAT export (e.g. the previous "
            "iteration's RUN/export) or an official BEATs / EAT checkpoint"
        },
    )
    codebook_size: int = field(default=1024, metadata={"help": "codes K (official quant_n)"})
    codebook_dim: int = field(default=256, metadata={"help": "code dimension (official quant_dim)"})
    estimator_layers: int = field(
        default=3,
        metadata={"help": "transformer layers of the estimator (0: a per-patch MLP)"},
    )
    beta: float = field(default=1.0, metadata={"help": "commitment loss weight"})
    decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook"})
    kmeans_init: bool = field(
        default=True, metadata={"help": "start the codebook by k-means on the first batch"}
    )
    kmeans_iters: int = field(default=10, metadata={"help": "k-means iterations"})
    dead_code_threshold: float = field(
        default=1e-3,
        metadata={"help": "re-initialise codes whose EMA usage falls below this (0: never)"},
    )
    ema_rule: str = field(
        default="official", metadata={"help": "codebook update rule: official | sums"}
    )
    quantizer_seed: int = field(
        default=0, metadata={"help": "seed of the initial codebook and the k-means start"}
    )

    def quantizer(self) -> QuantizerConfig:
        return QuantizerConfig(
            codebook_size=self.codebook_size,
            dim=self.codebook_dim,
            beta=self.beta,
            decay=self.decay,
            kmeans_init=self.kmeans_init,
            kmeans_iters=self.kmeans_iters,
            seed=self.quantizer_seed,
            dead_code_threshold=self.dead_code_threshold,
            ema_rule=self.ema_rule,  # type: ignore[arg-type]
        )

    def validate(self) -> None:
        if not str(self.teacher).strip():
            raise ConfigError(
                "beats_tokenizer needs a teacher: --beats_tokenizer.teacher PATH (the previous "
                "iteration's export, or an official BEATs / EAT checkpoint)"
            )
        if self.estimator_layers < 0:
            raise ConfigError(
                f"beats_tokenizer estimator_layers must be >= 0, got {self.estimator_layers}"
            )
        try:
            self.quantizer().validate()
        except ConfigError as e:
            raise ConfigError(f"beats_tokenizer: {first_line(e)}") from e


class TokenizerObjective(Objective):
    """Train a BEATs tokenizer around the run's encoder by distillation (module docstring)."""

    name = "beats_tokenizer"
    config_class = TokenizerObjectiveConfig

    def __init__(self, model: nn.Module, cfg: TokenizerObjectiveConfig | dict | None = None):
        super().__init__(model, cfg)
        self.cfg: TokenizerObjectiveConfig = cfg
        encoder = _beats_encoder(model, "beats_tokenizer")
        tok_cfg = BEATsTokenizerConfig(encoder=encoder.cfg, quantizer=cfg.quantizer())
        try:
            tok_cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"beats_tokenizer: {first_line(e)}") from e
        teacher = self._load_teacher(cfg.teacher)
        self._check_grids(teacher, model, encoder)
        tokenizer = BEATsTokenizer(tok_cfg)
        model_fe = getattr(model, "frontend_cfg", None)
        if model_fe is not None and model_fe.kind != tokenizer.frontend_cfg.kind:
            raise ConfigError(
                f"beats_tokenizer: a BEATs tokenizer labels {tokenizer.frontend_cfg.kind} "
                f"features; the model computes {model_fe.kind}"
            )
        tokenizer.encoder = encoder  # the run's encoder is the tokenizer's (module docstring)
        distiller = TokenizerDistiller(tokenizer, int(teacher.embed_dim), cfg.estimator_layers)
        # Only the parts that are not the model are registered here (trained, saved, resumed).
        self.quantize_layer = tokenizer.quantize_layer
        self.quantize = tokenizer.quantize
        self.estimator = distiller.estimator
        self._distiller = [distiller]  # lists: not submodules (the encoder is the model's)
        self._teacher = [teacher]
        self.teacher_type = str(getattr(teacher, "model_type", type(teacher).__name__))

    @staticmethod
    def _load_teacher(path: str) -> nn.Module:
        from bioaudio.models.checkpoint import load_model

        try:
            teacher = load_model(Path(path).expanduser())
        except BioaudioError as e:
            raise ConfigError(f"--beats_tokenizer.teacher {path}: {_reason(e, path)}") from e
        if not hasattr(teacher, "features") or getattr(teacher, "encoder", None) is None:
            raise ConfigError(
                f"--beats_tokenizer.teacher {path}: a {type(teacher).__name__} has no transformer "
                "encoder to distil from"
            )
        return teacher.requires_grad_(False).eval()

    @staticmethod
    def _check_grids(teacher: nn.Module, model: nn.Module, encoder: BEATsEncoder) -> None:
        """The teacher must cut the same patches (size, frequency rows) at the same frame rate
        and read audio at the model's sample rate."""
        t_cfg = teacher.encoder.cfg
        t_patch = getattr(t_cfg, "input_patch_size", None) or getattr(t_cfg, "patch_size", None)
        t_freq = getattr(teacher.encoder, "n_freq", None)
        p = encoder.cfg.input_patch_size
        if t_patch != p or t_freq != encoder.n_freq:
            raise ConfigError(
                f"--beats_tokenizer.teacher: its {t_patch}x{t_patch} patches in {t_freq} frequency "
                f"rows do not match the tokenizer's {p}x{p} in {encoder.n_freq} rows"
            )
        t_fe, m_fe = teacher.frontend_cfg, model.frontend_cfg
        if t_fe.frame_rate != m_fe.frame_rate or t_fe.sample_rate != m_fe.sample_rate:
            raise ConfigError(
                f"--beats_tokenizer.teacher reads {t_fe.sample_rate} Hz audio at "
                f"{t_fe.frame_rate:g} frames/s; the model {m_fe.sample_rate} Hz at "
                f"{m_fe.frame_rate:g} frames/s: their patches would not cover the same sound"
            )

    @property
    def tokenizer(self) -> BEATsTokenizer:
        """The tokenizer being trained (its encoder is the run's model encoder)."""
        return self._distiller[0].tokenizer

    def bind(self, others: list[Objective]) -> None:
        """The tokenizer run trains the model's encoder as a tokenizer: nothing else may."""
        extra = [o.name for o in others if o is not self]
        if extra:
            raise ConfigError(
                f"beats_tokenizer trains a tokenizer and runs alone; drop {', '.join(extra)} "
                "from --objective"
            )

    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        if inputs.wav is None:
            raise ConfigError("beats_tokenizer needs the waveforms (the teacher featurises them)")
        teacher = _on_device(self._teacher[0], inputs.wav.device)
        with torch.no_grad():
            t_tokens = teacher.features(inputs.wav, inputs.padding_mask).tokens  # (B, Nt, Dt)
        fbank, frame_mask = inputs.fbank, inputs.frame_mask
        p, nf = self.tokenizer.patch_size, self.tokenizer.encoder.n_freq
        n_time = min(fbank.shape[1] // p, t_tokens.shape[1] // nf)  # the common time patches
        if n_time < 1:
            raise ConfigError("beats_tokenizer: the clips are shorter than one patch")
        t_tokens = t_tokens[:, : n_time * nf]
        fbank = fbank[:, : n_time * p]
        if frame_mask is not None:
            frame_mask = frame_mask[:, : n_time * p]
        loss, logs = self._distiller[0].distillation_loss(fbank, frame_mask, t_tokens.float())
        return ObjectiveOutput(loss=loss, logs={k: v.detach().float() for k, v in logs.items()})

    def export(self, model: nn.Module, out_dir: Any, provenance: dict[str, Any]) -> bool:
        """The product is the tokenizer: `save_tokenizer` content into `out_dir`."""
        prov = {
            **provenance,
            "product": "beats_tokenizer",
            "teacher": str(self.cfg.teacher),
            "teacher_model_type": self.teacher_type,
            "frontend": to_dict(model.frontend_cfg),
        }
        save_tokenizer(self.tokenizer, out_dir, prov)
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **dataclasses.asdict(self.cfg),
            "teacher_model_type": self.teacher_type,
        }
