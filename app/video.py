"""Frame composition for the Studio's videos: grey to RGB, resizing, LV contours, side-by-side panels with captions.

All functions take grey frames as float32 (T, H, W) in [0, 1] or RGB frames as uint8 (T, H, W, 3).
:func:`write_h264` writes the composed RGB clips the app shows; the downloadable files (the generated loop alone as
MP4, GIF and DICOM marked synthetic) are written by :mod:`echolvfm_core.io`.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

__all__ = ["to_rgb", "resize_frames", "resize_masks", "draw_contours", "caption", "side_by_side", "loop_to_length",
           "write_h264"]

#: BGR-free RGB colours used for overlays.
CONTOUR_RGB = (255, 200, 0)


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) float32 grey in [0, 1] -> (T, H, W, 3) uint8 RGB."""
    if frames.ndim != 3:
        raise ValueError(f"expected grey frames (T, H, W); got shape {frames.shape}.")
    grey = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize (T, H, W) or (T, H, W, 3) frames to size x size (bilinear when enlarging, area when shrinking)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    interp = cv2.INTER_LINEAR if size > frames.shape[1] else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Resize (T, h, w) boolean or label masks to (T, size, size) with nearest-neighbour interpolation."""
    m = masks.astype(np.uint8)
    if m.shape[1] == size and m.shape[2] == size:
        return m
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_NEAREST) for f in m])


def draw_contours(rgb: np.ndarray, masks: np.ndarray, colour: tuple[int, int, int] = CONTOUR_RGB,
                  thickness: int = 1) -> np.ndarray:
    """Draw the outline of each frame's mask onto a copy of ``rgb``.

    Args:
        rgb: (T, H, W, 3) uint8 frames.
        masks: (T, h, w) boolean masks (e.g. the LV cavity), resized to (H, W) with nearest neighbour.
    """
    if rgb.shape[0] != masks.shape[0]:
        raise ValueError(f"{rgb.shape[0]} frames but {masks.shape[0]} masks.")
    out = rgb.copy()
    masks = resize_masks(masks > 0, rgb.shape[1]) if masks.shape[1:] != rgb.shape[1:3] else masks.astype(np.uint8)
    for frame, mask in zip(out, masks):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(frame, contours, -1, colour, thickness, lineType=cv2.LINE_AA)
    return out


def caption(rgb: np.ndarray, text: str, colour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Write ``text`` on a black strip in the bottom-left corner of every frame of (T, H, W, 3) uint8 ``rgb``
    (in place; returned)."""
    scale = max(rgb.shape[2] / 560.0, 0.35)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x, y = 4, rgb.shape[1] - 4 - base
    rgb[:, max(y - h - 3, 0) : min(y + base + 2, rgb.shape[1]), : min(x + w + 4, rgb.shape[2])] = 0
    for frame in rgb:
        cv2.putText(frame, text, (x + 2, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return rgb


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Join two (T, H, W, 3) uint8 clips of equal shape into (T, H, 2 W + gap, 3) with a black gap between."""
    if left.shape != right.shape:
        raise ValueError(f"side-by-side panels must have the same shape; got {left.shape} and {right.shape}.")
    spacer = np.zeros((left.shape[0], left.shape[1], gap, 3), dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=2)


def loop_to_length(frames: np.ndarray, length: int) -> np.ndarray:
    """Repeat a loop cyclically (frame i -> i mod T) to exactly ``length`` frames, keeping its frame rate."""
    if length < 1:
        raise ValueError(f"length must be at least 1; got {length}.")
    return frames[np.arange(length) % frames.shape[0]]


def write_h264(rgb: np.ndarray, path: str | Path, fps: float, crf: int = 20) -> Path:
    """Write (T, H, W, 3) uint8 RGB frames as a browser-playable H.264 MP4 (yuv420p, moov atom first).

    Speed over size: the x264 "ultrafast" preset, since this runs on every slider release. H and W must be even.
    """
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames (T, H, W, 3); got {rgb.dtype} {rgb.shape}.")
    if rgb.shape[1] % 2 or rgb.shape[2] % 2:
        raise ValueError(f"H.264 in yuv420p needs even frame sides; got {rgb.shape[2]} x {rgb.shape[1]}.")
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    path = Path(path)
    rate = round(float(fps) * 1000)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(rate, 1000))
        stream.width, stream.height, stream.pix_fmt = rgb.shape[2], rgb.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for frame in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
