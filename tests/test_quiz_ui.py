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
import pytest
from test_app_server import CHROMIUM, ONE_THREAD, build_tiny_models
from test_quiz_study import fan_echo

from app.quiz.store import QuizStore
from app.quiz.study import load_study
from echolvfm_core.cli import main
from echolvfm_core.io import write_dicom

POOL_LABEL = "unit-test fan phantoms"


def dicom_pool(folder: Path, n: int) -> Path:
    """``n`` small moving-speckle fan loops as DICOM files (fast to read, unlike MP4)."""
    folder.mkdir(parents=True)
    for i in range(n):
        write_dicom(fan_echo(i), folder / f"echo{i}.dcm")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def study(models, tmp_path_factory):
    """A 6 + 2 practice study from the pydicom sample and 9 fan loops, made by the CLI; (db, study id, output)."""
    root = tmp_path_factory.mktemp("quiz")
    pool = dicom_pool(root / "pool", 9)
    db = root / "study" / "quiz.sqlite"
    capture = root / "out.txt"
    with open(capture, "w") as fh, contextlib.redirect_stdout(fh):
        rc = main(["quiz", "create", str(db), "--pool", "sample", str(pool), "--cases", "6", "--calibration", "2",
                   "--ef-range", "25,70", "--models", str(models), "--seed", "5"])
    assert rc == 0
    out = capture.read_text()
    return db, out.strip().splitlines()[-1], out


def test_create_prints_the_id_and_records_model_seed_and_provenance(study, models):
    db, study_id, out = study
    s = load_study(db, study_id)
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", study_id) and f"Study {study_id}" in out
    assert s.record.seed == 5 and re.search(r"generator sha256:[0-9a-f]{12}$", s.record.model_version)
    assert s.record.real_pool_source == "the pydicom sample cine (apical 4CH) + 9 echo file(s) from " \
                                        f"{db.parent.parent / 'pool'}"
    assert sorted((c.block, c.truth) for c in s.cases) == sorted(
        [("calibration", "real"), ("calibration", "synthetic")] + [("scored", "real")] * 3 + [("scored", "synthetic")] * 3)
    assert all(25 <= c.ef <= 70 for c in s.cases if c.truth == "synthetic")
    assert all(s.video_path(c).is_file() for c in s.cases)


def test_create_with_too_small_pool_is_exit_2(tmp_path, capsys):
    pool = dicom_pool(tmp_path / "pool", 8)
    rc = main(["quiz", "create", str(tmp_path / "q.sqlite"), "--pool", "sample", str(pool), "--cases", "4",
               "--models", str(tmp_path / "no_models")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "real pool holds 9 case(s); a realism study needs at least 10 real echoes" in err
    assert not (tmp_path / "q.sqlite").exists()


@pytest.mark.camus
def test_create_with_camus_loops_says_they_are_not_acquired_cines(camus_root, models, tmp_path):
    pool = dicom_pool(tmp_path / "pool", 8)
    db = tmp_path / "quiz.sqlite"
    assert main(["quiz", "create", str(db), "--pool", str(pool), "--pool-label", POOL_LABEL, "--data",
                 str(camus_root), "--camus-loops", "2", "--camus-split", "train", "--cases", "4", "--calibration",
                 "0", "--models", str(models)]) == 0
    source = QuizStore(db).studies()[0].real_pool_source
    assert source.startswith(f"{POOL_LABEL} (8 case(s)) + 2 CAMUS real-anatomy loop(s) with synthesised motion")
    assert "not acquired cines" in source


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
    with pytest.raises(gr.Error, match="confident"):
        cb.answer_real(state, None)
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
    with pytest.raises(gr.Error, match="Wrong"):
        cb.unlock("guess", None)
    with pytest.raises(gr.Error, match="password first"):
        cb.show(None, study_id)
    admin, login, panel, dropdown = cb.unlock("s3cret", None)
    assert not login["visible"] and panel["visible"] and dropdown["value"] == study_id
    provenance, text, pooled, readers, *_ = cb.show(admin, study_id)
    assert "pydicom sample cine" in provenance and "seed 5" in provenance and "Real pool:" in text
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


@pytest.mark.browser
def test_browser_answers_three_cases(models, study):
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from app.bench import LocalServer

    db, study_id, _ = study
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with LocalServer(models, "cpu", extra_args=["--quiz-db", str(db)], env=ONE_THREAD, startup_timeout=150) as srv:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1000})
                page.goto(srv.url, wait_until="domcontentloaded")
                page.get_by_role("tab", name="Quiz").click()
                page.fill("#quiz-reader textarea, #quiz-reader input", "browser-reader")
                page.click("#quiz-start")
                for answered in range(3):
                    page.wait_for_selector("#quiz-video video", timeout=60_000)
                    page.wait_for_function(
                        "n => document.querySelector('#quiz-progress').innerText.includes(n + ' of 8 answered')",
                        arg=str(answered), timeout=30_000)
                    assert page.locator("#quiz-video a[download], #quiz-video button[aria-label*=ownload]").count() == 0
                    # no "Save video as", no native download entry, no picture-in-picture
                    page.wait_for_function("() => (document.querySelector('#quiz-video video').getAttribute("
                                           "'controlsList') || '').includes('nodownload')", timeout=10_000)
                    assert page.evaluate("() => document.querySelector('#quiz-video video').disablePictureInPicture")
                    assert not page.evaluate("() => document.querySelector('#quiz-video video').dispatchEvent("
                                             "new MouseEvent('contextmenu', {bubbles: true, cancelable: true}))")
                    page.locator("#quiz-confidence label").nth(answered + 1).click()
                    page.click("#quiz-synthetic" if answered % 2 else "#quiz-real")
                page.wait_for_function(
                    "() => document.querySelector('#quiz-progress').innerText.includes('3 of 8 answered')",
                    timeout=30_000)
            finally:
                browser.close()
    rows = QuizStore(db).answers(study_id, reader="browser-reader")
    assert [(r.answer, r.confidence) for r in rows] == [("real", 2), ("synthetic", 3), ("real", 4)]
