"""Read-outs of a frozen EchoJEPA encoder: EF probes, robustness to acoustic changes, Fréchet distances.

* Clips: a loop's whole cycle resampled to the encoder's ``num_frames`` (:func:`loop_clips`), as the EF regressor
  reads it; tokens of many clips are computed once (:func:`encode_clips`) and probes train on them.
* Probes: :class:`~echolvfm_core.models.jepa.AttentiveProbe` (learned query cross-attention) and
  :class:`~echolvfm_core.models.jepa.LinearProbe` (mean token), trained on frozen tokens (:func:`fit_probe`).
* Robustness: :data:`PERTURBATIONS` apply one ultrasound change each (gain, depth attenuation, speckle, sector
  dropout; :func:`~echolvfm_core.training.augment.augment_batch` with everything else off) before encoding.
* Diagnostics of the features: :func:`effective_rank` (RankMe; a collapsed encoder puts every token on a few
  directions) and :func:`temporal_share` (how much of the features' variance is change over the clip).
* Fréchet distances in the encoder's feature space: ``fvd_jepa`` between loop features (the mean token and how much
  the tokens change over the clip) and ``fid_jepa`` between frame features (the spatial mean token of each tubelet
  time step, i.e. 2 frames), each against statistics of a reference set (:class:`FeatureStats`; the bundled model
  caches those of the training split's real-anatomy loops). These are *not* comparable with I3D-based FVD or
  Inception-based FID numbers: the feature extractor, its dimension and its training data differ, so only compare
  values computed with one encoder.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import feature_stats, frechet_distance
from ..models.jepa import AttentiveProbe, EchoJEPA, VideoViT, temporal_deviation
from ..training.augment import AugmentConfig, augment_batch
from .ef_posterior import clip_indices

__all__ = [
    "PERTURBATIONS",
    "FeatureStats",
    "loop_clips",
    "encode_clips",
    "fit_probe",
    "predict",
    "effective_rank",
    "temporal_share",
    "loop_features",
    "frame_features",
    "fvd_jepa",
    "fid_jepa",
    "evaluate_jepa_section",
]

log = logging.getLogger(__name__)

#: A transform that changes nothing (the base of every perturbation).
_IDENTITY = AugmentConfig(p_geometry=0.0, gain_range=(1.0, 1.0), gamma_log_range=0.0, attenuation_range=(0.0, 0.0),
                          p_speckle=0.0, additive_max=0.0, p_dropout=0.0, p_far_dropout=0.0)
#: Robustness-table perturbations, one ultrasound change each (ranges drawn per clip).
PERTURBATIONS = {
    "gain": replace(_IDENTITY, gain_range=(0.6, 1.5)),
    "depth_attenuation": replace(_IDENTITY, attenuation_range=(0.8, 1.2)),
    "speckle": replace(_IDENTITY, p_speckle=1.0, speckle_max=0.4, additive_max=0.03),
    "sector_dropout": replace(_IDENTITY, p_dropout=1.0, dropout_angle=(0.1, 0.3), p_far_dropout=0.5),
}
#: Files of a bundled model folder: the EF probe and the cached reference statistics.
PROBE_DIR, STATS_FILE = "probe", "real_stats.npz"


def loop_clips(loops: Iterable[np.ndarray], num_frames: int, size: int) -> torch.Tensor:
    """Loops (each uint8 (T, S, S)) -> clips uint8 (N, num_frames, S, S): the whole cycle from frame 0, resampled
    (:func:`~echolvfm_core.estimators.ef_posterior.clip_indices`)."""
    clips = []
    for frames in loops:
        f = np.asarray(frames)
        if f.ndim != 3 or f.dtype != np.uint8 or f.shape[1:] != (size, size):
            raise ValueError(f"loops must be uint8 (T, {size}, {size}); got {f.dtype} {f.shape}.")
        clips.append(torch.from_numpy(f[clip_indices(len(f), num_frames)]))
    if not clips:
        raise ValueError("no loops to turn into clips.")
    return torch.stack(clips)


@torch.no_grad()
def encode_clips(encoder: VideoViT, clips: torch.Tensor, perturb: AugmentConfig | None = None, seed: int = 0,
                 batch_size: int = 32) -> torch.Tensor:
    """Tokens of clips uint8 (N, T, S, S) -> float16 (N, num_tokens, dim) on the CPU.

    ``perturb``: an :class:`AugmentConfig` applied to each batch first (randomness from ``seed``).
    """
    if clips.ndim != 4 or clips.dtype != torch.uint8:
        raise ValueError(f"clips must be uint8 (N, T, S, S); got {clips.dtype} {tuple(clips.shape)}.")
    g = torch.Generator().manual_seed(seed)
    dev = next(encoder.parameters()).device
    encoder.eval()
    out = []
    for i in range(0, len(clips), batch_size):
        x = clips[i:i + batch_size].float() / 255.0
        if perturb is not None:
            x, _ = augment_batch(x, None, g, perturb)
        out.append(encoder(x[:, None].to(dev)).to("cpu", torch.float16))
    return torch.cat(out)


def fit_probe(probe: torch.nn.Module, tokens: torch.Tensor, ef: torch.Tensor, steps: int = 1500, batch_size: int = 64,
              lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Train ``probe`` (tokens -> EF in %) on frozen tokens (N, num_tokens, dim) and labels ef (N,) in %.

    AdamW with cosine decay, Huber loss on the error in units of the training labels' standard deviation.
    Returns the probe in eval mode.
    """
    if len(tokens) != len(ef) or len(ef) < 2:
        raise ValueError(f"need at least two token sets with one label each; got {len(tokens)} and {len(ef)}.")
    g = torch.Generator().manual_seed(seed)
    scale = float(ef.float().std())
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    probe.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ef), (min(batch_size, len(ef)),), generator=g)
        loss = F.smooth_l1_loss(probe(tokens[idx].float()) / scale, ef[idx].float() / scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """EF (N,) in % from tokens (N, num_tokens, dim)."""
    probe.eval()
    return torch.cat([probe(tokens[i:i + batch_size].float()) for i in range(0, len(tokens), batch_size)]).numpy()


def effective_rank(tokens: torch.Tensor) -> float:
    """RankMe (Garrido et al., ICML 2023) of tokens (N, num_tokens, dim): the exponential of the entropy of the
    normalised singular values of the centred (N * num_tokens, dim) feature matrix.

    From 1 (all tokens on one line: a collapsed encoder) to ``dim`` (variance spread evenly over every direction).
    """
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    x = x - x.mean(dim=0)
    sv = torch.linalg.eigvalsh(x.T @ x).clamp(min=0).sqrt()
    if float(sv.sum()) == 0.0:
        return 0.0
    p = sv / sv.sum()
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum()))


