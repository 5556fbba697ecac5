"""Tests for echolvfm_core.preprocess: sector detection, crop/blank/resize, time resampling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from echolvfm_core.echo import ClinicalInfo, Echo, EchoLoadError
from echolvfm_core.preprocess import CropGeometry, find_sector, preprocess, resample_time

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
CAMUS = Path(os.environ.get("ECHOLVFM_CAMUS",
                           Path(__file__).resolve().parents[1].parent / "shared/data/camus_4ch_edes"))


def fan_mask(h: int, w: int, apex=(12, 160), radius=190, half_angle_deg=40.0) -> np.ndarray:
    """bool (h, w) sector with its apex at ``apex`` (y, x) opening downwards."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    dy, dx = yy - apex[0], xx - apex[1]
    r = np.hypot(dy, dx)
    angle = np.degrees(np.arctan2(np.abs(dx), dy))
    return (r <= radius) & (dy > 0) & (angle <= half_angle_deg)


def scanner_loop(t: int = 12, h: int = 240, w: int = 320, noise: float = 0.0, seed: int = 0, overlays: bool = True):
    """A scanner-like cine: speckled fan with a dark cavity, burned-in text blocks in the top corners, a static
    ECG line and a moving sweep cursor below the fan, a depth ruler on its right.

    Returns frames float32 (t, h, w), the fan bool (h, w) and the overlay pixels bool (h, w)."""
    rng = np.random.default_rng(seed)
    fan = fan_mask(h, w)
    yy, xx = np.mgrid[:h, :w]
    cavity = ((yy - 110) / 45.0) ** 2 + ((xx - 160) / 25.0) ** 2 < 1
    tissue = np.where(cavity, 0.08, 0.45).astype(np.float32)
    frames = rng.rayleigh(1.0, size=(t, h, w)).astype(np.float32) * tissue / 1.25 * fan
    overlay = np.zeros((t, h, w), np.float32)
    for y0, x0 in [(4, 4), (16, 4), (4, 262), (16, 262), (28, 262)]:  # text, static
        for c in range(6):
            overlay[:, y0 : y0 + 8, x0 + 9 * c : x0 + 9 * c + 6] = 0.9 * (rng.random((8, 6)) > 0.4)
    xs = np.arange(20, 300)
    overlay[:, (224 + 6 * np.sin(xs / 9.0)).astype(int), xs] = 0.8  # ECG line, static, thin
    for i in range(t):  # sweep cursor moving along the ECG line
        x = 20 + (i * 23) % 280
        overlay[i, 214:236, x : x + 2] = 1.0
    overlay[:, 40:200:20, 312:314] = 0.7  # depth ruler dots
    if overlays:
        frames = np.where(overlay > 0, overlay, frames)
    if noise:
        frames += rng.normal(0.0, noise, size=frames.shape).astype(np.float32)
    return np.clip(frames, 0.0, 1.0).astype(np.float32), fan, overlay.max(axis=0) > 0


def test_find_sector_on_synthetic_scanner_loop():
    frames, fan, overlay = scanner_loop()
    sector = find_sector(frames)
    assert sector.method == "temporal"
    assert not (sector.mask & overlay).any()
    iou = (sector.mask & fan).sum() / (sector.mask | fan).sum()
    assert iou > 0.9
    assert abs(sector.apex[1] - 160) < 6 and abs(sector.apex[0] - 12) < 12


def test_find_sector_tolerates_compression_noise():
    frames, fan, _ = scanner_loop(noise=0.01, seed=1)
    sector = find_sector(frames)
    iou = (sector.mask & fan).sum() / (sector.mask | fan).sum()
    assert iou > 0.85


def test_preprocess_blanks_text_and_ecg_on_synthetic_loop():
    frames, fan, overlay = scanner_loop()
    clean, _, _ = scanner_loop(overlays=False)
    echo = Echo(frames=frames, fps=25.0, spacing_mm=(0.5, 0.5), source_format="synthetic")
    out = preprocess(echo, size=64, display_size=128)
    assert out.echo.frames.shape == (12, 64, 64) and out.display.frames.shape == (12, 128, 128)
    assert np.all(out.echo.frames[:, ~out.mask] == 0)
    # no text, ECG or ruler pixel is inside the sector: the result equals that of the loop without overlays
    assert not (out.sector.mask & overlay).any()
    ref = preprocess(echo.replace(frames=clean), size=64, display_size=128, sector=out.sector)
    np.testing.assert_array_equal(out.echo.frames, ref.echo.frames)
    np.testing.assert_array_equal(out.display.frames, ref.display.frames)
    # apex at the top centre, fan spanning the width
    cols = np.nonzero(out.mask.any(axis=0))[0]
    assert cols[0] <= 2 and cols[-1] >= 61
    top = np.nonzero(out.mask[1])[0]
    assert abs(top.mean() - 31.5) < 2


