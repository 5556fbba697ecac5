"""Blinded real-vs-synthetic realism quiz, without UI code: the SQLite store, study setup, reader sessions and the
results report (the app's Quiz and Results tabs, :mod:`app.quiz`, sit on top of it).

Setup cuts beats of acquired cines (:mod:`echolvfm_core.quiz.pool`) into cases, renders the synthetic ones
(:mod:`echolvfm_core.quiz.synth`) and shows every case through one presentation
(:mod:`echolvfm_core.quiz.present`). The UI layer creates a :class:`ReaderSession` per request from the database
path, study ID and reader ID, shows :meth:`ReaderSession.next_case` (a :class:`CaseView`, which never holds the
truth) and passes the reader's click to :meth:`ReaderSession.answer`. Statistics come from
:func:`echolvfm_core.quiz_stats.summarize` over :meth:`QuizStore.answer_records`; :mod:`echolvfm_core.quiz.report`
turns them into the report dict and its text.
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
