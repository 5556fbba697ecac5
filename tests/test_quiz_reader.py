"""The automatic reader (cross-validated C2ST over a study's cases): near chance on two sets of the same speckle,
near 1 against blurred speckle; folds grouped by source when each arm has two sources."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from echolvfm_core.quiz_reader import automatic_reader


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Two torch threads on two shared cores run the small classifier ten times slower than one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def speckle_cases(n: int, seed: int, blur: bool = False) -> list[np.ndarray]:
    """``n`` cases of 4 frames of 64 x 64 speckle (uint8, as served); ``blur``: Gaussian-blurred speckle."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        frames = rng.gamma(2.0, 0.2, size=(4, 64, 64)).astype(np.float32)
        if blur:
            frames = np.stack([cv2.GaussianBlur(f, (7, 7), 2.0) for f in frames])
        out.append(np.clip(frames / 1.2 * 255, 1, 255).astype(np.uint8))
    return out


def test_same_speckle_is_near_chance_and_blurred_is_found():
    groups = [f"beat {i % 4}" for i in range(12)]
    same = automatic_reader(speckle_cases(12, 0), speckle_cases(12, 1), groups, groups, seed=0, steps=150)
    blurred = automatic_reader(speckle_cases(12, 2), speckle_cases(12, 3, blur=True), groups, groups, seed=0,
                               steps=150)
    assert same.grouped and same.folds == 4 and same.n == 24
    assert same.accuracy <= 0.75 and same.ci95[0] < 0.5 < same.ci95[1]
    assert blurred.accuracy >= 0.9 and blurred.ci95[0] > 0.5
    d = blurred.to_dict()
    assert d["correct"] == blurred.correct and d["ci95"][0] <= d["accuracy"] <= d["ci95"][1]


def test_one_source_per_arm_folds_over_cases_and_says_so():
    r = automatic_reader(speckle_cases(4, 4), speckle_cases(4, 5), ["a"] * 4, ["b"] * 4, seed=0, steps=20)
    assert not r.grouped and r.folds == 4 and r.n == 8
    with pytest.raises(ValueError, match="at least two real and two synthetic"):
        automatic_reader(speckle_cases(1, 6), speckle_cases(4, 7), ["a"], ["b"] * 4)
    small = [c[:, :24, :24] for c in speckle_cases(2, 8)]
    with pytest.raises(ValueError, match="needs 32 x 32 patches inside the fan of every case"):
        automatic_reader(small, small, ["a", "b"], ["c", "d"])
