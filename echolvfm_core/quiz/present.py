"""One presentation for every quiz case, real or synthetic: from the acquired (or rendered) frames of a beat to the
served MP4, so that readers, and any tool they point at the file, have nothing but the image to go on.

:func:`present_frames` cuts the case's window from the beat played cyclically (a beat's last frame runs on into its
first, in both arms), resamples it in time to the study's frame rate, resizes it to the study's size and normalises
its grey levels inside the fan (1st and 99.5th percentiles to 0 and 0.95). :func:`encode_study` writes all cases
with one encoder setting (H.264, fixed GOP without scene cuts, so every file has the same frame types) and then
pads every coded frame with an H.264 filler-data NAL unit (type 12, which decoders skip) to the largest size of that
frame over the study, so every file has the same frame sizes, the same bitrate and the same byte count.
:func:`file_features` reads the file-level facts a reader could see (size, bitrate, duration, frames, rate, size,
codec fields) for the test that no single one separates the arms.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["VideoSpec", "ENCODER_OPTIONS", "present_frames", "encode_study", "file_features"]

#: libx264 settings of every quiz video: quality by CRF, one GOP with fixed frame types (no scene-cut I frames).
ENCODER_OPTIONS = {"crf": "17", "preset": "medium",
                   "x264-params": "scenecut=0:b-adapt=0:bframes=2:keyint=600:min-keyint=600"}
#: Bytes of the smallest filler NAL unit in an MP4 sample (4-byte length, NAL header, trailing byte).
_FILLER_MIN = 6


@dataclass(frozen=True)
class VideoSpec:
    """What every quiz video is made to look like: ``size`` x ``size`` pixels, ``fps`` frames per second and
    exactly ``n_frames`` frames (a window of ``n_frames / fps`` seconds of the case's beat played cyclically)."""

    size: int = 256
    fps: float = 30.0
    n_frames: int = 24

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"VideoSpec.size must be an even number of pixels >= 16 (H.264); got {self.size}.")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"VideoSpec.fps must be a positive frame rate; got {self.fps}.")
        if self.n_frames < 2:
            raise ValueError(f"VideoSpec.n_frames must be at least 2; got {self.n_frames}.")

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps


def present_frames(beat: np.ndarray, fps: float, start: float, spec: VideoSpec) -> np.ndarray:
    """The case's frames as served, before encoding.

    Args:
        beat: float (N, S, S) in [0, 1], one beat (ED to the frame before the next ED), 0 outside the fan.
        fps: frame rate of ``beat``.
        start: where the window starts, as a fraction of the beat in [0, 1).
        spec: the study's :class:`VideoSpec`.

    Returns:
        uint8 (spec.n_frames, spec.size, spec.size): the beat played cyclically from ``start`` at its own speed
        (linear interpolation between frames), resized (area averaging) and grey-normalised inside the fan.
    """
    beat = np.asarray(beat, dtype=np.float32)
    if beat.ndim != 3 or beat.shape[0] < 2 or beat.shape[1] != beat.shape[2]:
        raise ValueError(f"A quiz case needs a beat of square frames (N >= 2, S, S); got shape {beat.shape}.")
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be a fraction of the beat in [0, 1); got {start}.")
    n = beat.shape[0]
    pos = (start * n + np.arange(spec.n_frames) * fps / spec.fps) % n
    lo = np.floor(pos).astype(int)
    w = (pos - lo).astype(np.float32)[:, None, None]
    frames = (1 - w) * beat[lo] + w * beat[(lo + 1) % n]
    interp = cv2.INTER_AREA if beat.shape[-1] > spec.size else cv2.INTER_CUBIC
    frames = np.stack([cv2.resize(f, (spec.size, spec.size), interpolation=interp) for f in frames])
    fan = cv2.resize((beat.max(0) > 0).astype(np.uint8), (spec.size, spec.size),
                     interpolation=cv2.INTER_NEAREST).astype(bool)
    if fan.sum() < 16:
        raise ValueError("A quiz case needs an ultrasound fan; this beat is blank.")
    lo_g, hi_g = np.percentile(frames[:, fan], [1.0, 99.5])
    frames = (frames - lo_g) / max(float(hi_g - lo_g), 1e-6) * 0.95
    frames = np.clip(frames, 0.0, 1.0) * fan
    return np.round(frames * 255.0).astype(np.uint8)


