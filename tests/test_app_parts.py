"""Pure parts of the app: frame composition, H.264 writing, figures, observed-frame choice, launch flags."""
from __future__ import annotations

import av
import numpy as np
import pytest
from test_app_server import ASSETS

from app import video as vid
from app.engine import StudioEngine
from app.figures import EFReadout, area_figure, ef_figure
from echolvfm_core.io import to_uint8, write_mp4


def test_side_by_side_with_contours_and_caption():
    grey = np.zeros((3, 16, 16), np.float32)
    mask = np.zeros((3, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    small = vid.resize_frames(to_uint8(grey, clip=True), 32)
    rgb = vid.to_rgb(small)
    assert rgb.shape == (3, 32, 32, 3) and rgb.dtype == np.uint8
    drawn = vid.draw_contours(rgb, mask)
    assert drawn.sum() > 0 and rgb.sum() == 0  # a copy, outlined only where the mask's border is
    assert drawn[:, 16, 16].sum() == 0  # the inside of the square stays untouched
    both = vid.side_by_side(drawn, vid.caption(rgb.copy(), "Original", (255, 255, 255)), gap=4)
    assert both.shape == (3, 32, 68, 3)
    with pytest.raises(ValueError, match="same shape"):
        vid.side_by_side(drawn, drawn[:2])
    labelled = vid.caption(np.full((2, 64, 64), 100, np.uint8), "EF 40 %")
    assert (labelled[:, -3:, :4] == 0).all() and labelled[0, :, :40].max() > 200  # white text on a black strip
    assert (labelled[0] == labelled[1]).all() and labelled[0, 10, 50] == 100  # same caption, rest untouched
    assert vid.side_by_side(labelled, labelled).shape == (2, 64, 132)


def test_loop_to_length_repeats_cyclically():
    frames = np.arange(3)[:, None, None] * np.ones((3, 2, 2))
    assert vid.loop_to_length(frames, 7)[:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("colour", [False, True])
def test_app_videos_are_browser_playable(tmp_path, colour):
    """The app's settings of the one H.264 writer: grey or RGB, black stays black and white white."""
    grey = np.zeros((5, 32, 48), np.uint8)
    grey[:, :, 24:] = 255
    clip = vid.to_rgb(grey) if colour else grey
    path = write_mp4(clip, tmp_path / "x.mp4", fps=25.0, **vid.APP_VIDEO)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.codec_context.width, s.codec_context.height) == (48, 32)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5
    assert frames[0][16, 4].max() <= 3 and frames[0][16, 40].min() >= 252  # black stays black, white white


def test_ef_figure_shows_interval_and_requested_line():
    samples = np.random.default_rng(0).normal(40, 3, 200)
    fig = ef_figure([EFReadout("Original", 55.0, None, None, None, None),
                     EFReadout("Counterfactual", 38.0, samples, 40.0, 35.0, 45.0)], requested_ef=40)
    kinds = [t.type for t in fig.data]
    assert kinds.count("violin") == 1 and kinds.count("scatter") == 3
    interval = next(t for t in fig.data if t.type == "scatter" and t.error_x.array is not None)
    assert interval.error_x.array[0] == pytest.approx(5.0) and interval.error_x.arrayminus[0] == pytest.approx(5.0)
    assert any("requested 40" in a.text for a in fig.layout.annotations)


def test_area_figure_time_axis_in_seconds():
    fig = area_figure({"Original": np.array([10.0, 8.0, 6.0, 8.0])}, fps=2.0, markers={"Original": (0, 2)})
    line = fig.data[0]
    assert list(line.x) == [0.0, 0.5, 1.0, 1.5]
    assert [t.text[0] for t in fig.data[1:]] == ["ED", "ES"]
    with pytest.raises(ValueError):
        area_figure({}, fps=0)


@pytest.mark.parametrize("mode,expected", [
    ("ed", (3,)), ("first_k", (0, 1, 2)), ("every_other", (0, 2, 4, 6, 8)), ("all", tuple(range(10))),
])
def test_observed_frames(mode, expected):
    assert StudioEngine.observed_frames(mode, n_frames=12, length=10, k=3, ed_index=3) == expected


def test_observed_frames_rejects_bad_requests():
    with pytest.raises(ValueError, match="k must be"):
        StudioEngine.observed_frames("first_k", 12, 10, k=11)
    with pytest.raises(ValueError, match="Unknown"):
        StudioEngine.observed_frames("random", 12, 10)


def test_engine_reports_missing_models(tmp_path):
    engine = StudioEngine(tmp_path, device="cpu")
    assert engine.status() == {"vae": False, "generator": False, "segmenter": False, "ef_regressor": False}
    with pytest.raises(Exception, match=r"generator is not bundled in .*generator yet"):
        engine.model("generator")


def test_launch_flags(tmp_path):
    import launch

    cfg = launch.parse_args(["--port", "7999", "--auth", "ann:se:cret", "--data", str(tmp_path), "--max-upload", "1GB"])
    assert (cfg.host, cfg.port, cfg.auth, cfg.data, cfg.max_upload) == ("127.0.0.1", 7999, ("ann", "se:cret"),
                                                                      tmp_path, "1gb")
    for bad in (["--auth", "nopass"], ["--max-upload", "lots"], ["--data", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit):
            launch.parse_args(bad)


def test_loops_longer_than_the_generator_are_resampled_to_its_length(tmp_path):
    """With a generator of 16 frames bundled, the 30-frame sample is measured and observed as 16 frames spanning
    the same second (as in the generator's training and evaluation); the display video keeps all 30 frames."""
    from dataclasses import asdict

    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.pipelines.counterfactual import save_generator

    models = tmp_path / "models"
    save_generator(EchoVelocityUNet(**{**asdict(unet_preset("tiny")), "max_frames": 16}), models / "generator")
    engine = StudioEngine(models, device="cpu")
    case = engine.load(None, tmp_path / "work")
    plain = StudioEngine(tmp_path / "none", device="cpu").load(None, tmp_path / "work")
    assert plain.n_frames == 30 and case.n_frames == 16
    assert abs(case.n_frames / case.fps - plain.n_frames / plain.fps) < 1e-6
    with av.open(str(case.video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 30


def test_rolled_measurement_starts_at_end_diastole():
    from app.engine import Measurement, _rolled

    masks = np.arange(5)[:, None, None] == np.ones((5, 2, 2))
    m = _rolled(Measurement(ef=50.0, lv_area=np.arange(5.0), lv_masks=masks, ed_index=2, es_index=1), 2)
    assert m.lv_area.tolist() == [2.0, 3.0, 4.0, 0.0, 1.0] and (m.ed_index, m.es_index, m.ef) == (0, 4, 50.0)
    assert m.lv_masks[4].all() and not m.lv_masks[0].any()


@pytest.mark.skipif(not all((ASSETS / m / "config.json").is_file() for m in ("generator", "segmenter")),
                    reason="the trained generator and segmenter are not bundled in assets/ yet")
def test_the_samples_es_marker_is_at_its_smallest_lv_area(tmp_path):
    """The built-in sample holds no whole beat, so the Studio plays it as one cycle and measures it as one: its ES
    marker is the frame of smallest LV area (measured as a clip, ES was the clip's last frame, 3 of 16 frames before
    the minimum). The bundled segmenter and the generator's length, without the slower EF posterior."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("generator", "segmenter"):
        (models / name).symlink_to(ASSETS / name)
    case = StudioEngine(models, device="cpu").load(None, tmp_path / "work")
    m = case.measurement
    assert case.cine.beats.method == "whole_loop" and case.n_frames == 16 and m.ed_index == 0
    off = abs(m.es_index - int(np.argmin(m.lv_area)))
    assert min(off, len(m.lv_area) - off) <= 1, (m.es_index, m.lv_area.round())


def test_a_rendered_beat_reads_its_ef_on_key_frames_and_its_curve_after_the_video(tmp_path):
    """On the 120-frame cine: each beat's motion gain is calibrated on first use, the EF on the video is read on the
    beat's key frames (ED and around ES), and the full measurement after the video adds the whole beat's area curve
    with the same EF, ED and ES; with contours every frame is segmented at once. The bundled generator, codec and
    segmenter, without the slower EF posterior."""
    from echolvfm_core.io import sample_cine_path

    if sample_cine_path() is None:
        pytest.skip("pydicom-data (color3d_jpeg_baseline.dcm) is not installed")
    models = tmp_path / "models"
    models.mkdir()
    for name in ("generator", "vae", "segmenter"):
        (models / name).symlink_to(ASSETS / name)
    engine = StudioEngine(models, device="cpu")
    case = engine.load(sample_cine_path(), tmp_path / "work")
    cine = case.cine
    assert cine.labels is not None and len(cine.labels) == len(cine.grid)
    again = engine.measure(cine.beat_frames(1)[1], case.echo)  # segmented anew: the same as the beat's slice
    assert engine.beat_measurement(case, 1).ef == pytest.approx(again.ef)

    result = engine.counterfactual(case, 30.0, tmp_path / "out", beat=1, seed=0)
    n = result.display.shape[0]
    seg = result.segmentation
    assert result.video.is_file()
    assert seg.key_frames is not None and len(seg.key_frames) < n // 2 and seg.lv_area is None
    assert {seg.ed_index, seg.es_index} <= set(seg.key_frames)
    assert abs(seg.ef - 30.0) <= 8, seg.ef  # the calibrated gain makes the beat follow the request
    full = engine.measure_result(case, result)
    assert full.ef == seg.ef and (full.ed_index, full.es_index) == (seg.ed_index, seg.es_index)
    assert full.lv_area.shape == (n,) and full.lv_masks.shape[0] == n

    outlined = engine.counterfactual(case, 30.0, tmp_path / "out", beat=1, seed=0, contours=True)
    assert outlined.segmentation.key_frames is None and outlined.segmentation.lv_masks.shape[0] == n
