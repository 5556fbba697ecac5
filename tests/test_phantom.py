"""Procedural phantom: requested EF met, exact labels, determinism, clearly synthetic."""
from __future__ import annotations

import numpy as np
import pytest

from echolvfm_core.data.loops import CycleTiming
from echolvfm_core.data.phantom import (
    EF_RANGE,
    phantom_echo,
    render_phantom,
    sample_anatomy,
)
from echolvfm_core.ef import ejection_fraction, lv_volumes


@pytest.mark.parametrize("seed,ef", [(0, 12.0), (1, 35.0), (2, 58.0), (3, 78.0)])
def test_phantom_meets_requested_ef(seed, ef):
    loop = render_phantom(seed, ef, CycleTiming(12), fps=30.0)
    assert abs(loop.ef - ef) <= 2.0
    vols = lv_volumes(loop.labels)  # every frame has an LV cavity, the EF is measured on them
    assert loop.ef == pytest.approx(float(ejection_fraction(vols[0], vols[loop.es_index])))
    assert loop.es_index == CycleTiming(12).es_index
    assert vols[loop.es_index] <= 1.01 * vols.min()  # peak contraction is (up to pixel noise) the smallest volume
    assert loop.source == "phantom"


def test_phantom_frames_labels_and_determinism():
    timing = CycleTiming(10)
    a = render_phantom(5, 50.0, timing, fps=25.0, size=64)
    b = render_phantom(5, 50.0, timing, fps=25.0, size=64)
    assert a.frames.shape == a.labels.shape == (10, 64, 64)
    assert a.frames.dtype == np.uint8 and a.labels.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.labels, b.labels)
    assert set(np.unique(a.labels)) == {0, 1, 2, 3}
    assert np.all(a.frames[:, 0, 0] == 0) and np.all(a.frames[:, 0, -1] == 0)  # outside the fan
    other = render_phantom(6, 50.0, timing, fps=25.0, size=64)
    assert not np.array_equal(a.labels[0], other.labels[0])  # anatomy changes with the seed
    assert sample_anatomy(5) == a.anatomy


def test_phantom_echo_is_marked_synthetic():
    loop = render_phantom(0, 40.0, CycleTiming(10), fps=30.0, size=64)
    echo = phantom_echo(loop)
    assert echo.synthetic and echo.source_format == "phantom"
    assert echo.labelled == tuple(range(10)) and echo.info.ef == loop.ef
    assert echo.frames.max() <= 1.0


def test_phantom_rejects_bad_requests():
    with pytest.raises(ValueError, match="requested EF"):
        render_phantom(0, EF_RANGE[1] + 1, CycleTiming(10), fps=30.0)
    with pytest.raises(ValueError, match="size"):
        render_phantom(0, 50.0, CycleTiming(10), fps=30.0, size=16)
