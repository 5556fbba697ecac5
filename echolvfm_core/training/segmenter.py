"""Train the LV segmenter: ``echolvfm train segmenter --data PREPARED --preset demo|tiny --out DIR``.

Batches mix the real CAMUS ED / ES frames of the training split (expert labels) with frames of the prepared loops
(labels warped with the images), augmented with :func:`~echolvfm_core.training.augment.augment_batch`. Loss:
cross-entropy plus soft Dice of the three structures. The valid split's real ED / ES frames give the metrics
(Dice per class, segmentation EF error), written to ``DIR/metrics.json``; the model goes to ``DIR/final``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.segmenter import LVSegmenter, SegmenterConfig, segmenter_preset
from .augment import AugmentConfig, augment_batch
from .common import TrainingRun, adamw_warmup_cosine, preset_from_args

__all__ = ["SegTrainConfig", "TRAIN_PRESETS", "train_preset", "segmentation_loss", "FrameSampler", "train_step",
           "fit", "write_model_card", "train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegTrainConfig:
    """Schedule of a segmenter training run (saved with the model as ``training_config.json``).

    Attributes:
        model: network size.
        steps: optimiser steps.
        batch_size: frames per step.
        loop_fraction: share of each batch drawn from prepared-loop frames (the rest: real ED / ES frames).
        lr, weight_decay, warmup: AdamW with linear warm-up then cosine decay to 5 % of ``lr``.
        dice_weight: weight of the soft Dice term (cross-entropy has weight 1).
        eval_every, checkpoint_every: in steps (0 = only at the end).
    """

    model: SegmenterConfig = field(default_factory=SegmenterConfig)
    steps: int = 4000
    batch_size: int = 16
    loop_fraction: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    dice_weight: float = 1.0
    eval_every: int = 1000
    checkpoint_every: int = 250
    augment: AugmentConfig = field(default_factory=AugmentConfig)


TRAIN_PRESETS = {
    "demo": SegTrainConfig(),
    "tiny": SegTrainConfig(model=segmenter_preset("tiny"), steps=30, batch_size=4, warmup=5, eval_every=0,
                           checkpoint_every=10),
}


def train_preset(name: str) -> SegTrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"Unknown segmenter preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x (1 - mean soft Dice of classes 1..K-1 over the batch).

    Args:
        logits: (B, K, H, W); labels: (B, H, W) int64 in 0..K-1.
    """
    ce = F.cross_entropy(logits, labels)
    probs = logits.float().softmax(1)[:, 1:]
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    soft_dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + dice_weight * (1.0 - soft_dice.mean())