def _encode(frames: np.ndarray, fps: float, path: Path) -> list:
    """Encode uint8 (T, H, W) with :data:`ENCODER_OPTIONS` to ``path``; returns its packets (bytes, pts, dts,
    keyframe), in stream order."""
    import av

    from ..io.writers import stream_rate

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=stream_rate(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(ENCODER_OPTIONS)
        for f in frames:
            rgb = np.ascontiguousarray(np.repeat(f[..., None], 3, -1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in container.demux(video=0) if p.size]


def _filler(n: int) -> bytes:
    """An AVCC filler-data NAL unit of exactly ``n`` bytes (n >= 6)."""
    body = b"\x0c" + b"\xff" * (n - _FILLER_MIN) + b"\x80"
    return len(body).to_bytes(4, "big") + body


def _remux(source: Path, packets: list, path: Path) -> None:
    """Write ``packets`` (bytes, pts, dts, keyframe) as the video of ``source`` (its stream settings) to ``path``."""
    import av

    with av.open(str(source)) as src, av.open(str(path), mode="w", format="mp4",
                                              options={"movflags": "+faststart"}) as container:
        template = src.streams.video[0]
        stream = container.add_stream_from_template(template)
        for data, pts, dts, key in packets:
            packet = av.Packet(data)
            packet.pts, packet.dts, packet.time_base, packet.stream = pts, dts, template.time_base, stream
            packet.is_keyframe = key
            container.mux(packet)


def encode_study(cases: Sequence[np.ndarray], paths: Sequence[str | os.PathLike], fps: float) -> int:
    """Write every case (uint8 (T, H, W), all the same shape) as an MP4 whose coded frames are padded to the
    study-wide largest size at each frame index; then pad the files (an MP4 ``free`` box) to one byte count.

    Returns the common file size in bytes. Raises ValueError when the cases differ in shape or in coded structure
    (frame count or frame types), which one encoder setting should never produce.
    """
    if len(cases) != len(paths) or not cases:
        raise ValueError("encode_study needs one path per case and at least one case.")
    shapes = {np.asarray(c).shape for c in cases}
    if len(shapes) != 1:
        raise ValueError(f"Every quiz case must have the same frames and size; got shapes {sorted(shapes)}.")
    paths = [Path(p) for p in paths]
    coded = []
    for c, path in zip(cases, paths):
        coded.append(_encode(np.asarray(c, dtype=np.uint8), fps, path.with_suffix(".coded.mp4")))
    structure = {tuple((pts, dts, key) for _, pts, dts, key in packets) for packets in coded}
    if len(structure) != 1:
        raise ValueError("The encoder gave the quiz cases different frame structures; they would be told apart.")
    target = [max(len(packets[i][0]) for packets in coded) + _FILLER_MIN for i in range(len(coded[0]))]
    for packets, path in zip(coded, paths):
        padded = [(data + _filler(t - len(data)), pts, dts, key) for (data, pts, dts, key), t in zip(packets, target)]
        _remux(path.with_suffix(".coded.mp4"), padded, path)
        path.with_suffix(".coded.mp4").unlink()
    size = max(os.path.getsize(p) for p in paths)
    if any(0 < size - os.path.getsize(p) < 8 for p in paths):  # a box needs 8 bytes: grow every file instead
        size += 8
    for p in paths:
        short = size - os.path.getsize(p)
        if short:
            with open(p, "ab") as fh:
                fh.write(short.to_bytes(4, "big") + b"free" + b"\0" * (short - 8))
    return size


def file_features(path: str | os.PathLike) -> dict[str, float | str]:
    """File-level facts of a served video: bytes, container and stream bitrate, duration, frames, frame rate,
    width, height, codec name, profile, level, pixel format, metadata, and the name's length."""
    import av

    path = Path(path)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        cc = s.codec_context
        sizes = [p.size for p in c.demux(s) if p.size]
        return {
            "bytes": float(path.stat().st_size),
            "container_bitrate": float(c.bit_rate or 0),
            "stream_bitrate": float(s.bit_rate or 0),
            "duration_s": float(c.duration or 0) / 1e6,
            "frames": float(len(sizes)),
            "largest_frame": float(max(sizes)),
            "fps": float(s.average_rate),
            "width": float(s.width),
            "height": float(s.height),
            "name_length": float(len(path.name)),
            "codec": f"{cc.name}/{cc.profile}/{cc.level}/{cc.pix_fmt}",
            "metadata": repr(sorted(dict(c.metadata).items()) + sorted(dict(s.metadata).items())),
        }
