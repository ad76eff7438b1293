"""The EAT self-supervised objective (Chen et al. 2024), data2vec 2.0 style.

    teacher (EMA copy of the encoder, full clip, no grad)
        -> FFN outputs of the top-K blocks, each instance-normalised over patches, averaged,
           layer-normalised per patch                                  = targets (B, N, D)
        -> mean over the clip's patches                                = utterance target (B, D)
    student (the model's encoder): each clip cloned C times, each clone with its own inverse
    block mask (~80 % of the patches dropped before the blocks)     -> visible tokens, CLS
        -> Decoder2d: visible tokens back on the (time, freq) grid, masked cells filled with
           N(0, mask_noise_std) noise, a small grouped-conv CNN      -> predictions (BC, N, D)
    loss = frame_w * frame (predictions vs targets on masked, non-padding patches)
         + utt_w * utterance (student CLS vs utterance target)
    after each optimizer update: teacher <- lerp(teacher, student, 1 - decay(step))

Facts reproduced from the official code (cwx-worst-one/EAT `models/EAT_pretraining.py`,
`models/base.py`, `models/images.py`, `models/modules.py`, `utils/data_utils.py`,
`config/pretraining_AS2M.yaml`; the same logic as fairseq `examples/data2vec/models/data2vec2.py`
and `modalities/{base,images,modules}.py`):
- Targets are the blocks' FFN outputs, not the block outputs: `AltBlock` returns `t = mlp(x)`
  (before the residual and `norm2`) because `end_of_block_targets: false` sets
  `ffn_targets=True`. We read them with forward hooks on the teacher's `blocks[i].mlp`
  (`target_source="block"` uses the block outputs instead). The CLS position is dropped.
- AS2M config: `average_top_k_layers: 12`, `instance_norm_target_layer: true` (F.instance_norm
  over patches per channel, eps 1e-5), `layer_norm_target_layer: false`, `layer_norm_targets:
  true` (F.layer_norm per patch, no affine, eps 1e-5), `instance_norm_targets: false`.
- Utterance target = `orig_targets.mean(dim=1)` (mean over patches of the final targets), loss
  against the student CLS (`cls_loss: 1`, frame loss `d2v_loss: 1`).
- `d2v_loss`: squared error per element times `loss_scale`, default 1/sqrt(D); fairseq's model
  criterion sums every term and divides by `sample_size` = the number of masked patches. So
  frame = mean over masked patches of (sum over channels of the squared error) / sqrt(D), and
  the CLS term (multiplied by `cls_loss * sample_size` before that division) is the SUM over
  the B*C clone views of the per-view squared error / sqrt(D). `utterance_reduction="sum"`
  reproduces that for the micro-batch of all processes together (its weight relative to the
  frame loss grows with the micro-batch: 192 views per GPU officially), so a run gives the same
  losses and updates on 1 or N processes at the same global batch; "mean" averages over views
  instead (batch-size independent).
- Masking: `inverse_mask: true, mask_prob: 0.8, mask_length: 5, mask_prob_adjust: 0.07`
  (`bioaudio.training.masking.inverse_block_mask`), `clone_batch: 16` with `repeat_interleave`
  (views of one clip are adjacent), one teacher pass per clip.
- Decoder input (`ModalitySpecificEncoder.decoder_input`): encoder outputs without CLS, masked
  positions filled with Gaussian noise of std `mask_noise_std: 0.01`, restored to grid order;
  the EAT/data2vec image decoder config adds NO positions (`add_positions_masked` and
  `add_positions_all` default False, not set in the AS2M config), `input_dropout: 0`.
- `Decoder2d` (`models/modules.py`): `decoder_layers` x [Conv2d(kernel, padding kernel // 2,
  groups), trim one row/column for even kernels (SamePad2d), LayerNorm over channels without
  affine, GELU] with a residual whenever the channel count is unchanged, then
  `proj = Linear(decoder_dim, D)`; PyTorch default init. AS2M: 6 layers, kernel 3, dim 768,
  groups 16 (EAT-large: 3 layers, kernel 5, dim 1024). Parameter names match the official
  `decoder.*` keys (`blocks.{i}.0.weight`, `proj.weight`).
- Teacher: `ema_encoder_only: false` with `ema_local_encoder: true` in the AS2M config, i.e. the
  teacher is a full copy (its own patch embedding, CLS token, pre-norm and blocks, all EMA
  updated; the fixed positions are copied) without the decoder, and it encodes the unmasked
  input itself. With `ema_encoder_only: true` only the blocks are averaged and the teacher runs
  on the student's patch embedding, positions, CLS and pre-norm (we copy those into the teacher
  after every update, which is the same thing). fairseq's `EMAModule`: ema = decay * ema +
  (1 - decay) * param, non-trainable tensors copied, the teacher kept in eval mode.
- Decay: `ema_decay: 0.9998 -> ema_end_decay: 0.99999` LINEARLY over `ema_anneal_end_step:
  100000` updates (`get_annealed_rate`), then constant; no update when the decay is 1.

Simplifications / differences:
- No padding exists in the official pretraining (fixed 1024-frame inputs). Here padding tokens
  (frame mask) are excluded from attention (teacher and student), never kept by the mask, set to
  zero in the decoder input and after every decoder layer, excluded from the instance norm
  statistics, from the utterance target mean and from the frame loss.
- The student runs the patch embedding on every clone (our encoder API takes fbank); the
  official code clones after the patch embedding. It is ~1 % of the student's compute for
  EAT-base at 80 % masking.
- The official `min_target_var` / `min_pred_var` abort checks are not reproduced (the AS2M config
  sets both to 0); `target_var` / `pred_var` are logged per process (the official computes them
  over all processes).
- Loading an official fairseq pretraining checkpoint: its `_ema` teacher and `decoder.*`
  weights are in the file but are not loaded; the teacher starts as a copy of the loaded
  student and the decoder is freshly initialised.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bioaudio.errors import ConfigError
from bioaudio.models.layers import keep_indices
from bioaudio.training.masking import inverse_block_mask, per_clip_masks
from bioaudio.training.objectives import Objective, ObjectiveOutput, PretrainInputs
from bioaudio.training.optim import ema_update_
from bioaudio.training.schedules import linear_ramp
from bioaudio.training.task import TaskContext
from eat.model import EATEncoder

NORM_EPS = 1e-5  # F.instance_norm / F.layer_norm defaults, as the official make_targets


@dataclass
class EATObjectiveConfig:
    """EAT pretraining options (defaults: the official `pretraining_AS2M.yaml`)."""

    mask_ratio: float = field(
        default=0.8, metadata={"help": "fraction of patches hidden from the student"}
    )
    block_size: int = field(
        default=5, metadata={"help": "side (patches) of the kept square blocks of the mask"}
    )
    mask_prob_adjust: float = field(
        default=0.07,
        metadata={"help": "extra keep fraction used to place blocks (they overlap)"},
    )
    clone_batch: int = field(
        default=16, metadata={"help": "masked student views of each clip per teacher pass"}
    )
    average_top_k_layers: int = field(
        default=12,
        metadata={"help": "teacher blocks averaged into the targets (clamped to the depth)"},
    )
    target_source: Literal["ffn", "block"] = field(
        default="ffn",
        metadata={"help": "teacher layer output used as target: FFN output (official) or block"},
    )
    instance_norm_target_layer: bool = field(
        default=True, metadata={"help": "instance-normalise each target layer over patches"}
    )
    layer_norm_target_layer: bool = field(
        default=False, metadata={"help": "layer-normalise each target layer per patch"}
    )
    layer_norm_targets: bool = field(
        default=True, metadata={"help": "layer-normalise the averaged targets per patch"}
    )
    instance_norm_targets: bool = field(
        default=False, metadata={"help": "instance-normalise the averaged targets over patches"}
    )
    decoder_dim: int = field(
        default=0, metadata={"help": "CNN decoder width (0: the encoder width, 768 for base)"}
    )
    decoder_layers: int = field(default=6, metadata={"help": "CNN decoder conv layers"})
    decoder_kernel: int = field(default=3, metadata={"help": "CNN decoder kernel size"})
    decoder_groups: int = field(default=16, metadata={"help": "CNN decoder conv groups"})
    mask_noise_std: float = field(
        default=0.01, metadata={"help": "std of the noise filling masked decoder inputs"}
    )
    frame_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the masked-patch regression loss"}
    )
    utterance_loss_weight: float = field(
        default=1.0, metadata={"help": "weight of the CLS (utterance) regression loss"}
    )
    utterance_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "CLS loss over clone views: sum (official) or mean"},
    )
    loss_scale: float | None = field(
        default=None, metadata={"help": "squared-error scale (None: 1/sqrt(D), official)"}
    )
    ema_decay: float = field(default=0.9998, metadata={"help": "teacher EMA decay at step 0"})
    ema_end_decay: float = field(
        default=0.99999, metadata={"help": "teacher EMA decay after the ramp"}
    )
    ema_anneal_end_step: int = field(
        default=100_000,
        metadata={"help": "updates of the linear decay ramp (official 100k of 400k)"},
    )
    ema_encoder_only: bool = field(
        default=False,
        metadata={"help": "EMA only the blocks; the teacher uses the student's embedding"},
    )

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(
                f"eat mask_ratio must be strictly between 0 and 1, got {self.mask_ratio}"
            )
        if self.block_size < 1:
            raise ConfigError(f"eat block_size must be >= 1, got {self.block_size}")
        if self.clone_batch < 1:
            raise ConfigError(f"eat clone_batch must be >= 1, got {self.clone_batch}")
        if self.average_top_k_layers < 1:
            raise ConfigError(
                f"eat average_top_k_layers must be >= 1, got {self.average_top_k_layers}"
            )
        if self.target_source not in ("ffn", "block"):
            raise ConfigError(f"eat target_source must be ffn or block, got {self.target_source!r}")
        if self.utterance_reduction not in ("sum", "mean"):
            raise ConfigError(
                f"eat utterance_reduction must be sum or mean, got {self.utterance_reduction!r}"
            )
        if min(self.decoder_layers, self.decoder_kernel, self.decoder_groups) < 1:
            raise ConfigError("eat decoder layers, kernel and groups must be >= 1")
        if self.decoder_dim < 0 or self.mask_noise_std < 0:
            raise ConfigError("eat decoder_dim and mask_noise_std must be >= 0")
        for name in ("ema_decay", "ema_end_decay"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"eat {name} must be in [0, 1], got {v}")


class _ChannelNormGELU(nn.Module):
    """SamePad2d (trim for even kernels) + LayerNorm over channels without affine + GELU."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.dim = dim
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T', F')
        if self.trim:
            x = x[:, :, : -self.trim, : -self.trim]
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim,), eps=NORM_EPS)  # channels last
        return F.gelu(x).permute(0, 3, 1, 2)


