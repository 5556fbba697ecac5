"""Train the latent codec: ``echolvfm train vae --data PREPARED --preset demo|tiny --out DIR``.

Batches mix the real CAMUS ED / ES frames of the training split with single frames of prepared loops (a pool of
loops rendered once at the start, so a step costs no rendering). Augmentation is light and photometric only (gain
and a gamma curve): no flips or rotations, the orientation is clinical. Most steps see random square crops (the
network is convolutional, and a 56-pixel crop costs a quarter of a frame); the last ``1 - crop_fraction`` of the
steps see whole frames, so that the GroupNorm statistics match inference. Loss: L1 reconstruction, plus
``ssim_weight`` x (1 - SSIM) and a small KL term (``kl_weight`` x the KL per latent element). At the end the
per-channel latent statistics are measured on the training frames, the codec is saved to ``DIR/final`` and
``DIR/metrics.json`` gets :func:`~echolvfm_core.models.vae.evaluate_vae` on the valid split's real frames.
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.vae import (
    EchoCodec,
    VAEConfig,
    bench_codec,
    build_vae,
    compute_latent_stats,
    evaluate_vae,
    vae_preset,
)
from .augment import AugmentConfig, augment_batch
from .common import TrainingRun, adamw_warmup_cosine, preset_from_args

__all__ = [
    "VAETrainConfig",
    "TRAIN_PRESETS",
    "train_preset",
    "VAELoss",
    "ssim_map",
    "vae_loss",
    "FramePool",
    "loop_frames",
    "model_card",
    "fit",
    "train",
]

log = logging.getLogger(__name__)

#: Photometric-only augmentation: small gain and contrast changes, no geometry, speckle or dropout.
LIGHT_AUGMENT = AugmentConfig(
    p_geometry=0.0,
    gain_range=(0.85, 1.15),
    gamma_log_range=0.15,
    attenuation_range=(0.0, 0.0),
    p_speckle=0.0,
    p_dropout=0.0,
    p_far_dropout=0.0,
)


@dataclass(frozen=True)
class VAETrainConfig:
    """Schedule of a VAE training run (saved with the model as ``training_config.json``).

    Attributes:
        model: network architecture.
        steps: optimiser steps.
        crop, crop_fraction, crop_batch_size: the first ``crop_fraction`` of the steps train on random
            ``crop`` x ``crop`` windows, ``crop_batch_size`` per step (``crop=0``: whole frames throughout).
        batch_size: whole frames per step in the remaining steps.
        lr, warmup: AdamW with linear warm-up then cosine decay to 5 % of ``lr``.
        ssim_weight: weight of (1 - SSIM) next to the L1 term (weight 1), both on [0, 1] grey levels.
        kl_weight: weight of the KL divergence to N(0, I), averaged over latent elements.
        loop_fraction: share of each batch drawn from prepared-loop frames (the rest: real ED / ES frames).
        loop_pool, frames_per_loop: loops rendered at the start and frames kept from each.
        phantom: also use phantom loops (off: they do not look like the real frames the codec is measured on).
        augment: photometric augmentation applied to every batch.
        checkpoint_every, eval_every: in steps (0 = only at the end).
        stats_loops: prepared loops (from the pool) whose frames join the real frames for the latent statistics.
    """

    model: VAEConfig = field(default_factory=VAEConfig)
    steps: int = 8000
    crop: int = 56
    crop_fraction: float = 0.8
    crop_batch_size: int = 32
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-4
    loop_fraction: float = 0.5
    loop_pool: int = 300
    frames_per_loop: int = 6
    phantom: bool = False
    augment: AugmentConfig = LIGHT_AUGMENT
    checkpoint_every: int = 250
    eval_every: int = 1000
    stats_loops: int = 100


TRAIN_PRESETS = {
    "demo": VAETrainConfig(),
    "tiny": VAETrainConfig(model=vae_preset("tiny"), steps=30, crop=32, crop_fraction=0.5, crop_batch_size=8,
                           batch_size=4, warmup=5, loop_pool=8, frames_per_loop=2, phantom=True,
                           checkpoint_every=10, eval_every=0, stats_loops=4),
}


def train_preset(name: str) -> VAETrainConfig:
    """The :class:`VAETrainConfig` of preset ``name`` ("demo" or "tiny")."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"Unknown VAE preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]


