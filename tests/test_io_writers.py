"""Writers: MP4 (H.264, yuv420p, even size, no audio), looping GIF, synthetic-marked DICOM; all read back."""
from __future__ import annotations

import shutil
import subprocess

import av
import imageio.v3 as iio
import numpy as np
import pydicom
import pytest

from echolvfm_core.echo import Echo
from echolvfm_core.io import load_echo, write_dicom, write_gif, write_mp4
from echolvfm_core.io.writers import SYNTHETIC_DESCRIPTION


def loop(t=10, h=33, w=47, seed=0) -> np.ndarray:
    """float32 (T, H, W) in [0, 1]: a smooth moving blob over a gradient (odd size on purpose)."""
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(t):
        cx = w / 2 + 6 * np.sin(2 * np.pi * i / t)
        out.append(0.15 + 0.5 * yy / h + 0.3 * np.exp(-((xx - cx) ** 2 + (yy - h / 2) ** 2) / 40.0))
    return np.clip(np.stack(out), 0, 1).astype(np.float32)


def test_mp4_round_trip(tmp_path):
    frames = loop()
    path = write_mp4(frames, tmp_path / "a.mp4", fps=30)
    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["video"]  # no audio
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (48, 34)  # padded to even
    echo = load_echo(path)
    assert echo.frames.shape == (10, 34, 48) and echo.fps == pytest.approx(30.0)
    err = np.abs(echo.frames[:, :33, :47] - frames)
    assert err.mean() < 0.01 and err.max() < 0.06
    np.testing.assert_allclose(echo.frames[:, 33, :47], echo.frames[:, 32, :47], atol=0.03)  # edge-copied pad row


