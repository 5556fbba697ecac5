"""Durable SQLite store of realism-quiz studies, cases, readers and answers (standard library only).

Durability and concurrency choices:

* **WAL journal, ``synchronous=FULL``.** Each answer is its own ``BEGIN IMMEDIATE ... COMMIT`` transaction. In WAL
  mode a commit appends the transaction to the ``-wal`` file with ``write()`` before ``COMMIT`` returns, so once
  :meth:`QuizStore.submit_answer` has returned, the answer is in the operating system's file cache and survives the
  server process being killed (``kill -9``) at any later moment; the next connection replays the WAL. ``NORMAL``
  would already give that; ``FULL`` additionally ``fsync``\\s the WAL at every commit, so a committed answer also
  survives a power cut or kernel crash. Answers arrive at human pace (seconds apart), so one ``fsync`` per answer
  costs nothing noticeable.
* **One connection per thread** (per process), kept open and never shared: any number of server threads and worker
  processes can use the same file. ``timeout`` (SQLite's busy timeout) makes a writer wait for another writer's
  lock instead of failing; ``BEGIN IMMEDIATE`` takes the write lock up front so that read-then-write transactions
  cannot deadlock. (Start worker processes with ``spawn``, or fork before any thread touches the database: a fork
  taken while another thread is inside SQLite copies that thread's in-process lock state.)
* **Idempotent answers.** ``answers`` has ``UNIQUE(study, reader, case_id)``; the first committed answer of a reader
  to a case is final. Submitting again (a double click, a retried request after a lost response) stores nothing and
  returns the stored answer with ``duplicate=True``; it is not an error, so retries are safe, and an answer cannot
  be changed afterwards (in the calibration block the truth has been shown by then).
* The truth, model version, seed and block written with each answer are read from the ``cases`` / ``studies``
  tables inside the same transaction, never taken from the caller.
"""
from __future__ import annotations

import csv
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..quiz_stats import CATEGORIES, AnswerRecord

__all__ = [
    "SCHEMA_VERSION",
    "BLOCKS",
    "QuizStore",
    "StudyRecord",
    "CaseRecord",
    "ReaderRecord",
    "AnswerRow",
    "SubmitResult",
    "results_to_csv",
    "utc_now",
]