# ------------------------------------------------------------------------------------------------------------ loss
@dataclass(frozen=True)
class VAELoss:
    """Loss of one batch: ``total`` (differentiable) and its parts as floats (L1, 1 - SSIM, KL per element)."""

    total: torch.Tensor
    l1: float
    ssim: float
    kl: float


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Local SSIM (Wang et al., IEEE TIP 2004, eq. 13) of (B, 1, H, W) images in [0, 1], data range 1.

    Uniform ``window`` x ``window`` statistics without padding and sample covariances, as skimage's
    ``structural_similarity`` defaults, so the training term tracks the reported metric.

    Returns:
        (B, 1, H - window + 1, W - window + 1).
    """
    c1, c2 = 0.01**2, 0.03**2
    n = window * window
    cov = n / (n - 1)
    mx, my = F.avg_pool2d(x, window, 1), F.avg_pool2d(y, window, 1)
    vx = cov * (F.avg_pool2d(x * x, window, 1) - mx * mx)
    vy = cov * (F.avg_pool2d(y * y, window, 1) - my * my)
    vxy = cov * (F.avg_pool2d(x * y, window, 1) - mx * my)
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def vae_loss(vae, x: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator | None = None) -> VAELoss:
    """Reconstruction + KL loss of a grey ``AutoencoderKL`` on frames x (B, 1, H, W) in [0, 1].

    The decoder sees a sample of the posterior (reparameterised), so it learns to tolerate small latent errors.
    """
    posterior = vae.encode(x * 2.0 - 1.0).latent_dist
    z = posterior.sample(generator=generator)
    recon = (vae.decode(z).sample.float() + 1.0) * 0.5
    l1 = (recon - x).abs().mean()
    one_minus_ssim = 1.0 - ssim_map(recon, x).mean()
    kl = posterior.kl().float().mean() / posterior.mean[0].numel()  # KL to N(0, I) per latent element
    total = l1 + cfg.ssim_weight * one_minus_ssim + cfg.kl_weight * kl
    return VAELoss(total, float(l1.detach()), float(one_minus_ssim.detach()), float(kl.detach()))


# ------------------------------------------------------------------------------------------------------------ data
class FramePool:
    """Training frames in memory: real ED / ES frames and frames of prepared loops.

    Args:
        real: uint8 (N, S, S) real frames.
        loops: uint8 (M, S, S) loop frames (may be empty or None).
        loop_fraction: share of loop frames per batch (0 when there are none; 1 when there are no real frames).
    """

    def __init__(self, real: np.ndarray, loops: np.ndarray | None = None, loop_fraction: float = 0.5) -> None:
        real = np.asarray(real)
        loops = np.zeros((0, *real.shape[1:]), np.uint8) if loops is None else np.asarray(loops)
        if real.dtype != np.uint8 or loops.dtype != np.uint8 or real.ndim != 3 or loops.ndim != 3:
            raise ValueError(f"FramePool needs uint8 (N, S, S) stacks; got {real.dtype} {real.shape} and "
                             f"{loops.dtype} {loops.shape}.")
        if len(real) + len(loops) == 0:
            raise ValueError("The VAE needs training frames: the data set has no real frames and no loops.")
        if len(real) and len(loops) and real.shape[1:] != loops.shape[1:]:
            raise ValueError(f"real frames {real.shape[1:]} and loop frames {loops.shape[1:]} differ in size.")
        self.real, self.loops = real, loops
        self.loop_fraction = 0.0 if len(loops) == 0 else 1.0 if len(real) == 0 else float(loop_fraction)

    def sample(self, batch_size: int, generator: torch.Generator, crop: int = 0) -> torch.Tensor:
        """A batch of frames, float (B, 1, S, S) in [0, 1], drawn with ``generator``.

        With ``crop`` > 0 each frame is cut to a random ``crop`` x ``crop`` window: (B, 1, crop, crop).
        """
        n_loop = round(batch_size * self.loop_fraction)
        parts = []
        if batch_size - n_loop:
            parts.append(
                self.real[torch.randint(0, len(self.real), (batch_size - n_loop,), generator=generator).numpy()])
        if n_loop:
            parts.append(self.loops[torch.randint(0, len(self.loops), (n_loop,), generator=generator).numpy()])
        frames = np.concatenate(parts)
        s = frames.shape[-1]
        if crop:
            if not 0 < crop <= min(frames.shape[1:]):
                raise ValueError(f"crop must be between 1 and the frame side {s}; got {crop}.")
            ij = torch.randint(0, s - crop + 1, (len(frames), 2), generator=generator).tolist()
            frames = np.stack([f[i : i + crop, j : j + crop] for f, (i, j) in zip(frames, ij)])
        return torch.from_numpy(frames).float().div_(255.0)[:, None]


def loop_frames(loops, n_loops: int, frames_per_loop: int, seed: int = 0) -> np.ndarray:
    """Frames of ``n_loops`` randomly chosen loops of a data set, ``frames_per_loop`` from each (spread in time).

    Args:
        loops: a data set whose items have ``frames`` uint8 (T, S, S) (e.g. ``PreparedLoops``).

    Returns:
        uint8 (n, S, S); empty when ``loops`` is empty.
    """
    if loops is None or len(loops) == 0 or n_loops <= 0 or frames_per_loop <= 0:
        return np.zeros((0, 0, 0), np.uint8)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(loops), size=min(n_loops, len(loops)), replace=False)
    out = []
    for i in chosen:
        frames = np.asarray(loops[int(i)].frames)
        k = min(frames_per_loop, len(frames))
        start = rng.uniform(0, len(frames) / k)
        out.append(frames[(start + np.arange(k) * len(frames) / k).astype(int)])
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------- train
def _codec_copy(model) -> EchoCodec:
    """An inference codec over a frozen float32 copy of the training network (the original keeps training)."""
    return EchoCodec(copy.deepcopy(model).float())


def model_card(cfg: VAETrainConfig, metrics: dict, data: str) -> str:
    """MODEL_CARD.md text for a trained codec, from its configuration and the run's measured metrics."""
    m = cfg.model
    n_params = sum(p.numel() for p in build_vae(m).parameters())
    valid = metrics.get("valid")
    bench = metrics.get("bench", {})
    lines = [
        "# EchoLVFM grey frame VAE (4 latent channels, 4x downsampling)",
        "",
        "A diffusers `AutoencoderKL` applied frame by frame to grey apical four-chamber echo frames on the 112 x 112",
        "model grid: 1 x 112 x 112 in [-1, 1] -> 4 x 28 x 28 (posterior mean) -> 1 x 112 x 112. Use it through",
        "`echolvfm_core.models.vae.EchoCodec.from_pretrained(folder)`, which handles the [0, 1] pixel range and the",
        "per-channel latent normalisation stored in `config.json` (`latents_mean`, `latents_std`).",
        "",
        "## Architecture",
        (f"- widths {list(m.block_out_channels)}, {m.layers_per_block} resnet(s) per encoder level, GroupNorm "
         f"{m.norm_num_groups} groups, no mid-block attention; {n_params / 1e3:.1f} k parameters."),
        "- sized for decoding speed on two CPU cores (the EF slider re-decodes a whole loop).",
        "",
        "## Training",
        f"- data: {data}.",
        (f"- {metrics['steps']} AdamW steps (lr {cfg.lr:g}, cosine): the first {cfg.crop_fraction:.0%} on random "
         f"{cfg.crop} x {cfg.crop} crops ({cfg.crop_batch_size} a step), then whole frames ({cfg.batch_size} a step); "
         f"a share {cfg.loop_fraction:g} of each batch from loop frames."),
        f"- loss: L1 + {cfg.ssim_weight:g} x (1 - SSIM) + {cfg.kl_weight:g} x KL per latent element; light gain /",
        "  contrast augmentation only (no flips: the orientation is clinical).",
        f"- seed {metrics['seed']}, device {metrics['device']}, {metrics['seconds']:.0f} s.",
        "",
        "## Evaluation (valid split, real ED / ES frames, 112 x 112, skimage SSIM with data range 1)",
    ]
    if valid:
        lines.append(f"- SSIM {valid['ssim']:.4f}, PSNR {valid['psnr']:.2f} dB on {valid['n']} frames.")
    else:
        lines.append("- not measured: the data had no real valid frames.")
    if bench:
        lines.append(f"- encode / decode of a {bench['frames']}-frame loop: {bench['encode_ms']:.0f} / "
                     f"{bench['decode_ms']:.0f} ms (median; torch threads: {bench['torch_threads']}, "
                     f"{bench['device']}; "
                     "on the training machine at the end of training).")
    lines += [
        "",
        "## Intended use and limits",
        "- Research and teaching: the latent space of EchoLVFM's counterfactual generator. Not a medical device;",
        "  not for diagnosis.",
        "- Trained only on CAMUS apical 4CH frames (one centre, one vendor) after the project's sector crop and gain",
        "  normalisation; other views, vendors or unnormalised frames reconstruct worse.",
        "- CAMUS (Leclerc et al., IEEE TMI 2019) is released for non-commercial research; the same terms apply here.",
        "",
    ]
    return "\n".join(lines)


