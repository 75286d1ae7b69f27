"""Per-step metrics: a JSON Lines file always, TensorBoard and Weights & Biases when
configured, and a one-line console summary / progress bar. Only global rank 0 writes.

``metrics.jsonl`` holds one run's history. A fresh run (step 0) that finds one from an earlier
run moves it aside to ``metrics.<UTC time>.jsonl``; a run resumed at step N keeps the rows up
to N and moves the complete old file aside when it held later steps (logged after the
checkpoint, before a crash; they are run again), so no step appears twice and nothing is
deleted.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    def __init__(self, directory: str, enabled: bool, tensorboard: bool = False,
                 wandb_project: Optional[str] = None, run_name: str = "lens",
                 total_steps: int = 0, start_step: int = 0, progress_bar: bool = True,
                 config_dict: Optional[dict] = None) -> None:
        self.enabled = enabled
        self.set_aside: Optional[str] = None  # where an earlier metrics.jsonl was moved
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.set_aside = _start_history(self.path, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise RuntimeError("exp_manager.tensorboard: install tensorboard "
                                   "(`pip install -e .[logging]`)") from exc
            # a resumed run rewrites the steps after its checkpoint: drop their old events
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"),
                                     purge_step=start_step + 1 if start_step > 0 else None)
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:  # pragma: no cover
                raise RuntimeError("exp_manager.wandb_project: install wandb "
                                   "(`pip install -e .[logging]`)") from exc
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config_dict,
                                     resume="allow")
        if progress_bar and total_steps > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name,
                             dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{metrics[k]:.3g}" for k in _SUMMARY if k in metrics})

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _row_step(line: str) -> Optional[int]:
    """The step of one metrics line; None for a line a crash cut short (not valid JSON)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return None


def _start_history(path: str, start_step: int) -> Optional[str]:
    """Make ``path`` hold only rows up to ``start_step``; returns where an earlier file went.
    A line cut short by a crash counts as past the checkpoint: set aside, not kept."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    steps = [_row_step(line) for line in lines]
    if start_step > 0 and all(s is not None and s <= start_step for s in steps):
        return None  # a clean resume: keep appending
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = os.path.join(os.path.dirname(path), f"metrics.{stamp}.jsonl")
    suffix = 1
    while os.path.exists(aside):
        aside = os.path.join(os.path.dirname(path), f"metrics.{stamp}-{suffix}.jsonl")
        suffix += 1
    os.replace(path, aside)
    if start_step > 0:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as dst:
            dst.writelines(line if line.endswith("\n") else line + "\n"
                           for line, step in zip(lines, steps)
                           if step is not None and step <= start_step)
        os.replace(tmp, path)
    return aside


_SUMMARY = ("reward/mean", "groups/negative_group_ratio", "train/loss", "time/step_s")


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (non-finite values, stored as strings, restored)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
            for row in rows]
