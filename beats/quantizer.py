"""Vector quantiser of the BEATs acoustic tokenizers: unit-norm codebook, EMA updates, k-means start.

    z (..., d) -> l2-normalise -> nearest code (squared distance = 2 - 2 cos on unit vectors)
      -> quantised (..., d) with a straight-through gradient, code indices (...),
         commitment loss beta * mean((z - sg(code))^2), usage statistics (codes used, perplexity)

Training (module in train mode AND gradients enabled), per forward, in this order:
1. k-means start, once: while the `initted` buffer is False, the codebook is set by spherical
   k-means (`kmeans_iters` iterations, seeded by `seed`) on the batch's vectors, the EMA counts
   to its cluster sizes, and `initted` becomes True. A second batch never re-clusters.
2. assignment with the current codebook (the quantised output uses these codes);
3. EMA update with the batch's counts `n_k` and sums `s_k` of the vectors assigned to code k:
       cluster_size_k <- decay * cluster_size_k + (1 - decay) * n_k
       embed_avg_k    <- decay * embed_avg_k    + (1 - decay) * s_k
   then the codebook, by `ema_rule`:
   - "official" (what microsoft/unilm `quantizer.py` does in training): for every code used in
     the batch, w_k <- l2norm(decay * w_k + (1 - decay) * l2norm(s_k / n_k)); unused codes keep
     their row.
   - "sums" (the classic VQ-VAE EMA): w_k <- l2norm(embed_avg_k / smoothed_k) with the Laplace
     smoothed size smoothed_k = (cluster_size_k + eps) / (n + K eps) * n, n = sum(cluster_size).
     Dividing a row by the positive number smoothed_k does not change its direction, so after
     the l2 renormalisation the smoothing has no effect and the code computes l2norm(embed_avg_k)
     (a row that is still all zeros keeps its codeword).
4. dead codes: every code whose EMA `cluster_size` (the expected number of vectors it receives
   per batch) is below `dead_code_threshold` is replaced by a random vector of the current batch
   (distinct vectors when the batch has enough), with `cluster_size` reset to 1 and `embed_avg`
   to that vector, so it has about log(threshold) / log(decay) steps to attract vectors before
   it counts as dead again. A threshold of 0 turns this off. Random draws use torch's global RNG
   (the trainer seeds it and restores it on resume).

In eval mode or under `torch.no_grad()` nothing is updated (no k-means, no EMA, no usage
statistics): labels depend on the codebook only. This differs from the official quantiser, which
updates its `cluster_size` usage statistics on every eval call too.

Under `torch.distributed` (initialised, world size > 1) every process keeps the same codebook:
counts and sums are all-reduced (summed) before the EMA update; k-means runs on rank 0's vectors
and its result is broadcast (its cluster sizes are then all-reduced over every process's
vectors); dead-code replacements are drawn on rank 0 and broadcast. The collectives run on every
training forward, so every process must call the quantiser the same number of times.

Padding: `valid` (True = a real vector) keeps padding vectors out of k-means, the EMA statistics,
the commitment loss and the usage statistics; they are still assigned a code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bioaudio.errors import ConfigError

EMARule = Literal["official", "sums"]


@dataclass
class QuantizerConfig:
    """Codebook size and training settings (official names: quant_n, quant_dim)."""

    codebook_size: int = field(default=1024, metadata={"help": "codes K (official quant_n)"})
    dim: int = field(default=256, metadata={"help": "code dimension (official quant_dim)"})
    beta: float = field(default=1.0, metadata={"help": "commitment loss weight"})
    decay: float = field(default=0.99, metadata={"help": "EMA decay of the codebook statistics"})
    eps: float = field(default=1e-5, metadata={"help": "Laplace smoothing ('sums' rule)"})
    kmeans_init: bool = field(
        default=True, metadata={"help": "start the codebook by k-means on the first batch"}
    )
    kmeans_iters: int = field(default=10, metadata={"help": "k-means iterations"})
    seed: int = field(default=0, metadata={"help": "seed of the initial codebook and k-means"})
    dead_code_threshold: float = field(
        default=1e-3,
        metadata={"help": "re-initialise codes whose EMA count falls below this (0: never)"},
    )
    ema_rule: EMARule = field(
        default="official", metadata={"help": "codebook update: 'official' or 'sums'"}
    )

    def validate(self) -> None:
        if self.codebook_size < 2:
            raise ConfigError(
                f"a codebook of {self.codebook_size} code(s) gives every patch the same label: "
                "use codebook_size >= 2"
            )
        if self.dim < 1:
            raise ConfigError(f"quantiser dim must be positive, got {self.dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"quantiser decay must be in [0, 1), got {self.decay}")
        if self.beta < 0 or self.eps <= 0 or self.dead_code_threshold < 0:
            raise ConfigError("quantiser beta and dead_code_threshold must be >= 0, eps > 0")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.ema_rule not in get_args(EMARule):
            raise ConfigError(
                f"unknown ema_rule {self.ema_rule!r} (known: {', '.join(get_args(EMARule))})"
            )


class QuantizerOutput(NamedTuple):
    """quantized (..., d): codewords forward, identity gradient to the input backward;
    indices (...) int64; loss: commitment loss (scalar); codes_used, perplexity: scalars of the
    batch's code distribution (valid vectors; over all processes when training distributed)."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codes_used: torch.Tensor
    perplexity: torch.Tensor


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(x, src=0)
    return x


