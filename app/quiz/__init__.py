"""Blinded real-vs-synthetic realism quiz, without UI code: the SQLite store, study setup and reader sessions.

Setup cuts beats of acquired cines (:mod:`app.quiz.pool`) into cases and shows every case through one
presentation (:mod:`app.quiz.present`). The UI layer creates a :class:`ReaderSession` per request from the database path, study ID and reader ID, shows
:meth:`ReaderSession.next_case` (a :class:`CaseView`, which never holds the truth) and passes the reader's click to
:meth:`ReaderSession.answer`. Statistics come from :func:`echolvfm_core.quiz_stats.summarize` over
:meth:`QuizStore.answer_records`; :mod:`app.quiz.results` turns them into the report dict, its text and plotly
figures (imported on its own, as it loads plotly).
"""
from .store import (
    AnswerRow,
    CaseRecord,
    QuizStore,
    ReaderRecord,
    StudyRecord,
    SubmitResult,
    results_to_csv,
)
from .study import (
    MIN_POOL_BEATS,
    AnswerFeedback,
    CaseView,
    DetectFn,
    Progress,
    ReaderSession,
    Study,
    StudyTooDetectable,
    SynthFn,
    VideoSpec,
    create_study,
    load_study,
    read_served,
    reader_order,
)

__all__ = [
    "QuizStore",
    "StudyRecord",
    "CaseRecord",
    "ReaderRecord",
    "AnswerRow",
    "SubmitResult",
    "results_to_csv",
    "MIN_POOL_BEATS",
    "VideoSpec",
    "Study",
    "SynthFn",
    "DetectFn",
    "StudyTooDetectable",
    "CaseView",
    "AnswerFeedback",
    "Progress",
    "ReaderSession",
    "create_study",
    "load_study",
    "read_served",
    "reader_order",
]
