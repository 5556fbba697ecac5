"""Video reader: containers, frame rate, grey conversion, format detection and bad inputs."""
from __future__ import annotations

import av
import numpy as np
import pytest

from echolvfm_core.echo import EchoLoadError, LoadLimits
from echolvfm_core.io import detect_kind, load_echo


def encode(path, frames: np.ndarray, codec="mpeg4", fps=25, fmt=None) -> None:
    """Encode uint8 (T, H, W) grey or (T, H, W, 3) RGB frames with PyAV (T may be 0)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        c.start_encoding()
        for f in frames:
            rgb = f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=-1)
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def smooth_loop(t=12, h=32, w=48) -> np.ndarray:
    """uint8 (T, H, W): a bright disc whose brightness and radius change over time (easy to compress)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        r = 6 + 4 * np.sin(2 * np.pi * i / t)
        out[i] = np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r * r, 120 + 8 * i, 20)
    return out


@pytest.mark.parametrize(
    "name, codec, fmt",
    [("a.avi", "mpeg4", None), ("a.mp4", "libx264", None), ("a.webm", "libvpx-vp9", "webm"),
     ("a.mkv", "mpeg4", None), ("a.mov", "mpeg4", None)],
)
def test_containers_read_as_grey_loops(tmp_path, name, codec, fmt):
    frames = smooth_loop()
    encode(tmp_path / name, frames, codec=codec, fps=25, fmt=fmt)
    echo = load_echo(tmp_path / name)
    assert echo.frames.shape == frames.shape and echo.frames.dtype == np.float32
    assert echo.fps == pytest.approx(25.0) and echo.source_format == "video" and echo.spacing_mm is None
    err = np.abs(echo.frames - frames / 255.0)
    assert err.mean() < 0.03 and np.median(err) < 0.02  # lossy codecs: close, not exact


def test_gif_reads(tmp_path):
    import imageio.v3 as iio

    frames = smooth_loop()
    iio.imwrite(tmp_path / "a.gif", frames, plugin="pillow", is_batch=True, duration=50, loop=0)
    echo = load_echo(tmp_path / "a.gif")
    assert echo.frames.shape == frames.shape and echo.fps == pytest.approx(20.0)
    np.testing.assert_allclose(echo.frames, frames / 255.0, atol=1.5 / 255)


def test_one_frame_video_is_a_still(tmp_path):
    encode(tmp_path / "one.avi", smooth_loop(t=1))
    echo = load_echo(tmp_path / "one.avi")
    assert echo.n_frames == 1 and echo.fps is None and not echo.is_loop


def test_kind_detection_by_content(tmp_path):
    encode(tmp_path / "clip.bin", smooth_loop(t=3), fmt="avi")
    assert detect_kind(tmp_path / "clip.bin") == "video"
    assert load_echo(tmp_path / "clip.bin").n_frames == 3
    assert load_echo(tmp_path / "clip.bin", kind="video").n_frames == 3


# --------------------------------------------------------------------------------------------------- bad inputs
def test_missing_file_and_folder(tmp_path):
    with pytest.raises(EchoLoadError, match="No file at 'nope.avi'"):
        load_echo(tmp_path / "nope.avi")
    with pytest.raises(EchoLoadError, match="is a folder"):
        load_echo(tmp_path)
    with pytest.raises(EchoLoadError, match="Unknown kind"):
        load_echo(tmp_path / "nope.avi", kind="jpeg")


def test_text_file_renamed_avi(tmp_path):
    (tmp_path / "notes.avi").write_text("this is not a video\n" * 20)
    with pytest.raises(EchoLoadError, match="could not be decoded as a video"):
        load_echo(tmp_path / "notes.avi")


def test_unknown_and_empty_files(tmp_path):
    (tmp_path / "x.xyz").write_text("hello")
    with pytest.raises(EchoLoadError, match="not in a recognised echo format"):
        load_echo(tmp_path / "x.xyz")
    (tmp_path / "empty.dat").write_bytes(b"")
    with pytest.raises(EchoLoadError, match="empty file"):
        load_echo(tmp_path / "empty.dat")


def test_zero_frame_video(tmp_path):
    encode(tmp_path / "empty.avi", np.zeros((0, 16, 16), np.uint8))
    with pytest.raises(EchoLoadError, match="no image frames"):
        load_echo(tmp_path / "empty.avi")


def test_10000_frame_video_rejected_from_metadata(tmp_path):
    encode(tmp_path / "long.avi", np.zeros((10000, 16, 16), np.uint8))
    with pytest.raises(EchoLoadError, match="10000 frames, more than the limit of 2000"):
        load_echo(tmp_path / "long.avi")


def test_frame_limit_from_duration_when_count_unknown(tmp_path):
    encode(tmp_path / "a.webm", smooth_loop(t=30), codec="libvpx-vp9", fmt="webm")  # WebM has no frame count
    with pytest.raises(EchoLoadError, match="has 30 frames, more than the limit of 10"):
        load_echo(tmp_path / "a.webm", limits=LoadLimits(max_frames=10))


def test_frame_limit_enforced_while_decoding_when_length_unknown(tmp_path):
    encode(tmp_path / "a.h264", smooth_loop(t=30), codec="libx264", fmt="h264")  # raw stream: no count, no duration
    assert load_echo(tmp_path / "a.h264", kind="video").n_frames == 30
    with pytest.raises(EchoLoadError, match="has more than 10 frames, the limit"):
        load_echo(tmp_path / "a.h264", kind="video", limits=LoadLimits(max_frames=10))


def test_frame_size_limit(tmp_path):
    encode(tmp_path / "wide.avi", smooth_loop(t=2, h=32, w=64))
    with pytest.raises(EchoLoadError, match="64 x 32 pixels, larger than the limit of 48"):
        load_echo(tmp_path / "wide.avi", limits=LoadLimits(max_side=48))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[::4, ::4])  # (128, 128, 3) uint8 colour photograph


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_photographs_are_not_supported(tmp_path, photo, ext):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / f"photo.{ext}", photo)
    with pytest.raises(EchoLoadError, match="images and photographs are not supported"):
        load_echo(tmp_path / f"photo.{ext}")


def test_colour_photograph_as_video_rejected(tmp_path, photo):
    encode(tmp_path / "photo.mp4", photo[None], codec="libx264")
    with pytest.raises(EchoLoadError, match="looks like a colour photograph, not a greyscale ultrasound"):
        load_echo(tmp_path / "photo.mp4")