SCHEMA_VERSION = 2
BLOCKS = ("calibration", "scored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    id               TEXT PRIMARY KEY,
    created          TEXT NOT NULL,
    model_version    TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    config           TEXT NOT NULL,            -- JSON
    real_pool_source TEXT NOT NULL,
    media_dir        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cases (
    study     TEXT NOT NULL REFERENCES studies(id),
    case_id   TEXT NOT NULL,                   -- random token, the only case handle the browser sees
    truth     TEXT NOT NULL CHECK (truth IN ('real', 'synthetic')),
    ef        REAL,                            -- % : requested EF (synthetic) or known EF (real), may be NULL
    video     TEXT NOT NULL,                   -- random file name inside studies.media_dir
    position  INTEGER NOT NULL,
    block     TEXT NOT NULL CHECK (block IN ('calibration', 'scored')),
    method    TEXT,                            -- the generator of a synthetic case (its model version)
    source    TEXT,                            -- provenance: cine, beat, window, kind, EF rendered at
    PRIMARY KEY (study, case_id),
    UNIQUE (study, video)
);
CREATE TABLE IF NOT EXISTS readers (
    study         TEXT NOT NULL REFERENCES studies(id),
    reader        TEXT NOT NULL,
    created       TEXT NOT NULL,
    case_order    TEXT NOT NULL,               -- JSON list of case_id: calibration block, then scored block
    n_calibration INTEGER NOT NULL,
    served_case   TEXT,                        -- case last handed to the browser, for server-side timing
    served_at     TEXT,
    PRIMARY KEY (study, reader)
);
CREATE TABLE IF NOT EXISTS answers (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    study         TEXT NOT NULL,
    reader        TEXT NOT NULL,
    case_id       TEXT NOT NULL,
    truth         TEXT NOT NULL CHECK (truth IN ('real', 'synthetic')),
    answer        TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    confidence    INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    ms            INTEGER NOT NULL CHECK (ms >= 0),
    timestamp     TEXT NOT NULL,
    model_version TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    block         TEXT NOT NULL CHECK (block IN ('calibration', 'scored')),
    UNIQUE (study, reader, case_id),
    FOREIGN KEY (study, case_id) REFERENCES cases(study, case_id),
    FOREIGN KEY (study, reader) REFERENCES readers(study, reader)
);
"""


def utc_now() -> str:
    """Current UTC time as ISO 8601 with milliseconds, e.g. ``2025-01-31T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class StudyRecord:
    """A study as stored: ``config`` is the JSON-able setup (sizes, EF range, video settings, pool size, ...)."""

    id: str
    created: str
    model_version: str
    seed: int
    config: dict
    real_pool_source: str
    media_dir: str


@dataclass(frozen=True)
class CaseRecord:
    """One case, server side only (it holds the truth). ``ef`` in %, ``video`` a file name in the media dir."""

    study: str
    case_id: str
    truth: str
    ef: float | None
    video: str
    position: int
    block: str
    method: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ReaderRecord:
    """A reader's fixed case order (calibration block first) and the case last served to them."""

    study: str
    reader: str
    created: str
    order: tuple[str, ...]
    n_calibration: int
    served_case: str | None
    served_at: str | None


@dataclass(frozen=True)
class AnswerRow:
    """One stored answer; ``ms`` time on the case in milliseconds, ``timestamp`` UTC ISO 8601."""

    study: str
    reader: str
    case_id: str
    truth: str
    answer: str
    confidence: int
    ms: int
    timestamp: str
    model_version: str
    seed: int
    block: str


@dataclass(frozen=True)
class SubmitResult:
    """The answer as stored; ``duplicate`` is True when an earlier answer to this case was kept instead."""

    row: AnswerRow
    duplicate: bool


_ANSWER_COLUMNS = "study, reader, case_id, truth, answer, confidence, ms, timestamp, model_version, seed, block"


class QuizStore:
    """A quiz database file. Cheap to construct; safe to use from many threads and processes at once.

    Args:
        path: SQLite file (created with its folder when missing).
        timeout: seconds a call waits for another writer's lock before raising ``sqlite3.OperationalError``.
    """

    def __init__(self, path: str | Path, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = float(timeout)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._connect()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ValueError(
                f"Quiz database {self.path} could not be switched to WAL journaling (got {mode!r}); "
                "put it on a local file system."
            )
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 1:  # version 2 added the generator and the provenance of each case
            with self._write() as conn:
                conn.execute("ALTER TABLE cases ADD COLUMN method TEXT")
                conn.execute("ALTER TABLE cases ADD COLUMN source TEXT")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            version = SCHEMA_VERSION
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(
                f"Quiz database {self.path} has schema version {version}; this code reads version {SCHEMA_VERSION}."
            )
        if version == 0:  # a new file (CREATE ... IF NOT EXISTS makes a concurrent first open harmless)
            with self._write() as conn:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- connections --------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a forked child, which must not reuse its
        parent's). Keeping it open avoids a WAL checkpoint at every call, which SQLite runs when the last
        connection to a database closes."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.row_factory = sqlite3.Row
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close the calling thread's connection (other threads' connections close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE, COMMIT on success, ROLLBACK on error."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        return self._connect().execute(sql, params).fetchall()

    # -- studies and cases --------------------------------------------------------------------------------------

    def add_study(self, study: StudyRecord, cases: Sequence[CaseRecord]) -> None:
        """Store a study and all its cases in one transaction (nothing is stored if anything fails)."""
        for c in cases:
            if c.study != study.id:
                raise ValueError(f"case {c.case_id} belongs to study {c.study!r}, not {study.id!r}.")
        with self._write() as conn:
            conn.execute(
                "INSERT INTO studies (id, created, model_version, seed, config, real_pool_source, media_dir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (study.id, study.created, study.model_version, int(study.seed), json.dumps(study.config),
                 study.real_pool_source, study.media_dir),
            )
            conn.executemany(
                "INSERT INTO cases (study, case_id, truth, ef, video, position, block, method, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.study, c.case_id, c.truth, c.ef, c.video, c.position, c.block, c.method, c.source)
                 for c in cases],
            )

    @staticmethod
    def _study(row: sqlite3.Row) -> StudyRecord:
        return StudyRecord(
            id=row["id"], created=row["created"], model_version=row["model_version"], seed=int(row["seed"]),
            config=json.loads(row["config"]), real_pool_source=row["real_pool_source"], media_dir=row["media_dir"],
        )

    def studies(self) -> list[StudyRecord]:
        """All studies, oldest first."""
        return [self._study(r) for r in self._read("SELECT * FROM studies ORDER BY created, id")]

    def study(self, study_id: str) -> StudyRecord:
        rows = self._read("SELECT * FROM studies WHERE id = ?", (study_id,))
        if not rows:
            raise KeyError(f"no study {study_id!r} in {self.path}.")
        return self._study(rows[0])

    def cases(self, study_id: str) -> list[CaseRecord]:
        """The study's cases in creation order (server side only: they hold the truth)."""
        rows = self._read("SELECT * FROM cases WHERE study = ? ORDER BY position", (study_id,))
        return [CaseRecord(**{k: r[k] for k in r.keys()}) for r in rows]

    # -- readers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _reader(row: sqlite3.Row) -> ReaderRecord:
        return ReaderRecord(
            study=row["study"], reader=row["reader"], created=row["created"],
            order=tuple(json.loads(row["case_order"])), n_calibration=int(row["n_calibration"]),
            served_case=row["served_case"], served_at=row["served_at"],
        )

    def register_reader(self, study_id: str, reader: str, order: Sequence[str], n_calibration: int) -> ReaderRecord:
        """Register a reader with their case order; when the reader exists already, keep and return the stored one."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO readers (study, reader, created, case_order, n_calibration) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (study, reader) DO NOTHING",
                (study_id, reader, utc_now(), json.dumps(list(order)), int(n_calibration)),
            )
            row = conn.execute("SELECT * FROM readers WHERE study = ? AND reader = ?", (study_id, reader)).fetchone()
        return self._reader(row)

    def reader(self, study_id: str, reader: str) -> ReaderRecord | None:
        rows = self._read("SELECT * FROM readers WHERE study = ? AND reader = ?", (study_id, reader))
        return self._reader(rows[0]) if rows else None

    def readers(self, study_id: str) -> list[ReaderRecord]:
        rows = self._read("SELECT * FROM readers WHERE study = ? ORDER BY reader", (study_id,))
        return [self._reader(r) for r in rows]

    def mark_served(self, study_id: str, reader: str, case_id: str) -> str:
        """Record that ``case_id`` is on the reader's screen now: every serving (re)starts the case's clock, so a
        reload or a resume after a server restart does not count the time away as reading time. Returns the
        served-at timestamp."""
        with self._write() as conn:
            conn.execute(
                "UPDATE readers SET served_case = ?, served_at = ? WHERE study = ? AND reader = ?",
                (case_id, utc_now(), study_id, reader),
            )
            row = conn.execute(
                "SELECT served_at FROM readers WHERE study = ? AND reader = ?", (study_id, reader)
            ).fetchone()
        if row is None:
            raise KeyError(f"reader {reader!r} is not registered in study {study_id!r}.")
        return row["served_at"]

    # -- answers ------------------------------------------------------------------------------------------------

    def submit_answer(
        self, study_id: str, reader: str, case_id: str, answer: str, confidence: int, ms: int
    ) -> SubmitResult:
        """Commit one answer in its own transaction (see the module docstring for durability and idempotence).

        ``answer`` "real" | "synthetic", ``confidence`` 1-5, ``ms`` time on the case in milliseconds (>= 0). The
        truth, block, model version and seed are taken from the database.
        """
        if answer not in CATEGORIES:
            raise ValueError(f"answer must be 'real' or 'synthetic'; got {answer!r}.")
        if isinstance(confidence, bool) or not isinstance(confidence, int) or not 1 <= confidence <= 5:
            raise ValueError(f"confidence must be an integer from 1 to 5; got {confidence!r}.")
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ValueError(f"ms must be a non-negative integer number of milliseconds; got {ms!r}.")
        with self._write() as conn:
            case = conn.execute(
                "SELECT c.truth, c.block, s.model_version, s.seed FROM cases c JOIN studies s ON s.id = c.study "
                "WHERE c.study = ? AND c.case_id = ?",
                (study_id, case_id),
            ).fetchone()
            if case is None:
                raise KeyError(f"no case {case_id!r} in study {study_id!r}.")
            known = conn.execute("SELECT 1 FROM readers WHERE study = ? AND reader = ?", (study_id, reader)).fetchone()
            if known is None:
                raise KeyError(f"reader {reader!r} is not registered in study {study_id!r}.")
            cur = conn.execute(
                f"INSERT INTO answers ({_ANSWER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (study, reader, case_id) DO NOTHING",
                (study_id, reader, case_id, case["truth"], answer, confidence, ms, utc_now(), case["model_version"],
                 case["seed"], case["block"]),
            )
            duplicate = cur.rowcount == 0
            row = conn.execute(
                f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE study = ? AND reader = ? AND case_id = ?",
                (study_id, reader, case_id),
            ).fetchone()
        return SubmitResult(row=AnswerRow(**{k: row[k] for k in row.keys()}), duplicate=duplicate)

    def answers(
        self, study_id: str | None = None, reader: str | None = None, block: str | None = None
    ) -> list[AnswerRow]:
        """Stored answers in commit order, optionally filtered by study, reader and block."""
        where, params = [], []
        for column, value in (("study", study_id), ("reader", reader), ("block", block)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {_ANSWER_COLUMNS} FROM answers"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY id", params)
        return [AnswerRow(**{k: r[k] for k in r.keys()}) for r in rows]

    def answer_records(self, study_id: str) -> list[AnswerRecord]:
        """Scored answers of a study joined with their case EF, ready for :func:`echolvfm_core.quiz_stats.summarize`."""
        rows = self._read(
            "SELECT a.reader, a.case_id, a.truth, a.answer, a.confidence, a.ms, c.ef, c.method FROM answers a "
            "JOIN cases c ON c.study = a.study AND c.case_id = a.case_id "
            "WHERE a.study = ? AND a.block = 'scored' ORDER BY a.id",
            (study_id,),
        )
        return [
            AnswerRecord(reader=r["reader"], case=r["case_id"], truth=r["truth"], answer=r["answer"],
                         confidence=int(r["confidence"]), ms=int(r["ms"]), ef=r["ef"], method=r["method"])
            for r in rows
        ]


def results_to_csv(db: str | Path | QuizStore, path: str | Path, study_id: str | None = None) -> int:
    """Write raw answers (one row per answer, every block, with the case EF) to a CSV file; returns the row count.

    Columns: study, reader, case_id, block, truth, answer, correct, confidence, ms, ef, timestamp, model_version,
    seed.
    """
    store = db if isinstance(db, QuizStore) else QuizStore(db)
    efs = {}
    for study in store.studies() if study_id is None else [store.study(study_id)]:
        efs.update({(c.study, c.case_id): c.ef for c in store.cases(study.id)})
    rows = store.answers(study_id)
    columns = ["study", "reader", "case_id", "block", "truth", "answer", "correct", "confidence", "ms", "ef",
               "timestamp", "model_version", "seed"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for a in rows:
            ef = efs.get((a.study, a.case_id))
            writer.writerow({
                "study": a.study, "reader": a.reader, "case_id": a.case_id, "block": a.block, "truth": a.truth,
                "answer": a.answer, "correct": int(a.truth == a.answer), "confidence": a.confidence, "ms": a.ms,
                "ef": "" if ef is None else ef,
                "timestamp": a.timestamp, "model_version": a.model_version, "seed": a.seed,
            })
    return len(rows)
