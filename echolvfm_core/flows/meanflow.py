"""Masked MeanFlow for latent echo videos: training loss with a JVP target, and one-step (or few-step) sampling.

Reference: Geng et al., "Mean Flows for One-step Generative Modeling" (2025), and the EchoLVFM paper (masked,
variable-length latent MeanFlow conditioned on the ejection fraction).

Time convention (stated once, used everywhere in this package)::

    z_t = (1 - t) x + t eps          t = 0: data x,  t = 1: noise eps ~ N(0, I)
    v   = dz_t/dt = eps - x           conditional (instantaneous) velocity
    u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds      average velocity on [r, t]  (MeanFlow Eq. 3)
    z_r = z_t - (t - r) u(z_t, r, t)                          (Eq. 4)
    one step: x = eps - u(eps, 0, 1)

MeanFlow identity (Eq. 6): ``u = v - (t - r) du/dt`` with the total derivative ``du/dt = v . d_z u + d_t u``
(Eq. 8), i.e. the Jacobian-vector product of the network along the tangent (v, 0, 1) for (z, r, t). The
training target ``u_tgt = v - (t - r) du/dt`` is detached (stop-gradient, Eq. 9-10). With r = t the loss is plain
flow matching on u(z_t, t, t) = v.

Improved Mean Flows (Geng et al. 2025, arXiv 2512.02012, Sec. 4) read the same loss as a regression of the
instantaneous velocity ``V = u + (t - r) sg(du/dt)`` onto ``v`` and take the JVP tangent from the network's own
instantaneous velocity ``u(z_t, t, t)`` (the marginal velocity, a function of z_t alone) instead of the conditional
``v = eps - x``; ``tangent="predicted"`` does that (the tangent carries no gradient either). "Understanding,
Accelerating, and Improving MeanFlow Training" (Kim et al. 2025, arXiv 2511.19065) find that the instantaneous and
short-interval velocities must form before the long intervals can; ``interval_warmup`` grows the drawn intervals
from short to full length over the first steps.

Masking (EchoLVFM): the network sees the clean latents of the observed frames as extra channels and a not-padding
indicator; the loss covers every real frame, observed frames included (weight ``observed_weight``, default 1),
because with counterfactual supervision the target loop differs from the loop the observed frames come from, and
because the network's output at observed frames is what the decoder shows; padded frames never enter the loss.
Each clip's error is a mean over its own real frames, so every clip weighs the same whatever its length.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

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

__all__ = ["MeanFlow", "MeanFlowConfig"]

RECON_ON = ("instantaneous", "all", "one_step")
PREDICTIONS = ("u", "x", "warp")
TANGENTS = ("conditional", "predicted")


@dataclass(frozen=True)
class MeanFlowConfig:
    """Hyper-parameters of :class:`MeanFlow` (saved with every checkpoint).

    share_r_neq_t: share of samples with r < t (the rest has r = t); MeanFlow's ablation favours 25 %.
    time_mean, time_std: logit-normal sampling of t and r (MeanFlow's best: mean -0.4, std 1.0).
    adaptive_p, adaptive_c: per-clip loss weight ``1 / (mse + c)^p``, detached (MeanFlow Sec. 4.3); p = 0 is
        plain MSE, the EchoLVFM paper's best are p = 1 and p = 0.5.
    recon_weight: weight of the reconstruction regulariser ``|x_hat - x|^2`` with ``x_hat = z_t - t u``
        (0 turns it off).
    recon_on: "instantaneous" applies it only to samples with r = t, where ``z_t - t u`` estimates E[x | z_t]
        and the term is a t^2-weighted flow-matching loss; "all" applies it to every sample (for r > 0 it pulls
        the average velocity towards the instantaneous one); "one_step" applies it only to the samples drawn at
        (r, t) = (0, 1) (``one_step_share``), where ``x_hat`` is the one-step sample itself, so the term supervises
        the generator's output directly: its minimiser is the clean loop expected given the observed frames and
        the EF.
    one_step_share: share of samples drawn at exactly (r, t) = (0, 1), the interval of the one-step sampler
        (logit-normal draws almost never reach it, so without them the one-step path is learnt only by
        extrapolation); the rest are drawn as usual.
    mf_weight: weight of the MeanFlow term (1: the paper's loss). 0 trains with the reconstruction regulariser
        alone (no JVP, about half the time per step); with ``one_step_share`` = 1 and ``recon_on`` "one_step" that
        is plain regression of the one-step sample onto the data: the generator learns the expected loop given the
        observed frames and the EF and is then close to deterministic (the noise barely changes its output). Used by
        the CPU preset, where the full objective did not learn the EF-dependent motion within the budget.
    motion_gain: with "warp", sampling (not training) multiplies the displacement field by it. A regression-trained
        generator returns the expected motion, whose amplitude shrinks where the timing and shape of the contraction
        are uncertain; a gain > 1, chosen on training patients, restores the amplitude (the CPU model's card states
        the value and how it was chosen). 1: the network's own estimate.
    linear_ratio: share of training steps that use the masked linear flow-matching objective (all r = t, no JVP,
        same weighting) instead of the MeanFlow objective; steps alternate deterministically.
    observed_weight: loss weight of observed frames relative to the other real frames.
    residual: the flow carries each frame's difference from its anchor (the observed latents interpolated in time,
        :func:`~echolvfm_core.flows.base.anchor_latents`) instead of the latent itself; sampling adds the anchor
        back. The anatomy then comes from the observed frames and the network learns the motion only.
    prediction: what the network outputs. "u": the average velocity itself. "x": a clean-data estimate x_hat,
        read as the average velocity ``u = (z_t - x_hat) / t`` (t clamped at ``PREDICTION_T_MIN``), so a one-step
        sample is x_hat itself and an untrained network already returns clean (zero, or with ``residual`` the
        anchor) latents instead of noise. "warp" (needs ``residual`` and a network with ``displacement_channels``
        = 2): like "x", with the clean estimate built as the anchor moved by the network's displacement field plus
        its residual, ``x_hat = warp(anchor, d) - anchor + r`` (in the residual's frame). A contraction is then a
        smooth field, and an estimate that averages over uncertain motion moves the anatomy by the mean
        displacement instead of blurring it. The loss and its JVP target are the same in every case.
    displacement_gain: with "warp", the network's displacement output is multiplied by it (latent pixels), so
        that the optimiser's steps move the anatomy by useful fractions of a pixel from the start.
    tangent: the JVP tangent for z. "conditional": ``v = eps - x`` (MeanFlow Eq. 8). "predicted": the network's
        instantaneous velocity ``u(z_t, t, t)``, evaluated without gradient (Improved Mean Flows); one more network
        call per MeanFlow step.
    interval_warmup: curriculum over the first ``interval_warmup`` training steps (0: off): every drawn interval
        t - r is shortened to the fraction ``min(1, (step + 1) / interval_warmup)`` of itself (r moves towards t), so
        training goes from instantaneous and short intervals to long ones; the ``one_step_share`` draws at
        (r, t) = (0, 1) are left whole.
    displacement_weight: with "warp", weight of a squared error (latent pixels^2, per clip over its real frames)
        between the network's displacement field and the clip's known motion (``VideoBatch.displacement``, e.g. the
        registration field a synthesised loop was rendered with), for the clips that carry it. The image terms pull
        on a displacement only through the local gradient of the warped latents; the known field supervises the
        whole motion directly. 0: off.
    """

    share_r_neq_t: float = 0.25
    time_mean: float = -0.4
    time_std: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    recon_weight: float = 0.0
    recon_on: str = "instantaneous"
    linear_ratio: float = 0.0
    observed_weight: float = 1.0
    residual: bool = False
    prediction: str = "u"
    displacement_gain: float = 5.0
    one_step_share: float = 0.0
    mf_weight: float = 1.0
    motion_gain: float = 1.0
    displacement_weight: float = 0.0
    tangent: str = "conditional"
    interval_warmup: int = 0

    def __post_init__(self) -> None:
        for name in ("share_r_neq_t", "one_step_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}.")
        if not 0.0 <= self.linear_ratio <= 1.0:
            raise ValueError(f"linear_ratio must be in [0, 1]; got {self.linear_ratio}.")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            raise ValueError("adaptive_p must be >= 0 and adaptive_c > 0.")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {self.prediction!r}.")
        if self.prediction == "warp" and not self.residual:
            raise ValueError('prediction="warp" moves the anchor: it needs residual=True.')
        if self.recon_on not in RECON_ON:
            raise ValueError(f"recon_on must be one of {RECON_ON}; got {self.recon_on!r}.")
        if self.recon_weight < 0 or self.observed_weight < 0 or self.mf_weight < 0:
            raise ValueError("recon_weight, observed_weight and mf_weight must be >= 0.")
        if self.motion_gain != 1.0 and self.prediction != "warp":
            raise ValueError('motion_gain scales the displacement field of prediction="warp" only.')
        if not self.motion_gain > 0:
            raise ValueError(f"motion_gain must be > 0; got {self.motion_gain}.")
        if self.displacement_weight < 0:
            raise ValueError(f"displacement_weight must be >= 0; got {self.displacement_weight}.")
        if self.displacement_weight > 0 and self.prediction != "warp":
            raise ValueError('displacement_weight supervises the displacement field of prediction="warp" only.')
        if self.tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {TANGENTS}; got {self.tangent!r}.")
        if self.interval_warmup < 0:
            raise ValueError(f"interval_warmup must be >= 0; got {self.interval_warmup}.")
        if self.mf_weight == 0 and self.recon_weight == 0:
            raise ValueError("mf_weight = 0 leaves only the reconstruction regulariser: recon_weight must be > 0.")


class MeanFlow(nn.Module):
    """MeanFlow wrapper around a velocity network (:class:`echolvfm_core.flows.base.FlowNetwork` signature).

    ``forward(batch, step, generator) -> FlowLoss`` (time sampling, noise, JVP target, weighting);
    ``sample(cond, steps=1, generator) -> (B, C, T, h, w)`` latents.
    """

    def __init__(self, net: nn.Module, config: MeanFlowConfig | None = None, **overrides):
        super().__init__()
        self.net = net
        self.config = MeanFlowConfig(**{**asdict(config or MeanFlowConfig()), **overrides})

    def is_linear_step(self, step: int) -> bool:
        """True when training step ``step`` uses the linear flow-matching objective (``linear_ratio`` of steps)."""
        ratio = self.config.linear_ratio
        return int((step + 1) * ratio) > int(step * ratio)

    def sample_times(self, n: int, device, generator: torch.Generator | None = None,
                     step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t), each (n,): two logit-normal draws sorted so that r <= t, then r = t for 1 - share_r_neq_t; during
        the ``interval_warmup`` curriculum (``step`` given) t - r is shortened to (step + 1) / interval_warmup of
        itself; then (r, t) = (0, 1) for ``one_step_share`` of the samples (logit-normal draws are never exactly 0
        or 1)."""
        c = self.config
        a = sample_logit_normal(n, c.time_mean, c.time_std, device, generator)
        b = sample_logit_normal(n, c.time_mean, c.time_std, device, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.rand(n, device=device, generator=generator) < c.share_r_neq_t
        r = torch.where(keep, r, t)
        if c.interval_warmup and step is not None and step + 1 < c.interval_warmup:
            r = t - (t - r) * ((step + 1) / c.interval_warmup)
        if c.one_step_share > 0:
            one = torch.rand(n, device=device, generator=generator) < c.one_step_share
            r, t = torch.where(one, 0.0, r), torch.where(one, 1.0, t)
        return r, t

    def _velocity_fn(self, cond: Conditioning, anchor: torch.Tensor | None = None, motion_gain: float = 1.0,
                     with_displacement: bool = False):
        """u(z, r, t) of the network; ``anchor``: ``anchor_latents(cond)`` when the caller has it (residual flows);
        ``motion_gain``: factor on the displacement field ("warp" prediction); ``with_displacement``: the function
        returns ``(u, displacement)`` with the field (B, 2, T, h, w) in latent pixels ("warp" only)."""
        if anchor is None and self.config.residual:
            anchor = anchor_latents(cond)
        context = network_context(self.net, cond, anchor)
        prediction = self.config.prediction

        def fn(z, r, t):
            out = self.net(z, t, t - r, cond.ef, cond.cond, cond.frame_mask, **context)
            if prediction == "warp":
                out, disp = warp_estimate(out, anchor, self.config.displacement_gain * motion_gain)
            if prediction in ("x", "warp"):
                out = velocity_from_estimate(z, out, t)
            if with_displacement:
                return out, disp
            return out

        return fn

    def forward(self, batch: VideoBatch, step: int = 0, generator: torch.Generator | None = None) -> FlowLoss:
        """Loss of one training batch. ``step`` selects the objective when ``linear_ratio`` > 0."""
        cfg = self.config
        x, cond = batch.x, batch.cond
        anchor = anchor_latents(cond) if cfg.residual else None
        if anchor is not None:
            x = x - anchor
        n = x.shape[0]
        pad = cond.frame_mask[:, None, :, None, None].to(x.dtype)
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * pad
        linear = self.is_linear_step(step)
        r, t = self.sample_times(n, x.device, generator, step)
        if linear:
            r = t
        t_, r_ = t.to(x.dtype), r.to(x.dtype)
        tb = t_[:, None, None, None, None]
        z = (1 - tb) * x + tb * eps
        v = eps - x
        supervise_motion = cfg.displacement_weight > 0 and batch.displacement is not None
        fn = self._velocity_fn(cond, anchor, with_displacement=supervise_motion)
        weights = frame_weights(cond, cfg.observed_weight)
        parts = {"linear": torch.tensor(float(linear))}

        def split(out):  # (u, displacement or None)
            return out if supervise_motion else (out, None)

        if cfg.mf_weight == 0:  # reconstruction regulariser alone: no target, no JVP
            u, disp = split(fn(z, r_, t_))
            loss = u.new_zeros(())
        else:
            if bool((r < t).any()):
                dz = self.jvp_tangent(lambda *a: split(fn(*a))[0], z, t_, v)
                # du/dt along (dz, dr, dt) = (dz, 0, 1); the fused SDPA kernels have no forward-mode derivative.
                with sdpa_kernel([SDPBackend.MATH]):
                    out, tangent = torch.func.jvp(fn, (z, r_, t_), (dz, torch.zeros_like(r_), torch.ones_like(t_)))
                (u, disp), (dudt, _) = split(out), split(tangent)
                target = (v - (t_ - r_)[:, None, None, None, None] * dudt).detach()
            else:
                u, disp = split(fn(z, r_, t_))
                target = v
            mse = per_video_mse(u, target, weights)  # (B,)
            adaptive = (mse.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
            loss_mf = (adaptive * mse).mean()
            loss = cfg.mf_weight * loss_mf
            parts.update(mse=mse.detach().mean(), mf=loss_mf.detach())
        if cfg.recon_weight > 0:
            x_hat = z - tb * u
            rec = per_video_mse(x_hat, x, weights)
            if cfg.recon_on == "all":
                sel = torch.ones_like(rec)
            elif cfg.recon_on == "one_step":
                sel = ((r == 0) & (t == 1)).to(rec.dtype)
            else:
                sel = (r == t).to(rec.dtype)
            loss_rec = (rec * sel).sum() / sel.sum().clamp_min(1.0)
            loss = loss + cfg.recon_weight * loss_rec
            parts["recon"] = loss_rec.detach()
        if supervise_motion:
            loss_disp = displacement_error(disp, batch)
            loss = loss + cfg.displacement_weight * loss_disp
            parts["disp"] = loss_disp.detach()
        return FlowLoss(loss, parts)

    def jvp_tangent(self, fn, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The z-component (B, C, T, h, w) of the JVP tangent: the conditional velocity ``v`` ("conditional"), or the
        network's instantaneous velocity ``fn(z, t, t)`` without gradient ("predicted", Improved Mean Flows)."""
        if self.config.tangent == "conditional":
            return v
        with torch.no_grad():
            return fn(z, t, t)

    @torch.no_grad()
    def sample_motion(self, cond: Conditioning, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One-step sample and its motion: ``(latents (B, C, T, h, w), displacement (B, 2, T, h, w))``.

        The displacement field (latent pixels, channel 0: x, 1: y, ``motion_gain`` applied) is the one the
        "warp" prediction moved the observed frames' anchor by: latent frame k is the anchor at ``(i + d_y,
        j + d_x)`` plus the residual. Renderers use it to move the observed frames at any resolution.
        """
        if self.config.prediction != "warp":
            raise ValueError('Only a generator with prediction="warp" returns a displacement field.')
        z, pad = initial_noise(cond, noise, generator)
        anchor = anchor_latents(cond)
        n = z.shape[0]
        velocity = self._velocity_fn(cond, anchor, self.config.motion_gain, with_displacement=True)
        u, disp = velocity(z, z.new_zeros(n), z.new_ones(n))
        return (z - u + anchor) * pad, disp * pad

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        steps: int = 1,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents (B, C, T, h, w) from noise in ``steps`` MeanFlow steps (1: x = eps - u(eps, 0, 1)); zero at padding.

        ``noise`` (B, C, T, h, w) overrides drawing eps from ``generator``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}.")
        z, pad = initial_noise(cond, noise, generator)
        times = torch.linspace(1.0, 0.0, steps + 1, device=z.device, dtype=z.dtype)
        n = z.shape[0]
        anchor = anchor_latents(cond) if self.config.residual else None
        velocity = self._velocity_fn(cond, anchor, self.config.motion_gain)
        for i in range(steps):
            t, r = times[i].expand(n), times[i + 1].expand(n)
            u = velocity(z, r, t)
            z = z - (times[i] - times[i + 1]) * u
        if anchor is not None:
            z = z + anchor
        return z * pad