def test_mp4_accepts_uint8_rgb_and_echo(tmp_path):
    rgb = np.repeat((loop(h=32, w=32) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    assert load_echo(write_mp4(rgb, tmp_path / "rgb.mp4", fps=25)).frames.shape == (10, 32, 32)
    echo = Echo(frames=loop(h=32, w=32), fps=12.5)
    back = load_echo(write_mp4(echo, tmp_path / "echo.mp4"))
    assert back.fps == pytest.approx(12.5) and back.n_frames == 10


def test_gif_round_trip_loops(tmp_path):
    from PIL import Image

    frames = loop()
    frames[3] = frames[2]  # a still moment (diastasis) must stay two frames
    path = write_gif(frames, tmp_path / "a.gif", fps=25)
    with Image.open(path) as im:
        assert im.info.get("loop") == 0 and im.n_frames == 10 and im.info.get("duration") == 40
    echo = load_echo(path)
    assert echo.frames.shape == frames.shape and echo.fps == pytest.approx(25.0)
    np.testing.assert_allclose(echo.frames, np.rint(frames * 255) / 255, atol=1.5 / 255)


def test_gif_rgb_and_30_fps(tmp_path):
    from PIL import Image

    grey = (loop() * 255).astype(np.uint8)
    rgb = np.stack([grey, grey, np.full_like(grey, 128)], axis=-1)
    path = write_gif(rgb, tmp_path / "c.gif", fps=30)
    with Image.open(path) as im:
        assert im.n_frames == 10 and im.info.get("duration") == 30  # 10 ms GIF clock
    back = iio.imread(path, plugin="pyav")
    assert back.shape == rgb.shape and np.abs(back.astype(int) - rgb).mean() < 3


def test_dicom_round_trip_is_exact(tmp_path):
    frames = np.rint(loop() * 255).astype(np.float32) / 255
    echo = Echo(frames=frames, fps=30.0, spacing_mm=(0.3, 0.4), synthetic=True, source_format="synthetic")
    path = write_dicom(echo, tmp_path / "a.dcm")
    back = load_echo(path)
    np.testing.assert_array_equal(back.frames, frames)
    assert back.fps == pytest.approx(30.0, rel=1e-4) and back.spacing_mm == pytest.approx((0.3, 0.4))


def test_dicom_is_marked_synthetic_standard_and_private_free(tmp_path):
    echo = Echo(frames=loop(), fps=25.0, spacing_mm=(0.5, 0.5))
    a = pydicom.dcmread(write_dicom(echo, tmp_path / "a.dcm"))
    b = pydicom.dcmread(write_dicom(echo, tmp_path / "b.dcm"))
    assert a.file_meta.MediaStorageSOPClassUID == a.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (a.Modality, a.PhotometricInterpretation, a.BitsAllocated, a.SamplesPerPixel) == ("US", "MONOCHROME2", 8, 1)
    assert list(a.ImageType) == ["DERIVED", "SECONDARY"] and a.SeriesDescription == SYNTHETIC_DESCRIPTION
    assert a.BurnedInAnnotation == "NO" and str(a.PatientName) == "ANONYMOUS^SYNTHETIC" and a.PatientID == ""
    assert int(a.NumberOfFrames) == 10 and float(a.FrameTime) == pytest.approx(40.0) and int(a.CineRate) == 25
    assert a.FrameIncrementPointer == pydicom.tag.Tag("FrameTime")
    assert a.SequenceOfUltrasoundRegions[0].PhysicalDeltaX == pytest.approx(0.05)
    uids = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    assert all(getattr(a, k) != getattr(b, k) for k in uids)
    assert not any(el.tag.is_private for el in a.iterall())
    # Every Type 1 / 2 attribute of the modules used is present (Patient, Study, Series, Equipment, Image, Pixel,
    # Cine, Multi-frame, US Image, SOP Common).
    required = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesInstanceUID",
                "SeriesNumber", "Manufacturer", "InstanceNumber", "PatientOrientation", "Rows", "Columns",
                "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "ImageType",
                "LossyImageCompression", "SOPClassUID", "SOPInstanceUID"]
    assert [k for k in required if k not in a] == []


def test_still_dicom_needs_no_fps(tmp_path):
    echo = Echo(frames=loop(t=1), fps=None)
    path = write_dicom(echo, tmp_path / "still.dcm")
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"  # US Image Storage (single frame)
    back = load_echo(path)
    assert back.n_frames == 1 and back.fps is None and back.spacing_mm is None


@pytest.mark.parametrize("t", [1, 6])
def test_dicom_passes_dciodvfy(tmp_path, t):
    """dicom3tools' IOD verifier (Debian package dicom3tools) finds no error or warning beyond the DICOMDIR
    notes about the deliberately empty Patient ID / Study ID."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    path = write_dicom(Echo(frames=loop(t=t), fps=30.0, spacing_mm=(0.3, 0.3)), tmp_path / "v.dcm")
    report = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (report.stdout + report.stderr).splitlines()
                if line.startswith(("Error", "Warning")) and "DICOMDIR" not in line]
    assert problems == []


@pytest.mark.parametrize(
    "frames, fps, match",
    [
        (np.full((2, 8, 8), 1.5, np.float32), 10, "must lie in \\[0, 1\\]"),
        (np.zeros((8, 8), np.float32), 10, "must be \\(T, H, W\\)"),
        (np.zeros((2, 8, 8), np.int32), 10, "float in \\[0, 1\\] or uint8"),
        (np.zeros((2, 8, 8), np.float32), 0, "fps must be a positive number"),
        (np.zeros((2, 8, 8), np.float32), None, "fps must be a positive number"),
    ],
)
def test_writers_validate_input(tmp_path, frames, fps, match):
    for writer in (write_mp4, write_gif):
        with pytest.raises(ValueError, match=match):
            writer(frames, tmp_path / "x.out", fps)


def test_loop_dicom_needs_fps(tmp_path):
    with pytest.raises(ValueError, match="fps must be a positive number"):
        write_dicom(Echo(frames=loop(t=3), fps=None), tmp_path / "x.dcm")


def test_to_uint8_checks_by_default_and_clips_a_models_overshoot_when_asked():
    from echolvfm_core.io import to_uint8

    frames = np.array([[[-0.01, 0.5, 1.02]]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8(frames)
    assert to_uint8(frames, clip=True).tolist() == [[[0, 128, 255]]]
    assert to_uint8(np.array([[[0.0, 1.0]]])).tolist() == [[[0, 255]]]
