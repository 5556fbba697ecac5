"""Shared parts of the flow wrappers: the batch they train on, the conditioning they sample from, time sampling and
the masked per-video loss.

Time convention (all flows): ``z_t = (1 - t) x + t eps`` with ``t = 0`` data and ``t = 1`` noise; the conditional
velocity is ``v = dz_t/dt = eps - x``; sampling integrates from ``t = 1`` down to ``t = 0``.

The network a flow wraps is any module with the call signature of :class:`FlowNetwork` (the velocity U-Net of
:mod:`echolvfm_core.models.unet` is one; the tests also use a 1 x 1-conv stand-in).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

__all__ = [
    "FlowNetwork",
    "Conditioning",
    "VideoBatch",
    "FlowLoss",
    "sample_logit_normal",
    "frame_weights",
    "per_video_mse",
    "initial_noise",
    "anchor_latents",
    "network_context",
    "warp_latents",
]


class FlowNetwork(Protocol):
    """``net(z, t, h, ef, cond, frame_mask, ef_drop=None, **context) -> u``, all tensors on one device.

    z (B, C, T, h, w) noisy latents; t (B,) time in [0, 1]; h (B,) interval t - r (0: instantaneous velocity);
    ef (B,) EF in %; cond (B, C, T, h, w) clean latents at observed frames, zero elsewhere; frame_mask (B, T) bool
    (True at real frames); ef_drop (B,) bool or None (True: use the null EF embedding). u has the shape of z.
    ``context``: see :func:`network_context` (only networks whose ``config.context_channels`` is set get it).
    """

    def __call__(self, z, t, h, ef, cond, frame_mask, ef_drop=None, **context) -> torch.Tensor: ...


@dataclass
class Conditioning:
    """What a batch of B clips (padded to T frames) is conditioned on.

    Attributes:
        cond: (B, C, T, h, w) clean normalised latents at observed frames, exactly zero at every other frame
            (build it with :meth:`from_latents`).
        observed: (B, T) bool, True at observed frames (a subset of ``frame_mask``, at least one per clip).
        frame_mask: (B, T) bool, True at real frames; padding only after the last real frame, >= 1 real frame.
        ef: (B,) float, requested ejection fraction in %.
    """

    cond: torch.Tensor
    observed: torch.Tensor
    frame_mask: torch.Tensor
    ef: torch.Tensor

    def __post_init__(self) -> None:
        if self.cond.ndim != 5:
            raise ValueError(f"cond must be (B, C, T, h, w); got shape {tuple(self.cond.shape)}.")
        b, _, t = self.cond.shape[:3]
        for name, m in (("observed", self.observed), ("frame_mask", self.frame_mask)):
            if m.shape != (b, t) or m.dtype != torch.bool:
                raise ValueError(f"{name} must be bool ({b}, {t}); got {m.dtype} {tuple(m.shape)}.")
        if self.ef.shape != (b,):
            raise ValueError(f"ef must have shape ({b},); got {tuple(self.ef.shape)}.")

    @classmethod
    def from_latents(
        cls, latents: torch.Tensor, observed: torch.Tensor, frame_mask: torch.Tensor, ef: torch.Tensor
    ) -> Conditioning:
        """Conditioning that observes ``latents`` (B, C, T, h, w) at ``observed`` (B, T) frames only.

        Raises ValueError when an observed frame is padding or a clip observes no frame or has no real frame.
        """
        if bool((observed & ~frame_mask).any()):
            raise ValueError("An observed frame lies in the padding; observed frames must be real frames.")
        if not bool(observed.any(1).all()):
            raise ValueError("Every clip needs at least one observed frame.")
        if not bool(frame_mask[:, 0].all()):
            raise ValueError("Every clip needs at least one real frame, and padding must come after the real frames.")
        cond = latents * observed[:, None, :, None, None].to(latents.dtype)
        return cls(cond, observed, frame_mask, ef.to(latents.dtype))

    @property
    def batch_size(self) -> int:
        return int(self.cond.shape[0])

    def to(self, device=None, dtype=None) -> Conditioning:
        return Conditioning(
            self.cond.to(device=device, dtype=dtype),
            self.observed.to(device),
            self.frame_mask.to(device),
            self.ef.to(device=device, dtype=dtype),
        )

    def repeat(self, n: int) -> Conditioning:
        """Each clip repeated ``n`` times in a row (B*n clips), e.g. for candidates of rejection sampling."""
        return Conditioning(
            self.cond.repeat_interleave(n, 0),
            self.observed.repeat_interleave(n, 0),
            self.frame_mask.repeat_interleave(n, 0),
            self.ef.repeat_interleave(n, 0),
        )


@dataclass
class VideoBatch:
    """A training batch: target clean latents ``x`` (B, C, T, h, w), zero at padded frames, and its conditioning.

    ``x`` may be another loop than the one the conditioning frames come from (counterfactual supervision: same
    anatomy, the target's exact EF in ``cond.ef``).

    ``displacement`` (B, 2, T, h, w), optional: the known motion of each clip, in latent pixels (channel 0: x,
    1: y), that moves its anchor (:func:`anchor_latents`) onto each target frame as :func:`warp_latents` applies
    it; ``displacement_known`` (B,) bool marks the clips it is known for (the others carry zeros).
    """

    x: torch.Tensor
    cond: Conditioning
    displacement: torch.Tensor | None = None
    displacement_known: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.shape != self.cond.cond.shape:
            raise ValueError(f"x {tuple(self.x.shape)} and cond {tuple(self.cond.cond.shape)} must have one shape.")
        if (self.displacement is None) != (self.displacement_known is None):
            raise ValueError("displacement and displacement_known come together.")
        if self.displacement is not None:
            b, _, t, h, w = self.x.shape
            if self.displacement.shape != (b, 2, t, h, w) or self.displacement_known.shape != (b,):
                raise ValueError(f"displacement must be ({b}, 2, {t}, {h}, {w}) and displacement_known ({b},); got "
                                 f"{tuple(self.displacement.shape)} and {tuple(self.displacement_known.shape)}.")

    def to(self, device=None, dtype=None) -> VideoBatch:
        disp = known = None
        if self.displacement is not None:
            disp = self.displacement.to(device=device, dtype=dtype)
            known = self.displacement_known.to(device)
        return VideoBatch(self.x.to(device=device, dtype=dtype), self.cond.to(device, dtype), disp, known)


@dataclass
class FlowLoss:
    """Output of a flow's ``forward``: ``loss`` (scalar, to backpropagate) and detached ``parts`` for logging."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def sample_logit_normal(
    n: int, mean: float, std: float, device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n,) samples of sigmoid(N(mean, std^2)) in (0, 1), float32."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def frame_weights(cond: Conditioning, observed_weight: float = 1.0) -> torch.Tensor:
    """(B, T) float loss weight per frame: 0 at padding, ``observed_weight`` at observed frames, 1 elsewhere."""
    w = cond.frame_mask.to(cond.cond.dtype)
    if observed_weight != 1.0:
        w = torch.where(cond.observed, w * observed_weight, w)
    return w


