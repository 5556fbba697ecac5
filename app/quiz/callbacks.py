"""Plain callbacks of the Quiz and Results tabs (the layout lives in :mod:`app.quiz.tabs`).

Blinding: what a quiz callback returns is exactly what the browser gets, so it returns only a copy of the case's
video under a fresh random name (no metadata, see :func:`echolvfm_core.quiz.create_study`), the reader's progress
and, for calibration cases only, feedback. The truth of a scored case, its EF, its token's meaning and the study's media
folder never leave the server; the case on screen is kept in the per-session ``gr.State`` (server side).
A reader's progress lives in the database, so closing the browser or restarting the server loses nothing: entering
the same reader ID again resumes at the first unanswered case.

The Results tab opens with the admin password (compared in constant time); its callbacks check the unlocked state,
kept server side, on every call.
"""
from __future__ import annotations

import hmac
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from echolvfm_core.quiz.report import automatic_reader_text, format_report, study_report
from echolvfm_core.quiz.store import QuizStore, results_to_csv
from echolvfm_core.quiz.study import AnswerFeedback, CaseView, ReaderSession

from ..callbacks import user_errors
from .results import (
    accuracy_figure,
    confusion_figure,
    readers_confusion_figure,
    save_pngs,
)

__all__ = ["ReaderState", "QuizCallbacks", "ResultsCallbacks", "drop_folder"]

#: Seconds a wrong admin password costs (slows guessing).
WRONG_PASSWORD_DELAY = 1.0
#: Shown, with the case kept on screen, when Real or Synthetic is pressed without a confidence.
ASK_CONFIDENCE = "**Choose how confident you are (1-5), then press Real or Synthetic again.**"
#: Shown under the password box after a wrong admin password.
WRONG_PASSWORD = "**Wrong admin password.** Try again."


@dataclass
class ReaderState:
    """A browser session taking the quiz: study, reader, the case on screen and this session's video folder."""

    study: str
    reader: str
    token: str | None
    folder: Path


def drop_folder(state) -> None:
    """``gr.State`` delete callback: remove the session's folder (a :class:`ReaderState`'s or the admin's)."""
    folder = state.folder if isinstance(state, ReaderState) else state
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _latest_study(store: QuizStore, study_id: str | None) -> str:
    if study_id is not None:
        return study_id
    studies = store.studies()
    if not studies:
        raise gr.Error(f"No study in {store.path.name} yet; an admin creates one with `echolvfm quiz create`.",
                       print_exception=False)
    return studies[-1].id


class QuizCallbacks:
    """The reader flow over one quiz database.

    Args:
        db: the quiz database (created empty when missing).
        work_root: folder for per-session copies of the case videos (inside the app's temporary folder).
        study_id: the study to take; None: the newest study in the database when the reader starts.
    """

    def __init__(self, db: str | Path, work_root: str | Path, study_id: str | None = None):
        self.store = QuizStore(db)
        self.work_root = Path(work_root)
        self.study_id = study_id

    @user_errors
    def start(self, reader_id: str, state: ReaderState | None, request: gr.Request):
        """Start or resume: the signed-in user name (with --auth) or the typed reader ID."""
        reader = getattr(request, "username", None) or (reader_id or "").strip()
        if not reader:
            raise gr.Error("Enter your reader ID to start.", print_exception=False)
        session = ReaderSession(self.store, _latest_study(self.store, self.study_id), reader)
        if state is None:
            state = ReaderState(study=session.study.id, reader=session.reader, token=None,
                                folder=self.work_root / "quiz" / secrets.token_hex(8))
        state.study, state.reader = session.study.id, session.reader
        progress = session.progress()
        note = "Welcome back: you continue where you left off." if progress.calibration_answered or \
            progress.scored_answered else ""
        return self._show(state, session, note)

    def answer_real(self, state: ReaderState | None, confidence: int | None):
        return self._answer(state, "real", confidence)

    def answer_synthetic(self, state: ReaderState | None, confidence: int | None):
        return self._answer(state, "synthetic", confidence)

    @user_errors
    def _answer(self, state: ReaderState | None, answer: str, confidence: int | None):
        if state is None or state.token is None:
            raise gr.Error("Enter your reader ID and press Start first.", print_exception=False)
        if confidence is None:  # keep the case on screen and ask (an error would cover the video and the radio)
            return (state, gr.update(), gr.update(), ASK_CONFIDENCE, gr.update(), gr.update())
        session = ReaderSession(self.store, state.study, state.reader)
        feedback = session.answer(state.token, answer, int(confidence))  # time from the server's clock
        return self._show(state, session, _feedback_text(feedback))

    def _show(self, state: ReaderState, session: ReaderSession, note: str):
        """Outputs: state, video, progress, feedback, answer controls (visibility), confidence (cleared)."""
        view = session.next_case()
        if view is None:
            state.token = None
            total = len(session.order)
            done = f"**{state.reader}**: all {total} cases answered. Thank you!"
            return (state, gr.update(value=None, visible=False), done, note, gr.update(visible=False),
                    gr.update(value=None))
        state.token = view.token
        state.folder.mkdir(parents=True, exist_ok=True)  # removed with the session (drop_folder)
        video = shutil.copyfile(view.video, state.folder / f"{secrets.token_hex(12)}.mp4")
        return (state, gr.update(value=str(video), visible=True), _progress_text(state.reader, view), note,
                gr.update(visible=True), gr.update(value=None))


