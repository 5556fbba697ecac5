"""Training EF probes on frozen EchoJEPA tokens, and the ultrasound perturbations of the robustness table.

* :func:`fit_probe` trains an :class:`~echolvfm_core.models.jepa.AttentiveProbe` or
  :class:`~echolvfm_core.models.jepa.LinearProbe` (tokens -> EF in %) on tokens computed once by
  :func:`echolvfm_core.estimators.jepa.encode_clips`.
* :data:`PERTURBATIONS` apply one ultrasound change each (gain, depth attenuation, speckle, sector dropout:
  :func:`~echolvfm_core.training.augment.augment_batch` with everything else off); :func:`perturbation` turns one
  into a seeded ``transform`` for ``encode_clips``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment_batch

__all__ = ["PERTURBATIONS", "perturbation", "fit_probe"]

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


def perturbation(cfg: AugmentConfig, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform of clip batches float (B, T, S, S) in [0, 1] that applies ``cfg``, drawing from one generator
    seeded with ``seed`` (so the same batches in the same order get the same changes)."""
    g = torch.Generator().manual_seed(seed)

    def apply(clips: torch.Tensor) -> torch.Tensor:
        return augment_batch(clips, None, g, cfg)[0]

    return apply


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
