"""Which manifest rows each run of an experiment trains, validates and tests on: the folds of
`--cv` (each fold in turn the test set, the next one validating) or one split (the manifest's
split column, else a seeded stratified / grouped split). `cfg` is an `ExperimentOptions`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from bioaudio.data.splits import SplitConfig, assign_splits, split_manifest, strata_of
from bioaudio.errors import ConfigError, DataError


def fold_splits(df: pd.DataFrame, cfg: Any) -> list[tuple]:
    """(fold, train rows, val rows, test rows) per test fold."""
    col = cfg.fold_column
    if col not in df.columns:
        raise DataError(
            f"--fold_column {col!r} is not a manifest column (make folds with `bioaudio split"
            " --method esc` or `--method kfold`)"
        )
    values = df[col]
    if values.isna().any():
        raise DataError(f"--fold_column {col!r} is empty in {int(values.isna().sum())} row(s)")
    folds = sorted(values.unique().tolist())
    if cfg.test_fold is not None and cfg.test_fold not in folds:
        raise ConfigError(
            f"--test_fold {cfg.test_fold} does not exist (folds in {col!r}:"
            f" {', '.join(map(str, folds))})"
        )
    if len(folds) < 2:
        raise DataError(f"--fold_column {col!r} holds a single fold ({folds[0]})")
    if cfg.cv_val == "next_fold" and len(folds) < 3:
        raise ConfigError(
            f"{len(folds)} folds leave no training fold when the next fold validates;"
            " use --cv_val none"
        )
    out = []
    v = values.to_numpy()
    for k, fold in enumerate(folds):
        if cfg.test_fold is not None and fold != cfg.test_fold:
            continue
        val_fold = folds[(k + 1) % len(folds)] if cfg.cv_val == "next_fold" else None
        test = np.flatnonzero(v == fold)
        val = np.flatnonzero(v == val_fold) if val_fold is not None else np.zeros(0, np.int64)
        train = np.flatnonzero((v != fold) & (v != val_fold if val_fold is not None else True))
        out.append((fold, train, val, test))
    return out


def split_rows(
    df: pd.DataFrame, cfg: Any, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) rows from the split column, else a seeded (grouped) split."""
    col = cfg.split_column
    if col in df.columns:
        split = df[col].fillna("").astype(str).str.strip().str.lower().to_numpy()
        split = np.where(np.isin(split, ["valid", "validation", "dev"]), "val", split)
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise DataError(
                f"--split_column {col!r} holds {', '.join(map(repr, bad[:3]))}; expected"
                " train, val and test"
            )
        train, val, test = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
        if len(val) == 0 and cfg.val > 0 and len(train) > 1:
            # carve a stratified validation set out of the training rows
            sub = df.iloc[train]
            assigned = assign_splits(strata_of(sub), val=cfg.val, test=0.0, seed=cfg.split_seed)
            val, train = train[assigned == "val"], train[assigned == "train"]
            notes.append(f"no val rows in {col!r}: {len(val)} training rows validate instead")
        notes.append(f"splits from the manifest's {col!r} column")
        return train, val, test
    method = "stratified"
    split_cfg = SplitConfig(method="stratified", val=cfg.val, test=cfg.test, seed=cfg.split_seed)
    if "recording" in df.columns and df["recording"].astype(str).duplicated().any():
        # windows of one recording must not land in both train and test
        split_cfg = dataclasses.replace(split_cfg, method="group", group_column="recording")
        method = "grouped by recording"
    result = split_manifest(df, split_cfg)
    split = result.df[result.column].to_numpy()
    notes.append(
        f"{method} split {1 - cfg.val - cfg.test:g}/{cfg.val:g}/{cfg.test:g}"
        f" (--split_seed {cfg.split_seed})"
    )
    return tuple(np.flatnonzero(split == s) for s in ("train", "val", "test"))  # type: ignore
