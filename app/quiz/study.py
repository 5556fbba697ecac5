"""Realism-quiz study setup and reader sessions, independent of any UI.

Setup (:func:`create_study`) draws a balanced set of real and synthetic cases from a pool of real echoes, passes
every case through the same preprocessing (:func:`echolvfm_core.preprocess.preprocess`: fan crop, size, frame
rate), the same length and the same video writer, writes the videos under random file names and stores the study in
a :class:`~app.quiz.store.QuizStore`. A reader's progress lives only in the database, so a
:class:`ReaderSession` can be rebuilt at any time (another request, another worker, after a server restart) and
continues at the first unanswered case.

What the browser may receive is exactly :class:`CaseView` (no truth, no EF, no source) and, after an answer,
:class:`AnswerFeedback` (the truth only for calibration cases, whose purpose is feedback).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import shutil
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from echolvfm_core.echo import Echo, EchoLoadError
from echolvfm_core.quiz_stats import CATEGORIES, REAL, SYNTHETIC

from .store import CaseRecord, QuizStore, StudyRecord, utc_now

__all__ = [
    "MIN_REAL_POOL",
    "VideoSpec",
    "Study",
    "SynthFn",
    "CaseView",
    "AnswerFeedback",
    "Progress",
    "ReaderSession",
    "create_study",
    "load_study",
    "conform_case",
    "reader_order",
]

logger = logging.getLogger(__name__)

#: A study needs at least this many real echoes in its pool.
MIN_REAL_POOL = 10

#: The generator, injected: (real echo whose observed frames condition it, requested EF in %, random generator)
#: -> a synthetic :class:`Echo` loop with a frame rate.
SynthFn = Callable[[Echo, float, np.random.Generator], Echo]


@dataclass(frozen=True)
class VideoSpec:
    """What every quiz video is made to look like: ``size`` x ``size`` pixels, ``fps`` frames per second and
    exactly ``n_frames`` frames (shorter loops are repeated cyclically, longer ones cut)."""

    size: int = 112
    fps: float = 25.0
    n_frames: int = 50

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"VideoSpec.size must be an even number of pixels >= 16 (H.264); got {self.size}.")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"VideoSpec.fps must be a positive frame rate; got {self.fps}.")
        if self.n_frames < 2:
            raise ValueError(f"VideoSpec.n_frames must be at least 2; got {self.n_frames}.")


@dataclass(frozen=True)
class Study:
    """A stored study: its record (model version, seed, config, real-pool source) and cases (server side only)."""

    record: StudyRecord
    cases: tuple[CaseRecord, ...]
    db: Path

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def media_dir(self) -> Path:
        return Path(self.record.media_dir)

    def video_path(self, case: CaseRecord) -> Path:
        return self.media_dir / case.video


@dataclass(frozen=True)
class CaseView:
    """Everything the browser may know about the case on screen.

    Attributes:
        token: random case token, sent back with the answer.
        video: path of the case's video (random file name, no metadata) for the UI to serve.
        block: "calibration" (answers get feedback, not scored) or "scored".
        index: 1-based position within the block; ``block_size`` cases in the block.
        answered: answers given so far over both blocks; ``total`` cases over both blocks.
    """

    token: str
    video: str
    block: str
    index: int
    block_size: int
    answered: int
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnswerFeedback:
    """Reply to an answer. ``truth`` and ``correct`` are set for calibration cases only (None when scored);
    ``duplicate`` when the case had been answered before (the first answer was kept)."""

    block: str
    duplicate: bool
    truth: str | None
    correct: bool | None
    answered: int
    total: int

    @property
    def done(self) -> bool:
        return self.answered >= self.total

    def to_dict(self) -> dict:
        return asdict(self) | {"done": self.done}


@dataclass(frozen=True)
class Progress:
    """Answers given: calibration and scored, and their block sizes."""

    calibration_answered: int
    calibration_total: int
    scored_answered: int
    scored_total: int

    @property
    def done(self) -> bool:
        return self.scored_answered >= self.scored_total and self.calibration_answered >= self.calibration_total


# ------------------------------------------------------------------------------------------------------ setup


def conform_case(echo: Echo, spec: VideoSpec) -> np.ndarray:
    """Bring one case, real or synthetic, onto the quiz's common video format.

    Args:
        echo: a loop (T >= 2 frames) with a frame rate; frames float32 (T, H, W) in [0, 1].
        spec: the study's :class:`VideoSpec`.

    Returns:
        float32 (spec.n_frames, spec.size, spec.size) in [0, 1]: fan-cropped and resized, resampled to
        ``spec.fps`` and repeated cyclically or cut to ``spec.n_frames`` frames.
    """
    from echolvfm_core.preprocess import preprocess

    from app.video import loop_to_length

    echo.require_loop("A realism-quiz case")
    if echo.fps is None:
        raise EchoLoadError("A realism-quiz case needs a frame rate, but this echo has none.")
    frames = preprocess(echo, size=spec.size, fps=spec.fps).echo.frames
    return np.ascontiguousarray(loop_to_length(frames, spec.n_frames), dtype=np.float32)


def _load(item: Echo | str | os.PathLike) -> Echo:
    if isinstance(item, Echo):
        return item
    from echolvfm_core.io import load_echo

    return load_echo(item)


def _check_setup(n_real_pool: int, n_cases: int, calibration_n: int, ef_range: tuple[float, float],
                 model_version: str, real_pool_source: str) -> tuple[int, int]:
    """Validate the setup; return (real cases needed, synthetic cases needed) over both blocks."""
    if not isinstance(n_cases, int) or n_cases < 2 or n_cases % 2:
        raise ValueError(f"n_cases must be an even number >= 2 (half real, half synthetic); got {n_cases!r}.")
    if not isinstance(calibration_n, int) or calibration_n < 0:
        raise ValueError(f"calibration_n must be a non-negative integer; got {calibration_n!r}.")
    lo, hi = ef_range
    if not (0.0 <= lo < hi <= 100.0):
        raise ValueError(f"ef_range must be (low, high) in % with 0 <= low < high <= 100; got {ef_range!r}.")
    if not model_version.strip():
        raise ValueError("model_version must name the generator that made the synthetic cases.")
    if not real_pool_source.strip():
        raise ValueError("real_pool_source must say where the real cases come from (e.g. 'acquired cines, site X').")
    n_real = n_cases // 2 + calibration_n // 2
    n_synth = n_cases // 2 + calibration_n - calibration_n // 2
    if n_real_pool < MIN_REAL_POOL:
        raise EchoLoadError(
            f"The real pool holds {n_real_pool} case{'s' if n_real_pool != 1 else ''}; a realism study needs at "
            f"least {MIN_REAL_POOL} real echoes."
        )
    if n_real_pool < n_real:
        raise EchoLoadError(
            f"The real pool holds {n_real_pool} cases but the study shows {n_real} distinct real cases "
            f"({n_cases // 2} scored + {calibration_n // 2} calibration); add real echoes or ask for fewer cases."
        )
    return n_real, n_synth


def create_study(
    real_pool: Sequence[Echo | str | os.PathLike],
    n_cases: int,
    synth_fn: SynthFn,
    *,
    model_version: str,
    out_dir: str | os.PathLike,
    real_pool_source: str,
    ef_range: tuple[float, float] = (20.0, 75.0),
    seed: int = 0,
    calibration_n: int = 4,
    spec: VideoSpec = VideoSpec(),
    store: QuizStore | None = None,
) -> Study:
    """Set up a blinded real-vs-synthetic study and store it.

    Args:
        real_pool: real echoes (:class:`Echo` loops with a frame rate, or paths that
            :func:`echolvfm_core.io.load_echo` reads); at least :data:`MIN_REAL_POOL`.
        n_cases: scored cases, even: half real, half synthetic.
        synth_fn: the generator, ``synth_fn(real_echo, ef, rng) -> Echo``; called once per synthetic case with a
            pool echo (one not shown as a real case whenever the pool is large enough), an EF in % drawn
            uniformly from ``ef_range`` and a per-case ``numpy.random.Generator`` derived from ``seed``.
        model_version: name/version of the generator, stored with the study and with every answer.
        out_dir: folder for the database (``quiz.sqlite`` unless ``store`` is given) and ``media/<study id>/``.
        real_pool_source: where the real pool comes from (shown in the results; e.g. "CAMUS ED/ES loops with
            synthesised motion, not acquired cines").
        ef_range: (low, high) EF in % for synthetic cases.
        seed: fixes which pool echoes are used, the EFs, the generator's randomness and, with the reader ID,
            each reader's case order. Case tokens and file names are random regardless (:mod:`secrets`).
        calibration_n: extra cases shown first with feedback and not scored (half real, rounded down).
        spec: size, frame rate and length every video is brought to.
        store: where to store the study; default ``QuizStore(out_dir / "quiz.sqlite")``.

    Returns:
        The stored :class:`Study`.

    Raises:
        EchoLoadError: a real pool smaller than :data:`MIN_REAL_POOL` or than the real cases needed, or an echo
            that cannot be used (a still, no frame rate, no ultrasound fan).
        ValueError: bad counts, EF range or descriptions, or a ``synth_fn`` that does not return an :class:`Echo`.
    """
    from echolvfm_core.io.writers import MP4_CRF, write_mp4

    n_real, n_synth = _check_setup(len(real_pool), n_cases, calibration_n, tuple(ef_range), model_version,
                                   real_pool_source)
    out_dir = Path(out_dir)
    store = store if store is not None else QuizStore(out_dir / "quiz.sqlite")
    study_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    media_dir = (out_dir / "media" / study_id).resolve()

    rng = np.random.default_rng(seed)
    pool_order = rng.permutation(len(real_pool))
    real_idx = pool_order[:n_real]
    rest = pool_order[n_real:]
    # Synthetic cases start from echoes not shown as real; when the pool is too small, real ones are reused.
    synth_idx = rest[:n_synth] if len(rest) >= n_synth else np.concatenate(
        [rest, rng.choice(real_idx, size=n_synth - len(rest), replace=n_synth - len(rest) > len(real_idx))]
    )
    n_shared = int(np.isin(synth_idx, real_idx).sum())
    if n_shared:
        logger.warning("%d synthetic cases start from echoes that are also shown as real cases.", n_shared)
    efs = rng.uniform(ef_range[0], ef_range[1], size=n_synth).round(1)

    # (truth, pool index, requested EF or None, block); calibration: the first calibration_n // 2 real and the
    # first calibration_n - calibration_n // 2 synthetic entries.
    n_cal_real, n_cal_synth = calibration_n // 2, calibration_n - calibration_n // 2
    plan = [(REAL, int(i), None, "calibration" if k < n_cal_real else "scored") for k, i in enumerate(real_idx)]
    plan += [
        (SYNTHETIC, int(i), float(ef), "calibration" if k < n_cal_synth else "scored")
        for k, (i, ef) in enumerate(zip(synth_idx, efs))
    ]
    # Creation order (and so file times and database positions) must not follow the truth.
    plan = [plan[i] for i in rng.permutation(len(plan))]
    case_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(plan))]

    media_dir.mkdir(parents=True, exist_ok=False)
    cases: list[CaseRecord] = []
    try:
        for position, ((truth, pool_i, ef, block), case_rng) in enumerate(zip(plan, case_rngs)):
            source = _load(real_pool[pool_i])
            if truth == REAL:
                echo = source
                ef = source.info.ef
            else:
                echo = synth_fn(source, ef, case_rng)
                if not isinstance(echo, Echo):
                    raise ValueError(f"synth_fn must return an Echo; got {type(echo).__name__}.")
            video = secrets.token_hex(12) + ".mp4"
            # the same writer and settings for every case; plain frames, so nothing but pixels reaches the file
            write_mp4(conform_case(echo, spec), media_dir / video, fps=spec.fps)
            cases.append(CaseRecord(study=study_id, case_id=secrets.token_urlsafe(12), truth=truth,
                                    ef=None if ef is None else float(ef), video=video, position=position, block=block))
        stamp = time.time()
        for c in cases:  # one modification time for all, so HTTP Last-Modified headers say nothing
            os.utime(media_dir / c.video, (stamp, stamp))
        record = StudyRecord(
            id=study_id,
            created=utc_now(),
            model_version=model_version,
            seed=int(seed),
            config={
                "n_cases": n_cases,
                "calibration_n": calibration_n,
                "ef_range": [float(ef_range[0]), float(ef_range[1])],
                "video": asdict(spec) | {"codec": f"H.264 (libx264, yuv420p, crf {MP4_CRF}), MP4"},
                "real_pool_size": len(real_pool),
                "n_real": n_real,
                "n_synthetic": n_synth,
                "synthetic_from_shown_real": n_shared,
            },
            real_pool_source=real_pool_source,
            media_dir=str(media_dir),
        )
        store.add_study(record, cases)
    except BaseException:
        shutil.rmtree(media_dir, ignore_errors=True)
        raise
    return Study(record=record, cases=tuple(cases), db=store.path)


def load_study(store: QuizStore | str | os.PathLike, study_id: str) -> Study:
    """Read a stored study back."""
    store = store if isinstance(store, QuizStore) else QuizStore(store)
    return Study(record=store.study(study_id), cases=tuple(store.cases(study_id)), db=store.path)


# ---------------------------------------------------------------------------------------------- reader sessions


def _check_reader_id(reader: str) -> str:
    if not isinstance(reader, str):
        raise ValueError("The reader ID must be text.")
    reader = unicodedata.normalize("NFC", reader.strip())
    if not 1 <= len(reader) <= 64 or any(unicodedata.category(ch).startswith("C") for ch in reader):
        raise ValueError("The reader ID must be 1 to 64 printable characters.")
    return reader


def reader_order(study: Study, reader: str) -> tuple[list[str], int]:
    """The reader's case order: calibration cases, then scored cases, each block shuffled with a generator seeded
    from the study seed and the reader ID (so the same reader always gets the same order). Returns (case tokens,
    number of calibration cases)."""
    digest = int.from_bytes(hashlib.sha256(reader.encode("utf-8")).digest()[:8], "big")
    rng = np.random.default_rng(np.random.SeedSequence([int(study.record.seed), digest]))
    calibration = [c.case_id for c in study.cases if c.block == "calibration"]
    scored = [c.case_id for c in study.cases if c.block == "scored"]
    order = [calibration[i] for i in rng.permutation(len(calibration))]
    order += [scored[i] for i in rng.permutation(len(scored))]
    return order, len(calibration)


class ReaderSession:
    """One reader taking one study. Holds no progress of its own: every call reads the database, so sessions can be
    rebuilt freely (new request, other worker, after a restart) and always agree.

    Args:
        store: the study's :class:`QuizStore` (or its path).
        study_id: the study.
        reader: reader ID (1 to 64 printable characters; surrounding spaces dropped).
    """

    def __init__(self, store: QuizStore | str | os.PathLike, study_id: str, reader: str):
        self.store = store if isinstance(store, QuizStore) else QuizStore(store)
        self.reader = _check_reader_id(reader)
        self.study = load_study(self.store, study_id)
        order, n_calibration = reader_order(self.study, self.reader)
        self._record = self.store.register_reader(self.study.id, self.reader, order, n_calibration)
        self._cases = {c.case_id: c for c in self.study.cases}

    @property
    def order(self) -> tuple[str, ...]:
        return self._record.order

    def _answered(self) -> set[str]:
        return {a.case_id for a in self.store.answers(self.study.id, reader=self.reader)}

    def progress(self) -> Progress:
        answered = self._answered()
        n_cal = self._record.n_calibration
        cal, scored = self.order[:n_cal], self.order[n_cal:]
        return Progress(
            calibration_answered=sum(c in answered for c in cal),
            calibration_total=len(cal),
            scored_answered=sum(c in answered for c in scored),
            scored_total=len(scored),
        )

    def _current(self, answered: set[str]) -> int | None:
        """Index in the order of the first unanswered case, or None when all are answered."""
        return next((i for i, c in enumerate(self.order) if c not in answered), None)

    def next_case(self) -> CaseView | None:
        """The case to show now (the first unanswered one in this reader's order), or None when the study is done.
        Starts the server-side clock for the case unless it was already on screen (a reload keeps the clock)."""
        answered = self._answered()
        i = self._current(answered)
        if i is None:
            return None
        token = self.order[i]
        case = self._cases[token]
        self.store.mark_served(self.study.id, self.reader, token)
        n_cal = self._record.n_calibration
        in_cal = i < n_cal
        return CaseView(
            token=token,
            video=str(self.study.video_path(case)),
            block=case.block,
            index=i + 1 if in_cal else i - n_cal + 1,
            block_size=n_cal if in_cal else len(self.order) - n_cal,
            answered=len(answered),
            total=len(self.order),
        )

    def answer(self, token: str, answer: str, confidence: int, ms: int | None = None) -> AnswerFeedback:
        """Record the reader's answer to the case on screen.

        Args:
            token: the :attr:`CaseView.token` of the case shown.
            answer: "real" or "synthetic".
            confidence: 1 (guess) to 5 (certain).
            ms: time spent on the case in milliseconds; None uses the server-side clock started by
                :meth:`next_case`.

        Returns:
            :class:`AnswerFeedback`; answering an already answered case keeps the first answer (``duplicate``).

        Raises:
            ValueError: a bad answer or confidence, or a token that is not the case on screen for this reader.
        """
        if answer not in CATEGORIES:
            raise ValueError(f"The answer must be 'real' or 'synthetic'; got {answer!r}.")
        answered = self._answered()
        if token not in answered:
            i = self._current(answered)
            if i is None or self.order[i] != token:
                raise ValueError("That case is not the one on screen for this reader; reload to get the current case.")
            if ms is None:
                ms = self._served_ms(token)
        result = self.store.submit_answer(self.study.id, self.reader, token, answer, confidence,
                                          0 if ms is None else int(ms))
        scored = result.row.block == "scored"
        return AnswerFeedback(
            block=result.row.block,
            duplicate=result.duplicate,
            truth=None if scored else result.row.truth,
            correct=None if scored else result.row.truth == result.row.answer,
            answered=len(answered | {token}),
            total=len(self.order),
        )

    def _served_ms(self, token: str) -> int:
        record = self.store.reader(self.study.id, self.reader)
        if record is None or record.served_case != token or record.served_at is None:
            raise ValueError("No time was given and the case was never served with next_case(); pass ms.")
        served = datetime.fromisoformat(record.served_at)
        return max(0, int((datetime.now(timezone.utc) - served).total_seconds() * 1000))
