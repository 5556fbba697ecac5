"""EchoNet-Dynamic folders: FileList parsing, ED / ES from VolumeTracings, lazy records, load_echo inside Videos/."""
from __future__ import annotations

import logging

import imageio.v3 as iio
import numpy as np
import pytest

from echolvfm_core.echo import EchoLoadError
from echolvfm_core.io import EchoNetRecord, load_echo, read_echonet

N_FRAMES = 10


def tracing_rows(name: str, frame: int, half_width: float) -> list[str]:
    """VolumeTracings rows for one frame: the long axis, then 5 chords of the given half-width around x = 56."""
    rows = [f"{name},56,20,56,90,{frame}"]
    for y in np.linspace(30, 80, 5):
        rows.append(f"{name},{56 - half_width},{y},{56 + half_width},{y},{frame}")
    return rows


@pytest.fixture()
def echonet_root(tmp_path):
    root = tmp_path / "EchoNet-Dynamic"
    (root / "Videos").mkdir(parents=True)
    yy, xx = np.mgrid[:112, :112]
    for i, name in enumerate(["0X1A", "0X2B", "0X3C"]):
        frames = np.stack([np.where((yy - 56) ** 2 + (xx - 56) ** 2 < (20 + 3 * i + t) ** 2, 150, 15)
                           for t in range(N_FRAMES)]).astype(np.uint8)
        iio.imwrite(root / "Videos" / f"{name}.avi", np.repeat(frames[..., None], 3, axis=-1), plugin="pyav",
                    codec="mpeg4", fps=50)
    (root / "FileList.csv").write_text(
        "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split\n"
        f"0X1A,62.5,30.1,80.2,112,112,50,{N_FRAMES},TRAIN\n"
        f"0X2B,35.0,70.0,107.7,112,112,50,{N_FRAMES},VAL\n"
        f"0X3C,55.0,40.0,88.9,112,112,50,{N_FRAMES},TEST\n"
        "0X4D,50.0,45.0,90.0,112,112,50,10,TRAIN\n"  # listed, but its video is missing
    )
    # ES (small cavity) listed first for 0X1A, last for 0X2B: the reader must use the areas, not the order.
    rows = (tracing_rows("0X1A.avi", 7, 8) + tracing_rows("0X1A.avi", 2, 14)
            + tracing_rows("0X2B.avi", 1, 15) + tracing_rows("0X2B.avi", 6, 11))
    (root / "VolumeTracings.csv").write_text("FileName,X1,Y1,X2,Y2,Frame\n" + "\n".join(rows) + "\n")
    return root


def test_read_echonet_records(echonet_root, caplog):
    with caplog.at_level(logging.WARNING):
        records = list(read_echonet(echonet_root))
    assert [r.file_name for r in records] == ["0X1A", "0X2B", "0X3C"]
    assert "1 EchoNet videos listed in FileList.csv are missing" in caplog.text
    a, b, c = records
    assert isinstance(a, EchoNetRecord) and a.path == echonet_root / "Videos" / "0X1A.avi"
    assert (a.ef, a.esv, a.edv, a.fps, a.n_frames, a.split) == (62.5, 30.1, 80.2, 50.0, N_FRAMES, "train")
    assert (a.ed_index, a.es_index) == (2, 7) and (b.ed_index, b.es_index) == (1, 6)
    assert (c.ed_index, c.es_index) == (None, None)  # not traced
    assert [r.file_name for r in read_echonet(echonet_root, split="VAL")] == ["0X2B"]


def test_record_load_and_load_echo_inside_videos(echonet_root):
    record = next(read_echonet(echonet_root, split="train"))
    echo = record.load()
    assert echo.frames.shape == (N_FRAMES, 112, 112) and echo.fps == pytest.approx(50.0)
    assert echo.source_format == "echonet"
    assert (echo.info.ef, echo.info.ed_index, echo.info.es_index, echo.info.view) == (62.5, 2, 7, "4CH")
    same = load_echo(echonet_root / "Videos" / "0X1A.avi")
    np.testing.assert_array_equal(same.frames, echo.frames)
    assert same.info == echo.info and same.source_format == "echonet"
    assert load_echo(echonet_root / "Videos" / "0X2B.avi", kind="echonet").info.ef == 35.0
    assert load_echo(echonet_root / "Videos" / "0X3C").info.ef == 55.0  # FileList name, no extension


def test_unlisted_video_is_a_plain_video_and_kind_echonet_needs_a_listing(echonet_root, tmp_path):
    unlisted = echonet_root / "Videos" / "0X9Z.avi"
    unlisted.write_bytes((echonet_root / "Videos" / "0X1A.avi").read_bytes())
    echo = load_echo(unlisted)
    assert echo.source_format == "video" and echo.info.ef is None
    with pytest.raises(EchoLoadError, match="not a video listed in an EchoNet-Dynamic FileList.csv"):
        load_echo(unlisted, kind="echonet")


def test_not_an_echonet_folder(tmp_path):
    with pytest.raises(EchoLoadError, match="needs FileList.csv and a Videos/ folder"):
        read_echonet(tmp_path)