def temporal_share(tokens: torch.Tensor, time_steps: int) -> float:
    """Share of the variance of tokens (N, num_tokens, dim), about the set's mean token, that is their change over the
    clip at each place (:func:`~echolvfm_core.models.jepa.temporal_deviation`): 0 for features that stay still
    while the heart beats. The rest is where a token is and what the clip shows."""
    x = tokens.double()
    total = float(((x - x.mean(dim=(0, 1))) ** 2).sum())
    return float((temporal_deviation(x, time_steps) ** 2).sum()) / total if total > 0 else 0.0


def loop_features(tokens: torch.Tensor, time_steps: int) -> np.ndarray:
    """Loop features for ``fvd_jepa``, (N, num_tokens, dim) -> float64 (N, 2 * dim): the mean token (what the loop
    shows) beside the root-mean-square change of the tokens over the clip (:func:`temporal_deviation`, how it moves).
    The mean token alone is nearly blind to motion: loops of one repeated frame sat almost as close to the training
    loops as the real valid loops (1.27 against 1.19 with the bundled encoder; docs/models.md)."""
    x = tokens.double()
    motion = temporal_deviation(x, time_steps).pow(2).mean(dim=1).sqrt()
    return torch.cat([x.mean(dim=1), motion], dim=1).numpy()


def frame_features(tokens: torch.Tensor, grid: tuple[int, int, int]) -> np.ndarray:
    """Frame features for ``fid_jepa``: the spatial mean token of every tubelet time step -> float64 (N * T', dim)."""
    n, _, d = tokens.shape
    return tokens.double().reshape(n, grid[0], grid[1] * grid[2], d).mean(dim=2).reshape(-1, d).numpy()


