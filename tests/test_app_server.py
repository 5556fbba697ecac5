"""The Studio as users reach it: ``launch.py`` in a subprocess on 127.0.0.1, driven by gradio_client and Chromium.

With tiny random models these tests check the plumbing (load, EF 30 / 70, readouts, downloads, errors that leave
the session usable, the page in a browser). Whether the measured EFs follow the request needs the trained bundled
models in assets/; that test skips while they are absent.

The browser test saves its screenshot in its tmp folder; set ``ECHOLVFM_SCREENSHOT=docs/app_screenshot.png`` (and
``ECHOLVFM_BROWSER_MODELS=assets``, to show the bundled models rather than the tiny random ones) to refresh the
README's screenshot.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import av
import pytest

from app.bench import REPO_ROOT, LocalServer

ASSETS = REPO_ROOT / "assets"
CHROMIUM = Path("/usr/bin/chromium")
# Tests check plumbing, not speed: one thread per server keeps them quick on a busy shared machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def build_tiny_models(root: Path) -> Path:
    """Random tiny versions of the four bundled models in ``root`` (vae, generator, segmenter, ef_regressor)."""
    import torch

    from echolvfm_core.estimators.ef_posterior import make_train_scheduler
    from echolvfm_core.models.ef_denoiser import EFDenoiser, ef_denoiser_preset
    from echolvfm_core.models.segmenter import LVSegmenter, segmenter_preset
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.models.vae import EchoCodec, build_vae
    from echolvfm_core.pipelines.counterfactual import save_generator

    torch.manual_seed(0)
    LVSegmenter(**asdict(segmenter_preset("tiny"))).save_pretrained(root / "segmenter")
    EFDenoiser(**asdict(ef_denoiser_preset("tiny"))).save_pretrained(root / "ef_regressor")
    make_train_scheduler().save_config(root / "ef_regressor")
    EchoCodec(build_vae("tiny")).save_pretrained(root / "vae")
    save_generator(EchoVelocityUNet(**asdict(unet_preset("tiny"))), root / "generator")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    srv = LocalServer(models, "cpu", env=ONE_THREAD, startup_timeout=150)
    srv.start()
    yield srv
    srv.stop()
    # Stopping the app (SIGTERM) removes its temporary folder, uploads and generated videos included.
    temp = re.search(r"temporary files in (\S+), removed on exit", srv.log(tail=10**8))  # the whole log
    assert temp and not Path(temp.group(1)).exists(), srv.log()
    srv.log_path.unlink()


@pytest.fixture(scope="module")
def browser_server(server):
    """The tiny-model server, or one on ECHOLVFM_BROWSER_MODELS when that is set (e.g. assets)."""
    models = os.environ.get("ECHOLVFM_BROWSER_MODELS")
    if not models:
        yield server
        return
    with LocalServer(models, "cpu", startup_timeout=150) as srv:
        yield srv


@pytest.fixture()
def client(server, tmp_path, monkeypatch):
    from gradio_client import Client

    # gradio_client stages every download in a fresh folder under tempfile.gettempdir(): keep those in tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))


def _video_path(value) -> Path:
    return Path(value["video"] if isinstance(value, dict) else value)


def _h264_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        return sum(1 for _ in c.decode(video=0))


def _counterfactual(client, ef, length=12, **kw):
    args = dict(mode="ed", k=4, length=length, seed=0, reject=False, reject_k=4, contours=False) | kw
    return client.predict(ef, *args.values(), api_name="/counterfactual")


def test_load_sample_then_ef_30_and_70(client):
    loaded = client.predict(api_name="/load_sample")
    assert _h264_frames(_video_path(loaded[0])) == loaded[2]["frames"] >= 10
    assert "Built-in sample" in loaded[1] and loaded[2]["fps"] > 0
    for ef in (30, 70):
        video, line, summary = _counterfactual(client, ef, contours=ef == 70)
        assert _h264_frames(_video_path(video)) == 12
        assert f"Requested EF **{ef} %**" in line and summary["requested_ef"] == ef
        assert summary["latency_ms"] > 0 and summary["observed_frames"] == [summary.get("original_ed_index") or 0]
        ef_plot, area_plot, text, raw = client.predict(api_name="/measure")
        assert f"**Requested EF**: {ef} %" in text and "**Counterfactual**" in text
        assert raw["requested_ef"] == ef and raw["counterfactual_posterior_mean"] is not None
        assert 0 <= raw["counterfactual_posterior_p05"] <= raw["counterfactual_posterior_p95"] <= 100
        assert ef_plot["type"] == "plotly" and area_plot["type"] == "plotly"
    files = client.predict(api_name="/export")
    assert sorted(Path(f).suffix for f in files) == [".dcm", ".gif", ".mp4"]
    import pydicom

    ds = pydicom.dcmread(next(f for f in files if f.endswith(".dcm")))
    assert "DERIVED" in ds.ImageType and "synthetic" in ds.SeriesDescription.lower()


def test_bad_upload_is_an_error_and_the_session_goes_on(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client.predict(api_name="/load_sample")
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad)), api_name="/load_upload")
    assert "scan.dcm" in str(err.value)
    with pytest.raises(AppError, match="maximum"):  # the slider's range is checked before the callback
        _counterfactual(client, 95)
    video, _, summary = _counterfactual(client, 55)
    assert _video_path(video).is_file() and summary["requested_ef"] == 55


@pytest.mark.skipif(not all((ASSETS / m / "config.json").is_file() for m in ("vae", "generator", "segmenter")),
                    reason="the trained generator, VAE and segmenter are not bundled in assets/ yet")
def test_bundled_models_follow_the_requested_ef():
    from gradio_client import Client

    with LocalServer(ASSETS, "cpu", startup_timeout=150) as srv:
        client = Client(srv.url, verbose=False, download_files=False)
        client.predict(api_name="/load_sample")
        measured = {}
        length = json.loads((ASSETS / "generator" / "config.json").read_text())["max_frames"]
        for ef in (30, 70):
            _counterfactual(client, ef, length=length)
            raw = client.predict(api_name="/measure")[3]
            measured[ef] = raw["counterfactual_segmentation_ef"]
        assert None not in measured.values(), measured
        assert measured[70] - measured[30] >= 20, measured  # the generator issue's acceptance on the sample


@pytest.mark.browser
def test_browser_loads_sample_drags_slider_and_saves_screenshot(browser_server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    server = browser_server
    outside = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((server.url.rstrip("/"), "data:", "blob:")) else None)
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_selector("#orig-video video", timeout=60_000)  # the sample is loaded at start
            page.wait_for_selector("#cf-video video", timeout=60_000)  # ... and its counterfactual shown
            assert "Built-in sample" in page.inner_text("#case-md")
            before = page.eval_on_selector("#cf-video video", "v => v.currentSrc || v.src")
            track = page.locator("#ef-slider input[type=range]").bounding_box()
            y = track["y"] + track["height"] / 2
            page.mouse.move(track["x"] + track["width"] * 0.375, y)  # 40 % on a 10-90 track
            page.mouse.down()
            page.mouse.move(track["x"] + track["width"] * 0.75, y, steps=6)  # ~70 %
            page.mouse.up()
            page.wait_for_function(
                "s => { const v = document.querySelector('#cf-video video'); return v && (v.currentSrc || v.src) "
                "&& (v.currentSrc || v.src) !== s; }", arg=before, timeout=60_000)
            page.wait_for_function("() => document.querySelector('#cf-video video').readyState >= 2",
                                   timeout=30_000)
            requested = int(page.input_value("#ef-box input"))
            assert 65 <= requested <= 75
            page.wait_for_function(f"() => document.querySelector('#latency-md').innerText.includes('{requested} %')",
                                   timeout=30_000)
            page.wait_for_function("() => document.querySelector('#readout-md').innerText.includes('Requested EF')",
                                   timeout=60_000)
            time.sleep(1.0)  # let the plots settle
            shot = tmp_path / "app_screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page fetched resources from outside the app: {outside[:5]}"
    assert shot.stat().st_size > 20_000
    if os.environ.get("ECHOLVFM_SCREENSHOT"):
        target = Path(os.environ["ECHOLVFM_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


@pytest.mark.browser
def test_browser_loads_the_120_frame_cine_with_its_beats(browser_server, tmp_path):
    """The second built-in case: beats and heart rate shown, a beat picker, the counterfactual shown; with the
    bundled models (ECHOLVFM_BROWSER_MODELS=assets) the side-by-side video is at the cine's display resolution."""
    from echolvfm_core.io import sample_cine_path

    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    if sample_cine_path() is None:
        pytest.skip("pydicom-data (the 120-frame cine) is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(browser_server.url, wait_until="domcontentloaded")
            page.wait_for_selector("#cf-video video", timeout=90_000)  # the sample's counterfactual first
            before = page.eval_on_selector("#cf-video video", "v => v.currentSrc || v.src")
            page.click("#cine-btn")
            page.wait_for_function("() => document.querySelector('#case-md').innerText.includes('120 frames')",
                                   timeout=120_000)
            text = page.inner_text("#case-md")
            assert "30.0 fps" in text and "heart rate" in text, text
            if os.environ.get("ECHOLVFM_BROWSER_MODELS"):  # the bundled segmenter finds the three whole beats
                assert "3 found (lv area)" in text, text
            assert page.locator("#beat-dd").is_visible()
            page.wait_for_function(
                "s => { const v = document.querySelector('#cf-video video'); return v && (v.currentSrc || v.src) "
                "&& (v.currentSrc || v.src) !== s && v.readyState >= 1; }", arg=before, timeout=120_000)
            width = page.eval_on_selector("#cf-video video", "v => v.videoWidth")
            if os.environ.get("ECHOLVFM_BROWSER_MODELS"):
                assert width >= 2 * 512, width  # two panels at the cine's 513-pixel crop
                assert "acquired frames moved" in page.inner_text("#latency-md")
            page.wait_for_function("() => document.querySelector('#readout-md').innerText.includes('this beat')"
                                   if os.environ.get("ECHOLVFM_BROWSER_MODELS") else
                                   "() => document.querySelector('#readout-md').innerText.includes('Requested EF')",
                                   timeout=120_000)
            time.sleep(1.0)
            shot = tmp_path / "app_cine.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    if os.environ.get("ECHOLVFM_CINE_SCREENSHOT"):
        target = Path(os.environ["ECHOLVFM_CINE_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


#: Error badges on panels (a failed event marks each of its outputs); the toast of the message is not one of them.
ERROR_BADGES = "() => document.querySelectorAll('[data-testid=\"status-tracker\"] .error').length"


@pytest.mark.browser
def test_browser_bad_upload_after_a_good_one_then_keyboard_slider(server, tmp_path, sample_path):
    """A bad file after a good one leaves the good case, a message and no error badge; the arrow keys then move the
    EF slider and the good case is regenerated at the new EF."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    good, bad = tmp_path / "good_echo.dcm", tmp_path / "bad_scan.dcm"
    shutil.copyfile(sample_path, good)
    bad.write_bytes(b"this is not a DICOM file at all" * 10)
    src = "() => { const v = document.querySelector('#cf-video video'); return v ? (v.currentSrc || v.src) : ''; }"
    changed = f"s => ({src})() && ({src})() !== s"
    text_has = "([sel, t]) => document.querySelector(sel).innerText.includes(t)"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.url, wait_until="domcontentloaded")
            page.wait_for_selector("#cf-video video", timeout=60_000)  # the sample and its counterfactual
            before = page.evaluate(src)
            page.set_input_files("#upload input[type=file]", str(good))
            page.wait_for_function(text_has, arg=["#case-md", "good_echo.dcm"], timeout=60_000)
            page.wait_for_function(changed, arg=before, timeout=60_000)  # ... and its counterfactual
            page.wait_for_function(text_has, arg=["#readout-md", "Requested EF"], timeout=60_000)
            good_video = page.evaluate(src)

            page.click("#upload button[aria-label=Clear]")  # the box holds the good file until cleared
            page.set_input_files("#upload input[type=file]", str(bad))
            page.wait_for_function(text_has, arg=["#case-md", "Not loaded"], timeout=60_000)
            toast = page.inner_text("[data-testid=toast-text]")
            assert "bad_scan.dcm" in toast and "Traceback" not in toast
            case = page.inner_text("#case-md")
            assert "Counterfactuals still use good_echo.dcm" in case and "bad_scan.dcm" in case
            assert "bad_scan.dcm" not in page.inner_text("#upload")  # the upload box let go of the bad file
            assert page.evaluate(ERROR_BADGES) == 0
            assert page.evaluate(src) == good_video  # the panels still show the good case

            page.focus("#ef-slider input[type=range]")
            for _ in range(3):
                page.keyboard.press("ArrowRight")  # 40 -> 43; each key's release regenerates, the last one wins
            page.wait_for_function("() => document.querySelector('#ef-box input').value === '43'", timeout=10_000)
            page.wait_for_function(text_has, arg=["#latency-md", "Requested EF 43 %"], timeout=60_000)
            page.wait_for_function(text_has, arg=["#readout-md", "Requested EF: 43 %"], timeout=60_000)
            line = page.inner_text("#latency-md")
            assert "good_echo.dcm" in line and page.evaluate(src) != good_video
            assert page.evaluate(ERROR_BADGES) == 0
        finally:
            browser.close()
