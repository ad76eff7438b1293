"""Seeded train/val/test splits and k-fold assignments of a manifest, stratified and grouped.

Methods:
    stratified  train/val/test with every class in proportion (exact totals, largest remainder)
    group       the same, but all rows of a group (recording, site, speaker...) in one split
    kfold       stratified k-fold (`fold` = 0..k-1), grouped when a group column/pattern is given
    esc         folds read from file names, `<fold>-<id>-<take>.ogg` (ESC-50 convention)

Stratifying multi-label rows: each row is stratified by its rarest label (fewest rows in the
manifest; ties by name), so rare classes are spread over the splits first and common ones follow
along; unlabelled rows form their own stratum. Groups come from a column (empty values: the
file's path, so windows of one file stay together) or from the first capture group of a regex
searched in each file name. A group given to `stratified` or `kfold` is always honoured: no
group ever lands in two splits.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from bioaudio.data.manifest import split_labels
from bioaudio.errors import ConfigError, DataError

SplitMethod = Literal["stratified", "group", "kfold", "esc"]
SPLITS = ("train", "val", "test")
UNLABELLED = "(unlabelled)"


@dataclass
class SplitConfig:
    """Options of `bioaudio split`."""

    method: SplitMethod = field(
        default="stratified",
        metadata={
            "help": "stratified | group (no group in two splits) | kfold | esc (fold in name)"
        },
    )
    val: float = field(default=0.1, metadata={"help": "validation fraction (stratified / group)"})
    test: float = field(default=0.1, metadata={"help": "test fraction (stratified / group)"})
    folds: int = field(default=5, metadata={"help": "number of folds (kfold)"})
    group_column: str | None = field(
        default=None,
        metadata={"help": "manifest column of groups (--method group without one: recording)"},
    )
    group_pattern: str | None = field(
        default=None,
        metadata={"help": r"regex on file names, 1st capture group = group, e.g. ^\d+_([a-z]+)_"},
    )
    fold_pattern: str = field(
        default=r"^(\d+)-",
        metadata={"help": "regex on the file name; first capture group = fold number (esc)"},
    )
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same split)"})
    out: Path | None = field(
        default=None, metadata={"help": "output manifest; unset: <stem>.split.csv beside MANIFEST"}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace --out even when it is not a manifest (or is MANIFEST itself)"},
    )

    def validate(self) -> None:
        for name in ("val", "test"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {v}")
        if self.method in ("stratified", "group"):
            if self.val + self.test >= 1.0:
                raise ConfigError(
                    f"--val {self.val} + --test {self.test} = {self.val + self.test:g}"
                    " leaves no training data (must add up to less than 1)"
                )
            if self.val == 0 and self.test == 0:
                raise ConfigError("--val and --test are both 0: nothing to split")
        if self.method == "kfold" and self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.group_column is not None and self.group_pattern is not None:
            raise ConfigError("give --group_column or --group_pattern, not both")
        for name in ("group_pattern", "fold_pattern"):
            pattern = getattr(self, name)
            if pattern is not None:
                _compile(pattern, name)


@dataclass
class SplitResult:
    """A manifest with its new `split` or `fold` column, and notes worth printing."""

    df: pd.DataFrame
    column: str
    notes: list[str] = field(default_factory=list)
    groups: np.ndarray | None = None


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--{flag} {pattern!r} is not a valid regular expression: {e}") from e


def _seed32(seed: int) -> int:
    return int(seed) % 2**32


# --------------------------------------------------------------------------- strata and groups


def strata_of(df: pd.DataFrame) -> np.ndarray:
    """One stratum per row: its label, or for multi-label rows its rarest label; '' unlabelled."""
    rows = [split_labels(v) for v in df["labels"]] if "labels" in df.columns else [[]] * len(df)
    counts: dict[str, int] = {}
    for labels in rows:
        for label in set(labels):
            counts[label] = counts.get(label, 0) + 1
    return np.array(
        [min(labels, key=lambda n: (counts[n], n)) if labels else "" for labels in rows],
        dtype=object,
    )


def _name_matches(df: pd.DataFrame, pattern: str, flag: str) -> list[str]:
    """Per row, what `--flag pattern` captures from its file name (the first capture group, else
    the whole match); DataError unless it matches every file name."""
    rx = _compile(pattern, flag)
    names = [Path(p).name for p in df["path"]]
    found = [rx.search(n) for n in names]
    missing = [n for n, m in zip(names, found) if m is None]
    if len(missing) == len(names):
        raise DataError(f"--{flag} {pattern!r} matches no file name (e.g. {names[0]!r})")
    if missing:
        raise DataError(
            f"--{flag} {pattern!r} does not match {len(missing)} of {len(names)}"
            f" file names (e.g. {missing[0]!r})"
        )
    return [m.group(1) if m.re.groups else m.group(0) for m in found]


def groups_of(
    df: pd.DataFrame, column: str | None = None, pattern: str | None = None
) -> np.ndarray:
    """Group id per row from a manifest column or the first capture group of a file-name regex."""
    if column is not None:
        if column not in df.columns:
            raise DataError(
                f"--group_column {column!r} is not a manifest column"
                f" (columns: {', '.join(map(str, df.columns))})"
            )
        values = df[column].astype(object).where(df[column].notna(), "").astype(str).to_numpy()
        empty = (values == "") | (values == "nan")
        # a row without a group is its own file's group: windows of one file never split up
        return np.where(empty, "path:" + df["path"].astype(str).to_numpy(), values).astype(object)
    if pattern is None:
        raise ConfigError("a grouped split needs --group_column or --group_pattern")
    return np.array(_name_matches(df, pattern, "group_pattern"), dtype=object)


def folds_from_names(df: pd.DataFrame, pattern: str = r"^(\d+)-") -> tuple[np.ndarray, dict]:
    """ESC-style folds: the number captured from each file name, renumbered 0..k-1 in order.

    Returns (fold per row, {number in the file name: fold}).
    """
    raw = _name_matches(df, pattern, "fold_pattern")
    try:
        numbers = [int(r) for r in raw]
    except ValueError:
        bad = next(r for r in raw if not r.strip().lstrip("-").isdigit())
        raise DataError(f"--fold_pattern {pattern!r} captured {bad!r}, not a fold number") from None
    mapping = {n: i for i, n in enumerate(sorted(set(numbers)))}
    if len(mapping) < 2:
        raise DataError(f"--fold_pattern {pattern!r} finds a single fold ({numbers[0]}) only")
    return np.array([mapping[n] for n in numbers], dtype=np.int64), mapping


# --------------------------------------------------------------------------- train / val / test


def _targets(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Rows per split: rounded, at least one for every non-zero fraction, train takes the rest."""
    out = {s: max(1, int(round(n * f))) for s, f in fractions.items() if s != "train" and f > 0}
    out["train"] = n - sum(out.values())
    if out["train"] < 1:
        active = ", ".join(s for s in out)
        raise DataError(f"too few clips ({n}) for a split into {active}: train would be empty")
    return out