def per_video_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of each clip over its weighted frames.

    pred, target (B, C, T, h, w); weights (B, T) >= 0 with a positive sum per clip. Each clip's error is the
    weighted mean over its frames of the per-frame mean over (C, h, w), so every clip counts the same whatever its
    length, and frames with weight 0 (padding) do not enter at all.
    """
    per_frame = (pred.float() - target.float()).square().mean(dim=(1, 3, 4))  # (B, T)
    w = weights.float()
    return torch.where(w > 0, per_frame * w, 0.0).sum(1) / w.sum(1)


def initial_noise(
    cond: Conditioning, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting point of sampling: ``(z, pad)`` with z = eps * pad, (B, C, T, h, w) like ``cond.cond``.

    ``pad`` (B, 1, T, 1, 1) is 1 on real frames and 0 on padding; ``noise`` overrides drawing eps from ``generator``.
    """
    shape = cond.cond.shape
    pad = cond.frame_mask[:, None, :, None, None].to(cond.cond.dtype)
    if noise is None:
        noise = torch.randn(shape, device=cond.cond.device, dtype=cond.cond.dtype, generator=generator)
    elif noise.shape != shape:
        raise ValueError(f"noise must have shape {tuple(shape)}; got {tuple(noise.shape)}.")
    return noise * pad, pad