def test_narrow_fan_is_padded_evenly_left_and_right():
    fan = fan_mask(240, 320, apex=(10, 120), radius=200, half_angle_deg=18)
    frames = (np.random.default_rng(3).rayleigh(0.3, size=(6, 240, 320)) * fan).clip(0, 1).astype(np.float32)
    out = preprocess(Echo(frames=frames, fps=30.0), size=64)
    assert abs(out.sector.apex[1] - 120) < 3 and abs(out.sector.apex[0] - 10) < 8  # y is sensitive for narrow fans
    rows = np.nonzero(out.mask.any(axis=1))[0]
    cols = np.nonzero(out.mask.any(axis=0))[0]
    assert rows[0] <= 1 and rows[-1] >= 62  # fan spans the height
    assert abs((cols[0] + cols[-1]) / 2 - 31.5) < 1.5 and cols[0] > 8  # centred, margins both sides
    assert abs(np.nonzero(out.mask[2])[0].mean() - 31.5) < 1.5


def test_find_sector_on_still_with_text():
    frames, fan, overlay = scanner_loop(t=1)
    sector = find_sector(frames[0])
    assert sector.method == "intensity"
    assert not (sector.mask & overlay).any()
    iou = (sector.mask & fan).sum() / (sector.mask | fan).sum()
    assert iou > 0.85


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda rng: np.full((1, 120, 160), 0.5, np.float32), id="uniform"),
        pytest.param(lambda rng: np.zeros((4, 120, 160), np.float32), id="black-loop"),
        pytest.param(lambda rng: rng.random((1, 120, 160, 3), dtype=np.float32) @ LUMA, id="colour-noise"),
        pytest.param(lambda rng: rng.random((8, 120, 160, 3), dtype=np.float32) @ LUMA, id="colour-noise-loop"),
        pytest.param(lambda rng: fan_mask(240, 320, radius=60, half_angle_deg=30)[None] * np.float32(0.6),
                     id="tiny-fan"),
        pytest.param(lambda rng: np.tile(np.linspace(0, 1, 160, dtype=np.float32), (1, 120, 1)), id="gradient"),
    ],
)
def test_no_sector_raises(make):
    frames = make(np.random.default_rng(0)).astype(np.float32)
    with pytest.raises(EchoLoadError, match="No ultrasound sector was found"):
        find_sector(frames)
    with pytest.raises(EchoLoadError):
        preprocess(Echo(frames=frames, fps=30.0))


