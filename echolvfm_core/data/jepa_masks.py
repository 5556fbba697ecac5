"""Multi-block spatiotemporal masks for JEPA training, drawn by a seeded collator.

V-JEPA's masks (Bardes et al. 2024, sec. 3.2): the union of several rectangular blocks of the spatial token grid,
repeated over **all** time steps (a "tube"), so that the target cannot be read off the same place in a
neighbouring frame. Two mask families are drawn for every clip: many small blocks (short range, about 15 % of the
image each) and a few large ones (long range, about 70 % each). The masked tokens are the targets, the rest the
context. A third kind of family, :class:`TimeStepMaskConfig`, masks whole time steps instead: the context sees every
place at a few random tubelet time steps and the targets are the other time steps, so that what changes over the
cycle has to be predicted (with tubes alone, features that stay still over the cycle win; see docs/models.md).
Within a batch every sample keeps the same number of tokens (the batch minimum, a random subset of each sample's
tokens), so that the encoder and predictor run on dense tensors.

Token indices follow :class:`~echolvfm_core.models.jepa.VideoViT`: ``t * H * W + h * W + w`` on a (T, H, W) grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlockMaskConfig", "DEFAULT_MASKS", "MaskedBatch", "MultiBlockMaskCollator", "TimeStepMaskConfig"]


@dataclass(frozen=True)
class BlockMaskConfig:
    """One mask family: ``num_blocks`` rectangles, each covering ``spatial_scale`` (a range, fraction of the
    H x W grid) with height / width drawn log-uniformly in ``aspect_ratio``."""

    num_blocks: int
    spatial_scale: tuple[float, float]
    aspect_ratio: tuple[float, float] = (0.75, 1.5)


@dataclass(frozen=True)
class TimeStepMaskConfig:
    """One mask family over time: ``visible_steps`` (a range, both ends included) random tubelet time steps are
    the context, with every place; the other time steps are the targets."""

    visible_steps: tuple[int, int]


#: V-JEPA's short-range (8 x 0.15) and long-range (2 x 0.7) families.
DEFAULT_MASKS = (BlockMaskConfig(8, (0.15, 0.15)), BlockMaskConfig(2, (0.7, 0.7)))


@dataclass
class MaskedBatch:
    """A batch of clips with one (context, target) pair of token-index sets per mask family.

    Attributes:
        clips: float (B, 1, T, S, S) in [0, 1].
        context: per family, int64 (B, Kc) token indices the context encoder sees.
        targets: per family, int64 (B, Kt) token indices the predictor fills in (disjoint from the context).
    """

    clips: torch.Tensor
    context: list[torch.Tensor]
    targets: list[torch.Tensor]


class MultiBlockMaskCollator:
    """Stack clips and draw their masks: ``collator(clips, generator=None) -> MaskedBatch``.

    Args:
        grid: token grid (T, H, W), e.g. ``VideoViT.grid``.
        masks: the mask families.
        seed: seeds the collator's own generator, used when a call passes no ``generator``.
    """

    def __init__(self, grid: tuple[int, int, int],
                 masks: tuple[BlockMaskConfig | TimeStepMaskConfig, ...] = DEFAULT_MASKS, seed: int = 0):
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid must be three positive sizes (T, H, W); got {grid}.")
        if not masks:
            raise ValueError("need at least one mask family.")
        for m in masks:
            if isinstance(m, TimeStepMaskConfig):
                if not 1 <= m.visible_steps[0] <= m.visible_steps[1] < grid[0]:
                    raise ValueError(f"invalid mask family {m}: needs 1 <= visible steps < {grid[0]} time steps.")
                continue
            lo, hi = m.spatial_scale
            if m.num_blocks < 1 or not 0 < lo <= hi <= 1 or not 0 < m.aspect_ratio[0] <= m.aspect_ratio[1]:
                raise ValueError(f"invalid mask family {m}.")
        self.grid, self.masks = tuple(int(g) for g in grid), tuple(masks)
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, lo: float, hi: float, g: torch.Generator) -> float:
        return lo + (hi - lo) * float(torch.rand(1, generator=g))

    def _spatial_mask(self, family: BlockMaskConfig, g: torch.Generator) -> torch.Tensor:
        """bool (H, W): True where masked; redrawn until at least one position stays visible."""
        _, h, w = self.grid
        for _ in range(100):
            masked = torch.zeros((h, w), dtype=torch.bool)
            for _ in range(family.num_blocks):
                area = self._uniform(*family.spatial_scale, g) * h * w
                ratio = math.exp(self._uniform(*(math.log(a) for a in family.aspect_ratio), g))
                bh = min(h, max(1, round(math.sqrt(area * ratio))))
                bw = min(w, max(1, round(math.sqrt(area / ratio))))
                top = int(torch.randint(0, h - bh + 1, (1,), generator=g))
                left = int(torch.randint(0, w - bw + 1, (1,), generator=g))
                masked[top:top + bh, left:left + bw] = True
            if not bool(masked.all()):
                return masked
        raise ValueError(f"mask family {family} covers the whole {h} x {w} grid; use smaller or fewer blocks.")

    def _time_mask(self, family: TimeStepMaskConfig, g: torch.Generator) -> torch.Tensor:
        """bool (T * H * W,): True at every place of the time steps that are not among the visible ones."""
        t, h, w = self.grid
        k = int(torch.randint(family.visible_steps[0], family.visible_steps[1] + 1, (1,), generator=g))
        visible = torch.zeros(t, dtype=torch.bool)
        visible[torch.randperm(t, generator=g)[:k]] = True
        return (~visible).repeat_interleave(h * w)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Draw the masks alone: (context, targets), per family int64 (batch_size, K) token indices."""
        contexts, targets = [], []
        for family in self.masks:
            ctx, tgt = [], []
            for _ in range(batch_size):
                masked = (self._time_mask(family, generator) if isinstance(family, TimeStepMaskConfig)
                          else self._spatial_mask(family, generator).reshape(-1).repeat(self.grid[0]))  # (T * H * W,)
                ctx.append(torch.nonzero(~masked)[:, 0])
                tgt.append(torch.nonzero(masked)[:, 0])
            contexts.append(self._equal_length(ctx, generator))
            targets.append(self._equal_length(tgt, generator))
        return contexts, targets

    @staticmethod
    def _equal_length(indices: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
        """Keep a random subset of the batch-minimum size of each sample's indices (sorted) -> (B, K)."""
        k = min(len(i) for i in indices)
        return torch.stack([i[torch.randperm(len(i), generator=g)[:k]].sort().values for i in indices])

    def __call__(self, clips: list[torch.Tensor], generator: torch.Generator | None = None) -> MaskedBatch:
        """clips: each float (1, T, S, S) in [0, 1] -> a :class:`MaskedBatch`."""
        if not clips:
            raise ValueError("cannot collate an empty list of clips.")
        g = self.generator if generator is None else generator
        context, targets = self.sample(len(clips), g)
        return MaskedBatch(torch.stack(list(clips)), context, targets)
