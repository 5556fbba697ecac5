"""Ultrasound-minded augmentation of echo frames and clips on the model grid (apex at the top centre).

One call augments a batch (B, C, S, S) in [0, 1], where C is 1 for single frames or the frames of a clip: every
transform is drawn per sample and shared by its C channels, except the speckle noise, which is drawn per frame
(speckle decorrelates as tissue moves). Transforms, in order:

* geometry: rotation and scaling about the apex (probe angle and depth setting) plus a small shift; no left-right
  flips, since the orientation is clinical (LV on the right);
* gain, contrast (a gamma curve) and depth attenuation (time-gain compensation, ``exp(-k r)`` with ``r`` the
  distance from the apex);
* speckle: smoothed multiplicative noise plus a little additive noise, inside the fan only;
* sector-edge dropout: a wedge at one or both fan edges, or the far field, set to 0 (poor windows, narrow sectors).

Labels (B, S, S), or (B, C, S, S) for the frames of a clip, when given, follow the geometry (nearest neighbour) and
nothing else. All randomness comes from the ``generator`` argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment_batch"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities of :func:`augment_batch` (angles in degrees, shift as a fraction of the side)."""

    p_geometry: float = 0.8
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.04
    gain_range: tuple[float, float] = (0.75, 1.3)
    gamma_log_range: float = 0.35
    attenuation_range: tuple[float, float] = (-0.3, 0.8)
    p_speckle: float = 0.6
    speckle_max: float = 0.3
    additive_max: float = 0.03
    p_dropout: float = 0.3
    dropout_angle: tuple[float, float] = (0.05, 0.3)
    p_far_dropout: float = 0.15


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _polar(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance from the apex (top centre) in units of the side, and angle from the vertical (rad, + to the right)."""
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    dy, dx = (yy + 0.5) / s, (xx + 0.5 - s / 2) / s
    return torch.sqrt(dx**2 + dy**2), torch.atan2(dx, dy)


def augment_batch(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    cfg: AugmentConfig = AugmentConfig(),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment frames (B, C, S, S) float in [0, 1] and optional labels (B, S, S) or (B, C, S, S) int64; returns both
    (new tensors).

    Random numbers are drawn on the CPU from ``generator``; the tensors may live on any device.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"augment_batch expects frames (B, C, S, S); got {tuple(x.shape)}.")
    if labels is not None and labels.shape not in ((x.shape[0], *x.shape[-2:]), x.shape):
        raise ValueError(f"labels must be (B, S, S) = {(x.shape[0], *x.shape[-2:])} or (B, C, S, S); got "
                         f"{tuple(labels.shape)}.")
    b, c, s, _ = x.shape
    dev = x.device
    g = generator

    # --- geometry: rotate / scale about the apex (normalised coords (0, -1)), shift --------------------------
    apply = torch.rand(b, generator=g) < cfg.p_geometry
    ang = torch.where(apply, _uniform(b, -cfg.max_rotation, cfg.max_rotation, g), torch.zeros(b)) * math.pi / 180
    scale = torch.where(apply, _uniform(b, *cfg.scale_range, g), torch.ones(b))
    shift = torch.where(apply[:, None], _uniform(2 * b, -cfg.max_shift, cfg.max_shift, g).view(b, 2) * 2,
                        torch.zeros(b, 2))
    if bool(apply.any()):
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # (B, 2, 2) output -> input
        centre = torch.tensor([0.0, -1.0])
        t = centre - a @ centre + shift
        theta = torch.cat([a, t[:, :, None]], 2).to(dev, x.dtype)
        grid = F.affine_grid(theta, (b, c, s, s), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if labels is not None:
            stack = labels if labels.ndim == 4 else labels[:, None]
            stack = F.grid_sample(stack.to(x.dtype), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False).round().long()
            labels = stack if labels.ndim == 4 else stack[:, 0]
    fan = x.amax(dim=1, keepdim=True) > 0  # (B, 1, S, S) pixels inside the (moved) fan

    # --- gain, contrast, depth attenuation --------------------------------------------------------------------
    r, phi = (v.to(dev) for v in _polar(s))
    gain = _uniform(b, *cfg.gain_range, g).to(dev).view(b, 1, 1, 1)
    gamma = torch.exp(_uniform(b, -cfg.gamma_log_range, cfg.gamma_log_range, g)).to(dev).view(b, 1, 1, 1)
    k = _uniform(b, *cfg.attenuation_range, g).to(dev).view(b, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma * gain * torch.exp(-k * r)

    # --- speckle ------------------------------------------------------------------------------------------------
    on = (torch.rand(b, generator=g) < cfg.p_speckle).float()
    sigma = (on * _uniform(b, 0, cfg.speckle_max, g)).to(dev).view(b, 1, 1, 1)
    sigma_add = (on * _uniform(b, 0, cfg.additive_max, g)).to(dev).view(b, 1, 1, 1)
    noise = torch.randn((b, c, s, s), generator=g).to(dev, x.dtype)
    # a 3 x 3 box blur gives speckle grains of a few pixels; x3 restores unit variance
    noise = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False) * 3.0
    extra = torch.randn((b, c, s, s), generator=g).to(dev, x.dtype)
    x = torch.where(fan, x * (1 + sigma * noise) + sigma_add * extra, x)

    # --- sector-edge and far-field dropout ------------------------------------------------------------------
    drop = torch.rand(b, generator=g) < cfg.p_dropout
    far = torch.rand(b, generator=g) < cfg.p_far_dropout
    if bool(drop.any() | far.any()):
        phi_b = phi.expand(b, 1, s, s)
        half = torch.where(fan, phi_b.abs(), torch.zeros_like(phi_b)).amax(dim=(1, 2, 3))  # fan half-angle (B,)
        cut = (half - _uniform(b, *cfg.dropout_angle, g).to(dev)).view(b, 1, 1, 1)
        side = torch.randint(0, 3, (b,), generator=g).to(dev).view(b, 1, 1, 1)  # 0 left, 1 right, 2 both
        wedge = ((side != 1) & (phi_b < -cut)) | ((side != 0) & (phi_b > cut))
        depth = torch.where(fan, r.expand(b, 1, s, s), torch.zeros_like(phi_b)).amax(dim=(1, 2, 3))
        r_cut = (depth * _uniform(b, 0.8, 0.95, g).to(dev)).view(b, 1, 1, 1)
        mask = (wedge & drop.to(dev).view(b, 1, 1, 1)) | ((r.expand(b, 1, s, s) > r_cut) & far.to(dev).view(b, 1, 1, 1))
        x = x.masked_fill(mask, 0.0)
    return x.clamp(0.0, 1.0), labels