def _apportion(
    quota: np.ndarray, capacity: np.ndarray, total: int, rng: np.random.Generator
) -> np.ndarray:
    """Integer allocation near `quota` summing to `total` (when capacity allows).

    Floors first, then one more to the classes with the largest remainders (random ties);
    this is what scikit-learn's StratifiedShuffleSplit does, without its minimum class sizes.
    """
    alloc = np.minimum(np.floor(quota).astype(int), capacity)
    tiebreak = rng.random(len(quota))
    while alloc.sum() < total:
        free = np.flatnonzero(alloc < capacity)
        if len(free) == 0:
            break
        order = free[np.lexsort((tiebreak[free], -(quota[free] - alloc[free])))]
        for c in order[: total - alloc.sum()]:
            alloc[c] += 1
    return alloc


def _stratified_assign(
    strata: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
) -> np.ndarray:
    n = len(strata)
    targets = _targets(n, fractions)
    classes, inverse, counts = np.unique(
        strata.astype(str), return_inverse=True, return_counts=True
    )
    left = counts.copy()
    alloc: dict[str, np.ndarray] = {}
    for s in ("test", "val"):
        if s not in targets:
            continue
        quota = counts * targets[s] / n
        # keep one row of each class for training when possible, then allow taking it
        a = _apportion(quota, np.maximum(left - 1, 0), targets[s], rng)
        if a.sum() < targets[s]:
            a = _apportion(quota, left, targets[s], rng)
        alloc[s] = a
        left = left - a
    out = np.full(n, "train", dtype=object)
    for c in range(len(classes)):
        rows = rng.permutation(np.flatnonzero(inverse == c))
        k = 0
        for s in ("test", "val"):
            if s in alloc:
                take = int(alloc[s][c])
                out[rows[k : k + take]] = s
                k += take
    return out


