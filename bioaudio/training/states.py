"""The loop's resumable state: what a saved `state/step_N/` holds and how a run finds, checks,
writes and restores it (a mixin of `bioaudio.training.loop.Trainer`).

A state is written into `state/.tmp-step_N` and renamed to `state/step_N` only when complete
(Accelerate's model / optimiser / RNG files, each process's task state, `trainer_state.json`,
then a `COMPLETE` marker), so a kill during a save never leaves a state that is picked up. On
resume the identity of the model and task and the global batch must match; states newer than
the resumed one are set aside (an abandoned timeline), never pruned or resumed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bioaudio.errors import CheckpointError, ConfigError, first_line
from bioaudio.fileio import replace_dir, save_json_atomic
from bioaudio.models.checkpoint import check_state_files
from bioaudio.training.rundir import (
    STATE_FORMAT,
    STEP_DIR,
    find_resume_state,
    identity_differences,
    list_states,
)


def _plain_window(window: dict[str, Any]) -> dict[str, Any]:
    """The logging window with tensors turned into floats (for trainer_state.json)."""
    out = dict(window)
    out["logs"] = {k: float(v) for k, v in window["logs"].items()}
    for k in ("loss", "grad_norm"):
        out[k] = float(window[k])
    return out


class StateMixin:
    """Saving, finding, checking and restoring the Trainer's resumable state."""

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if len(weights) == len(models):
            for i, m in enumerate(models):
                weights[i] = self.accelerator.unwrap_model(m).state_for_saving()

    def _load_hook(self, models: list, input_dir: str) -> None:
        for i, m in enumerate(models):
            models[i] = self.accelerator.unwrap_model(m).target_for_loading()

    def _resolve_resume(self) -> Path | None:
        cfg, out = self.cfg, self.out_dir
        if cfg.resume is None:
            existing = list_states(out / "state")
            if existing or (out / "summary.json").is_file():
                held = existing[-1] if existing else out / "summary.json"
                raise ConfigError(
                    f"--out {out} already holds a run ({held}); pass --resume auto to "
                    "continue it or choose another --out"
                )
            return None
        if cfg.resume == "auto":
            state = find_resume_state(out)
            if state is None:
                self._check_identity(out / "config.json", "--out")
                return None
        else:
            path = Path(cfg.resume)
            if not path.exists():
                raise ConfigError(f"--resume {path}: no such directory")
            state = find_resume_state(path)
            if state is None:
                raise ConfigError(
                    f"--resume {path}: no complete training state (state/step_N with COMPLETE)"
                )
        saved = self._read_trainer_state(state)
        self._check_identity(state / "trainer_state.json", "--resume", saved=saved)
        if saved.get("batch_size") != cfg.batch_size:
            raise ConfigError(
                f"--batch_size {cfg.batch_size} differs from the resumed run's "
                f"{saved.get('batch_size')} ({state}); resume with the same global batch"
            )
        return state

    @staticmethod
    def _read_trainer_state(state: Path) -> dict[str, Any]:
        try:
            data = json.loads((state / "trainer_state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{state}/trainer_state.json: unreadable ({first_line(e)})"
            ) from e
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{state}/trainer_state.json: not a bioaudio training state")
        return data

    def _check_identity(self, path: Path, flag: str, saved: dict | None = None) -> None:
        if saved is None:
            if not path.is_file():
                return
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                return
        old = saved.get("identity") if isinstance(saved, dict) else None
        if not isinstance(old, dict):
            return
        diffs = identity_differences(old, self.identity)
        if diffs:
            where = path.parent
            raise ConfigError(
                f"{flag} {where}: holds a run of a different model/task ({'; '.join(diffs[:3])}); "
                "choose another --out"
            )

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "batch_size": self.cfg.batch_size,
            "num_processes": self.num_processes,
            "dataset_len": self.dataset_len,
            "consecutive_bad": self.consecutive_bad,
            "total_bad": self.total_bad,
            "best": self.best,
            "last_eval": self.last_eval,
            "elapsed_s": self.elapsed_s,
            "window": _plain_window(self._window),
            "evals_since_best": self.evals_since_best,
            "stopped_early": self.stopped_early,
            "identity": self.identity,
        }

    def _save_state(self) -> Path:
        """Save into state/.tmp-step_N, mark COMPLETE, rename to state/step_N, prune old ones."""
        acc = self.accelerator
        root = self.out_dir / "state"
        final, tmp = root / f"step_{self.step}", root / f".tmp-step_{self.step}"
        if self.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        task_state = self.task.state_dict()
        if task_state:
            torch.save(task_state, tmp / f"task_state_{self.rank}.pt")
        acc.wait_for_everyone()
        if self.is_main_process:
            save_json_atomic(tmp / "trainer_state.json", self._trainer_state())
            (tmp / "COMPLETE").write_text(f"step {self.step}\n")
            replace_dir(tmp, final)
            for old in list_states(root)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self._last_saved_step = self.step
        return final

    def _load_state(self, state: Path) -> None:
        saved = self._read_trainer_state(state)
        # Nothing in a state folder may run code: its pickles are checked before Accelerate or
        # torch.load open them (Accelerate quietly ignores a random-state file it refuses).
        check_state_files(state)
        try:
            self.accelerator.load_state(str(state))
        except Exception as e:  # torch / safetensors raise many types for a bad state
            raise CheckpointError(f"--resume {state}: cannot load ({first_line(e)})") from e
        if not (state / f"random_states_{self.rank}.pkl").is_file() and self.is_main_process:
            tqdm.write(f"note: {state} has no RNG state for process {self.rank}; resuming anyway")
        f = state / f"task_state_{self.rank}.pt"
        f = f if f.is_file() else state / "task_state_0.pt"
        if f.is_file():
            try:
                task_state = torch.load(f, map_location=self.device, weights_only=True)
            except Exception as e:  # refused or damaged pickles raise many types
                raise CheckpointError(f"--resume {f}: cannot load ({first_line(e)})") from e
            self.task.load_state_dict(task_state)
        elif self.task.state_dict():
            raise CheckpointError(f"--resume {state}: task state {f.name} is missing")
        for g, h in zip(self.optimizer.param_groups, self._group_hparams):
            g["weight_decay"] = h["weight_decay"]
        self.step = int(saved["step"])
        self.epoch = int(saved["epoch"])
        self.batch_in_epoch = int(saved["batch_in_epoch"])
        self.consecutive_bad = int(saved.get("consecutive_bad", 0))
        self.total_bad = int(saved.get("total_bad", 0))
        self.best = saved.get("best")
        self.last_eval = saved.get("last_eval")
        self.elapsed_s = float(saved.get("elapsed_s", 0.0))
        self._window = saved.get("window") or self._empty_window()
        self.evals_since_best = int(saved.get("evals_since_best", 0))
        self.stopped_early = saved.get("stopped_early")
        self._last_saved_step = self.step
        if saved.get("dataset_len") != self.dataset_len and self.is_main_process:
            tqdm.write(
                f"note: the training set changed size ({saved.get('dataset_len')} -> "
                f"{self.dataset_len}); the data order differs from the original run"
            )

    def _set_aside_newer_states(self, step: int) -> None:
        """States newer than the resumed one belong to an abandoned timeline: keep them, renamed,
        so auto-resume and pruning never pick them up."""
        for d in list_states(self.out_dir / "state"):
            n = int(STEP_DIR.match(d.name).group(1))  # type: ignore[union-attr]
            if n > step:
                target = d.with_name(f"{d.name}.abandoned")
                shutil.rmtree(target, ignore_errors=True)
                d.rename(target)
                tqdm.write(f"note: {d} is newer than the resumed state; kept as {target.name}")