@dataclass
class FeatureStats:
    """Reference statistics of a set of loops: mean and covariance of loop and frame features, and its size."""

    loop_mu: np.ndarray
    loop_sigma: np.ndarray
    frame_mu: np.ndarray
    frame_sigma: np.ndarray
    n: int

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, grid: tuple[int, int, int]) -> FeatureStats:
        lm, ls = feature_stats(loop_features(tokens, grid[0]))
        fm, fs = feature_stats(frame_features(tokens, grid))
        return cls(lm, ls, fm, fs, len(tokens))

    def save(self, path: str | Path) -> None:
        np.savez(path, loop_mu=self.loop_mu, loop_sigma=self.loop_sigma, frame_mu=self.frame_mu,
                 frame_sigma=self.frame_sigma, n=self.n)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as z:
            return cls(z["loop_mu"], z["loop_sigma"], z["frame_mu"], z["frame_sigma"], int(z["n"]))


def fvd_jepa(tokens: torch.Tensor, grid: tuple[int, int, int], reference: FeatureStats) -> float:
    """Fréchet distance between the loop features of ``tokens`` (N >= 2 clips) and the reference's."""
    return frechet_distance(*feature_stats(loop_features(tokens, grid[0])), reference.loop_mu, reference.loop_sigma)


def fid_jepa(tokens: torch.Tensor, grid: tuple[int, int, int], reference: FeatureStats) -> float:
    """Fréchet distance between the frame features of ``tokens`` and the reference's."""
    return frechet_distance(*feature_stats(frame_features(tokens, grid)), reference.frame_mu, reference.frame_sigma)


def _generated_loops(models: Path, loops, seed: int, device) -> list[np.ndarray]:
    """One generated loop per alpha = 1 loop: its ED frame observed, its EF requested (uint8 (T, S, S) each)."""
    from ..pipelines.counterfactual import CounterfactualPipeline

    pipe = CounterfactualPipeline.from_pretrained(models, device=device, segmenter=False)
    out = []
    for i, row in enumerate(loops.manifest):
        if abs(float(row["alpha"]) - 1.0) < 1e-6:
            loop = loops[i]
            cf = pipe.generate(loop.frames.astype(np.float32) / 255.0, ef=float(np.clip(loop.ef, 1, 99)),
                               observed=(0,), seed=seed + i)
            out.append(np.rint(cf.frames[0] * 255).astype(np.uint8))
    return out


def evaluate_jepa_section(folder: Path, loops, args: argparse.Namespace) -> dict:
    """The ``jepa`` section of ``echolvfm evaluate``: probe_mae, fvd_jepa, fid_jepa, n (+ what was compared).

    ``probe_mae``: the bundled attentive probe on all of ``loops`` (EF points). With a generator in the models
    folder (``folder.parent / "generator"``), one loop is generated per alpha = 1 loop and the Fréchet distances
    compare the generated loops with the split's real loops; without one, they compare the split's real loops
    with the cached training-split statistics (a real-vs-real floor, not a generation score).
    """
    device = getattr(args, "device", None) or "cpu"
    model = EchoJEPA.from_pretrained(folder).to(device).eval()
    probe = AttentiveProbe.from_pretrained(Path(folder) / PROBE_DIR).eval()
    cfg = model.config
    frames = [loops[i].frames for i in range(len(loops))]
    real = encode_clips(model.encoder, loop_clips(frames, cfg.num_frames, cfg.frame_size))
    ef = np.array([float(r["ef"]) for r in loops.manifest])
    result = {"probe_mae": float(np.abs(predict(probe, real) - ef).mean())}
    grid = model.encoder.grid
    generator = Path(folder).parent / "generator"
    if (generator / "config.json").exists():
        generated = _generated_loops(Path(folder).parent, loops, getattr(args, "seed", 0), device)
        tokens = encode_clips(model.encoder, loop_clips(generated, cfg.num_frames, cfg.frame_size))
        reference = FeatureStats.from_tokens(real, grid)
        compared = "generated loops (ED frame observed, loop EF requested) vs the split's real loops"
    else:
        tokens, reference = real, FeatureStats.load(Path(folder) / STATS_FILE)
        compared = "no generator: the split's real loops vs cached training-split real statistics (real-vs-real floor)"
    return {**result, "fvd_jepa": fvd_jepa(tokens, grid, reference), "fid_jepa": fid_jepa(tokens, grid, reference),
            "n": len(tokens), "compared": compared}
