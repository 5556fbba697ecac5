"""The one record every reader returns and every consumer takes: :class:`Echo`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["Echo", "EchoLoadError", "ClinicalInfo", "LoadLimits", "LABELS", "check_grey_stack"]

#: Label values used throughout the project (CAMUS convention).
LABELS = {"background": 0, "lv": 1, "myo": 2, "la": 3}


class EchoLoadError(ValueError):
    """An input could not be read as an echo; the message is one sentence saying what is wrong and what is accepted."""


def check_grey_stack(frames) -> np.ndarray:
    """Return ``frames`` as an array after checking it is a float (T, H, W) stack of finite grey levels in [0, 1].

    Raises:
        ValueError: wrong number of dimensions, an integer dtype, or values outside [0, 1].
    """
    f = np.asarray(frames)
    if f.ndim != 3:
        raise ValueError(f"frames must be a (T, H, W) stack; got shape {f.shape}.")
    if not np.issubdtype(f.dtype, np.floating):
        raise ValueError(f"frames must be float grey levels in [0, 1]; got dtype {f.dtype}.")
    if not np.all(np.isfinite(f)) or f.min() < 0 or f.max() > 1:
        raise ValueError("frames must be finite grey levels in [0, 1].")
    return f


@dataclass(frozen=True)
class LoadLimits:
    """Size limits applied by every reader before pixel data is decoded.

    Defaults can be overridden per call (``load_echo(..., limits=LoadLimits(max_frames=...))``) or globally through
    the environment variables ``ECHOLVFM_MAX_FRAMES``, ``ECHOLVFM_MAX_SIDE`` and ``ECHOLVFM_MAX_BYTES``.

    ``max_bytes`` bounds the float32 (T, H, W) stack a reader returns, computed from the declared shape before any
    pixel data is read (a compressed file can declare far more than its size: 489 kB of gzip NIfTI declare
    1024 x 1024 x 480 voxels). Loading and preprocessing such a 1.9 GiB stack peaked at 4.6 GB (about 2.4 times), so
    the default of 1 GiB (e.g. 340 frames of 1024 x 768) keeps one load near 2.5 GB.
    """

    max_frames: int = 2000
    max_side: int = 2048
    max_bytes: int = 1024**3

    @classmethod
    def from_env(cls) -> LoadLimits:
        import os

        d = cls()
        return cls(
            max_frames=int(os.environ.get("ECHOLVFM_MAX_FRAMES", d.max_frames)),
            max_side=int(os.environ.get("ECHOLVFM_MAX_SIDE", d.max_side)),
            max_bytes=int(os.environ.get("ECHOLVFM_MAX_BYTES", d.max_bytes)),
        )

    def check(self, frames: int, height: int, width: int, what: str) -> None:
        """Raise :class:`EchoLoadError` when a (frames, height, width) stack exceeds the limits."""
        if frames < 1:
            raise EchoLoadError(f"{what} holds no image frames; an echo needs at least one frame.")
        if frames > self.max_frames:
            raise EchoLoadError(
                f"{what} has {frames} frames, more than the limit of {self.max_frames} "
                "(set ECHOLVFM_MAX_FRAMES to raise it)."
            )
        if max(height, width) > self.max_side:
            raise EchoLoadError(
                f"{what} is {width} x {height} pixels, larger than the limit of {self.max_side} per side "
                "(set ECHOLVFM_MAX_SIDE to raise it)."
            )
        if frames * height * width * 4 > self.max_bytes:
            raise EchoLoadError(
                f"{what} declares {frames} frames of {width} x {height} pixels, which would need "
                f"{frames * height * width * 4 / 2**30:.1f} GiB as float32, more than the "
                f"limit of {self.max_bytes / 2**30:.1f} GiB (set ECHOLVFM_MAX_BYTES to raise it)."
            )


@dataclass(frozen=True)
class ClinicalInfo:
    """Clinical metadata that may travel with an echo. Never holds patient identifiers.

    ``ef`` in %, ``age`` in years, ``sex`` as "F" / "M", ``view`` e.g. "4CH" / "2CH",
    ``ed_index`` / ``es_index`` are frame indices into :attr:`Echo.frames`.
    """

    view: str | None = None
    ef: float | None = None
    ed_index: int | None = None
    es_index: int | None = None
    age: float | None = None
    sex: str | None = None


@dataclass
class Echo:
    """An echo loop (or still) in memory.

    Attributes:
        frames: float32 array (T, H, W), grey levels in [0, 1].
        fps: frames per second; ``None`` for a still or when the source gives no timing.
        spacing_mm: (row, column) pixel spacing in mm when known.
        source_format: "dicom", "nifti", "video", "echonet", "synthetic", ...
        labels: optional uint8 array (T, H, W) with 0 background, 1 LV cavity, 2 myocardium, 3 left atrium;
            frames without a label are all zero and listed as unlabelled in ``labelled``.
        labelled: indices of frames whose labels are expert-given (or exact, for synthetic loops).
        info: clinical metadata (:class:`ClinicalInfo`).
        synthetic: True for generated loops; writers mark their output accordingly.
    """

    frames: np.ndarray
    fps: float | None = None
    spacing_mm: tuple[float, float] | None = None
    source_format: str = "unknown"
    labels: np.ndarray | None = None
    labelled: tuple[int, ...] = ()
    info: ClinicalInfo = field(default_factory=ClinicalInfo)
    synthetic: bool = False

    def __post_init__(self) -> None:
        f = np.asarray(self.frames)
        if f.ndim != 3:
            raise ValueError(f"Echo.frames must be (T, H, W); got shape {f.shape}.")
        if f.dtype != np.float32:
            raise ValueError(f"Echo.frames must be float32 in [0, 1]; got {f.dtype}.")
        if self.labels is not None and self.labels.shape != f.shape:
            raise ValueError(f"Echo.labels shape {self.labels.shape} does not match frames {f.shape}.")

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def is_loop(self) -> bool:
        return self.n_frames > 1

    def require_loop(self, what: str = "This step") -> Echo:
        """Return self, or raise :class:`EchoLoadError` when the echo is a single still frame."""
        if not self.is_loop:
            raise EchoLoadError(f"{what} needs a loop of at least 2 frames, but the input is a single still frame.")
        return self

    def replace(self, **changes) -> Echo:
        return replace(self, **changes)
