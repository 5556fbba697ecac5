"""Small helpers shared by the training scripts: accelerator, seeding, checkpoints, progress."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

__all__ = ["TrainingError", "make_accelerator", "set_seed", "save_checkpoint", "load_checkpoint", "progress",
           "ema_update", "warmup_cosine", "preset_from_args"]


class TrainingError(ValueError):
    """A training run cannot start with the given data or models; ``echolvfm train`` prints it as one line."""


def make_accelerator(device: str | None = None, mixed_precision: str | None = None) -> Accelerator:
    """An Accelerator on ``device`` ("cpu", "cuda" or None for CUDA when present); bf16 on CUDA by default.

    Multi-GPU works unchanged under ``accelerate launch --multi_gpu -m echolvfm_core.cli train ...``.
    """
    cpu = device == "cpu" or not torch.cuda.is_available()
    if mixed_precision is None:
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, **state) -> None:
    """Save model/optimiser state (``accelerator.save_state``) plus a JSON of ``step`` and ``state``."""
    ckpt = Path(out) / "checkpoint"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / "progress.json").write_text(json.dumps({"step": step, **state}))


def load_checkpoint(accelerator: Accelerator, out: Path) -> dict:
    """Restore the state saved by :func:`save_checkpoint`; returns its JSON ({"step": 0} when none exists)."""
    ckpt = Path(out) / "checkpoint"
    if not (ckpt / "progress.json").exists():
        return {"step": 0}
    accelerator.load_state(str(ckpt))
    return json.loads((ckpt / "progress.json").read_text())


def progress(accelerator: Accelerator, total: int, initial: int = 0, desc: str = "train") -> tqdm:
    """A tqdm bar shown only on the main process."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def warmup_cosine(warmup: int, steps: int, floor: float = 0.05):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` of the peak at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


def preset_from_args(train_preset, args):
    """The training configuration of ``echolvfm train``: preset ``args.preset`` (looked up with ``train_preset``),
    with ``args.steps`` replacing its number of steps when given."""
    cfg = train_preset(args.preset)
    return replace(cfg, steps=int(args.steps)) if args.steps is not None else cfg
