"""Video reader (AVI, MP4, MOV, MKV, GIF, WebM) through imageio v3 and its PyAV plugin, converted to grey.

Size limits are checked from the container's metadata (frame count or duration x fps, frame size) before decoding;
decoding then stops as soon as the frame limit is passed, so a container that hides its length cannot exhaust memory.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..echo import Echo, EchoLoadError, LoadLimits
from ._common import check_not_photo, display_name, luma, reason

__all__ = ["read_video", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = {".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".wmv", ".ogv"}
ACCEPTED = "a video file (AVI, MP4, MOV, MKV, GIF or WebM), a DICOM file or a NIfTI file"


def _errors() -> tuple[type[Exception], ...]:
    import av

    return (OSError, ValueError, EOFError, av.FFmpegError)


def _duration_s(meta: dict) -> float | None:
    """Container duration in seconds from imageio's metadata (``duration`` or a Matroska ``DURATION`` tag)."""
    value = meta.get("duration")
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    tag = meta.get("DURATION")
    if isinstance(tag, str):
        m = re.fullmatch(r"\s*(\d+):(\d+):(\d+(?:\.\d+)?)\s*", tag)
        if m:
            return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    return None


def read_video(path: str | Path, limits: LoadLimits | None = None) -> Echo:
    """Read a video file into an :class:`Echo` (frames float32 (T, H, W), Rec. 601 luma in [0, 1]).

    ``fps`` is the container's frame rate (None for a single frame); no spacing is known. Raises
    :class:`EchoLoadError` when the file is not a decodable video, is over ``limits``, has no frame, or looks like
    a colour photograph / colour camera video.
    """
    import imageio.v3 as iio

    path = Path(path)
    what = display_name(path)
    limits = limits or LoadLimits.from_env()
    errors = _errors()
    try:
        with iio.imopen(path, "r", plugin="pyav") as video:
            props = video.properties(index=...)
            meta = video.metadata(index=..., exclude_applied=False)
            height, width = int(props.shape[1]), int(props.shape[2])
            fps = meta.get("fps")
            fps = float(fps) if isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0 else None
            declared = int(props.n_images or 0)
            if declared <= 0 and fps is not None and _duration_s(meta) is not None:
                declared = int(round(_duration_s(meta) * fps))
            # Unknown length (0) is checked as one frame here and frame by frame while decoding.
            limits.check(max(declared, 1), height, width, what)
            grey: list[np.ndarray] = []
            for frame in video.iter(format="rgb24"):
                if len(grey) >= limits.max_frames:
                    raise EchoLoadError(
                        f"{what} has more than {limits.max_frames} frames, the limit "
                        "(set ECHOLVFM_MAX_FRAMES to raise it)."
                    )
                limits.check(len(grey) + 1, height, width, what)
                if not grey:
                    check_not_photo([frame], 255.0, what)
                grey.append(luma(frame, 255.0))
    except EchoLoadError:
        raise
    except errors as exc:
        raise EchoLoadError(f"{what} could not be decoded as a video ({reason(exc, path)}); give {ACCEPTED}.") from exc
    if not grey:
        limits.check(0, height, width, what)
    frames = np.stack(grey).astype(np.float32, copy=False)
    return Echo(frames=frames, fps=fps if len(grey) > 1 else None, spacing_mm=None, source_format="video")
