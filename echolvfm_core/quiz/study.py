"""Realism-quiz study setup and reader sessions, independent of any UI.

Setup (:func:`create_study`) splits the pool's beats between the arms (a beat, and every window cut from it, is
shown either as real or as synthetic, never both), cuts the cases (a window of one beat played cyclically, from a
start phase spread over the beat), renders the synthetic ones (the generator's counterfactual of a synthetic-arm
beat at an EF drawn from the EF range), passes every case through one presentation
(:func:`echolvfm_core.quiz.present.present_frames` and :func:`~echolvfm_core.quiz.present.encode_study`: same window
length, frame rate, size, grey levels, encoder, frame sizes and byte count), runs the automatic reader on the served
files and stores the study in a :class:`~echolvfm_core.quiz.store.QuizStore`. A reader's progress lives only in the
database, so a :class:`ReaderSession` can be rebuilt at any time (another request, another worker, after a server
restart) and continues at the first unanswered case.

What the browser may receive is exactly :class:`CaseView` (no truth, no EF, no source) and, after an answer,
:class:`AnswerFeedback` (the truth only for calibration cases, whose purpose is feedback).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..echo import EchoLoadError
from ..quiz_stats import CATEGORIES, REAL, SYNTHETIC
from .pool import PoolBeat
from .present import ENCODER_OPTIONS, VideoSpec, encode_study, present_frames
from .store import CaseRecord, QuizStore, StudyRecord, utc_now

__all__ = [
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

logger = logging.getLogger(__name__)

#: A study needs at least this many beats in its pool: one for each arm.
MIN_POOL_BEATS = 2

#: The video spec of a study that states none (VideoSpec is frozen, so one instance serves every call).
_DEFAULT_SPEC = VideoSpec()

#: A generator, injected: (pool beat, requested EF in %, seed) -> float32 (N, S, S) frames of the beat's heart at
#: that EF, at the beat's size and frame count.
SynthFn = Callable[[PoolBeat, float, int], np.ndarray]
#: The automatic reader, injected: (real cases, synthetic cases as served, uint8 (T, H, W) each; the source of
#: each real case, of each synthetic case) -> a JSON-able dict with at least "accuracy" and "ci95".
DetectFn = Callable[[list, list, list, list], dict]


class StudyTooDetectable(ValueError):
    """The automatic reader already separates the study's synthetic cases (``--max-detectability``)."""


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


def _check_setup(n_beats: int, n_cases: int, calibration_n: int, ef_range: tuple[float, float], methods: list[str],
                 real_pool_source: str) -> tuple[int, int]:
    """Validate the setup; return (real cases needed, synthetic cases needed) over both blocks."""
    if not isinstance(n_cases, int) or n_cases < 2 or n_cases % 2:
        raise ValueError(f"n_cases must be an even number >= 2 (half real, half synthetic); got {n_cases!r}.")
    if not isinstance(calibration_n, int) or calibration_n < 0:
        raise ValueError(f"calibration_n must be a non-negative integer; got {calibration_n!r}.")
    lo, hi = ef_range
    if not (0.0 <= lo < hi <= 100.0):
        raise ValueError(f"ef_range must be (low, high) in % with 0 <= low < high <= 100; got {ef_range!r}.")
    if not methods or not all(m.strip() for m in methods):
        raise ValueError("generators must name at least one generator (its model version).")
    if not real_pool_source.strip():
        raise ValueError("real_pool_source must say where the real cases come from (e.g. 'acquired cines, site X').")
    if n_beats < MIN_POOL_BEATS:
        raise EchoLoadError(
            f"The pool holds {n_beats} whole beat{'s' if n_beats != 1 else ''}; a realism study needs at least "
            f"{MIN_POOL_BEATS} (one shown as real, one rendered as synthetic)."
        )
    return n_cases // 2 + calibration_n // 2, n_cases // 2 + calibration_n - calibration_n // 2