def fit(pool: FramePool, cfg: VAETrainConfig, out: Path, seed: int = 0, device: str | None = None,
        resume: bool = False, valid_images: np.ndarray | None = None, data: str = "frames given to fit()") -> dict:
    """Train a VAE; writes ``out/final`` (codec with latent stats, training_config.json, MODEL_CARD.md) and
    ``out/metrics.json``.

    Args:
        pool: training frames (also the frames the latent statistics are measured on).
        cfg: the run's configuration.
        out: output folder (``out/checkpoint`` every ``cfg.checkpoint_every`` steps).
        seed: seeds the initialisation; batch ``k`` depends only on (seed, k), so a resumed run sees the same data.
        resume: continue from ``out/checkpoint`` when present.
        valid_images: uint8 (N, S, S) real frames of the valid split for metrics.
        data: one line describing the training data, for the model card.

    Returns:
        The metrics dict (also in ``out/metrics.json``): training summary, latent stats and, with ``valid_images``,
        ``valid`` = :func:`evaluate_vae`.
    """
    run = TrainingRun(out, cfg.steps, seed, device, desc="vae", checkpoint_every=cfg.checkpoint_every)
    accelerator = run.accelerator
    model = build_vae(cfg.model)  # contiguous (NCHW) memory: GroupNorm backward is slow in channels-last on CPU
    model, optimizer, scheduler = accelerator.prepare(
        model, *adamw_warmup_cosine(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps))
    run.restore(resume)
    history = run.state.setdefault("history", [])
    parts: list[tuple[float, float, float, float]] = []
    while run.step < cfg.steps:
        step = run.step
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        cropped = cfg.crop > 0 and step < cfg.crop_fraction * cfg.steps
        batch = pool.sample(cfg.crop_batch_size, g, cfg.crop) if cropped else pool.sample(cfg.batch_size, g)
        x, _ = augment_batch(batch, None, g, cfg.augment)
        x = x.to(accelerator.device)
        model.train()
        with accelerator.autocast():
            loss = vae_loss(model, x, cfg, generator=torch.Generator(accelerator.device).manual_seed(seed + step))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss.total)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        parts.append((float(loss.total.detach()), loss.l1, loss.ssim, loss.kl))
        recent = np.mean(parts[-50:], axis=0)
        run.bar.set_postfix(loss=f"{recent[0]:.4f}", l1=f"{recent[1]:.4f}", ssim=f"{1 - recent[2]:.3f}",
                            kl=f"{recent[3]:.2f}")
        done = step + 1
        if cfg.eval_every and valid_images is not None and done % cfg.eval_every == 0 and done < cfg.steps:
            m = evaluate_vae(_codec_copy(accelerator.unwrap_model(model)), valid_images)
            history.append({"step": done, "loss": float(recent[0]), **m})
            log.info("step %d: %s", done, history[-1])
            run.bar.write(f"step {done}: valid ssim {m['ssim']:.4f} psnr {m['psnr']:.2f} dB")
        run.advance()
    summary = run.end()

    codec = _codec_copy(accelerator.unwrap_model(model))
    stats_frames = [pool.real, pool.loops[: cfg.stats_loops * cfg.frames_per_loop]]
    codec.set_stats(compute_latent_stats(codec, stats_frames))
    recent = np.mean(parts[-50:], axis=0) if parts else None
    metrics = {
        "final_loss": None if recent is None else {"total": recent[0], "l1": recent[1], "ssim": 1 - recent[2],
                                                   "kl": recent[3]},
        **summary,
        "latent_stats": {"mean": list(codec.stats.mean), "std": list(codec.stats.std)},
        "history": history,
    }
    if valid_images is not None and len(valid_images):
        metrics["valid"] = evaluate_vae(codec, valid_images)
    metrics["bench"] = bench_codec(codec, repeats=5)

    def save(final: Path) -> None:
        codec.save_pretrained(final)
        (final / "MODEL_CARD.md").write_text(model_card(cfg, metrics, data))

    run.save_final(cfg, metrics, save)
    return metrics