class FrameSampler:
    """Draws training batches: real ED / ES frames (in memory) and single frames of prepared loops (read lazily).

    Args:
        real_images, real_labels: uint8 (N, S, S).
        loops: a dataset whose items have ``frames`` and ``labels`` uint8 (T, S, S) (e.g. ``PreparedLoops``); may be
            None or empty, then every frame is real.
        loop_fraction: share of loop frames per batch.
    """

    def __init__(self, real_images: np.ndarray, real_labels: np.ndarray, loops=None, loop_fraction: float = 0.5):
        if len(real_images) == 0 and not loops:
            raise ValueError("The segmenter needs training frames: the data set has no real frames and no loops.")
        if real_images.shape != real_labels.shape:
            raise ValueError(f"real images {real_images.shape} and labels {real_labels.shape} differ in shape.")
        self.real_images, self.real_labels = real_images, real_labels
        self.loops = loops if loops is not None and len(loops) > 0 else None
        self.loop_fraction = loop_fraction if self.loops is not None else 0.0
        if len(real_images) == 0:
            self.loop_fraction = 1.0

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: frames float (B, 1, S, S) in [0, 1], labels int64 (B, S, S)."""
        n_loop = int(round(batch_size * self.loop_fraction))
        imgs, labs = [], []
        if batch_size - n_loop > 0:
            idx = torch.randint(0, len(self.real_images), (batch_size - n_loop,), generator=generator).numpy()
            imgs.append(self.real_images[idx])
            labs.append(self.real_labels[idx])
        for i in torch.randint(0, len(self.loops) if self.loops is not None else 1, (n_loop,),
                               generator=generator).tolist():
            loop = self.loops[i]
            t = int(torch.randint(0, len(loop.frames), (1,), generator=generator))
            imgs.append(np.asarray(loop.frames[t])[None])
            labs.append(np.asarray(loop.labels[t])[None])
        x = torch.from_numpy(np.concatenate(imgs)).float().div_(255.0)[:, None]
        y = torch.from_numpy(np.concatenate(labs).astype(np.int64))
        return x, y


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, cfg: SegTrainConfig, accelerator=None,
               scheduler=None) -> float:
    """One optimiser step on an (already augmented) batch; returns the loss."""
    model.train()
    loss = segmentation_loss(model(x), y, cfg.dice_weight)
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())


def _evaluate(model, real_valid, batch_size: int = 64) -> dict:
    from ..estimators.segmentation import SegmentationEF, evaluate_segmentation

    seg = SegmentationEF(model, batch_size=batch_size)
    return evaluate_segmentation(seg, real_valid.images, real_valid.labels, real_valid.patients, real_valid.phases)


def fit(sampler: FrameSampler, cfg: SegTrainConfig, out: Path, seed: int = 0, device: str | None = None,
        resume: bool = False, real_valid=None) -> dict:
    """Train a segmenter; writes ``out/final`` (save_pretrained + training_config.json) and ``out/metrics.json``.

    Args:
        sampler: training batches.
        cfg: the run's configuration.
        out: output folder (``out/checkpoint`` is written every ``cfg.checkpoint_every`` steps).
        resume: continue from ``out/checkpoint`` when present.
        real_valid: optional ``RealFrames`` of the valid split for metrics.

    Returns:
        The metrics dict (also written to ``out/metrics.json``): training summary plus, with ``real_valid``, the
        valid-split metrics of :func:`~echolvfm_core.estimators.segmentation.evaluate_segmentation`.
    """
    run = TrainingRun(out, cfg.steps, seed, device, desc="segmenter", checkpoint_every=cfg.checkpoint_every)
    accelerator = run.accelerator
    model = LVSegmenter(**asdict(cfg.model))
    model, optimizer, scheduler = accelerator.prepare(
        model, *adamw_warmup_cosine(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps))
    run.restore(resume)
    history = run.state.setdefault("history", [])
    losses: list[float] = []
    while run.step < cfg.steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + run.step)  # batch depends on (seed, step): resumable
        x, y = sampler.sample(cfg.batch_size, g)
        x, y = augment_batch(x, y, g, cfg.augment)
        loss = train_step(model, optimizer, x.to(accelerator.device), y.to(accelerator.device), cfg, accelerator,
                          scheduler)
        losses.append(loss)
        run.bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        done = run.step + 1
        if cfg.eval_every and real_valid is not None and done % cfg.eval_every == 0 and done < cfg.steps:
            m = _evaluate(accelerator.unwrap_model(model), real_valid)
            history.append({"step": done, "loss": float(np.mean(losses[-50:])), **m})
            log.info("step %d: %s", done, history[-1])
            run.bar.write(f"step {done}: dice_lv {m['dice_lv']:.3f} ef_mae {m['ef_mae']:.2f}")
        run.advance()
    summary = run.end()
    unwrapped = accelerator.unwrap_model(model).eval()
    metrics = {
        "params": int(sum(p.numel() for p in unwrapped.parameters())),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        **summary,
        "history": history,
    }
    if real_valid is not None:
        metrics["valid"] = _evaluate(unwrapped, real_valid)
    run.save_final(cfg, metrics, lambda final: unwrapped.save_pretrained(str(final)))
    return metrics


def write_model_card(final: Path, args: argparse.Namespace, cfg: SegTrainConfig, metrics: dict, data: dict) -> Path:
    """``final/MODEL_CARD.md``: what the model is, the data and split it saw, its valid metrics, how to reproduce."""
    v = metrics.get("valid")
    rows = (
        "\n".join(f"| {k} | {v[k]:.4g} |"
                  for k in ("dice_lv", "dice_myo", "dice_la", "ef_mae", "n", "n_patients", "ef_failures"))
        if v else "| (no valid split in the data folder) | |"
    )
    steps = f" --steps {args.steps}" if args.steps is not None else ""
    text = f"""# LV segmenter ({args.preset} preset)

