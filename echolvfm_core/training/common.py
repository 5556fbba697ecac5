"""What the training scripts share: the run's plumbing (:class:`TrainingRun`: accelerator, seeding, checkpoint and
resume, tqdm progress, EMA weights, the final files), AdamW with warm-up and cosine decay, and the error a run that
cannot start raises. Each script keeps its own readable training step."""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

__all__ = ["TrainingError", "TrainingRun", "make_accelerator", "set_seed", "save_checkpoint", "load_checkpoint",
           "progress", "ema_update", "ema_weights", "adamw_warmup_cosine", "warmup_cosine", "preset_from_args"]


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
    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied).

    For a target network that is itself run, with a momentum the script schedules (the EchoJEPA target encoder);
    an average of the weights that is only saved is :class:`~diffusers.training_utils.EMAModel`
    (:meth:`TrainingRun.ema`)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().to(pe.dtype), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_weights(ema: EMAModel, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (eval mode, no gradients) holding the EMA weights (buffers are the model's own)."""
    averaged = copy.deepcopy(model).requires_grad_(False).eval()
    ema.copy_to(averaged.parameters())
    return averaged


def adamw_warmup_cosine(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup: int, steps: int,
                        floor: float = 0.05, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW and its LambdaLR schedule (:func:`warmup_cosine`: linear warm-up, cosine decay to ``floor`` of ``lr``)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps, floor))


class TrainingRun:
    """The plumbing of one training run, shared by every training script::

        run = TrainingRun(out, cfg.steps, seed, device, desc="vae", checkpoint_every=cfg.checkpoint_every)
        model, optimizer, scheduler = run.accelerator.prepare(model, *adamw_warmup_cosine(...))
        ema = run.ema(model, cfg.ema_decay)       # optional, before restore
        run.restore(resume)                        # the checkpoint in out/checkpoint, when resuming
        while run.step < run.steps:
            ...                                    # one optimiser step; run.bar for the tqdm postfix
            run.advance()                          # step + 1, progress, a checkpoint every checkpoint_every steps
        metrics = run.end()                        # steps, resumed_from, seconds, steps_per_second, device, ...
        run.save_final(cfg, metrics, save_model)   # out/final, training_config.json, metrics.json, checkpoint

    Args:
        out: output folder (created). steps: optimiser steps of the whole run. seed: seeds initialisation (set
            here, before the script builds its model). device: "cpu", "cuda" or None (:func:`make_accelerator`).
        desc: name on the progress bar. checkpoint_every: steps between checkpoints (0: only the final one).

    ``state`` is the JSON state kept in every checkpoint beside the step (e.g. ``history``) and restored with it.
    """

    def __init__(self, out: str | Path, steps: int, seed: int = 0, device: str | None = None, desc: str = "train",
                 checkpoint_every: int = 0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps, self.seed, self.desc, self.checkpoint_every = int(steps), seed, desc, checkpoint_every
        self.accelerator = make_accelerator(device)
        set_seed(seed)
        self.step = self.start_step = 0
        self.state: dict = {}
        self.bar: tqdm | None = None
        self._emas: list[EMAModel] = []
        self._t0 = self._elapsed = 0.0

    def ema(self, model: torch.nn.Module, decay: float) -> EMAModel:
        """An :class:`~diffusers.training_utils.EMAModel` of ``model``'s parameters, saved in every checkpoint; its
        decay warms up as ``min(decay, (1 + s) / (10 + s))`` over its updates s (the first update copies the
        weights). Call ``ema.step(model.parameters())`` after each optimiser step and :func:`ema_weights` to read
        it. Create it before :meth:`restore`."""
        ema = EMAModel(model.parameters(), decay=decay)
        ema.to(self.accelerator.device)
        self.accelerator.register_for_checkpointing(ema)
        self._emas.append(ema)
        return ema

    def restore(self, resume: bool) -> None:
        """Continue from ``out/checkpoint`` when ``resume`` and one exists (models, optimiser, EMA, ``state``);
        start the progress bar and the clock."""
        if resume:
            saved = load_checkpoint(self.accelerator, self.out)
            self.step = self.start_step = int(saved.pop("step"))
            self.state = saved
            for ema in self._emas:  # accelerate loads custom state on the CPU
                ema.to(self.accelerator.device)
        self.bar = progress(self.accelerator, self.steps, self.step, desc=self.desc)
        self._t0 = time.perf_counter()

    def checkpoint_due(self) -> bool:
        """Whether finishing the current step writes a checkpoint."""
        done = self.step + 1
        return bool(self.checkpoint_every) and done % self.checkpoint_every == 0 and done < self.steps

    def advance(self) -> None:
        """One step done: count it, move the bar, write a checkpoint when due."""
        due = self.checkpoint_due()
        self.step += 1
        self.bar.update(1)
        if due:
            save_checkpoint(self.accelerator, self.out, self.step, **self.state)

    def end(self) -> dict:
        """Close the bar and stop the clock; returns the run's summary: ``steps``, ``resumed_from``, ``seconds``,
        ``steps_per_second`` (None when no step ran), ``device``, ``processes`` and ``seed``."""
        self.bar.close()
        self._elapsed = time.perf_counter() - self._t0
        ran = self.step - self.start_step
        return {
            "steps": self.steps,
            "resumed_from": self.start_step,
            "seconds": round(self._elapsed, 1),
            "steps_per_second": round(ran / self._elapsed, 3) if self._elapsed > 0 and ran > 0 else None,
            "device": str(self.accelerator.device),
            "processes": self.accelerator.num_processes,
            "seed": self.seed,
        }

    def save_final(self, config, metrics: dict | None, save_model: Callable[[Path], object]) -> Path:
        """On the main process: ``save_model(out/final)``, the configuration dataclass as
        ``final/training_config.json``, ``metrics`` (when given) as ``out/metrics.json``; then a last checkpoint on
        every process (accelerate saves each process's state, and waits for all of them). Returns ``out/final``."""
        final = self.out / "final"
        if self.accelerator.is_main_process:
            final.mkdir(parents=True, exist_ok=True)
            save_model(final)
            (final / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
            if metrics is not None:
                (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        save_checkpoint(self.accelerator, self.out, self.step, **self.state)
        return final


def warmup_cosine(warmup: int, steps: int, floor: float = 0.05):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` of the peak at
    ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * p))

    return factor


def preset_from_args(train_preset, args):
    """The training configuration of ``echolvfm train``: preset ``args.preset`` (looked up with ``train_preset``),
    with ``args.steps`` and ``args.lr`` (where the command has it) replacing its number of steps and peak learning
    rate when given."""
    cfg = train_preset(args.preset)
    if args.steps is not None:
        cfg = replace(cfg, steps=int(args.steps))
    if getattr(args, "lr", None) is not None:
        cfg = replace(cfg, lr=float(args.lr))
    return cfg
