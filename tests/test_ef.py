"""EF maths: known answers on ellipses, ED/ES detection, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from echolvfm_core import ef


def ellipse(a: float, b: float, size: int = 220, theta: float = 0.0, centre=(110.3, 109.7)) -> np.ndarray:
    """LV-only label map: an ellipse with semi-axes a (long) and b, long axis tilted by theta from vertical."""
    r, c = np.mgrid[:size, :size].astype(float)
    dr, dc = r - centre[0], c - centre[1]
    along = dr * np.cos(theta) + dc * np.sin(theta)
    across = -dr * np.sin(theta) + dc * np.cos(theta)
    return ((along / a) ** 2 + (across / b) ** 2 <= 1).astype(np.uint8)


def half_ellipse_with_atrium(a: float, b: float, myo: float = 0.0, atrium: bool = True, size: int = 200) -> np.ndarray:
    """Apex at the top, flat base at row 140 touching a left atrium below (or only the open myocardium)."""
    r, c = np.mgrid[:size, :size].astype(float)
    base, col = 140.0, 100.2
    lab = np.zeros((size, size), np.uint8)
    inside = ((r - base) / a) ** 2 + ((c - col) / b) ** 2 <= 1
    if myo:
        outer = ((r - base) / (a + myo)) ** 2 + ((c - col) / (b + myo)) ** 2 <= 1
        lab[outer & (r <= base)] = 2
    lab[inside & (r <= base)] = 1
    if atrium:
        lab[(r > base) & (r < base + 30) & (np.abs(c - col) < b)] = 3
    return lab


@pytest.mark.parametrize("a,b,theta", [(40.5, 20.5, 0.0), (60.5, 25.5, 0.0), (50.5, 18.5, 0.5), (35.5, 14.5, 1.2)])
def test_ellipse_area_length_and_simpson(a, b, theta):
    lab = ellipse(a, b, theta=theta)
    geo = ef.lv_geometry(lab)[0]
    assert geo.annulus_from == "axis"
    assert geo.area == pytest.approx(np.pi * a * b, rel=0.01)
    assert geo.length == pytest.approx(2 * a, abs=1.5)
    truth = 4.0 / 3.0 * np.pi * a * b * b  # 8 (pi a b)^2 / (3 pi 2a)
    assert ef.area_length_volume(lab)[0] == pytest.approx(truth, rel=0.03)
    assert ef.simpson_volume(lab)[0] == pytest.approx(truth, rel=0.02)


def test_half_ellipse_uses_the_atrium_for_the_annulus():
    a, b = 60.5, 22.5
    lab = half_ellipse_with_atrium(a, b, myo=6)
    geo = ef.lv_geometry(lab)[0]
    assert geo.annulus_from == "la"
    assert geo.length == pytest.approx(a, abs=1.5)
    assert geo.base[0] == pytest.approx(140, abs=1)
    assert geo.apex[0] == pytest.approx(140 - a, abs=1)
    half_volume = 2.0 / 3.0 * np.pi * a * b * b
    assert ef.area_length_volume(lab)[0] == pytest.approx(half_volume, rel=0.03)
    assert ef.simpson_volume(lab)[0] == pytest.approx(half_volume, rel=0.03)


def test_open_myocardium_marks_the_annulus_without_atrium():
    lab = half_ellipse_with_atrium(50.5, 20.5, myo=6, atrium=False)
    geo = ef.lv_geometry(lab)[0]
    assert geo.annulus_from == "myo"
    assert geo.length == pytest.approx(50.5, abs=1.5)


def test_spacing_gives_millilitres():
    lab = ellipse(40.5, 20.5)
    px = ef.lv_volumes(lab)[0]
    ml = ef.lv_volumes(lab, spacing_mm=(0.5, 0.5))[0]
    assert ml == pytest.approx(px * 0.125 / 1000.0, rel=1e-9)
    res = ef.ef_from_pair(lab, lab, spacing_mm=(0.3, 0.3))
    assert res.unit == "ml" and res.ef == pytest.approx(0.0)


@pytest.mark.parametrize("method", ef.METHODS)
def test_ef_of_two_ellipses(method):
    a0, b0, a1, b1 = 60.5, 24.5, 52.5, 17.5
    truth = 100 * (1 - (a1 * b1 * b1) / (a0 * b0 * b0))
    res = ef.ef_from_pair(ellipse(a0, b0), ellipse(a1, b1), method=method)
    assert res.ef == pytest.approx(truth, abs=1.5)
    assert res.method == method and res.unit == "px^3"


def test_ef_from_a_loop_of_shrinking_ellipses():
    t = np.arange(30)
    s = 0.5 - 0.5 * np.cos(2 * np.pi * t / 30)  # ED at 0, ES at 15
    loop = np.stack([ellipse(60.5 - 8 * x, 24.5 - 7 * x) for x in s])
    res = ef.ef_from_loop(loop)
    truth = 100 * (1 - (52.5 * 17.5**2) / (60.5 * 24.5**2))
    assert res.ed_index == 0 and res.es_index == 15
    assert res.ef == pytest.approx(truth, abs=1.5)


def test_detect_ed_es_over_several_noisy_cycles():
    rng = np.random.default_rng(0)
    t = np.arange(100)
    area = 1000 + 200 * np.cos(2 * np.pi * t / 25) + rng.normal(0, 8, t.size)
    phases = ef.detect_ed_es(area)
    assert len(phases.ed) >= 4 and len(phases.es) == 4
    for e in phases.ed:
        assert min(abs(e - k * 25) for k in range(5)) <= 2
    for s in phases.es:
        assert min(abs(s - (k * 25 + 12.5)) for k in range(4)) <= 2.5
    assert ef.detect_ed_es(np.full(10, 5.0)) == ef.CyclePhases((), ())


def test_ejection_fraction_formula():
    assert ef.ejection_fraction(120.0, 48.0) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="positive"):
        ef.ejection_fraction(0.0, 10.0)


def test_clear_errors_for_bad_label_maps():
    lab = ellipse(40.5, 20.5)
    with pytest.raises(ValueError, match="no LV cavity"):
        ef.lv_volumes(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="one size"):
        ef.ef_from_pair(lab, lab[:100])
    with pytest.raises(ValueError, match="integer labels"):
        ef.lv_volumes(lab.astype(np.float32))
    with pytest.raises(ValueError, match="label map"):
        ef.lv_volumes(np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="method"):
        ef.lv_volumes(lab, method="teichholz")
    with pytest.raises(ValueError, match="spacing"):
        ef.lv_volumes(lab, spacing_mm=(0.0, 1.0))
    with pytest.raises(ValueError, match="at least 2"):
        ef.ef_from_loop(lab)