class Decoder2d(nn.Module):
    """The EAT CNN decoder: tokens (B, N, D) on the (time, freq) patch grid -> (B, N, D).

    Official `models/modules.py` `Decoder2d` (see the module docstring); `valid` (B, N) zeroes
    padding cells at the input and after every layer so a padded clip's predictions equal the
    clip's own (the grid edge is zero padding for the convolutions too).
    """

    def __init__(self, in_dim: int, dim: int, layers: int, kernel: int, groups: int, n_freq: int):
        super().__init__()
        if in_dim % groups or dim % groups:
            raise ConfigError(
                f"eat decoder groups {groups} must divide the encoder width {in_dim} and the "
                f"decoder width {dim}"
            )
        self.n_freq = n_freq
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    in_dim if i == 0 else dim,
                    dim,
                    kernel_size=kernel,
                    padding=kernel // 2,
                    groups=groups,
                ),
                _ChannelNormGELU(dim, kernel),
            )
            for i in range(layers)
        )
        self.proj = nn.Linear(dim, in_dim)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        t = n // self.n_freq
        x = x.view(b, t, self.n_freq, d).permute(0, 3, 1, 2)  # (B, D, T', F'), time-major grid
        v = None if valid is None else valid.view(b, 1, t, self.n_freq).to(x.dtype)
        if v is not None:
            x = x * v
        for block in self.blocks:
            y = block(x)
            x = y + x if y.shape[1] == x.shape[1] else y  # official: residual when widths match
            if v is not None:
                x = x * v
        x = x.permute(0, 2, 3, 1).reshape(b, n, -1)  # back to time-major tokens
        return self.proj(x)


