"""The realism quiz end to end with tiny random models: `echolvfm quiz create`, the Quiz and Results tab callbacks,
what the browser receives (no truth), and a browser answering three cases."""
from __future__ import annotations

import contextlib
import json
import re
import secrets
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from test_app_server import CHROMIUM, ONE_THREAD, build_tiny_models
from test_quiz_study import fan_echo

from echolvfm_core.cli import main
from echolvfm_core.io import write_dicom
from echolvfm_core.quiz.store import QuizStore
from echolvfm_core.quiz.study import load_study

POOL_LABEL = "unit-test fan phantoms"


def dicom_pool(folder: Path, n: int) -> Path:
    """``n`` small moving-speckle fan loops as DICOM files (fast to read, unlike MP4)."""
    folder.mkdir(parents=True)
    for i in range(n):
        write_dicom(fan_echo(i), folder / f"echo{i}.dcm")
    return folder


def build_quiz_models(root: Path) -> Path:
    """The tiny random models, with a generator that predicts motion (what rendering on acquired frames needs)."""
    from dataclasses import asdict

    from echolvfm_core.flows.meanflow import MeanFlowConfig
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.pipelines.counterfactual import save_generator

    build_tiny_models(root)
    net = EchoVelocityUNet(**{**asdict(unet_preset("tiny")), "displacement_channels": 2})
    save_generator(net, root / "generator", flow_config=MeanFlowConfig(prediction="warp", residual=True))
    return root