def _draw(n: int, k: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """k indices into n rows: without replacement when n >= k."""
    if n >= k:
        idx = torch.randperm(n, generator=generator)[:k]
    else:
        idx = torch.randint(0, n, (k,), generator=generator)
    return idx.to(device)


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere: x (n, d) unit rows -> (means (k, d) unit, counts (k,)).

    Starts from k random rows of x; each iteration assigns every row to the most similar mean
    (cosine) and replaces each mean by its members' renormalised sum (a mean without members
    stays). `counts` are the sizes of the clusters of the returned means.
    """
    means = x[_draw(x.shape[0], k, x.device, generator)]
    for _ in range(iters):
        assign = (x @ means.T).argmax(dim=1)  # (n,)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        means = torch.where(counts[:, None] > 0, l2norm(sums), means)
    counts = torch.bincount((x @ means.T).argmax(dim=1), minlength=k)
    return means, counts.to(x.dtype)


class NormEMAVectorQuantizer(nn.Module):
    """Unit-norm codebook with EMA updates (see module docstring). Buffers (all saved):
    `codebook` (K, d), `cluster_size` (K,) EMA counts, `embed_avg` (K, d) EMA sums, `initted`."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.dim
        # Random unit codes until k-means replaces them (official: zeros), so an untrained
        # quantiser still spreads vectors over codes.
        gen = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("codebook", l2norm(torch.randn(k, d, generator=gen)))
        self.register_buffer("cluster_size", torch.zeros(k))
        self.register_buffer("embed_avg", torch.zeros(k, d))
        self.register_buffer("initted", torch.tensor(not cfg.kmeans_init))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def updating(self) -> bool:
        """True when a forward call updates the codebook (train mode and gradients enabled)."""
        return self.training and torch.is_grad_enabled()

    # ----- lookup -------------------------------------------------------------------------
    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances (n, K) from unit rows z (n, d) to the codes, as the official
        formula |z|^2 + |e|^2 - 2 z.e (fp32)."""
        z = z.float()
        e = self.codebook.float()
        return z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * (z @ e.T)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d), any norm -> (code indices (...), margin (...)): the margin is the gap
        between the second-best and the best squared distance (near ties have a small one)."""
        flat = l2norm(z.float()).reshape(-1, self.cfg.dim)
        d2 = self.distances(flat)
        best = torch.topk(d2, 2, dim=1, largest=False)
        idx = d2.argmin(dim=1)  # argmin's tie-breaking (first index), as the official code
        margin = best.values[:, 1] - best.values[:, 0]
        return idx.view(z.shape[:-1]), margin.view(z.shape[:-1])

    # ----- forward ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, valid: torch.Tensor | None = None) -> QuantizerOutput:
        """z (..., d) -> QuantizerOutput; `valid` (...) bool, True on real (non-padding) vectors."""
        if z.shape[-1] != self.cfg.dim:
            raise ValueError(f"quantiser expects vectors of size {self.cfg.dim}, got {z.shape}")
        z = l2norm(z.float())
        flat = z.reshape(-1, self.cfg.dim)  # (n, d)
        keep = None if valid is None else valid.reshape(-1)
        update = self.updating
        with torch.no_grad():
            data = flat.detach() if keep is None else flat.detach()[keep]
            if data.shape[0] == 0:  # nothing real in the batch: sample from what there is
                data = flat.detach()
            if update and not bool(self.initted):
                self._kmeans_init(data)
            idx = self.distances(flat).argmin(dim=1)  # (n,)
        quantized = self.codebook[idx].view(z.shape)  # a copy: later in-place updates are safe

        with torch.no_grad():
            onehot = F.one_hot(idx, self.cfg.codebook_size).to(flat.dtype)  # (n, K)
            if keep is not None:
                onehot = onehot * keep[:, None].to(flat.dtype)
            counts = onehot.sum(0)  # (K,)
            if update:
                sums = onehot.T @ flat.detach()  # (K, d)
                _all_reduce(counts)
                _all_reduce(sums)
                self._ema_update(counts, sums)
                self._replace_dead(data)
            probs = counts / counts.sum().clamp_min(1.0)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
            codes_used = (counts > 0).sum().to(flat.dtype)
            perplexity = torch.exp(entropy)

        err = (z - quantized.detach()).pow(2)  # (..., d)
        if valid is None:
            loss = err.mean()
        else:
            w = valid[..., None].to(err.dtype)
            loss = (err * w).sum() / (w.sum() * self.cfg.dim).clamp_min(1.0)
        loss = self.cfg.beta * loss
        quantized = z + (quantized - z).detach()  # straight-through estimator
        return QuantizerOutput(quantized, idx.view(z.shape[:-1]), loss, codes_used, perplexity)

    # ----- training updates (no_grad, called from forward) --------------------------------
    def _kmeans_init(self, data: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(self.cfg.seed)
        means = self.codebook.clone()
        if not _distributed() or dist.get_rank() == 0:
            means, _ = spherical_kmeans(data, self.cfg.codebook_size, self.cfg.kmeans_iters, gen)
        _broadcast(means)
        # Cluster sizes of the broadcast means over every process's vectors.
        counts = torch.bincount((data @ means.T).argmax(1), minlength=self.cfg.codebook_size)
        counts = _all_reduce(counts.to(data.dtype))
        self.codebook.copy_(means)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(means * counts[:, None])
        self.initted.fill_(True)

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        decay = self.cfg.decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.embed_avg.mul_(decay).add_(sums, alpha=1.0 - decay)
        if self.cfg.ema_rule == "official":
            used = counts > 0
            means = l2norm(sums / counts.clamp_min(1.0)[:, None])
            moved = l2norm(decay * self.codebook + (1.0 - decay) * means)
            self.codebook.copy_(torch.where(used[:, None], moved, self.codebook))
        else:
            # l2norm(embed_avg / smoothed size) == l2norm(embed_avg): see the module docstring.
            nonzero = self.embed_avg.norm(dim=1) > 1e-12
            self.codebook.copy_(
                torch.where(nonzero[:, None], l2norm(self.embed_avg), self.codebook)
            )

    def _replace_dead(self, data: torch.Tensor) -> None:
        if self.cfg.dead_code_threshold <= 0:
            return
        dead = self.cluster_size < self.cfg.dead_code_threshold  # same on every process
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        new = data[_draw(data.shape[0], n_dead, data.device, None)]
        _broadcast(new)
        self.codebook[dead] = new
        self.cluster_size[dead] = 1.0
        self.embed_avg[dead] = new
