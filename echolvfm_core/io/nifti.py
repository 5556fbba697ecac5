"""NIfTI reader (nibabel) for plain 2D / 2D+T images; CAMUS files are read by :mod:`echolvfm_core.io.camus`.

Orientation: nibabel returns arrays indexed (x, y[, t]); the display image is the transpose (rows = y, columns = x),
which for CAMUS is the clinical view (apex at the top, left ventricle on the right), i.e.
``np.fliplr(np.rot90(a, -1)) == a.T``. The same convention is applied to every NIfTI file.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..echo import Echo, EchoLoadError, LoadLimits
from ._common import display_name, reason, unit_grey

__all__ = ["read_nifti", "read_nifti_stack", "is_nifti_file"]

NIFTI1_HEADER_SIZE = 348
NIFTI2_HEADER_SIZE = 540


def is_nifti_file(path: str | Path) -> bool:
    """True when the file (possibly gzip-compressed) starts with a NIfTI-1 or NIfTI-2 header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head[:2] == b"\x1f\x8b":
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as gz:
                    head = gz.read(4)
    except (OSError, EOFError):
        return False
    if len(head) < 4:
        return False
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
    return bool(sizes & {NIFTI1_HEADER_SIZE, NIFTI2_HEADER_SIZE})


def read_nifti_stack(
    path: str | Path, limits: LoadLimits, what: str | None = None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Read a 2D or 3D NIfTI array in display orientation.

    Returns:
        stack: (T, H, W) array in the file's own dtype (T = 1 for a 2D image; a 3D file's last axis is time).
        spacing_mm: (row, column) spacing in mm from the header zooms (swapped with the axes), or None.

    Raises :class:`EchoLoadError` for unreadable files, 4-D (or more) data, colour data, and data exceeding
    ``limits`` (checked from the header before the data is read).
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    what = what or display_name(path)
    try:
        img = nib.load(str(path))
    except (ImageFileError, OSError, EOFError, ValueError) as exc:
        raise EchoLoadError(
            f"{what} is not a readable NIfTI file ({reason(exc, path)}); give a .nii or .nii.gz image."
        ) from exc
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 2 or len(shape) > 3:
        raise EchoLoadError(
            f"{what} is a {len(shape)}-D NIfTI image of shape {shape}; only 2-D images and 2-D+time loops "
            "(time on the last axis) are accepted."
        )
    if img.get_data_dtype().fields is not None:
        raise EchoLoadError(f"{what} is a colour (RGB) NIfTI image; only grey-level NIfTI images are accepted.")
    n_frames = shape[2] if len(shape) == 3 else 1
    limits.check(n_frames, shape[1], shape[0], what)
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise EchoLoadError(
            f"{what} is a corrupt or truncated NIfTI file and its data could not be read ({reason(exc, path)})."
        ) from exc
    stack = data.T[None] if data.ndim == 2 else data.transpose(2, 1, 0)
    zooms = img.header.get_zooms()
    spacing = None
    if len(zooms) >= 2 and all(np.isfinite(float(z)) and float(z) > 0 for z in zooms[:2]):
        spacing = (float(zooms[1]), float(zooms[0]))
    return np.ascontiguousarray(stack), spacing


def read_nifti(path: str | Path, limits: LoadLimits | None = None) -> Echo:
    """Read a plain (non-CAMUS) NIfTI file: 2D -> one frame, 3D -> a loop with frames on the last axis.

    Grey levels are scaled to [0, 1] as in :func:`echolvfm_core.io._common.unit_grey`; no timing is read.
    """
    limits = limits or LoadLimits.from_env()
    what = display_name(path)
    stack, spacing = read_nifti_stack(path, limits, what)
    return Echo(frames=unit_grey(stack, what), fps=None, spacing_mm=spacing, source_format="nifti")
