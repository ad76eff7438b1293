"""The memory-bank contrastive term (MoCo-style InfoNCE on utterance embeddings).

    query  q = normalise(proj(student utterance embedding of view 1))          (B, P)
    key    k = normalise(proj_ema(momentum encoder utterance of view 2))       (B, P), no grad
    candidates = the keys of this step (every process, gathered) + a queue of past keys
    loss   = mean over queries of  -mean over its positives p of log softmax(q . c / T)[p]

Positives of a query: its own clip's key (the other augmented view; the clone views of a clip
are averaged into one query, so they can never be each other's negatives), any key of the same
clip still in the queue from an earlier epoch, and, with `--positive_dir`, every key of another
clip of the positive folder (clips sharing a non-negative `pair_group`). Everything else is a
negative: `negative/` clips (pair group -1) and unrelated clips are only ever negatives.

The momentum encoder is the EMA teacher another objective already keeps (EAT's) when there is
one, else an EMA copy of the student's encoder kept here (BEATs; it costs one more forward per
step). The key projection head is an EMA copy of the query head. The queue (keys, their clip
ids and pair groups) is a buffer of this module: it is saved in every state and restored on
resume, and every process holds the same queue because keys are gathered before enqueueing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bioaudio.errors import ConfigError
from bioaudio.training.objectives import Objective, ObjectiveOutput, PretrainInputs
from bioaudio.training.optim import ema_update_
from bioaudio.training.task import TaskContext


@dataclass
class MemoryBankConfig:
    """Options of the memory-bank contrastive term."""

    queue_size: int = field(default=4096, metadata={"help": "past keys kept as negatives"})
    temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature"})
    proj_dim: int = field(default=128, metadata={"help": "projection (embedding) width"})
    proj_hidden: int = field(default=0, metadata={"help": "projection hidden width (0: D)"})
    momentum: float = field(
        default=0.996,
        metadata={"help": "EMA decay of the key projection head (and of the key encoder when "
                  "this term keeps its own)"},
    )  # fmt: skip
    pooling: str = field(
        default="auto",
        metadata={"help": "utterance embedding: cls | mean | auto (cls when the encoder has one)"},
    )

    def validate(self) -> None:
        if self.queue_size < 0:
            raise ConfigError(f"memory_bank queue_size must be >= 0, got {self.queue_size}")
        if not self.temperature > 0:
            raise ConfigError(f"memory_bank temperature must be > 0, got {self.temperature}")
        if self.proj_dim < 1 or self.proj_hidden < 0:
            raise ConfigError("memory_bank proj_dim must be >= 1 and proj_hidden >= 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"memory_bank momentum must be in [0, 1], got {self.momentum}")
        if self.pooling not in ("auto", "cls", "mean"):
            raise ConfigError(f"memory_bank pooling must be auto, cls or mean: {self.pooling!r}")


def utterance_embedding(out: Any, pooling: str) -> Tensor:
    """(B, D) from an EncoderOutput: the CLS vector, or the mean of the valid tokens."""
    if pooling == "cls" and out.cls is not None:
        return out.cls
    tokens, pad = out.tokens, out.padding_mask
    if pad is None:
        return tokens.mean(1)
    w = (~pad)[..., None].to(tokens.dtype)
    return (tokens * w).sum(1) / w.sum(1).clamp(min=1.0)


class Projection(nn.Module):
    """D -> hidden -> P (Linear, GELU, Linear), the MoCo v2 / SimCLR projection head."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MemoryBankObjective(Objective):
    """InfoNCE against a momentum encoder and a queue of past keys (see the module docstring)."""

    name = "memory_bank"
    config_class = MemoryBankConfig
    needs_view2 = True

    def __init__(self, model: nn.Module, cfg: MemoryBankConfig | dict | None = None):
        super().__init__(model, cfg)
        cfg = self.cfg  # resolved by the base class: None -> defaults, dict -> dataclass
        encoder = model.encoder
        d = int(encoder.embed_dim)
        self.pooling = cfg.pooling
        if self.pooling == "auto":
            self.pooling = "cls" if encoder.has_cls else "mean"
        if self.pooling == "cls" and not encoder.has_cls:
            raise ConfigError("memory_bank pooling cls: this encoder has no CLS token; use mean")
        self.proj = Projection(d, cfg.proj_hidden or d, cfg.proj_dim)
        self.proj_ema = copy.deepcopy(self.proj).requires_grad_(False)
        # The key encoder: an EMA copy of the student encoder, unless `bind` finds another
        # objective's teacher to share (then this one is dropped before anything is prepared).
        self.key_encoder: nn.Module | None = copy.deepcopy(encoder).requires_grad_(False)
        self._shared: list[nn.Module] = []  # a list: a shared teacher is not our submodule
        q = cfg.queue_size
        self.register_buffer("queue", torch.zeros(q, cfg.proj_dim))
        self.register_buffer("queue_ids", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_groups", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: list[Tensor] = []

    def bind(self, others: list[Objective]) -> None:
        """Share the momentum encoder of another objective (EAT's teacher) when there is one."""
        for other in others:
            enc = other.momentum_encoder()
            if enc is not None and other is not self:
                self._shared = [enc]
                self.key_encoder = None
                return

    @property
    def momentum(self) -> nn.Module:
        return self._shared[0] if self._shared else self.key_encoder  # type: ignore[return-value]

    def momentum_encoder(self) -> nn.Module | None:
        return self.key_encoder  # only when it is ours

    def train(self, mode: bool = True) -> MemoryBankObjective:
        super().train(mode)
        if self.key_encoder is not None:
            self.key_encoder.eval()
        self.proj_ema.eval()
        return self

    def check_batch(self, global_batch: int) -> None:
        """The queue must hold at least one global batch of keys."""
        if 0 < self.cfg.queue_size < global_batch:
            raise ConfigError(
                f"memory_bank queue_size {self.cfg.queue_size} is smaller than the global batch "
                f"{global_batch}; use at least {global_batch} (or 0 for in-batch negatives only)"
            )

    def forward(  # type: ignore[override]
        self, model: nn.Module, inputs: PretrainInputs, ctx: TaskContext
    ) -> ObjectiveOutput:
        if inputs.view2 is None:
            raise ConfigError("memory_bank needs a second augmented view of every clip")
        student_emb = inputs.student_utterance
        if student_emb is None:
            student_emb = utterance_embedding(
                model.encoder(inputs.fbank, inputs.frame_mask), self.pooling
            )
        q = F.normalize(self.proj(student_emb.float()), dim=-1)  # (B, P)
        with torch.no_grad():
            key_out = self.momentum(inputs.view2, inputs.view2_mask)
            k = F.normalize(
                self.proj_ema(utterance_embedding(key_out, self.pooling).float()), dim=-1
            )
        b = q.shape[0]
        ids = inputs.index if inputs.index is not None else torch.arange(b, device=q.device)
        groups = inputs.pair_group
        if groups is None:
            groups = torch.full_like(ids, -1)
        # Candidates: every process's keys of this step, then the queue.
        all_k = ctx.gather(k)
        all_ids = ctx.gather(ids.to(q.device))
        all_groups = ctx.gather(groups.to(q.device))
        n_q = int(self.queue_filled)
        cand = torch.cat([all_k, self.queue[:n_q]])  # (M, P)
        cand_ids = torch.cat([all_ids, self.queue_ids[:n_q]])
        cand_groups = torch.cat([all_groups, self.queue_groups[:n_q]])
        logits = q @ cand.T / self.cfg.temperature  # (B, M)
        positive = cand_ids[None, :] == ids[:, None]
        positive |= (groups[:, None] >= 0) & (cand_groups[None, :] == groups[:, None])
        log_prob = logits.log_softmax(dim=-1)
        n_pos = positive.sum(1).clamp(min=1)
        loss = -(log_prob * positive).sum(1).div(n_pos).mean()
        with torch.no_grad():
            own = (cand_ids[None, :] == ids[:, None]) & (
                torch.arange(cand.shape[0], device=q.device)[None, :] < all_k.shape[0]
            )
            top1 = (
                logits.argmax(1)[:, None] == torch.arange(cand.shape[0], device=q.device)
            ).float()
            logs = {
                "accuracy": (top1 * positive).sum(1).clamp(max=1).mean(),
                "pos_sim": (logits * own).sum(1).mean() * self.cfg.temperature,
                "queue_fill": torch.tensor(float(n_q), device=q.device),
            }
        self._pending.append(
            torch.cat([all_k, all_ids[:, None].float(), all_groups[:, None].float()], 1)
        )
        return ObjectiveOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def after_update(self, model: nn.Module, ctx: TaskContext) -> None:
        """EMA of the heads (and of our own key encoder); enqueue this step's keys."""
        m = self.cfg.momentum
        ema_update_(self.proj_ema, self.proj, m)
        if self.key_encoder is not None:
            ema_update_(self.key_encoder, model.encoder, m)
        pending, self._pending = self._pending, []
        q = self.cfg.queue_size
        if not pending or q == 0:
            return
        rows = torch.cat(pending)  # keys of every micro-batch of the step, every process
        p = self.cfg.proj_dim
        keys, ids, groups = rows[:, :p], rows[:, p].long(), rows[:, p + 1].long()
        n = min(len(keys), q)
        keys, ids, groups = keys[-n:], ids[-n:], groups[-n:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(n, device=keys.device)) % q
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ids[slots] = ids
        self.queue_groups[slots] = groups
        self.queue_ptr.fill_((ptr + n) % q)
        self.queue_filled.fill_(min(q, int(self.queue_filled) + n))
