"""DICOM ultrasound reader (pydicom 3): single- and multi-frame, any photometric interpretation, converted to grey.

Only pixel data, timing and spacing are read into the :class:`~echolvfm_core.echo.Echo`; patient identifiers never
are. Size limits are checked from the header (Rows, Columns, NumberOfFrames) before pixel data is read or decoded.
"""
from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path

import numpy as np

from ..echo import Echo, EchoLoadError, LoadLimits
from ._common import check_not_photo, display_name, luma, reason

__all__ = ["read_dicom", "is_dicom_file", "dicom_fps", "dicom_spacing_mm"]

#: Ultrasound SOP classes: US Image, US Multi-frame Image and their retired predecessors.
US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1",
    "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6",
    "1.2.840.10008.5.1.4.1.1.3",
}
#: Modalities accepted as ultrasound, and the ones that say "unknown" (then the data must look like 2D+T ultrasound).
US_MODALITIES = {"US", "IVUS"}
UNKNOWN_MODALITIES = {"", "OT"}
#: DICOM PhysicalUnits code for centimetres (PS3.3 C.8.5.5.1.15).
UNITS_CM = 3
#: RegionSpatialFormat 1 = 2D (tissue or flow); RegionDataType 1 = tissue.
REGION_2D = 1
REGION_TISSUE = 1
#: Pixel-data elements whose presence makes a file an image.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def dicom_fps(ds) -> float | None:
    """Frames per second from FrameTime (ms), FrameTimeVector (ms), CineRate or RecommendedDisplayFrameRate."""
    frame_time = _positive(ds.get("FrameTime"))
    if frame_time is not None:
        return 1000.0 / frame_time
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        # First entry is 0 (time of frame 1); the others are the intervals to the previous frame, in ms.
        steps = np.atleast_1d(np.asarray(vector, dtype=np.float64))[1:]
        steps = steps[np.isfinite(steps) & (steps > 0)]
        if steps.size:
            return 1000.0 / float(steps.mean())
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _positive(ds.get(keyword))
        if rate is not None:
            return rate
    return None