def _progress_text(reader: str, view: CaseView) -> str:
    if view.block == "calibration":
        where = f"**Practice case {view.index} of {view.block_size}** (not scored; you are told the answer)"
    else:
        where = f"**Case {view.index} of {view.block_size}**"
    return f"{where} · reader **{reader}** · {view.answered} of {view.total} answered"


def _feedback_text(fb: AnswerFeedback) -> str:
    if fb.duplicate:
        return "That case had been answered already; the first answer was kept."
    if fb.truth is None:  # scored: no feedback
        return "Answer recorded." if not fb.done else ""
    verdict = "Correct" if fb.correct else "Not quite"
    return f"{verdict}: that practice loop was **{fb.truth}**."


class ResultsCallbacks:
    """The admin's Results tab over one quiz database.

    Args:
        db: the quiz database.
        work_root: folder for exported files (inside the app's temporary folder).
        admin_password: the password that opens the tab (None: the tab stays locked).
    """

    def __init__(self, db: str | Path, work_root: str | Path, admin_password: str | None):
        self.store = QuizStore(db)
        self.work_root = Path(work_root)
        self._password = admin_password

    def _check(self, admin: Path | None) -> Path:
        if admin is None:
            raise gr.Error("Enter the admin password first.", print_exception=False)
        return admin

    def unlock(self, password: str, admin: Path | None):
        """Outputs: admin state (a folder for exports), login box, results panel, study dropdown, login message.
        A wrong password leaves the login box usable and says so under it (no error overlay on the box)."""
        ok = self._password is not None and hmac.compare_digest((password or "").encode(), self._password.encode())
        if not ok:
            time.sleep(WRONG_PASSWORD_DELAY)
            return admin, gr.update(visible=True), gr.update(), gr.update(), WRONG_PASSWORD
        admin = admin or self.work_root / "results" / secrets.token_hex(8)
        ids = [s.id for s in self.store.studies()]
        return (admin, gr.update(visible=False), gr.update(visible=True),
                gr.update(choices=ids, value=ids[-1] if ids else None), "")

    def open(self, admin: Path | None, study_id: str | None):
        """After :meth:`unlock`: the study's results when unlocked, nothing (no error) when the password was wrong."""
        if admin is None:
            return (gr.update(),) * 6
        return self.show(admin, study_id)

    @user_errors
    def show(self, admin: Path | None, study_id: str | None):
        """Outputs: provenance, report text, pooled and per-reader confusion, accuracy by EF and by confidence."""
        self._check(admin)
        if not study_id:
            return "No study in the database yet: create one with `echolvfm quiz create`.", "", None, None, None, None
        r = study_report(self.store, study_id)
        return (
            _provenance(r["study"]),
            format_report(r),
            confusion_figure(r["confusion"], f"Pooled ({r['n']} answers)"),
            readers_confusion_figure(r["per_reader"]),
            accuracy_figure(r["per_ef_bin"], "Accuracy by EF", "EF (%)"),
            accuracy_figure(r["per_confidence"], "Accuracy by confidence", "confidence"),
        )

    @user_errors
    def export(self, admin: Path | None, study_id: str | None) -> list[str]:
        """Raw answers (CSV, every block) and the figures (PNG) of the study."""
        folder = self._check(admin) / secrets.token_hex(4)
        if not study_id:
            raise gr.Error("No study to export.", print_exception=False)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = folder / f"quiz_{study_id}_answers.csv"
        results_to_csv(self.store, csv_path, study_id)
        return [str(csv_path)] + [str(p) for p in save_pngs(study_report(self.store, study_id), folder)]


def _provenance(study: dict) -> str:
    c = study["config"]
    lo, hi = c.get("ef_range", [None, None])
    beats = c.get("beats", {})
    return (
        f"**Real pool:** {study['real_pool_source']}\n\n"
        f"**{automatic_reader_text(c.get('automatic_reader'))}**, beside the human readers below\n\n"
        f"**Study** {study['id']} · created {study['created']} · generator {study['model_version']} · seed "
        f"{study['seed']} · {c.get('n_cases')} scored + {c.get('calibration_n')} practice cases · synthetic EFs "
        f"{lo}-{hi} % · {len(beats.get('real', []))} real and {len(beats.get('synthetic', []))} synthetic beat(s), "
        "none shown in both arms"
    )