def _windows(beat_ids: Sequence[int], n: int, rng: np.random.Generator) -> list[tuple[int, float]]:
    """``n`` (beat, start phase) pairs dealt round-robin over ``beat_ids``; the windows of one beat start at phases
    spread evenly over it from a random offset."""
    per_beat = {b: (n // len(beat_ids)) + (k < n % len(beat_ids)) for k, b in enumerate(beat_ids)}
    out = []
    for b, m in per_beat.items():
        offset = float(rng.random())
        out += [(b, (offset + k / m) % 1.0) for k in range(m)]
    return out


def read_served(path: str | os.PathLike) -> np.ndarray:
    """The frames of a served case as a browser decodes them: uint8 (T, H, W) grey levels."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24")[..., 0] for f in c.decode(video=0)])


def create_study(
    pool: Sequence[PoolBeat],
    n_cases: int,
    generators: Mapping[str, SynthFn],
    *,
    out_dir: str | os.PathLike,
    real_pool_source: str,
    ef_range: tuple[float, float] = (20.0, 75.0),
    seed: int = 0,
    calibration_n: int = 4,
    spec: VideoSpec = _DEFAULT_SPEC,
    store: QuizStore | None = None,
    detector: DetectFn | None = None,
    max_detectability: float | None = None,
) -> Study:
    """Set up a blinded real-vs-synthetic study and store it.

    Args:
        pool: the beats (:class:`~echolvfm_core.quiz.pool.PoolBeat`); at least :data:`MIN_POOL_BEATS`. They are split
            between the arms at random (half, rounded up, real); cases are dealt round-robin over each arm's beats.
        n_cases: scored cases, even: half real, half synthetic.
        generators: model version -> generator (:data:`SynthFn`); synthetic cases are dealt round-robin over them,
            so a study of several generators reports each one's share judged synthetic.
        out_dir: folder for the database (``quiz.sqlite`` unless ``store`` is given) and ``media/<study id>/``.
        real_pool_source: where the pool comes from (shown in the results).
        ef_range: (low, high) EF in % of the synthetic cases, drawn uniformly.
        seed: fixes the arms, the windows, the EFs, the generators' noise, the automatic reader and, with the reader
            ID, each reader's case order. Case tokens and file names are random regardless (:mod:`secrets`).
        calibration_n: extra cases shown first with feedback and not scored (half real, rounded down).
        spec: window length, frame rate and size of every video.
        store: where to store the study; default ``QuizStore(out_dir / "quiz.sqlite")``.
        detector: the automatic reader (:data:`DetectFn`), run on the served files; its result is stored with the
            study (``config["automatic_reader"]``). None: not run.
        max_detectability: refuse the study (:class:`StudyTooDetectable`, nothing stored) when the automatic
            reader's accuracy is above this.

    Raises:
        EchoLoadError: fewer than :data:`MIN_POOL_BEATS` beats.
        ValueError: bad counts, EF range, descriptions or generators, or a generator that does not return the
            beat's frame shape.
    """
    methods = list(generators)
    n_real, n_synth = _check_setup(len(pool), n_cases, calibration_n, tuple(ef_range), methods, real_pool_source)
    if max_detectability is not None and detector is None:
        raise ValueError("max_detectability needs a detector (the automatic reader).")
    out_dir = Path(out_dir)
    store = store if store is not None else QuizStore(out_dir / "quiz.sqlite")
    study_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    media_dir = (out_dir / "media" / study_id).resolve()

    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(pool))]
    n_real_beats = len(pool) - len(pool) // 2
    real_beats, synth_beats = order[:n_real_beats], order[n_real_beats:]
    real_windows = _windows(real_beats, n_real, rng)
    synth_windows = _windows(synth_beats, n_synth, rng)
    efs = rng.uniform(ef_range[0], ef_range[1], size=n_synth).round(1)
    dealt = [int(i) for i in rng.permutation(n_synth)]  # which synthetic case each generator makes
    n_cal_real, n_cal_synth = calibration_n // 2, calibration_n - calibration_n // 2
    # (truth, beat, start, EF, method, block); the first calibration entries of each arm are the practice cases
    plan = [(REAL, b, start, None, None, "calibration" if k < n_cal_real else "scored")
            for k, (b, start) in enumerate(real_windows)]
    plan += [(SYNTHETIC, b, start, float(efs[k]), methods[dealt[k] % len(methods)],
              "calibration" if k < n_cal_synth else "scored") for k, (b, start) in enumerate(synth_windows)]
    # Creation order (and so file times, names and database positions) must not follow the truth.
    plan = [plan[i] for i in rng.permutation(len(plan))]
    case_seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(len(plan))]

    media_dir.mkdir(parents=True, exist_ok=False)
    try:
        shown, records = [], []
        for position, ((truth, b, start, ef, method, block), case_seed) in enumerate(zip(plan, case_seeds)):
            beat = pool[b]
            frames = beat.frames
            source = f"{beat.source} [{beat.kind}], window from {start:.2f} of the beat"
            if truth == SYNTHETIC:
                frames = np.asarray(generators[method](beat, ef, case_seed), dtype=np.float32)
                if frames.shape != beat.frames.shape:
                    raise ValueError(f"A generator must return the beat's frames {beat.frames.shape}; got "
                                     f"{frames.shape}.")
                source += f", rendered at EF {ef:g} %"
            shown.append(present_frames(frames, beat.fps, start, spec))
            records.append(dict(truth=truth, ef=beat.ef if truth == REAL else ef, position=position, block=block,
                                method=method, source=source, beat=b))
        # random names, issued in creation order (a seeded shuffle that does not follow the truth)
        names = sorted(secrets.token_hex(12) + ".mp4" for _ in records)
        file_bytes = encode_study(shown, [media_dir / n for n in names], spec.fps)
        stamp = time.time()
        for n in names:  # one modification time for all, so HTTP Last-Modified headers say nothing
            os.utime(media_dir / n, (stamp, stamp))
        automatic = None
        if detector is not None:
            served = [read_served(media_dir / n) for n in names]
            real = [i for i, r in enumerate(records) if r["truth"] == REAL]
            synth = [i for i, r in enumerate(records) if r["truth"] == SYNTHETIC]
            automatic = detector([served[i] for i in real], [served[i] for i in synth],
                                 [str(records[i]["beat"]) for i in real], [str(records[i]["beat"]) for i in synth])
            if max_detectability is not None and automatic["accuracy"] > max_detectability:
                lo, hi = automatic["ci95"]
                raise StudyTooDetectable(
                    f"The automatic reader tells this study's cases apart (accuracy {automatic['accuracy']:.2f}, "
                    f"95 % CI {lo:.2f}-{hi:.2f}, above the maximum detectability {max_detectability:g}); "
                    "no study was stored.")
        cases = [CaseRecord(study=study_id, case_id=secrets.token_urlsafe(12), truth=r["truth"],
                            ef=None if r["ef"] is None else float(r["ef"]), video=n, position=r["position"],
                            block=r["block"], method=r["method"], source=r["source"])
                 for r, n in zip(records, names)]
        arm_sources = {REAL: sorted({pool[b].source for b in real_beats}),
                       SYNTHETIC: sorted({pool[b].source for b in synth_beats})}
        record = StudyRecord(
            id=study_id,
            created=utc_now(),
            model_version=" + ".join(methods),
            seed=int(seed),
            config={
                "n_cases": n_cases,
                "calibration_n": calibration_n,
                "ef_range": [float(ef_range[0]), float(ef_range[1])],
                "video": asdict(spec) | {"codec": f"H.264 (libx264, yuv420p, {ENCODER_OPTIONS['x264-params']}, crf "
                                                  f"{ENCODER_OPTIONS['crf']}), frames padded to one size, MP4",
                                         "file_bytes": int(file_bytes)},
                "pool_beats": len(pool),
                "beats": {"real": arm_sources[REAL], "synthetic": arm_sources[SYNTHETIC]},
                "max_cases_per_beat": max(
                    max(sum(r["beat"] == b for r in records) for b in real_beats),
                    max(sum(r["beat"] == b for r in records) for b in synth_beats)),
                "n_real": n_real,
                "n_synthetic": n_synth,
                "methods": methods,
                "automatic_reader": automatic,
                "max_detectability": max_detectability,
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
        Starts the server-side clock for the case; serving a case again (a reload, a resume after a server
        restart) restarts it, so time away from the page does not count as reading time."""
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
