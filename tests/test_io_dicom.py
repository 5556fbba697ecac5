"""DICOM reader: the built-in sample, every photometric interpretation, timing / spacing sources, bad inputs."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from echolvfm_core.echo import ClinicalInfo, EchoLoadError, LoadLimits
from echolvfm_core.io import load_echo, sample_echo_path
from echolvfm_core.io.dicom import read_dicom


def make_dicom(path, pixels: np.ndarray | None, *, photometric="MONOCHROME2", modality="US", frames=None,
               bits_stored=None, sop_class=UltrasoundMultiFrameImageStorage, **attrs):
    """Write a minimal DICOM file. ``pixels``: (T, H, W) or (T, H, W, 3) array (already in the stored encoding)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "SECRET-123"
    if pixels is not None:
        t, h, w = pixels.shape[:3]
        colour = pixels.ndim == 4
        ds.Rows, ds.Columns = h, w
        ds.NumberOfFrames = t if frames is None else frames
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        data = np.ascontiguousarray(pixels).tobytes()
        ds.PixelData = data + b"\x00" * (len(data) % 2)
    for key, value in attrs.items():
        setattr(ds, key, value)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def ramp(t=4, h=12, w=10) -> np.ndarray:
    """uint8 (T, H, W) with distinct values per frame / row / column."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return ((tt * 40 + yy * 7 + xx * 3) % 256).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- the sample
def test_sample_loads_as_30_frame_cine(sample_path):
    echo = load_echo(sample_path)
    assert sample_echo_path() == sample_path
    assert echo.frames.shape == (30, 240, 320) and echo.frames.dtype == np.float32
    assert 0.0 <= echo.frames.min() and echo.frames.max() <= 1.0 and echo.frames.std() > 0.05
    assert echo.fps == pytest.approx(30.0, abs=0.01)
    # Region bounds (84..595, 31..414) exceed the 320 x 240 image: clamped, still the tissue region's 0.051 cm.
    assert echo.spacing_mm == pytest.approx((0.5105, 0.5105), abs=1e-3)
    assert echo.source_format == "dicom" and echo.info == ClinicalInfo() and not echo.synthetic


def test_sample_grey_is_the_luma_channel(sample_path):
    from pydicom.pixels import pixel_array

    y = pixel_array(pydicom.dcmread(sample_path), as_rgb=False)[..., 0].astype(np.float32) / 255
    echo = load_echo(sample_path)
    assert np.abs(echo.frames - y).max() < 2.5 / 255  # YBR -> RGB -> luma rounds by a level or two


def test_sample_frame_limit_trips(sample_path):
    with pytest.raises(EchoLoadError, match="30 frames, more than the limit of 10"):
        load_echo(sample_path, limits=LoadLimits(max_frames=10))


def test_extensionless_dicom_is_detected(tmp_path, sample_path):
    target = tmp_path / "IM0001"
    target.write_bytes(sample_path.read_bytes())
    assert load_echo(target).n_frames == 30


# ------------------------------------------------------------------------------------------- photometric variants
def _rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    return convert_color_space(rgb, "RGB", "YBR_FULL")


def test_monochrome2_exact(tmp_path):
    a = ramp()
    echo = load_echo(make_dicom(tmp_path / "m2.dcm", a, FrameTime=40))
    np.testing.assert_array_equal(echo.frames, a.astype(np.float32) / 255)
    assert echo.fps == pytest.approx(25.0)


def test_monochrome1_is_inverted(tmp_path):
    a = ramp()
    echo = load_echo(make_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1"))
    np.testing.assert_allclose(echo.frames, 1.0 - a.astype(np.float32) / 255, atol=1e-6)


def test_12_bit_monochrome_scaled_by_bits_stored(tmp_path):
    a = (ramp().astype(np.uint16) * 16)  # 0..4080 of 4095
    echo = load_echo(make_dicom(tmp_path / "m16.dcm", a, bits_stored=12))
    np.testing.assert_allclose(echo.frames, a / 4095.0, atol=1e-6)


def test_rgb_and_ybr_full_to_luma(tmp_path):
    rng = np.random.default_rng(0)
    g = ramp()
    # Near-grey colour (like annotations on B-mode): small tint so the colour-photo check stays quiet.
    rgb = np.clip(g[..., None].astype(int) + rng.integers(-6, 7, size=g.shape + (3,)), 0, 255).astype(np.uint8)
    expected = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255
    e_rgb = load_echo(make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    np.testing.assert_allclose(e_rgb.frames, expected, atol=1e-5)
    e_ybr = load_echo(make_dicom(tmp_path / "ybr.dcm", _rgb_to_ybr_full(rgb), photometric="YBR_FULL"))
    np.testing.assert_allclose(e_ybr.frames, expected, atol=2.5 / 255)


def test_palette_colour(tmp_path):
    a = ramp()
    lut = (np.arange(256, dtype=np.uint16) * 257).tobytes()  # grey palette, 16-bit entries
    attrs = {}
    for c in ("Red", "Green", "Blue"):
        attrs[f"{c}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        attrs[f"{c}PaletteColorLookupTableData"] = lut
    echo = load_echo(make_dicom(tmp_path / "pal.dcm", a, photometric="PALETTE COLOR", **attrs))
    np.testing.assert_allclose(echo.frames, a / 255.0, atol=1e-5)


# ------------------------------------------------------------------------------------------- timing and spacing
@pytest.mark.parametrize(
    "attrs, fps",
    [
        ({"FrameTime": 20}, 50.0),
        ({"FrameTimeVector": [0, 25, 25, 25]}, 40.0),
        ({"CineRate": 24}, 24.0),
        ({"RecommendedDisplayFrameRate": 15}, 15.0),
        ({}, None),
    ],
)
def test_fps_sources(tmp_path, attrs, fps):
    echo = load_echo(make_dicom(tmp_path / "f.dcm", ramp(), **attrs))
    assert echo.fps == (pytest.approx(fps) if fps is not None else None)


def _region(**kw):
    r = Dataset()
    r.RegionSpatialFormat = kw.get("fmt", 1)
    r.RegionDataType = kw.get("dtype", 1)
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = kw.get("x0", 0), kw.get("y0", 0)
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = kw.get("x1", 9), kw.get("y1", 11)
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = kw.get("units", 3)
    r.PhysicalDeltaX, r.PhysicalDeltaY = kw.get("dx", 0.03), kw.get("dy", 0.04)
    return r


def test_spacing_from_tissue_region_in_cm(tmp_path):
    regions = [_region(dtype=2, dx=0.9, dy=0.9), _region(x0=2, y0=2, x1=500, y1=900, dx=0.03, dy=0.04)]
    echo = load_echo(make_dicom(tmp_path / "r.dcm", ramp(), SequenceOfUltrasoundRegions=regions))
    assert echo.spacing_mm == pytest.approx((0.4, 0.3))


def test_spacing_falls_back_on_pixel_spacing(tmp_path):
    regions = [_region(units=4)]  # seconds: a Doppler / M-mode axis, not a length
    echo = load_echo(make_dicom(tmp_path / "p.dcm", ramp(), SequenceOfUltrasoundRegions=regions,
                                PixelSpacing=[0.25, 0.2]))
    assert echo.spacing_mm == pytest.approx((0.25, 0.2))
    assert load_echo(make_dicom(tmp_path / "n.dcm", ramp())).spacing_mm is None


def test_single_frame_is_a_still(tmp_path):
    echo = load_echo(make_dicom(tmp_path / "one.dcm", ramp(t=1), FrameTime=33))
    assert echo.frames.shape == (1, 12, 10) and echo.fps is None
    with pytest.raises(EchoLoadError, match="single still frame"):
        echo.require_loop("Generation")


def test_unknown_modality_multiframe_accepted(tmp_path):
    echo = load_echo(make_dicom(tmp_path / "ot.dcm", ramp(), modality=None,
                                sop_class="1.2.840.10008.5.1.4.1.1.7.3"))  # multi-frame grey secondary capture
    assert echo.n_frames == 4


def test_patient_identifiers_never_reach_the_echo(tmp_path):
    echo = load_echo(make_dicom(tmp_path / "id.dcm", ramp()))
    assert "SECRET" not in repr(echo.info) and "DOE" not in repr(echo.info)
    assert set(vars(echo)) == {"frames", "fps", "spacing_mm", "source_format", "labels", "labelled", "info",
                               "synthetic"}


# --------------------------------------------------------------------------------------------------- bad inputs
def test_corrupt_dicom(tmp_path):
    p = tmp_path / "junk.dcm"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(EchoLoadError, match="not a DICOM file"):
        load_echo(p)


def test_truncated_dicom(tmp_path, sample_path):
    data = sample_path.read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(EchoLoadError, match="truncated"):
        load_echo(p)


@pytest.mark.parametrize("keep", [140, 300, 1003, -10])
def test_dicom_cut_inside_its_header_is_truncated(tmp_path, sample_path, keep):
    """Cut inside the file meta, right after it, inside a sequence, and just before the pixel data element: the file
    declares an ultrasound image, so a missing pixel data element means the file was cut off."""
    data = sample_path.read_bytes()
    pixel_tag = data.find(b"\xe0\x7f\x10\x00")
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[: keep if keep > 0 else pixel_tag + keep])
    with pytest.raises(EchoLoadError, match="'cut.dcm' is a truncated DICOM file"):
        load_echo(p)


def test_truncated_uncompressed_pixel_data(tmp_path):
    p = make_dicom(tmp_path / "full.dcm", ramp(t=8, h=40, w=40))
    data = p.read_bytes()
    p.write_bytes(data[:-3000])
    with pytest.raises(EchoLoadError, match="truncated"):
        load_echo(p)


def test_dicom_without_pixel_data(tmp_path):
    """A complete DICOM object of a class without pixel data (a Basic Text structured report)."""
    with pytest.raises(EchoLoadError, match="without pixel data"):
        load_echo(make_dicom(tmp_path / "sr.dcm", None, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.11"))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_ct_and_mr_rejected(tmp_path, modality):
    p = make_dicom(tmp_path / "ct.dcm", ramp(t=1).astype(np.uint16), modality=modality,
                   sop_class="1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(EchoLoadError, match=f"Modality {modality}.*only ultrasound"):
        load_echo(p)


def test_single_frame_without_ultrasound_markers_rejected(tmp_path):
    p = make_dicom(tmp_path / "sc.dcm", ramp(t=1), modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    with pytest.raises(EchoLoadError, match="no ultrasound markers"):
        load_echo(p)


def test_zero_frames(tmp_path):
    with pytest.raises(EchoLoadError, match="no image frames"):
        load_echo(make_dicom(tmp_path / "z.dcm", ramp(t=1), frames=0))


def test_huge_image_rejected_before_decoding(tmp_path):
    # The header declares 4000 x 4000 but holds a few bytes: only a header check can give this message.
    p = make_dicom(tmp_path / "big.dcm", ramp(t=1, h=2, w=2), Rows=4000, Columns=4000)
    with pytest.raises(EchoLoadError, match="4000 x 4000 pixels, larger than the limit of 2048"):
        load_echo(p)


def test_10000_frames_rejected_before_decoding(tmp_path):
    p = make_dicom(tmp_path / "long.dcm", ramp(t=2, h=4, w=4), frames=10000)
    with pytest.raises(EchoLoadError, match="10000 frames, more than the limit of 2000"):
        load_echo(p)


def test_colour_photograph_as_dicom_rejected(tmp_path):
    from skimage.data import astronaut

    photo = astronaut()[::4, ::4][None]  # (1, 128, 128, 3)
    p = make_dicom(tmp_path / "photo.dcm", photo, photometric="RGB")
    with pytest.raises(EchoLoadError, match="looks like a colour photograph"):
        read_dicom(p)