def _grouped_assign(
    strata: np.ndarray, groups: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
) -> np.ndarray:
    """Greedy: groups (largest first, random ties) go to the split they fill least, per class."""
    splits = [s for s in SPLITS if fractions.get(s, 0) > 0]
    g_ids, g_inv = np.unique(groups.astype(str), return_inverse=True)
    if len(g_ids) < len(splits):
        raise DataError(
            f"too few groups ({len(g_ids)}) for a grouped split into {', '.join(splits)}"
        )
    _, c_inv = np.unique(strata.astype(str), return_inverse=True)
    hist = np.zeros((len(g_ids), c_inv.max() + 1))
    np.add.at(hist, (g_inv, c_inv), 1.0)  # (G, C) rows per group and class
    sizes = hist.sum(1)
    frac = np.array([fractions[s] for s in splits])
    target = frac[:, None] * hist.sum(0)[None, :]  # (S, C)
    target_total = frac * len(strata)  # (S,)
    have = np.zeros_like(target)
    have_total = np.zeros(len(splits))
    order = rng.permutation(len(g_ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    where = np.zeros(len(g_ids), dtype=int)
    for g in order:
        h = hist[g]
        cls = h > 0
        # fill ratio after adding the group, weighted by its class mix, plus the overall size
        fill = ((have[:, cls] + h[cls]) / target[:, cls] * h[cls]).sum(1) / sizes[g]
        cost = fill + (have_total + sizes[g]) / target_total
        s = int(np.argmin(cost))
        where[g] = s
        have[s] += h
        have_total[s] += sizes[g]
    for s in range(len(splits)):  # a split the greedy left empty takes a donor's smallest group
        if (where == s).any():
            continue
        counts = np.bincount(where, minlength=len(splits))
        donor = int(np.argmax(counts))
        if counts[donor] < 2:
            raise DataError(f"too few groups ({len(g_ids)}) to give every split one")
        members = np.flatnonzero(where == donor)
        where[members[np.argmin(sizes[members])]] = s
    return np.array(splits, dtype=object)[where[g_inv]]


def assign_splits(
    strata: np.ndarray,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """'train' / 'val' / 'test' per row, stratified by `strata`, never splitting a group."""
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    rng = np.random.default_rng(_seed32(seed))
    if groups is None:
        return _stratified_assign(np.asarray(strata), fractions, rng)
    return _grouped_assign(np.asarray(strata), np.asarray(groups), fractions, rng)


def assign_folds(
    strata: np.ndarray, folds: int = 5, seed: int = 0, groups: np.ndarray | None = None
) -> np.ndarray:
    """Fold 0..k-1 per row: scikit-learn's (Stratified)(Group)KFold, shuffled with `seed`."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(strata).astype(str)
    x = np.zeros((len(y), 1))
    if groups is None:
        if folds > len(y):
            raise DataError(f"too few clips ({len(y)}) for {folds} folds")
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=_seed32(seed))
        parts = lambda: splitter.split(x, y)  # noqa: E731
    else:
        g = np.asarray(groups).astype(str)
        n_groups = len(np.unique(g))
        if folds > n_groups:
            raise DataError(f"too few groups ({n_groups}) for {folds} folds")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=_seed32(seed))
        parts = lambda: splitter.split(x, y, g)  # noqa: E731
    out = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": reported as a note instead
        warnings.simplefilter("ignore", UserWarning)
        try:
            for k, (_, test_idx) in enumerate(parts()):
                out[test_idx] = k
        except ValueError as e:
            raise DataError(f"cannot make {folds} folds: {e}") from e
    empty = sorted(set(range(folds)) - set(out.tolist()))
    if empty:
        raise DataError(
            f"cannot make {folds} non-empty folds from these clips/groups (fold {empty[0]} is empty)"
        )
    return out


# --------------------------------------------------------------------------- manifest level


def split_manifest(df: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    """Add a `split` (train/val/test) or `fold` (0..k-1) column to a copy of `df`."""
    cfg.validate()
    out = df.copy()
    notes: list[str] = []
    strata = strata_of(df)
    group_column = cfg.group_column
    if cfg.method == "group" and group_column is None and cfg.group_pattern is None:
        group_column = "recording"
    grouped = group_column is not None or cfg.group_pattern is not None
    groups = groups_of(df, group_column, cfg.group_pattern) if grouped else None
    if cfg.method == "esc":
        column = "fold"
        folds, mapping = folds_from_names(df, cfg.fold_pattern)
        notes.append(
            "folds from file names: "
            + ", ".join(f"{number} -> fold {k}" for number, k in mapping.items())
        )
        if groups is not None:
            spread = pd.Series(folds).groupby(groups).nunique()
            if (spread > 1).any():
                raise DataError(
                    f"group {spread.index[spread > 1][0]!r} spans several folds in the file names"
                )
        out[column] = folds
    elif cfg.method == "kfold":
        column = "fold"
        out[column] = assign_folds(strata, cfg.folds, cfg.seed, groups)
        small = [
            s or UNLABELLED for s, n in pd.Series(strata).value_counts().items() if n < cfg.folds
        ]
        if small:
            notes.append(
                f"{len(small)} class(es) have fewer clips than folds, so some folds lack them:"
                f" {', '.join(map(str, small[:10]))}{' ...' if len(small) > 10 else ''}"
            )
    else:
        column = "split"
        out[column] = assign_splits(strata, cfg.val, cfg.test, cfg.seed, groups)
        missing = [
            s
            for s in ("val", "test")
            if getattr(cfg, s) > 0 and not (out[column] == s).any()  # guarded by _targets
        ]
        if missing:
            raise DataError(f"the {', '.join(missing)} split came out empty")
    if groups is None and "recording" in df.columns:
        repeated = int(df["recording"].astype(str).duplicated().sum())
        if repeated:
            notes.append(
                f"{repeated} rows share a recording with another row and may land in different"
                " splits; use --method group (or --group_column recording) to keep them together"
            )
    if column in df.columns:
        notes.append(f"replaced the manifest's existing {column!r} column")
    return SplitResult(out, column, notes, groups)


def split_table(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Clips per class (rows) and split or fold (columns), with totals; multi-label rows count
    once per label, the `total` row counts clips."""
    raw = df["labels"] if "labels" in df.columns else [""] * len(df)
    labels = [split_labels(v) or [UNLABELLED] for v in raw]
    long = pd.DataFrame({"class": labels, column: df[column].to_numpy()}).explode("class")
    table = pd.crosstab(long["class"], long[column])
    order = [s for s in SPLITS if s in table.columns] or sorted(table.columns)
    table = table[order]
    table.loc["total"] = df[column].value_counts().reindex(order).fillna(0).astype(int)
    table["total"] = table.sum(axis=1)
    table.loc["total", "total"] = len(df)
    table.columns.name = column
    table.index.name = None
    return table