def _masked_instance_norm(y: Tensor, w: Tensor, count: Tensor) -> Tensor:
    """Normalise (B, N, D) per channel over the patches weighted by w (B, N, 1) (biased var)."""
    mean = (y * w).sum(1, keepdim=True) / count
    var = ((y - mean).square() * w).sum(1, keepdim=True) / count
    return (y - mean) * torch.rsqrt(var + NORM_EPS)


def _spread(x: Tensor) -> Tensor:
    """Official `compute_var`: mean over channels of the std over rows (x (M, D))."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    return torch.sqrt(x.float().var(dim=0) + 1e-6).mean()


class EATObjective(Objective):
    """EAT / data2vec 2.0 pretraining term for an `AudioModel` with an `EATEncoder`.

    Parts: `teacher` (EMA copy of the encoder, frozen, always in eval mode, saved and resumed
    with the objective) and `decoder` (`Decoder2d`, trained). See the module docstring for what
    reproduces the official code.
    """

    name = "eat"
    config_class = EATObjectiveConfig

    def __init__(self, model: nn.Module, cfg: EATObjectiveConfig | dict | None = None):
        super().__init__(model, cfg)
        self.cfg: EATObjectiveConfig = cfg
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, EATEncoder):
            raise ConfigError(
                f"the eat objective trains EAT encoders, not {type(encoder).__name__}"
            )
        depth = encoder.cfg.depth
        # Clamped: the official base default (12) is every block; small encoders have fewer.
        self.top_k = min(cfg.average_top_k_layers, depth)
        self.teacher = copy.deepcopy(encoder)
        self.teacher.requires_grad_(False)
        self.teacher.gradient_checkpointing = False
        self.teacher.eval()
        d = encoder.embed_dim
        self.decoder = Decoder2d(
            d,
            cfg.decoder_dim or d,
            cfg.decoder_layers,
            cfg.decoder_kernel,
            cfg.decoder_groups,
            encoder.n_freq,
        )

    # ----- schedule / modes ---------------------------------------------------------------
    def ema_decay_at(self, step: int) -> float:
        """Teacher decay after update `step`: linear from `ema_decay` to `ema_end_decay` over
        `ema_anneal_end_step` updates, then constant (official `get_annealed_rate`)."""
        c = self.cfg
        return linear_ramp(
            step, start=c.ema_decay, end=c.ema_end_decay, ramp_steps=c.ema_anneal_end_step
        )

    def train(self, mode: bool = True) -> EATObjective:
        """Train mode for the decoder; the teacher stays in eval mode (no dropout, drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def momentum_encoder(self) -> nn.Module:
        return self.teacher

    # ----- targets --------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(
        self, fbank: Tensor, frame_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher pass on the full input -> (targets (B, N, D) float32, zero on padding;
        token padding mask (B, N) or None)."""
        teacher, c = self.teacher, self.cfg
        if c.target_source == "ffn":
            layers: list[Tensor] = []
            hooks = [
                blk.mlp.register_forward_hook(lambda m, i, o: layers.append(o))
                for blk in teacher.blocks[-self.top_k :]
            ]
            try:
                out = teacher(fbank, frame_mask)
            finally:
                for h in hooks:
                    h.remove()
        else:
            out, layers = teacher.forward_layers(fbank, frame_mask)
            layers = layers[-self.top_k :]
        pad = out.padding_mask
        ys = [y[:, 1:].float() for y in layers]  # drop CLS -> (B, N, D)
        b, n, _ = ys[0].shape
        if pad is None:
            w = ys[0].new_ones(b, n, 1)
        else:
            w = (~pad)[..., None].float()
        count = w.sum(1, keepdim=True).clamp(min=1.0)
        if c.instance_norm_target_layer:
            ys = [_masked_instance_norm(y, w, count) for y in ys]
        if c.layer_norm_target_layer:
            ys = [F.layer_norm(y, y.shape[-1:], eps=NORM_EPS) for y in ys]
        y = torch.stack(ys).mean(0)
        if c.layer_norm_targets:
            y = F.layer_norm(y, y.shape[-1:], eps=NORM_EPS)
        if c.instance_norm_targets:
            y = _masked_instance_norm(y, w, count)
        return y * w, pad

    # ----- the loss -------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        c = self.cfg
        encoder = model.encoder
        fbank, frame_mask = inputs.fbank, inputs.frame_mask
        b = fbank.shape[0]
        views = c.clone_batch
        n_time = fbank.shape[1] // encoder.cfg.patch_size
        n_freq = encoder.n_freq
        dev = fbank.device

        # Teacher: one pass per clip, whatever the number of views.
        targets, pad = self.teacher_targets(fbank, frame_mask)  # (B, N, D), (B, N) | None
        d = targets.shape[-1]
        valid = torch.ones(targets.shape[:2], dtype=torch.bool, device=dev) if pad is None else ~pad
        n_valid = valid.sum(1)  # (B,)
        utt_target = targets.sum(1) / n_valid.clamp(min=1)[:, None]  # mean over valid patches

        # Student: C views per clip (view j of clip i at row i * C + j), one mask each.
        # Masks and decoder noise are drawn per clip from its own generator, so a clip gets the
        # same views whatever it is batched with (and on whichever process).
        gens = inputs.clip_gens()
        keep = per_clip_masks(
            lambda n_rows, gen, rows: inverse_block_mask(
                n_rows, n_time, n_freq, c.mask_ratio, c.block_size, gen, padding=rows,
                mask_prob_adjust=c.mask_prob_adjust,
            ),
            gens,
            views,
            pad,
            device=dev,
        )  # fmt: skip
        fb_rep = fbank.repeat_interleave(views, 0)
        fm_rep = None if frame_mask is None else frame_mask.repeat_interleave(views, 0)
        out = encoder(fb_rep, fm_rep, keep)  # tokens (BC, k, D), cls (BC, D)

        # Decoder: visible tokens back in place, noise elsewhere (official decoder_input).
        tokens = out.tokens
        grid = (b * views, n_time * n_freq, d)
        if c.mask_noise_std > 0:
            noise = []
            for gen in gens:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                noise_gen = torch.Generator(device=dev).manual_seed(seed)
                shape = (views, *grid[1:])
                noise.append(
                    torch.randn(shape, generator=noise_gen, device=dev, dtype=tokens.dtype)
                )
            filler = torch.cat(noise) * c.mask_noise_std
        else:
            filler = tokens.new_zeros(grid)
        idx = keep_indices(keep)  # the encoder gathered the visible tokens in this order
        dec_in = filler.scatter(1, idx[..., None].expand(-1, -1, d), tokens)
        valid_rep = valid.repeat_interleave(views, 0)
        pred = self.decoder(dec_in, valid_rep if pad is not None else None)  # (BC, N, D)

        scale = c.loss_scale if c.loss_scale is not None else d**-0.5
        masked = ~keep & valid_rep  # (BC, N)
        y_rep = targets.repeat_interleave(views, 0)
        pred_m = pred[masked].float()  # (M, D)
        y_m = y_rep[masked]
        n_masked = masked.sum()
        # Normalised by the masked patches of the micro-batch on all processes together (their
        # mean per process), as fairseq divides by the all-reduced sample size: with clips of
        # different lengths the processes mask different counts, and averaging per-process
        # means would weigh patches unequally.
        denom = ctx.mean_over_processes(n_masked.float()).clamp(min=1)
        frame = (pred_m - y_m).square().sum() * scale / denom

        cls = out.cls
        per_view = (cls.float() - utt_target.repeat_interleave(views, 0)).square().sum(-1)
        row_ok = (n_valid > 0).repeat_interleave(views, 0).float()  # empty clips: no target
        per_view = per_view * scale * row_ok
        utt = per_view.sum() / row_ok.sum().clamp(min=1.0)  # mean over views
        if c.utterance_reduction == "sum":
            # The sum over the views of the micro-batch on all processes together: each process
            # scales its own mean by the views of every process, and DDP averages gradients,
            # so 1 and N processes train alike (a per-process sum would halve on 2 processes).
            utt = utt * (b * views * ctx.world_size)

        loss = c.frame_loss_weight * frame + c.utterance_loss_weight * utt
        with torch.no_grad():
            logs = {
                "frame_loss": frame.detach(),
                "utterance_loss": utt.detach(),
                "ema_decay": torch.tensor(self.ema_decay_at(ctx.step), device=dev),
                "target_var": _spread(y_m),
                "pred_var": _spread(pred_m.detach()),
                "masked_fraction": n_masked.float() / valid_rep.sum().clamp(min=1),
            }
        utterance = cls.view(b, views, -1).mean(1)  # (B, D): the clone views averaged
        return ObjectiveOutput(loss=loss, logs=logs, utterance=utterance)

    # ----- teacher update -------------------------------------------------------------------
    @torch.no_grad()
    def after_update(self, model: nn.Module, ctx: TaskContext) -> None:
        """EMA of the student encoder into the teacher, decay `ema_decay_at(ctx.step)`."""
        decay = self.ema_decay_at(ctx.step)
        if decay >= 1.0:  # official: no EMA step when the decay is 1
            return
        student = model.encoder
        if not self.cfg.ema_encoder_only:
            ema_update_(self.teacher, student, decay)
            return
        ema_update_(self.teacher.blocks, student.blocks, decay)
        # The rest (patch embedding, CLS, pre-norm, positions) is the student's own.
        rest_t = [p for n, p in self.teacher.named_parameters() if not n.startswith("blocks.")]
        rest_s = [p.detach() for n, p in student.named_parameters() if not n.startswith("blocks.")]
        rest_t += [t for n, t in self.teacher.named_buffers() if not n.startswith("blocks.")]
        rest_s += [t for n, t in student.named_buffers() if not n.startswith("blocks.")]
        if rest_t:
            torch._foreach_copy_(rest_t, rest_s)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.cfg), "top_k_used": self.top_k}
