"""Helpers shared by the readers: grey conversion, scaling to [0, 1], the colour-photograph check."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..echo import EchoLoadError

#: Rec. 601 luma weights (R, G, B), the ones DICOM YBR_FULL and JPEG use.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: A pixel counts as "strongly coloured" when its HSV saturation exceeds this and it is not dark ...
PHOTO_SATURATION = 0.4
PHOTO_MIN_VALUE = 0.2
#: ... and a frame looks like a colour photograph when more than this share of its pixels are.
#: (Greyscale B-mode with colour annotations or a colour-Doppler box stays well below; natural photographs are above.)
PHOTO_SHARE = 0.25


def display_name(path: str | Path) -> str:
    """File name used in messages (never the full path, which may hold identifiers)."""
    return f"'{Path(path).name}'"


def reason(exc: BaseException, path: str | Path) -> str:
    """A library's error text for a message about ``path``: one line, with the file's folder left out wherever the
    path appears (nibabel and others quote the full path, which may name a patient or the server's folders)."""
    text = " ".join(str(exc).split())
    path = Path(path)
    for full in sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len, reverse=True):
        text = text.replace(full, path.name)
    return text


def luma(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Grey levels in [0, 1] from an (..., 3) RGB array whose full-scale value is ``scale``; float32 (...)."""
    grey = np.tensordot(rgb.astype(np.float32, copy=False), LUMA, axes=([-1], [0]))
    grey /= np.float32(scale)
    return np.clip(grey, 0.0, 1.0, out=grey)


def coloured_share(rgb: np.ndarray, scale: float) -> float:
    """Share of pixels of one (H, W, 3) RGB frame (full scale ``scale``) that are strongly saturated colour."""
    x = rgb.astype(np.float32, copy=False) / np.float32(scale)
    hi = x.max(axis=-1)
    lo = x.min(axis=-1)
    sat = (hi - lo) / np.maximum(hi, 1e-6)
    return float(np.mean((sat > PHOTO_SATURATION) & (hi > PHOTO_MIN_VALUE)))


def check_not_photo(rgb_frames: list[np.ndarray], scale: float, what: str) -> None:
    """Raise :class:`EchoLoadError` when the given (H, W, 3) RGB frames look like a colour photograph."""
    for frame in rgb_frames:
        share = coloured_share(frame, scale)
        if share > PHOTO_SHARE:
            raise EchoLoadError(
                f"{what} looks like a colour photograph, not a greyscale ultrasound ({share:.0%} of its pixels are "
                "strongly coloured); load a B-mode echo loop (DICOM, NIfTI or video)."
            )


def unit_grey(a: np.ndarray, what: str) -> np.ndarray:
    """Scale a grey-level array to float32 in [0, 1].

    uint8 is divided by 255, other unsigned integers by 255 when their values fit in 8 bits and by their type's maximum
    otherwise, booleans map to {0, 1}; floats already
    in [0, 1] are kept; anything else (signed integers, other float ranges) is min-max scaled over the whole array.
    Non-finite values raise :class:`EchoLoadError`.
    """
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if np.issubdtype(a.dtype, np.unsignedinteger) and a.size and int(a.max()) > 255:
        return (a.astype(np.float64) / np.iinfo(a.dtype).max).astype(np.float32)
    if np.issubdtype(a.dtype, np.unsignedinteger):
        return a.astype(np.float32) / np.float32(255)
    x = a.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise EchoLoadError(f"{what} holds non-finite values (NaN or infinity); grey levels must be finite numbers.")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return x
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / np.float32(hi - lo)
