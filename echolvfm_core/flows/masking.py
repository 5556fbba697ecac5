"""The training distribution of observed-frame sets and clip lengths (seeded), for masked video flows.

Patterns (EchoLVFM: train over many observation sets so that one model serves all of them at inference):

    single       one frame at a random phase
    ed           the end-diastolic frame only
    subset       a random subset of 2-8 frames
    first_k      the first k frames (1-8): continuation
    every_other  every second frame (offset 0 or 1): temporal upsampling

Lengths are drawn uniformly from ``min_frames`` to ``min(max_frames, available)``; clips are padded to
``max_frames`` with a not-padding mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ObservationConfig", "ObservationSampler", "PATTERNS"]

PATTERNS = ("single", "ed", "subset", "first_k", "every_other")


@dataclass(frozen=True)
class ObservationConfig:
    """Pattern probabilities (in :data:`PATTERNS` order, normalised) and the clip length range in frames."""

    probs: tuple[float, ...] = (0.35, 0.25, 0.15, 0.15, 0.10)
    min_frames: int = 10
    max_frames: int = 32
    max_observed: int = 8

    def __post_init__(self) -> None:
        if len(self.probs) != len(PATTERNS) or min(self.probs) < 0 or sum(self.probs) <= 0:
            raise ValueError(f"probs needs {len(PATTERNS)} non-negative weights (for {PATTERNS}); got {self.probs}.")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"Need 2 <= min_frames <= max_frames; got {self.min_frames}, {self.max_frames}.")
        if self.max_observed < 2:
            raise ValueError("max_observed must be >= 2.")


class ObservationSampler:
    """Seeded sampler of clip lengths and observed-frame masks.

    ``sampler = ObservationSampler(ObservationConfig(), seed=0)``;
    ``length = sampler.length(available)``; ``observed, pattern = sampler.observed(length, ed_index=0)``
    -> bool (max_frames,) with True only at frames < length (``pattern()`` draws a pattern name on its own, for
    callers that choose the clip window by pattern).
    """

    def __init__(self, config: ObservationConfig | None = None, seed: int = 0):
        self.config = config or ObservationConfig()
        self.generator = torch.Generator().manual_seed(seed)
        self._probs = torch.tensor(self.config.probs, dtype=torch.float64)

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (inclusive)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def length(self, available: int) -> int:
        """A clip length in [min_frames, min(max_frames, available)] (``available``: frames of the source loop)."""
        c = self.config
        if available < c.min_frames:
            raise ValueError(f"A loop of {available} frames is shorter than min_frames={c.min_frames}.")
        return self._randint(c.min_frames, min(c.max_frames, available))

    def pattern(self) -> str:
        """A pattern name drawn with the configured probabilities."""
        return PATTERNS[int(torch.multinomial(self._probs, 1, generator=self.generator))]

    def observed(self, length: int, ed_index: int = 0, pattern: str | None = None) -> tuple[torch.Tensor, str]:
        """(mask bool (max_frames,), pattern name) for a clip of ``length`` frames whose ED frame is ``ed_index``."""
        c = self.config
        if not 2 <= length <= c.max_frames:
            raise ValueError(f"length must be in [2, {c.max_frames}]; got {length}.")
        if not 0 <= ed_index < length:
            raise ValueError(f"ed_index {ed_index} is outside a clip of {length} frames.")
        if pattern is None:
            pattern = self.pattern()
        elif pattern not in PATTERNS:
            raise ValueError(f"Unknown pattern {pattern!r}; choose one of {PATTERNS}.")
        mask = torch.zeros(c.max_frames, dtype=torch.bool)
        if pattern == "single":
            mask[self._randint(0, length - 1)] = True
        elif pattern == "ed":
            mask[ed_index] = True
        elif pattern == "subset":
            k = self._randint(2, min(c.max_observed, length - 1))
            mask[torch.randperm(length, generator=self.generator)[:k]] = True
        elif pattern == "first_k":
            mask[: self._randint(1, min(c.max_observed, length - 1))] = True
        else:  # every_other
            mask[self._randint(0, 1) : length : 2] = True
        return mask, pattern