def test_grey_levels_must_be_in_unit_range():
    frames, _, _ = scanner_loop(t=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        find_sector(frames * 255)


def test_photograph_raises():
    skdata = pytest.importorskip("skimage.data")
    photo = skdata.astronaut().astype(np.float32) / 255.0 @ LUMA
    with pytest.raises(EchoLoadError, match="No ultrasound sector was found"):
        find_sector(photo)


def test_geometry_round_trip():
    g = CropGeometry(source_shape=(240, 320), y0=18, x0=-4, side=300)
    pts = np.array([[18.0, -4.0], [100.0, 150.0], [317.0, 295.0]])
    np.testing.assert_allclose(g.to_source(g.to_grid(pts, 112), 112), pts)
    np.testing.assert_allclose(g.to_grid([[18 - 0.5, -4 - 0.5]], 112), [[-0.5, -0.5]])


def test_given_sector_must_match_size():
    frames, _, _ = scanner_loop(t=3)
    sector = find_sector(frames)
    with pytest.raises(ValueError, match="sector's mask"):
        preprocess(Echo(frames=frames[:, :200]), sector=sector)


# ------------------------------------------------------------------------------------------- the pydicom sample


@pytest.fixture(scope="module")
def pydicom_sample() -> Echo:
    examples = pytest.importorskip("pydicom.examples")
    try:
        ds = examples.ybr_color
        rgb = ds.pixel_array  # pydicom 3 converts YBR_FULL_422 to RGB
    except Exception as exc:  # noqa: BLE001 - no JPEG decoder installed
        pytest.skip(f"pydicom example ybr_color cannot be decoded here: {exc}")
    assert ds.PhotometricInterpretation.startswith("YBR")
    grey = (rgb.astype(np.float32) / 255.0) @ LUMA
    return Echo(frames=grey.astype(np.float32), fps=1000.0 / float(ds.FrameTime), spacing_mm=(0.5, 0.5),
                source_format="dicom")


def test_pydicom_sample_clean_sector(pydicom_sample):
    echo = pydicom_sample
    out = preprocess(echo)
    assert out.sector.method == "temporal"
    assert 0.3 < out.sector.fraction < 0.8
    assert out.echo.frames.shape == (30, 112, 112) and out.echo.frames.dtype == np.float32
    assert out.display.frames.shape == (30, 384, 384)
    assert out.mask.shape == (112, 112) and 0.3 < out.mask.mean() < 0.8
    assert np.all(out.echo.frames[:, ~out.mask] == 0)
    assert out.echo.source_format == "dicom" and out.echo.fps == pytest.approx(30.0, abs=0.01)
    # spacing scaled by the crop side over the grid size
    factor = out.geometry.side / 112
    assert out.echo.spacing_mm == pytest.approx((0.5 * factor, 0.5 * factor))
    assert out.display.spacing_mm == pytest.approx((0.5 * out.geometry.side / 384,) * 2)
    # the text sits in the original's top corners and the bottom bar: bright there before, never in the mask after
    f = echo.frames
    assert (f[:, :40, :60] > 0.3).mean() > 0.02 and (f[:, 20:200, 285:] > 0.3).mean() > 0.01
    assert not out.sector.mask[:40, :60].any() and not out.sector.mask[:40, 285:].any()
    assert not out.sector.mask[220:].any()
    d = out.display.frames
    assert (d[:, :60, :60] > 0.3).mean() == 0 and (d[:, :60, -60:] > 0.3).mean() == 0
    # apex at the top centre, fan spanning the width
    top_rows = np.nonzero(out.mask.any(axis=1))[0]
    assert top_rows[0] <= 1
    cols = np.nonzero(out.mask.any(axis=0))[0]
    assert cols[0] <= 8 and cols[-1] >= 103
    assert abs(np.nonzero(out.mask[top_rows[0] + 2])[0].mean() - 55.5) < 6


def test_pydicom_sample_with_fps(pydicom_sample):
    out = preprocess(pydicom_sample, fps=50.0)
    assert out.echo.frames.shape == (50, 112, 112) and out.echo.fps == 50.0
    assert out.display.frames.shape[0] == 50


# ------------------------------------------------------------------------------------------------------- CAMUS


def _camus_pair(patient: str):
    if not CAMUS.is_dir():
        pytest.skip(f"CAMUS data not found at {CAMUS} (set ECHOLVFM_CAMUS)")
    nib = pytest.importorskip("nibabel")

    def read(name):
        a = np.asarray(nib.load(CAMUS / patient / f"{patient}_4CH_{name}.nii.gz").dataobj)
        return np.ascontiguousarray(np.fliplr(np.rot90(a, -1)))

    return [(read(p).astype(np.float32) / 255.0, read(p + "_gt").astype(np.uint8)) for p in ("ED", "ES")]


@pytest.mark.camus
@pytest.mark.parametrize("patient", ["patient0001", "patient0100"])
def test_camus_ed_es_same_crop(patient):
    (ed, led), (es, les) = _camus_pair(patient)
    sector = find_sector(np.stack([ed, es]))
    assert 0.4 < sector.fraction < 0.8
    outs = []
    for img, lab in ((ed, led), (es, les)):
        echo = Echo(frames=img[None], spacing_mm=(0.308, 0.308), source_format="nifti", labels=lab[None],
                    labelled=(0,), info=ClinicalInfo(view="4CH"))
        outs.append(preprocess(echo, sector=sector))
    a, b = outs
    assert a.geometry == b.geometry and np.array_equal(a.mask, b.mask)
    for out, (_, lab) in zip(outs, ((ed, led), (es, les))):
        assert out.echo.frames.shape == (1, 112, 112) and out.echo.labels.shape == (1, 112, 112)
        assert out.echo.source_format == "nifti" and out.echo.labelled == (0,) and out.echo.info.view == "4CH"
        assert set(np.unique(out.echo.labels)) == {0, 1, 2, 3}
        # labels stay inside the fan and their areas scale with the resize
        assert (out.echo.labels[0][~out.mask] > 0).mean() < 0.01
        area_mm2 = (lab == 1).sum() * 0.308**2
        grid_area_mm2 = (out.echo.labels[0] == 1).sum() * out.echo.spacing_mm[0] * out.echo.spacing_mm[1]
        assert grid_area_mm2 == pytest.approx(area_mm2, rel=0.05)
        # labels mapped back land where they were
        back = out.geometry.labels_to_source(out.display.labels)[0]
        inter = ((back == 1) & (lab == 1)).sum()
        assert 2 * inter / ((back == 1).sum() + (lab == 1).sum()) > 0.97
    # the fan fills the square's width with its apex at the top centre
    cols = np.nonzero(a.mask.any(axis=0))[0]
    assert cols[0] <= 2 and cols[-1] >= 109
    assert a.mask[0].any() or a.mask[1].any()
    assert abs(np.nonzero(a.mask[3])[0].mean() - 55.5) < 3


@pytest.mark.camus
def test_camus_single_still_uses_intensity():
    (ed, _), _ = _camus_pair("patient0002")
    sector = find_sector(ed)
    assert sector.method == "intensity" and 0.4 < sector.fraction < 0.8
    assert sector.bbox[0] == 0 and sector.bbox[2] <= 2 and sector.bbox[3] >= ed.shape[1] - 2


# -------------------------------------------------------------------------------------------------------- time


def _ramp_echo(t=30, fps=30.0, labelled=(0, 12), ed=0, es=12):
    frames = np.broadcast_to(np.arange(t, dtype=np.float32)[:, None, None] / t, (t, 4, 4)).copy()
    labels = np.zeros((t, 4, 4), np.uint8)
    for i in labelled:
        labels[i] = 1 + i % 3
    return Echo(frames=frames, fps=fps, labels=labels, labelled=tuple(labelled),
                info=ClinicalInfo(ed_index=ed, es_index=es, ef=55.0))


def test_resample_time_up():
    echo = _ramp_echo()
    out = resample_time(echo, 50.0)
    assert out.n_frames == 50 and out.fps == 50.0
    # linear interpolation: new frame k shows time k/50 s, i.e. source position 0.6 k (held at the last frame)
    expected = np.minimum(np.arange(50) * 0.6, 29) / 30
    np.testing.assert_allclose(out.frames[:, 0, 0], expected, atol=1e-6)
    assert out.labelled == (0, 20) and out.info.ed_index == 0 and out.info.es_index == 20
    assert out.labels[20, 0, 0] == echo.labels[12, 0, 0] and out.labels[0, 0, 0] == echo.labels[0, 0, 0]
    assert not out.labels[[k for k in range(50) if k not in (0, 20)]].any()
    assert out.info.ef == 55.0


def test_resample_time_down_keeps_labels_of_skipped_frames():
    out = resample_time(_ramp_echo(labelled=(0, 13), es=13), 15.0)
    assert out.n_frames == 15
    assert out.labelled == (0, 7) and out.info.es_index == 7  # 13 / 2 = 6.5 rounds half up
    assert out.labels[7, 0, 0] == 1 + 13 % 3


def test_resample_time_dense_labels_nearest():
    echo = _ramp_echo(t=10, labelled=tuple(range(10)))
    out = resample_time(echo, 50.0)
    assert out.n_frames == 17 and out.labelled == tuple(range(17))
    src = np.minimum(np.floor(np.arange(17) * 0.6 + 0.5), 9).astype(int)
    np.testing.assert_array_equal(out.labels[:, 0, 0], echo.labels[src, 0, 0])


def test_resample_time_needs_fps():
    with pytest.raises(EchoLoadError, match="no frame rate"):
        resample_time(Echo(frames=np.zeros((3, 4, 4), np.float32)), 30.0)
    with pytest.raises(ValueError, match="positive"):
        resample_time(_ramp_echo(), 0.0)


def test_normalisation_brings_dark_sample_to_common_brightness(pydicom_sample):
    from echolvfm_core.preprocess import NORMALISED_P98

    raw = preprocess(pydicom_sample, normalize=False)
    norm = preprocess(pydicom_sample)
    assert np.percentile(raw.echo.frames[:, raw.mask], 98) < 0.5  # the sample is dark as delivered
    assert np.percentile(norm.echo.frames[:, norm.mask], 98) == pytest.approx(NORMALISED_P98, abs=0.02)
    assert np.all(norm.echo.frames[:, ~norm.mask] == 0)  # a gain keeps black black
    assert np.percentile(norm.display.frames, 99.9) <= 1.0