def train(args: argparse.Namespace) -> int:
    """Entry point of ``echolvfm train vae``."""
    from ..data.prepared import PreparedLoops

    cfg = preset_from_args(train_preset, args)
    train_ds = PreparedLoops(args.data, split="train", source=None if cfg.phantom else "camus")
    real_train = PreparedLoops(args.data, split="train").real_frames()
    real = real_train.images
    log.info("rendering %d of %d training loops ...", min(cfg.loop_pool, len(train_ds)), len(train_ds))
    loops = loop_frames(train_ds, cfg.loop_pool, cfg.frames_per_loop, seed=args.seed)
    pool = FramePool(real, loops if len(loops) else None, cfg.loop_fraction)
    valid = PreparedLoops(args.data, split="valid").real_frames().images
    log.info("training frames: %d real, %d from loops; valid frames: %d", len(pool.real), len(pool.loops), len(valid))
    n_patients = len(set(real_train.patients))
    data = (f"{len(pool.real)} real ED / ES frames ({n_patients} patients, train split) and "
            f"{len(pool.loops)} frames of "
            f"{min(cfg.loop_pool, len(train_ds))} prepared {'loops' if cfg.phantom else 'CAMUS loops'}")
    metrics = fit(pool, cfg, Path(args.out), seed=args.seed, device=args.device, resume=args.resume,
                  valid_images=valid if len(valid) else None, data=data)
    if "valid" in metrics:
        v = metrics["valid"]
        log.info("valid: ssim %.4f psnr %.2f dB (n=%d)", v["ssim"], v["psnr"], v["n"])
    log.info("codec written to %s", Path(args.out) / "final")
    return 0