def fake_measure(self, frames):
    """Stands in for the random tiny segmenter: LV area = dark pixels in the middle third, EF 50 %."""
    f = np.asarray(frames)
    side = f.shape[-1]
    middle = f[:, side // 3 : 2 * side // 3, side // 3 : 2 * side // 3]
    area = (middle < 0.2 * f.max()).sum(axis=(1, 2)).astype(float)
    return SimpleNamespace(lv_area=area, ef=50.0, es_index=int(np.argmin(area)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_quiz_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def study(models, tmp_path_factory):
    """A 6 + 2 practice study from the pydicom sample and 9 fan loops (10 beats, each a whole loop), made by the
    CLI with the automatic reader; (db, study id, output)."""
    from echolvfm_core.estimators.segmentation import SegmentationEF

    root = tmp_path_factory.mktemp("quiz")
    pool = dicom_pool(root / "pool", 9)
    db = root / "study" / "quiz.sqlite"
    capture = root / "out.txt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the automatic reader's classifier: one thread is faster on two shared cores
    with pytest.MonkeyPatch.context() as mp, open(capture, "w") as fh, contextlib.redirect_stdout(fh):
        mp.setattr(SegmentationEF, "measure", fake_measure)
        rc = main(["quiz", "create", str(db), "--pool", "sample", str(pool), "--pool-label", POOL_LABEL,
                   "--cases", "6", "--calibration", "2", "--ef-range", "25,70", "--models", str(models), "--seed",
                   "5", "--size", "128", "--frames", "12", "--fps", "25", "--max-detectability", "1"])
    torch.set_num_threads(threads)
    assert rc == 0
    out = capture.read_text()
    return db, out.strip().splitlines()[-1], out


def test_create_prints_the_id_and_records_model_seed_and_provenance(study, models):
    db, study_id, out = study
    s = load_study(db, study_id)
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", study_id) and f"Study {study_id}" in out
    assert s.record.seed == 5 and re.search(r"generator sha256:[0-9a-f]{12}$", s.record.model_version)
    assert s.record.real_pool_source == f"{POOL_LABEL}: 10 cines cut into 10 whole beats"
    assert sorted((c.block, c.truth) for c in s.cases) == sorted(
        [("calibration", "real"), ("calibration", "synthetic")] + [("scored", "real")] * 3
        + [("scored", "synthetic")] * 3)
    assert all(25 <= c.ef <= 70 and c.method == s.record.model_version for c in s.cases if c.truth == "synthetic")
    assert all(s.video_path(c).is_file() for c in s.cases)
    assert len({s.video_path(c).stat().st_size for c in s.cases}) == 1
    reader = s.record.config["automatic_reader"]
    assert 0 <= reader["accuracy"] <= 1 and reader["n"] == 8 and reader["ci95"][0] <= reader["accuracy"]
    assert re.search(r"Automatic reader \(C2ST, \d folds\): accuracy [01]\.\d{3} \(95 % CI", out)


def test_create_errors_are_exit_2(models, tmp_path, capsys, monkeypatch):
    from echolvfm_core.estimators.segmentation import SegmentationEF

    monkeypatch.setattr(SegmentationEF, "measure", fake_measure)
    pool = dicom_pool(tmp_path / "pool", 1)
    for args, message in (
        (["--pool", str(pool), "--models", str(models)],
         "pool holds 1 whole beat(s); a realism study needs at least 2 (one real, one synthetic)"),
        (["--models", str(tmp_path / "no_models")], "No generator in"),
        (["--max-detectability", "0.3"], "--max-detectability between 0.5 and 1"),
    ):
        rc = main(["quiz", "create", str(tmp_path / "q.sqlite"), "--cases", "4", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "q.sqlite").exists()


@pytest.mark.camus
def test_create_with_camus_loops_says_they_are_not_acquired_cines(camus_root, models, tmp_path, monkeypatch):
    from echolvfm_core.estimators.segmentation import SegmentationEF

    monkeypatch.setattr(SegmentationEF, "measure", fake_measure)
    pool = dicom_pool(tmp_path / "pool", 8)
    db = tmp_path / "quiz.sqlite"
    assert main(["quiz", "create", str(db), "--pool", str(pool), "--pool-label", POOL_LABEL, "--data",
                 str(camus_root), "--camus-loops", "2", "--camus-split", "train", "--cases", "4", "--calibration",
                 "0", "--models", str(models), "--size", "128", "--frames", "12", "--max-detectability", "1"]) == 0
    source = QuizStore(db).studies()[0].real_pool_source
    assert source.startswith(f"{POOL_LABEL}: 8 cines cut into 8 whole beats + 2 CAMUS real-anatomy loops with "
                             "synthesised motion")
    assert "not acquired cines" in source
    camus = [c for c in QuizStore(db).cases(QuizStore(db).studies()[0].id) if "CAMUS" in c.source]
    assert all("not an acquired cine" in c.source for c in camus)


def test_launch_quiz_flags(study, monkeypatch):
    import launch

    db, study_id, _ = study
    monkeypatch.setenv("ECHOLVFM_ADMIN_PASSWORD", "from-env")
    cfg = launch.parse_args(["--quiz-db", str(db), "--quiz-study", study_id])
    assert (cfg.quiz_db, cfg.quiz_study, cfg.admin_password) == (db, study_id, "from-env")
    assert "from-env" not in repr(cfg)
    assert launch.parse_args(["--quiz-db", str(db), "--admin-password", "flag"]).admin_password == "flag"
    assert launch.parse_args([]).quiz_db is None
    for bad in (["--quiz-db", str(db.parent / "nope.sqlite")], ["--quiz-study", study_id]):
        with pytest.raises(SystemExit):
            launch.parse_args(bad)


def _request(username=None):
    return SimpleNamespace(username=username, session_hash=secrets.token_hex(4))


def test_quiz_callbacks_answer_cases_store_rows_and_resume(study, tmp_path):
    from app.quiz.callbacks import QuizCallbacks

    db, study_id, _ = study
    cb = QuizCallbacks(db, tmp_path)
    with pytest.raises(gr.Error, match="reader ID"):
        cb.start("  ", None, _request())
    state, video, progress, feedback, controls, _ = cb.start("cb-reader", None, _request())
    assert state.study == study_id and "Practice case 1 of 2" in progress and controls["visible"]
    assert Path(video["value"]).parent == state.folder and re.fullmatch(r"[0-9a-f]{24}\.mp4", Path(video["value"]).name)
    # no confidence: the case stays on screen (video, controls and token unchanged) and the reader is asked for one
    token = state.token
    kept, video_kept, _, asked, controls_kept, _ = cb.answer_real(state, None)
    assert kept.token == token and video_kept == gr.update() and controls_kept == gr.update()
    assert "how confident" in asked and not QuizStore(db).answers(study_id, reader="cb-reader")
    shown = []
    for i in range(3):  # two practice cases (feedback with the truth), then one scored case (none)
        shown.append(state.token)
        state, _, progress, feedback, _, confidence = cb.answer_synthetic(state, 4)
        assert confidence["value"] is None
        if i < 2:
            assert re.fullmatch(r"(Correct|Not quite): that practice loop was \*\*(real|synthetic)\*\*\.", feedback)
        else:
            assert feedback == "Answer recorded."
    assert "Case 2 of 6" in progress and "3 of 8 answered" in progress
    rows = QuizStore(db).answers(study_id, reader="cb-reader")
    assert [r.case_id for r in rows] == shown and [r.block for r in rows] == ["calibration"] * 2 + ["scored"]
    assert all(r.answer == "synthetic" and r.confidence == 4 and r.ms >= 0 for r in rows)
    # a new browser session (or a restarted server) resumes at the same case; a signed-in user name wins
    again = QuizCallbacks(db, tmp_path).start("cb-reader", None, _request())
    assert again[0].token == state.token and "Welcome back" in again[3]
    assert QuizCallbacks(db, tmp_path).start("typed", None, _request("alice"))[0].reader == "alice"


def test_results_callbacks_need_the_password_and_export_csv_and_png(study, tmp_path, monkeypatch):
    from app.quiz import callbacks
    from app.quiz.callbacks import ResultsCallbacks

    monkeypatch.setattr(callbacks, "WRONG_PASSWORD_DELAY", 0.0)
    db, study_id, _ = study
    cb = ResultsCallbacks(db, tmp_path, "s3cret")
    # a wrong password: the login box stays usable with a message under it, no error, nothing shown
    admin, login, panel, dropdown, message = cb.unlock("guess", None)
    assert admin is None and login["visible"] and panel == gr.update() and "Wrong admin password" in message
    assert cb.open(None, study_id) == (gr.update(),) * 6
    with pytest.raises(gr.Error, match="password first"):
        cb.show(None, study_id)
    admin, login, panel, dropdown, message = cb.unlock("s3cret", None)
    assert not login["visible"] and panel["visible"] and dropdown["value"] == study_id and message == ""
    provenance, text, pooled, readers, *_ = cb.show(admin, study_id)
    assert POOL_LABEL in provenance and "seed 5" in provenance and "Real pool:" in text
    assert "Automatic reader (C2ST over 8 cases" in provenance and "Automatic reader (C2ST" in text
    assert pooled.data[0].type == "heatmap" and all(t.type == "heatmap" for t in readers.data)
    files = [Path(f) for f in cb.export(admin, study_id)]
    assert sorted(f.suffix for f in files) == [".csv", ".png", ".png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.suffix == ".png")
    assert files[0].read_text().startswith("study,reader,case_id,block,truth")


# -------------------------------------------------------------------------------- what the browser receives


class PageClient:
    """Talks to a running app the way its page does: the config, then events through the queue (SSE)."""

    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=60)
        self.session = secrets.token_hex(6)
        self.config_text = self.http.get(f"{self.url}/config").text
        self.config = json.loads(self.config_text)
        self.received: list[str] = []

    def component(self, elem_id: str) -> int:
        return next(c["id"] for c in self.config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def fire(self, elem_id: str, event: str, values: dict[str, object]) -> list:
        """Trigger ``event`` of the component ``elem_id``; ``values`` by elem_id (others, e.g. states, None)."""
        target = self.component(elem_id)
        dep = next(d for d in self.config["dependencies"] if [target, event] in d["targets"])
        by_id = {self.component(k): v for k, v in values.items()}
        body = {"data": [by_id.get(i) for i in dep["inputs"]], "fn_index": dep["id"], "trigger_id": target,
                "session_hash": self.session, "event_data": None}
        self.http.post(f"{self.url}/gradio_api/queue/join", json=body).raise_for_status()
        with self.http.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": self.session}) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                self.received.append(line)
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    assert msg["success"], msg
                    return msg["output"]["data"]
        raise AssertionError("the event never completed")


@pytest.fixture()
def app_url(models, study, tmp_path, monkeypatch):
    from app.bench import free_port
    from app.server import StudioConfig, serve

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    config = StudioConfig(port=free_port(), device="cpu", models=models, quiz_db=study[0], admin_password="pw")
    demo = serve(config, block=False)
    yield f"http://127.0.0.1:{config.port}"
    demo.close()


def test_payloads_sent_to_the_browser_never_carry_the_truth(app_url, study):
    db, study_id, _ = study
    s = load_study(db, study_id)
    page = PageClient(app_url)
    # the quiz endpoints are not public API: not listed, not callable by gradio_client
    info = page.http.get(f"{app_url}/gradio_api/info").json()
    assert not [name for name in info["named_endpoints"] if re.search(r"quiz|results|_\d+$", name)]
    assert "/export" in info["named_endpoints"]  # the Explore tab's public names are unchanged
    page.fire("quiz-reader", "submit", {"quiz-reader": "http-reader"})
    scored_from = None
    for i in range(5):
        page.fire("quiz-real", "click", {"quiz-confidence": 3})
        if i == 1:
            scored_from = len(page.received)  # after both practice answers: scored cases only
    everything = page.config_text + "\n".join(page.received)
    secrets_ = [s.record.media_dir, "truth", *(c.case_id for c in s.cases), *(c.video for c in s.cases)]
    assert not [x for x in secrets_ if x in everything]
    scored = "\n".join(page.received[scored_from:]).lower()
    assert "real" not in scored and "synthetic" not in scored
    assert "case 4 of 6" in scored
    assert len(QuizStore(db).answers(study_id, reader="http-reader")) == 5


# ------------------------------------------------------------------------------------------------- browser


#: Visible error marks of a Gradio page: error toasts and the red status of an output whose event failed.
_ERROR_MARKS = """() => [...document.querySelectorAll('.toast-body.error, .toast-wrap .error, .wrap.error, .error')]
    .filter(e => e.offsetParent !== null).length"""


@pytest.mark.browser
def test_browser_answers_the_whole_study_and_opens_the_results(models, study):
    """A reader answers all 8 cases (once pressing Synthetic without a confidence: asked for one, the case stays);
    the admin types a wrong then the right password; no error mark is left on the page at any point."""
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from app.bench import LocalServer

    db, study_id, _ = study
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    env = {**ONE_THREAD, "ECHOLVFM_ADMIN_PASSWORD": "right-pw"}
    with LocalServer(models, "cpu", extra_args=["--quiz-db", str(db)], env=env, startup_timeout=150) as srv:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(srv.url, wait_until="domcontentloaded")
                page.get_by_role("tab", name="Quiz").click()
                assert "Readers:" in page.inner_text("body") and "drag the EF slider" not in page.inner_text("body")
                assert "Reader IDs are not passwords" in page.inner_text("#quiz-no-auth")
                page.fill("#quiz-reader textarea, #quiz-reader input", "browser-reader")
                page.click("#quiz-start")
                for answered in range(8):
                    page.wait_for_selector("#quiz-video video", timeout=60_000)
                    page.wait_for_function(
                        "n => document.querySelector('#quiz-progress').innerText.includes(n + ' of 8 answered')",
                        arg=str(answered), timeout=30_000)
                    assert page.locator("#quiz-video a[download], #quiz-video button[aria-label*=ownload]").count() == 0
                    page.wait_for_function("() => (document.querySelector('#quiz-video video').getAttribute("
                                           "'controlsList') || '').includes('nodownload')", timeout=10_000)
                    assert page.evaluate("() => document.querySelector('#quiz-video video').disablePictureInPicture")
                    if answered == 3:  # no confidence chosen: asked for one, the case and its controls stay
                        src = page.evaluate("() => document.querySelector('#quiz-video video').src")
                        page.click("#quiz-synthetic")
                        page.wait_for_function("() => document.querySelector('#quiz-feedback').innerText"
                                               ".includes('how confident')", timeout=30_000)
                        assert page.evaluate("() => document.querySelector('#quiz-video video').src") == src
                        assert page.locator("#quiz-confidence").is_visible() and page.evaluate(_ERROR_MARKS) == 0
                    page.locator("#quiz-confidence label").nth(answered % 5).click()
                    page.click("#quiz-synthetic" if answered % 2 else "#quiz-real")
                page.wait_for_function(
                    "() => document.querySelector('#quiz-progress').innerText.includes('all 8 cases answered')",
                    timeout=30_000)
                assert page.evaluate(_ERROR_MARKS) == 0

                page.get_by_role("tab", name="Results").click()
                page.fill("#results-password input", "wrong-pw")
                page.click("#results-unlock")
                page.wait_for_function("() => document.querySelector('#results-login-message').innerText"
                                       ".includes('Wrong admin password')", timeout=30_000)
                assert page.evaluate(_ERROR_MARKS) == 0
                page.fill("#results-password input", "right-pw")  # the box is still there and usable
                page.click("#results-unlock")
                page.wait_for_function("() => (document.querySelector('#results-provenance') || {innerText: ''})"
                                       ".innerText.includes('Automatic reader')", timeout=60_000)
                assert page.evaluate(_ERROR_MARKS) == 0
                assert not page.locator("#results-password").is_visible()
            finally:
                browser.close()
    rows = QuizStore(db).answers(study_id, reader="browser-reader")
    assert len(rows) == 8 and [r.confidence for r in rows] == [1, 2, 3, 4, 5, 1, 2, 3]
    assert [r.answer for r in rows] == ["real", "synthetic"] * 4
