"""Masked linear flow matching (the multi-step baseline) with optional classifier-free guidance on the EF.

Same time convention and masking as :mod:`echolvfm_core.flows.meanflow`: ``z_t = (1 - t) x + t eps``,
``v = eps - x``, t = 1 noise, t = 0 data. The network is asked for the instantaneous velocity (interval h = 0):
directly (``prediction`` "u"), or, as the one-step generator's "warp" prediction, through a clean estimate built as
the observed frames' anchor moved by a displacement field plus a residual (``u = (z_t - x_hat) / t``), so the baseline
can share the one-step model's network and output parameterisation and differ only in objective and sampler.
Training drops the EF for a share ``ef_dropout`` of clips (the network's learned null EF embedding), so that
sampling can mix conditional and unconditional velocities: ``v = v_null + w (v_ef - v_null)`` (Ho & Salimans,
2022), w = ``guidance`` (1: no guidance, one network call per step).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .base import (
    Conditioning,
    FlowLoss,
    VideoBatch,
    anchor_latents,
    displacement_error,
    frame_weights,
    initial_noise,
    network_context,
    per_video_mse,
    sample_logit_normal,
    velocity_from_estimate,
    warp_estimate,
)

__all__ = ["LinearFlow", "LinearFlowConfig"]

SOLVERS = ("euler", "midpoint")
PREDICTIONS = ("u", "warp")


@dataclass(frozen=True)
class LinearFlowConfig:
    """Hyper-parameters of :class:`LinearFlow`: logit-normal time sampling, EF dropout share, observed-frame weight,
    ``residual`` (flow over the difference from the observed-frame anchor, as in :class:`MeanFlowConfig`), and the
    output parameterisation: ``prediction`` "u" (the velocity) or "warp" (needs ``residual`` and a network with a
    displacement output; ``displacement_gain`` and ``displacement_weight`` as in :class:`MeanFlowConfig`, the latter
    supervising the displacement field with the clip's known motion where it has one)."""

    time_mean: float = 0.0
    time_std: float = 1.0
    ef_dropout: float = 0.1
    observed_weight: float = 1.0
    residual: bool = False
    prediction: str = "u"
    displacement_gain: float = 5.0
    displacement_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ef_dropout < 1.0:
            raise ValueError(f"ef_dropout must be in [0, 1); got {self.ef_dropout}.")
        if self.observed_weight < 0:
            raise ValueError("observed_weight must be >= 0.")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {self.prediction!r}.")
        if self.prediction == "warp" and not self.residual:
            raise ValueError('prediction="warp" moves the observed-frame anchor: it needs residual=True.')
        if self.displacement_weight < 0:
            raise ValueError(f"displacement_weight must be >= 0; got {self.displacement_weight}.")
        if self.displacement_weight > 0 and self.prediction != "warp":
            raise ValueError('displacement_weight supervises the displacement field of prediction="warp" only.')


class LinearFlow(nn.Module):
    """Flow-matching wrapper: ``forward(batch, step, generator) -> FlowLoss``;
    ``sample(cond, steps, solver, guidance)``."""

    def __init__(self, net: nn.Module, config: LinearFlowConfig | None = None, **overrides):
        super().__init__()
        self.net = net
        self.config = LinearFlowConfig(**{**asdict(config or LinearFlowConfig()), **overrides})
        outputs_motion = bool(getattr(getattr(net, "config", None), "displacement_channels", 0))
        if outputs_motion and self.config.prediction != "warp":
            raise ValueError("This network outputs a displacement field, read only by prediction='warp'.")
        if self.config.prediction == "warp" and not outputs_motion:
            raise ValueError("prediction='warp' needs a network with a displacement output (displacement_channels).")

    def _velocity(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, drop: torch.Tensor | None,
                  context: dict, anchor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's instantaneous velocity at (z, t) and, with "warp", its displacement field (else None)."""
        out = self.net(z, t, torch.zeros_like(t), cond.ef, cond.cond, cond.frame_mask, drop, **context)
        if self.config.prediction != "warp":
            return out, None
        x_hat, disp = warp_estimate(out, anchor, self.config.displacement_gain)
        return velocity_from_estimate(z, x_hat, t), disp

    def forward(self, batch: VideoBatch, step: int = 0, generator: torch.Generator | None = None) -> FlowLoss:
        """Masked flow-matching loss ``|u(z_t, t, t) - v|^2`` per clip, averaged over clips (``step`` is unused),
        plus, with ``displacement_weight``, the displacement field's squared error on clips with known motion."""
        cfg = self.config
        x, cond = batch.x, batch.cond
        anchor = anchor_latents(cond) if cfg.residual else None
        if anchor is not None:
            x = x - anchor
        n = x.shape[0]
        pad = cond.frame_mask[:, None, :, None, None].to(x.dtype)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * pad
        t = sample_logit_normal(n, cfg.time_mean, cfg.time_std, x.device, generator).to(x.dtype)
        drop = torch.rand(n, device=x.device, generator=generator) < cfg.ef_dropout
        tb = t[:, None, None, None, None]
        z = (1 - tb) * x + tb * eps
        u, disp = self._velocity(z, t, cond, drop, network_context(self.net, cond, anchor), anchor)
        loss = per_video_mse(u, eps - x, frame_weights(cond, cfg.observed_weight)).mean()
        parts = {"mse": loss.detach()}
        if cfg.displacement_weight > 0 and batch.displacement is not None:
            loss_disp = displacement_error(disp, batch)
            loss = loss + cfg.displacement_weight * loss_disp
            parts["disp"] = loss_disp.detach()
        return FlowLoss(loss, parts)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: float = 1.0,
                 context: dict | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """Instantaneous velocity (B, C, T, h, w) at z, t (B,); with guidance != 1 a conditional + null EF batch.

        ``context`` and ``anchor``: :func:`~echolvfm_core.flows.base.network_context` and
        :func:`~echolvfm_core.flows.base.anchor_latents` of ``cond`` when the caller has them (a sampler computes
        them once, not at every step).
        """
        if anchor is None and self.config.residual:
            anchor = anchor_latents(cond)
        if context is None:
            context = network_context(self.net, cond, anchor)
        if guidance == 1.0:
            return self._velocity(z, t, cond, None, context, anchor)[0]
        n = z.shape[0]
        drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(z.device)
        twice = Conditioning(torch.cat([cond.cond, cond.cond]), torch.cat([cond.observed, cond.observed]),
                             torch.cat([cond.frame_mask, cond.frame_mask]), torch.cat([cond.ef, cond.ef]))
        both, _ = self._velocity(torch.cat([z, z]), torch.cat([t, t]), twice, drop,
                                 {k: torch.cat([v, v]) for k, v in context.items()},
                                 None if anchor is None else torch.cat([anchor, anchor]))
        v_ef, v_null = both[:n], both[n:]
        return v_null + guidance * (v_ef - v_null)

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        steps: int = 25,
        solver: str = "midpoint",
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents (B, C, T, h, w) integrating the velocity ODE from t = 1 to 0 in ``steps`` uniform steps.

        ``solver``: "euler" (1 network call per step) or "midpoint" (2 calls per step); ``guidance`` w >= 0.
        """
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}.")
        z, pad = initial_noise(cond, noise, generator)
        n = z.shape[0]
        anchor = anchor_latents(cond) if self.config.residual else None
        context = network_context(self.net, cond, anchor)
        times = torch.linspace(1.0, 0.0, steps + 1, device=z.device, dtype=z.dtype)
        for i in range(steps):
            t, dt = times[i], times[i + 1] - times[i]  # dt < 0
            v = self.velocity(z, t.expand(n), cond, guidance, context, anchor)
            if solver == "midpoint":
                v = self.velocity(z + 0.5 * dt * v, (t + 0.5 * dt).expand(n), cond, guidance, context, anchor)
            z = z + dt * v
        if anchor is not None:
            z = z + anchor
        return z * pad