def dicom_spacing_mm(ds, rows: int, cols: int) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm.

    From SequenceOfUltrasoundRegions: the 2D tissue region (RegionSpatialFormat 1, RegionDataType 1) with physical
    units in cm, region bounds clamped to the image, the largest such region when there are several. Falls back on
    PixelSpacing (already (row, column) in mm).
    """
    best: tuple[int, tuple[float, float]] | None = None
    for region in ds.get("SequenceOfUltrasoundRegions", None) or []:
        if region.get("RegionSpatialFormat") != REGION_2D or region.get("RegionDataType") != REGION_TISSUE:
            continue
        if region.get("PhysicalUnitsXDirection") != UNITS_CM or region.get("PhysicalUnitsYDirection") != UNITS_CM:
            continue
        dx, dy = _positive(region.get("PhysicalDeltaX")), _positive(region.get("PhysicalDeltaY"))
        if dx is None or dy is None:
            continue
        x0 = min(max(int(region.get("RegionLocationMinX0", 0) or 0), 0), cols - 1)
        y0 = min(max(int(region.get("RegionLocationMinY0", 0) or 0), 0), rows - 1)
        x1 = min(max(int(region.get("RegionLocationMaxX1", cols - 1) or 0), 0), cols - 1)
        y1 = min(max(int(region.get("RegionLocationMaxY1", rows - 1) or 0), 0), rows - 1)
        area = max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)
        if area > 1 and (best is None or area > best[0]):
            best = (area, (dy * 10.0, dx * 10.0))
    if best is not None:
        return best[1]
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        row, col = _positive(spacing[0]), _positive(spacing[1])
        if row is not None and col is not None:
            return (row, col)
    return None


def _check_modality(ds, frames: int, what: str) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in US_MODALITIES:
        return
    if modality not in UNKNOWN_MODALITIES:
        raise EchoLoadError(
            f"{what} is a {modality} image (Modality {modality}), not an ultrasound; only ultrasound DICOM "
            "(Modality US) is accepted."
        )
    us_markers = str(ds.get("SOPClassUID", "")) in US_SOP_CLASSES or "SequenceOfUltrasoundRegions" in ds
    if not us_markers and frames < 2:
        raise EchoLoadError(
            f"{what} is a single-frame DICOM image with no ultrasound markers (no Modality US, ultrasound SOP class "
            "or ultrasound regions); only ultrasound DICOM is accepted."
        )


def _declares_image(ds) -> bool:
    """True when a dataset read to the end of its file still promises pixel data: it is empty (the file ends inside
    or right after the file meta header), has Rows / Columns, or is of an ultrasound image SOP class (whose pixel
    data is mandatory, PS3.3 A.6 / A.7)."""
    meta = getattr(ds, "file_meta", None) or {}
    classes = {str(ds.get("SOPClassUID", "")), str(meta.get("MediaStorageSOPClassUID", ""))}
    return len(ds) == 0 or "Rows" in ds or "Columns" in ds or bool(classes & US_SOP_CLASSES)


def _grey_frames(ds, arr: np.ndarray, photometric: str, frames: int, what: str) -> np.ndarray:
    """(T, H, W) float32 grey in [0, 1] from decoded pixel data in its ``photometric`` interpretation.

    YBR_FULL(_422) gives its Y channel (the luma) directly; RGB and PALETTE COLOR give Rec. 601 luma of the RGB;
    MONOCHROME1 is inverted. Colour data is first checked for looking like a colour photograph.
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsStored", 8) or 8)
    full = float(2**bits - 1)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds).reshape((frames,) + arr.shape[-2:] + (3,))
        # LUT entries are 8-bit, or 16-bit spanning the full 16-bit range.
        scale = 255.0 if int(rgb.max()) <= 255 else 65535.0
        check_not_photo([rgb[0], rgb[frames // 2]], scale, what)
        return luma(rgb, scale)
    if samples == 3:
        colour = arr.reshape((frames,) + arr.shape[-3:])
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            from pydicom.pixels import convert_color_space

            check_not_photo(list(convert_color_space(colour[[0, frames // 2]], "YBR_FULL", "RGB")), full, what)
            return np.clip(colour[..., 0].astype(np.float32) / np.float32(full), 0.0, 1.0)
        if photometric != "RGB":
            raise EchoLoadError(
                f"{what} uses the {photometric} colour encoding; accepted are MONOCHROME1/2, RGB, YBR_FULL(_422) "
                "and PALETTE COLOR."
            )
        check_not_photo([colour[0], colour[frames // 2]], full, what)
        return luma(colour, full)
    if samples != 1:
        raise EchoLoadError(f"{what} has {samples} samples per pixel; only grey (1) or colour (3) images are accepted.")
    mono = arr.reshape((frames,) + arr.shape[-2:])
    if not np.issubdtype(mono.dtype, np.integer):
        raise EchoLoadError(f"{what} holds floating-point pixel data; only integer ultrasound pixel data is accepted.")
    grey = mono.astype(np.float32)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        grey += np.float32(2 ** (bits - 1))
    grey /= np.float32(full)
    np.clip(grey, 0.0, 1.0, out=grey)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    return grey.astype(np.float32, copy=False)


def read_dicom(path: str | Path, limits: LoadLimits | None = None) -> Echo:
    """Read a DICOM ultrasound file into an :class:`Echo` (frames float32 (T, H, W) in [0, 1] grey).

    Raises :class:`EchoLoadError` for unreadable, truncated or non-ultrasound files, files without pixel data, and
    files whose header exceeds ``limits`` (checked before the pixel data is read).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    what = display_name(path)
    limits = limits or LoadLimits.from_env()
    try:
        # Values larger than 4 KiB (pixel data above all) are read only when accessed, after the limit checks.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size="4 KB")
    except InvalidDicomError as exc:
        raise EchoLoadError(
            f"{what} is not a DICOM file (no DICOM header found); give a DICOM, NIfTI or video file."
        ) from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise EchoLoadError(
            f"{what} is a corrupt or truncated DICOM file and could not be read ({reason(exc, path)})."
        ) from exc

    if any("End of file reached" in str(w.message) for w in caught):
        raise EchoLoadError(f"{what} is a truncated DICOM file (it ends before its data does); give the complete file.")
    if not any(k in ds for k in PIXEL_KEYWORDS) and _declares_image(ds):
        raise EchoLoadError(
            f"{what} is a truncated DICOM file (its header declares an ultrasound image but the file ends before the "
            "pixel data); give the complete file."
        )
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise EchoLoadError(f"{what} is a DICOM file without pixel data; give a DICOM ultrasound image or cine loop.")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        declared = ds.get("NumberOfFrames")
        frames = 1 if declared is None or str(declared).strip() == "" else int(declared)
    except (AttributeError, TypeError, ValueError) as exc:
        raise EchoLoadError(
            f"{what} lacks a valid Rows / Columns / NumberOfFrames header; it is not a usable image."
        ) from exc
    _check_modality(ds, frames, what)
    limits.check(frames, rows, cols, what)

    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise EchoLoadError(f"{what} has no transfer syntax in its file meta header, so its pixel data cannot be read.")
    try:
        arr, meta = get_decoder(syntax).as_array(ds, as_rgb=False)
    except Exception as exc:  # NotImplementedError (no decoder), ValueError, RuntimeError, plugin-specific errors
        raise EchoLoadError(
            f"{what} has pixel data that could not be decoded ({type(exc).__name__}: {reason(exc, path)}); "
            "the file may be truncated or use an unsupported compression."
        ) from exc
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "")).upper()
    grey = _grey_frames(ds, np.asarray(arr), photometric.strip(), frames, what)
    fps = dicom_fps(ds) if frames > 1 else None
    return Echo(
        frames=np.ascontiguousarray(grey, dtype=np.float32),
        fps=fps,
        spacing_mm=dicom_spacing_mm(ds, rows, cols),
        source_format="dicom",
    )

