"""``load_echo``: one entry point for every supported echo file, with format detection by content and extension."""
from __future__ import annotations

from pathlib import Path

from ..echo import Echo, EchoLoadError, LoadLimits
from ._common import display_name
from .camus import CAMUS_FILE, load_camus_file
from .dicom import is_dicom_file, read_dicom
from .echonet import echonet_record_for, read_echonet_video
from .nifti import is_nifti_file, read_nifti
from .video import VIDEO_EXTENSIONS, read_video

__all__ = ["load_echo", "detect_kind", "sample_echo_path", "sample_cine_path", "KINDS"]

KINDS = ("dicom", "nifti", "video", "echonet")
ACCEPTED = "give a DICOM file, a NIfTI file (.nii / .nii.gz) or a video (AVI, MP4, MOV, GIF, WebM)"
DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ".ima"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif"}
#: (offset, magic bytes) of still-image formats.
IMAGE_MAGIC = [(0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"II*\x00"), (0, b"MM\x00*")]


def _is_video_magic(head: bytes) -> bool:
    return (
        (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[4:8] == b"ftyp"  # MP4 / MOV / M4V
        or head[:4] in (b"GIF8", b"\x1a\x45\xdf\xa3", b"OggS")  # GIF, Matroska / WebM, Ogg
        or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG program / elementary stream
    )


def _is_image(head: bytes, suffix: str) -> bool:
    if any(head[o : o + len(m)] == m for o, m in IMAGE_MAGIC):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return suffix in IMAGE_EXTENSIONS and not _is_video_magic(head) and head[128:132] != b"DICM"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def detect_kind(path: str | Path) -> str:
    """The reader for ``path``: "dicom", "nifti" or "video" (by magic bytes first, then by extension).

    Raises :class:`EchoLoadError` for a missing path, a folder, a still image (JPEG, PNG, ...) or an unknown format.
    """
    path = Path(path)
    what = display_name(path)
    if not path.exists():
        raise EchoLoadError(f"No file at {what}; {ACCEPTED}.")
    if path.is_dir():
        raise EchoLoadError(
            f"{what} is a folder, not a file; {ACCEPTED} (data set folders are read by read_camus / read_echonet)."
        )
    with open(path, "rb") as fh:
        head = fh.read(132)
    suffix = _suffix(path)
    if is_dicom_file(path):
        return "dicom"
    if _is_image(head, suffix):
        raise EchoLoadError(
            f"{what} is a still image (photograph or picture); images and photographs are not supported, {ACCEPTED}."
        )
    if is_nifti_file(path):
        return "nifti"
    if _is_video_magic(head):
        return "video"
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    if suffix in (".nii", ".nii.gz"):
        return "nifti"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if not head:
        raise EchoLoadError(f"{what} is an empty file; {ACCEPTED}.")
    raise EchoLoadError(f"{what} is not in a recognised echo format; {ACCEPTED}.")


def load_echo(path: str | Path, *, kind: str | None = None, limits: LoadLimits | None = None) -> Echo:
    """Load an echo file as an :class:`Echo` (frames float32 (T, H, W), grey levels in [0, 1]).

    Args:
        path: a DICOM file (with or without extension), a NIfTI file (plain 2D / 2D+T, or a CAMUS file, read in
            clinical orientation with its labels and Info cfg), or a video (AVI, MP4, MOV, MKV, GIF, WebM); a video
            inside an EchoNet-Dynamic ``Videos/`` folder also gets its FileList EF and ED / ES frames (and may be
            named as in FileList.csv, without its extension).
        kind: "dicom", "nifti", "video" or "echonet" to force a reader; None detects it (:func:`detect_kind`).
        limits: size limits checked before decoding (default :meth:`LoadLimits.from_env`).

    Raises:
        EchoLoadError: one sentence saying what is wrong with the input and what is accepted.
    """
    path = Path(path)
    limits = limits or LoadLimits.from_env()
    if kind is not None and kind not in KINDS:
        raise EchoLoadError(f"Unknown kind {kind!r}; use one of {', '.join(KINDS)} or None to detect it.")
    if not path.exists() and kind in (None, "echonet", "video"):
        # EchoNet-Dynamic lists videos without extension: <root>/Videos/<FileName> means <FileName>.avi.
        record = echonet_record_for(path)
        if record is not None and record.path.is_file():
            return record.load(limits)
    if kind is None:
        kind = detect_kind(path)
    elif not path.is_file():
        detect_kind(path)  # raises the missing-file / folder message
    if kind == "dicom":
        return read_dicom(path, limits)
    if kind == "nifti":
        return load_camus_file(path, limits) if CAMUS_FILE.match(path.name) else read_nifti(path, limits)
    if kind == "echonet":
        return read_echonet_video(path, limits)
    record = echonet_record_for(path)
    return record.load(limits) if record is not None else read_video(path, limits)


def sample_echo_path() -> Path:
    """Path of the built-in sample: pydicom's ``ybr_color`` example, a real apical four-chamber cine
    (30 frames, 320 x 240, 30 fps, YBR_FULL_422 JPEG baseline) shipped with pydicom."""
    from pydicom.examples import get_path

    return Path(get_path("ybr_color"))


def sample_cine_path() -> Path | None:
    """Path of the second built-in case, or None when the ``pydicom-data`` package is not installed: its
    ``color3d_jpeg_baseline.dcm``, the full apical four-chamber cine the ``ybr_color`` sample was cut from (120
    frames, 640 x 480, 30 fps, several beats; MIT licence). Read from the installed package, never downloaded."""
    from importlib.util import find_spec

    spec = find_spec("data_store")  # the import name of pydicom-data
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "color3d_jpeg_baseline.dcm"
    return path if path.is_file() else None
