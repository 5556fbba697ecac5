"""Frame composition for the Studio's videos: resizing, LV contours, captions, side-by-side panels.

Clips are uint8, either grey (T, H, W) or RGB (T, H, W, 3), converted from model frames (float32 in [0, 1]) by
:func:`echolvfm_core.io.to_uint8` with ``clip`` and written by :func:`echolvfm_core.io.write_mp4` (x264
"ultrafast" for what runs on every slider release, see :data:`APP_VIDEO`). The slider's critical path stays grey
(a tenth of the work of RGB) and turns RGB only for the coloured LV contours. The downloadable files (the
generated loop alone as MP4, GIF and DICOM marked synthetic) are written by :mod:`echolvfm_core.io` too.
"""
from __future__ import annotations

import cv2
import numpy as np

from echolvfm_core.io import to_uint8

__all__ = [
    "APP_VIDEO",
    "CONTOUR_RGB",
    "caption",
    "draw_contours",
    "even",
    "loop_to_length",
    "resize_frames",
    "resize_masks",
    "side_by_side",
    "to_rgb",
]

#: Colour of LV contours (RGB).
CONTOUR_RGB = (255, 200, 0)

#: x264 settings of the videos the app shows (speed over size: one is written on every slider release).
APP_VIDEO = {"crf": 20, "preset": "ultrafast"}


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """Grey (T, H, W), uint8 or float in [0, 1] -> (T, H, W, 3) uint8 RGB."""
    grey = to_uint8(frames, clip=True)
    if grey.ndim != 3:
        raise ValueError(f"expected grey frames (T, H, W); got shape {frames.shape}.")
    return np.repeat(grey[..., None], 3, axis=-1)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize (T, H, W) or (T, H, W, 3) frames to size x size (bilinear when enlarging, area when shrinking)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    interp = cv2.INTER_LINEAR if size > frames.shape[1] else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames])


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Resize (T, h, w) boolean or label masks to (T, size, size) uint8 with nearest-neighbour interpolation."""
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
    if rgb.ndim != 4 or rgb.shape[0] != masks.shape[0]:
        raise ValueError(f"need RGB frames (T, H, W, 3) and one mask per frame; got {rgb.shape} and {masks.shape}.")
    out = rgb.copy()
    masks = resize_masks(masks > 0, rgb.shape[1]) if masks.shape[1:] != rgb.shape[1:3] else masks.astype(np.uint8)
    for frame, mask in zip(out, masks):
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(frame, contours, -1, colour, thickness, lineType=cv2.LINE_AA)
    return out


def caption(clip: np.ndarray, text: str, colour: tuple[int, int, int] | int = 255) -> np.ndarray:
    """Write ``text`` on a black strip in the bottom-left corner of every frame of a uint8 clip (grey or RGB;
    in place, returned). ``colour`` is a grey level for grey clips, an RGB triple for RGB ones."""
    scale = max(clip.shape[2] / 560.0, 0.35)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y0, y1 = max(clip.shape[1] - 7 - base - h, 0), clip.shape[1]
    x1 = min(w + 10, clip.shape[2])
    strip = np.zeros((y1 - y0, x1) + clip.shape[3:], dtype=np.uint8)
    cv2.putText(strip, text, (5, strip.shape[0] - 4 - base), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    clip[:, y0:y1, :x1] = strip  # drawn once, pasted into every frame
    return clip


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Join two uint8 clips of equal shape, (T, H, W) or (T, H, W, 3), into (T, H, 2 W + gap, ...) with a black gap."""
    if left.shape != right.shape:
        raise ValueError(f"side-by-side panels must have the same shape; got {left.shape} and {right.shape}.")
    spacer = np.zeros((left.shape[0], left.shape[1], gap) + left.shape[3:], dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=2)


def even(clip: np.ndarray) -> np.ndarray:
    """Pad a clip (T, H, W[, 3]) with black at the bottom / right to even sides, as H.264 in yuv420p needs."""
    pad_h, pad_w = clip.shape[1] % 2, clip.shape[2] % 2
    if not (pad_h or pad_w):
        return clip
    return np.pad(clip, ((0, 0), (0, pad_h), (0, pad_w)) + ((0, 0),) * (clip.ndim - 3))


def loop_to_length(frames: np.ndarray, length: int) -> np.ndarray:
    """Repeat a loop cyclically (frame i -> i mod T) to exactly ``length`` frames, keeping its frame rate."""
    if length < 1:
        raise ValueError(f"length must be at least 1; got {length}.")
    return frames[np.arange(length) % frames.shape[0]]