def anchor_latents(cond: Conditioning) -> torch.Tensor:
    """(B, C, T, h, w) per-frame anchor of the residual parameterisation: the observed latents interpolated in time.

    Frame k gets the linear interpolation between the observed frames just before and just after it, or the
    nearest observed frame where it lies outside them (one observed frame: that frame's latent at every frame).
    Observed frames get their own latent; padding gets zero.
    """
    c = cond.cond
    t = c.shape[2]
    pos = torch.arange(t, device=c.device, dtype=torch.float32)
    big = torch.tensor(float(t) * 4, device=c.device)
    obs = cond.observed
    # index of the last observed frame at or before k, and of the first at or after k (either side may be missing)
    before = torch.where(obs, pos, -big).cummax(dim=1).values  # (B, T)
    after = torch.where(obs, pos, big).flip(1).cummin(dim=1).values.flip(1)
    before = torch.where(before < 0, after, before)
    after = torch.where(after >= t, before, after)
    span = (after - before).clamp_min(1.0)
    w = ((pos - before) / span).clamp(0.0, 1.0).to(c.dtype)  # weight of the later observed frame
    gather = lambda idx: torch.take_along_dim(c, idx.long()[:, None, :, None, None], dim=2)  # noqa: E731
    anchor = (1 - w)[:, None, :, None, None] * gather(before) + w[:, None, :, None, None] * gather(after)
    return anchor * cond.frame_mask[:, None, :, None, None].to(c.dtype)


def network_context(net, cond: Conditioning, anchor: torch.Tensor | None = None) -> dict:
    """Extra keyword arguments for ``net``: ``{"context": anchor_latents(cond)}`` when the network was built to take
    the anchor as input (``net.config.context_channels`` > 0), else ``{}``; ``anchor`` is that anchor when the
    caller has already computed it. The context depends on the conditioning only, so it is a constant of the
    MeanFlow JVP."""
    config = getattr(net, "config", None)
    if config is not None and getattr(config, "context_channels", 0):
        return {"context": anchor_latents(cond) if anchor is None else anchor}
    return {}


#: Smallest t in a clean-estimate prediction's velocity ``u = (z_t - x_hat) / t``.
PREDICTION_T_MIN = 1e-2


def warp_estimate(out: torch.Tensor, anchor: torch.Tensor, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean estimate of a "warp" network output ``out`` (B, C + 2, T, h, w), in the residual's frame: the anchor
    (B, C, T, h, w) moved by the displacement channels (times ``gain``, latent pixels) plus the residual channels,
    minus the anchor. Returns ``(x_hat, displacement (B, 2, T, h, w))``."""
    b, c, frames, h, w = anchor.shape
    frame_anchor = anchor.transpose(1, 2).reshape(b * frames, c, h, w)
    disp = out[:, c:].transpose(1, 2).reshape(b * frames, 2, h, w) * gain
    moved = warp_latents(frame_anchor, disp).reshape(b, frames, c, h, w).transpose(1, 2)
    return moved - anchor + out[:, :c], disp.reshape(b, frames, 2, h, w).transpose(1, 2)


def velocity_from_estimate(z: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity ``(z_t - x_hat) / t`` (t (B,) clamped at :data:`PREDICTION_T_MIN`) that a clean estimate means."""
    return (z - x_hat) / t.clamp_min(PREDICTION_T_MIN)[:, None, None, None, None]


def displacement_error(disp: torch.Tensor, batch: VideoBatch) -> torch.Tensor:
    """Mean squared error (latent pixels^2, per clip over its real frames) of a displacement field (B, 2, T, h, w)
    against the batch's known motion, over the clips that know it (``batch.displacement_known``)."""
    known = batch.displacement_known.to(disp.dtype)
    err = per_video_mse(disp, batch.displacement, frame_weights(batch.cond))
    return (err * known).sum() / known.sum().clamp_min(1.0)


def warp_latents(src: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Bilinear backward warp of ``src`` (N, C, H, W) by ``disp`` (N, 2, H, W) in pixels (channel 0: x, 1: y):
    ``out[..., i, j] = src at (i + disp_y, j + disp_x)``, sampling positions clamped to the border.

    Written with ``gather`` rather than ``grid_sample`` because ``torch.func.jvp`` (the MeanFlow target) has no
    forward-mode derivative for ``grid_sample``; the result and its gradients are the same.
    """
    n, c, h, w = src.shape
    if disp.shape != (n, 2, h, w):
        raise ValueError(f"disp must be ({n}, 2, {h}, {w}); got {tuple(disp.shape)}.")
    ys = torch.arange(h, device=src.device, dtype=src.dtype)[:, None]
    xs = torch.arange(w, device=src.device, dtype=src.dtype)[None, :]
    x = (xs + disp[:, 0]).clamp(0, w - 1)  # (N, H, W)
    y = (ys + disp[:, 1]).clamp(0, h - 1)
    x0, y0 = x.detach().floor(), y.detach().floor()
    wx, wy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp_max(w - 1), (y0 + 1).clamp_max(h - 1)
    flat = src.reshape(n, c, h * w)

    def at(yy, xx):
        idx = (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)
        return flat.gather(2, idx).reshape(n, c, h, w)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy
