"""The automatic reader of a realism study: the classifier two-sample test (:func:`echolvfm_core.realism.c2st`) run
on the study's own served cases, cross-validated over cases, before any human reads them.

Each case gives patches of its frames inside the fan; a fold's classifier is trained on the other folds' cases and
calls each held-out case real or synthetic from the mean logit of its patches. Folds are grouped by source (the
beat a case was cut from) whenever each arm holds at least two sources, so the classifier never sees another window
of the beat it is asked about; with fewer sources the folds split cases, which can only flatter the detector
(``grouped`` is then False). The accuracy over all held-out cases comes with a 95 % Wilson interval.

    result = automatic_reader(real_frames, synthetic_frames, real_groups, synthetic_groups, seed=0)
    result.accuracy, result.ci95
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["AutomaticReader", "automatic_reader", "DEFAULT_MAX_DETECTABILITY"]

#: ``echolvfm quiz create --max-detectability`` default: a study whose automatic reader is right on more than 75 %
#: of the cases is refused (the classifier separates its synthetic cases; human readers would only measure that).
DEFAULT_MAX_DETECTABILITY = 0.75
#: Patches per case and folds at most.
_PATCHES, _FOLDS = 32, 4


@dataclass(frozen=True)
class AutomaticReader:
    """Cross-validated C2ST over a study's cases: ``correct`` of ``n`` held-out cases, its 95 % Wilson interval."""

    accuracy: float
    ci95: tuple[float, float]
    correct: int
    n: int
    folds: int
    grouped: bool
    steps: int

    def to_dict(self) -> dict:
        return {"method": "C2ST (patch CNN, cross-validated over cases)", "accuracy": round(self.accuracy, 4),
                "ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)], "correct": self.correct, "n": self.n,
                "folds": self.folds, "grouped_by_source": self.grouped, "steps": self.steps}


def _folds(groups: Sequence[str], k: int, rng: np.random.Generator) -> list[int]:
    """Fold of each item: its group's, with the groups dealt to folds in a random order."""
    names = sorted(set(groups))
    order = [names[i] for i in rng.permutation(len(names))]
    fold_of = {g: i % k for i, g in enumerate(order)}
    return [fold_of[g] for g in groups]


def automatic_reader(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray], real_groups: Sequence[str],
                     synthetic_groups: Sequence[str], seed: int = 0, steps: int = 300) -> AutomaticReader:
    """Cross-validated classifier two-sample test over cases.

    Args:
        real, synthetic: each case's frames as served, uint8 or float (T, H, W); 0 outside the fan.
        real_groups, synthetic_groups: source of each case (cases of one source stay in one fold when possible).
        seed: folds, patches and the classifiers' training.
        steps: training steps of each fold's classifier.
    """
    from scipy import ndimage as ndi
    from scipy.stats import binomtest

    from .realism import PATCH, c2st, sample_patches

    if len(real) != len(real_groups) or len(synthetic) != len(synthetic_groups):
        raise ValueError("automatic_reader needs one group per case.")
    if min(len(real), len(synthetic)) < 2:
        raise ValueError("automatic_reader needs at least two real and two synthetic cases.")
    rng = np.random.default_rng(seed)

    def patches(frames):
        f = np.asarray(frames, dtype=np.float32)
        f = f / 255.0 if f.max() > 1.0 else f
        fan = ndi.binary_fill_holes(f.max(0) > 8 / 255)  # the fan, with its dark cavities
        try:
            return sample_patches(f, fan, _PATCHES, rng)
        except ValueError:
            raise ValueError(f"The automatic reader needs {PATCH} x {PATCH} patches inside the fan of every case, "
                             f"and a case of {f.shape[2]} x {f.shape[1]} pixels has none; show larger videos."
                             ) from None

    xr, xs = [patches(f) for f in real], [patches(f) for f in synthetic]
    n_groups = min(len(set(real_groups)), len(set(synthetic_groups)))
    grouped = n_groups >= 2
    k = min(_FOLDS, n_groups) if grouped else min(_FOLDS, len(real), len(synthetic))
    if grouped:
        fr, fs = _folds(real_groups, k, rng), _folds(synthetic_groups, k, rng)
    else:
        fr = list(rng.permutation(np.arange(len(real)) % k))
        fs = list(rng.permutation(np.arange(len(synthetic)) % k))
    def split(items, folds, fold, test):
        return [x for x, f in zip(items, folds) if (f == fold) == test]

    correct = n = 0
    for fold in range(k):  # every fold holds cases of both arms: k <= the groups (or cases) of each arm
        res = c2st(split(xr, fr, fold, False), split(xs, fs, fold, False), split(xr, fr, fold, True),
                   split(xs, fs, fold, True), steps=steps, seed=seed + fold)
        correct += round(res.accuracy * res.n_test)
        n += res.n_test
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return AutomaticReader(correct / n, (float(ci.low), float(ci.high)), correct, n, k, grouped, steps)