Frame-wise 2D U-Net (diffusers UNet blocks) labelling apical four-chamber frames on the 112 x 112 model grid:
0 background, 1 LV cavity, 2 myocardium, 3 left atrium. Used by `echolvfm segment` and the Studio to measure
EF (area-length and single-plane Simpson) from the LV area curve. {metrics.get("params", 0) / 1e6:.2f} M parameters.

## Data
- Prepared folder `{args.data}` (`echolvfm prepare`): real CAMUS apical 4CH ED / ES frames with expert labels and
  synthesised loops built from them (labels warped with the \
images{", plus phantom loops" if data.get("phantom_loops") else ""}).
- Training split: {data.get("train_patients")} patients, {data.get("train_real_frames")} real ED / ES frames,
  {data.get("train_loops")} loops; each batch holds {1 - cfg.loop_fraction:.0%} real frames and \
{cfg.loop_fraction:.0%} loop frames,
  with ultrasound augmentation (gain, contrast, depth attenuation, rotation and scale about the apex, speckle,
  sector-edge dropout; no flips).
- Metrics: the valid split's real ED / ES frames ({data.get("valid_real_frames")} frames), never used in training.
  CAMUS (Leclerc et al., IEEE TMI 2019) is for non-commercial research; cite it when reporting results.

## Valid metrics
Default inference of `SegmentationEF` (test-time augmentation over `TTA_TRANSFORMS`, largest connected component of
each class per frame).

| metric | value |
|---|---|
{rows}

Dice: mean over frames. ef_mae: |area-length EF from predicted ED / ES labels - EF from the expert labels|,
mean over patients, in EF points.

## Training
{cfg.steps} steps, batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, seed {args.seed}, device {metrics.get("device")},
{metrics.get("seconds", 0) / 60:.1f} min. Configuration: `training_config.json`.

## Reproduce
```bash
echolvfm prepare --camus CAMUS_DIR --out {args.data}{data.get('prepare_flags', '')}
echolvfm train segmenter --data {args.data} --preset {args.preset} --seed {args.seed}{steps} --out {args.out}
```

## Limits
Trained on one data set's apical 4CH views at ED and ES plus synthesised in-between frames; other views, poor
windows or other scanners may segment worse. Not a medical device; not for diagnosis.
"""
    path = Path(final) / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


def train(args: argparse.Namespace) -> int:
    """Entry point of ``echolvfm train segmenter``."""
    from ..data.prepared import PreparedLoops

    cfg = preset_from_args(train_preset, args)
    train_ds = PreparedLoops(args.data, split="train")
    train_ds.cache_size = len(train_ds)  # loops are rendered on access: render each once, keep them (~1 GB)
    real = train_ds.real_frames()
    try:
        valid_ds = PreparedLoops(args.data, split="valid")
        real_valid = valid_ds.real_frames()
    except (ValueError, FileNotFoundError) as exc:
        log.warning("no valid split for metrics: %s", exc)
        real_valid = None
    if real_valid is not None and len(real_valid.images) == 0:
        real_valid = None
    sampler = FrameSampler(real.images, real.labels, train_ds, cfg.loop_fraction)
    metrics = fit(sampler, cfg, Path(args.out), seed=args.seed, device=args.device, resume=args.resume,
                  real_valid=real_valid)
    meta = train_ds.meta
    data = {
        "prepare_flags": f" --loops-per-patient {meta.get('loops_per_patient')} --phantom {meta.get('phantom')} "
                         f"--seed {meta.get('seed')}",
        "train_patients": len(set(real.patients)),  # CAMUS patients (phantom anatomies are not patients)
        "train_real_frames": len(real.images),
        "train_loops": len(train_ds),
        "phantom_loops": sum(r["source"] == "phantom" for r in train_ds.manifest),
        "valid_real_frames": 0 if real_valid is None else len(real_valid.images),
    }
    write_model_card(Path(args.out) / "final", args, cfg, metrics, data)
    valid = metrics.get("valid")
    if valid:
        log.info("valid: dice_lv %.3f dice_myo %.3f dice_la %.3f ef_mae %.2f (n=%d)", valid["dice_lv"],
                 valid["dice_myo"], valid["dice_la"], valid["ef_mae"], valid["n"])
    log.info("model written to %s", Path(args.out) / "final")
    return 0
