"""Quiz SQLite store: schema, idempotent answers, concurrent writers (threads and processes), CSV export."""
from __future__ import annotations

import csv
import multiprocessing as mp
import sqlite3
import threading

import pytest

from echolvfm_core.quiz.store import (
    CaseRecord,
    QuizStore,
    StudyRecord,
    results_to_csv,
    utc_now,
)

N_CASES = 12
N_READERS = 10


def make_store(path, study_id="s1", n_cases=N_CASES, n_calibration=2) -> QuizStore:
    """A store holding one study of ``n_cases`` cases (alternating truth; the first ``n_calibration`` calibration)."""
    store = QuizStore(path)
    study = StudyRecord(id=study_id, created=utc_now(), model_version="m-test", seed=7, config={"n_cases": n_cases},
                        real_pool_source="unit test", media_dir=str(path.parent))
    cases = [
        CaseRecord(study=study_id, case_id=f"k{i:02d}", truth="real" if i % 2 else "synthetic", ef=30.0 + i,
                   video=f"v{i:02d}.mp4", position=i, block="calibration" if i < n_calibration else "scored")
        for i in range(n_cases)
    ]
    store.add_study(study, cases)
    return store


def _answer_all(db_path, reader: str) -> None:
    """Worker: register ``reader`` and answer every case once (runs in a thread or a separate process)."""
    store = QuizStore(db_path)
    order = [f"k{i:02d}" for i in range(N_CASES)]
    store.register_reader("s1", reader, order, 2)
    for i, case in enumerate(order):
        store.submit_answer("s1", reader, case, "real" if i % 3 else "synthetic", 1 + i % 5, 100 * i)


def test_schema_wal_and_metadata_from_db(tmp_path):
    store = make_store(tmp_path / "q.sqlite")
    conn = sqlite3.connect(tmp_path / "q.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store.register_reader("s1", "alice", ["k00", "k01"], 1)
    res = store.submit_answer("s1", "alice", "k03", "synthetic", 4, 1234)
    row = res.row
    assert not res.duplicate
    # truth, block, model version and seed come from the database, not the caller
    assert (row.truth, row.block, row.model_version, row.seed) == ("real", "scored", "m-test", 7)
    assert (row.answer, row.confidence, row.ms) == ("synthetic", 4, 1234)
    assert store.study("s1").config == {"n_cases": N_CASES}
    assert [c.case_id for c in store.cases("s1")][:2] == ["k00", "k01"]
    QuizStore(tmp_path / "q.sqlite")  # reopening an existing database is fine
    assert len(store.answers("s1")) == 1


def test_second_answer_to_a_case_keeps_the_first(tmp_path):
    store = make_store(tmp_path / "q.sqlite")
    store.register_reader("s1", "alice", ["k00"], 0)
    first = store.submit_answer("s1", "alice", "k05", "real", 2, 10)
    again = store.submit_answer("s1", "alice", "k05", "synthetic", 5, 99)
    assert again.duplicate and again.row == first.row
    assert len(store.answers("s1", reader="alice")) == 1
    # registering again keeps the stored order
    assert store.register_reader("s1", "alice", ["k01", "k02"], 1).order == ("k00",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"answer": "fake"}, "'real' or 'synthetic'"),
        ({"confidence": 0}, "from 1 to 5"),
        ({"confidence": 2.5}, "from 1 to 5"),
        ({"ms": -1}, "non-negative"),
    ],
)
def test_bad_answers_are_rejected(tmp_path, kwargs, message):
    store = make_store(tmp_path / "q.sqlite")
    store.register_reader("s1", "alice", ["k00"], 0)
    args = {"answer": "real", "confidence": 3, "ms": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        store.submit_answer("s1", "alice", "k02", **args)
    assert store.answers() == []


def test_unknown_case_or_reader(tmp_path):
    store = make_store(tmp_path / "q.sqlite")
    with pytest.raises(KeyError, match="not registered"):
        store.submit_answer("s1", "nobody", "k02", "real", 3, 5)
    store.register_reader("s1", "alice", ["k00"], 0)
    with pytest.raises(KeyError, match="no case"):
        store.submit_answer("s1", "alice", "nope", "real", 3, 5)
    with pytest.raises(KeyError, match="no study"):
        store.study("s2")


def test_ten_readers_in_threads_lose_nothing(tmp_path):
    db = tmp_path / "q.sqlite"
    make_store(db)
    threads = [threading.Thread(target=_answer_all, args=(db, f"r{i}")) for i in range(N_READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers = QuizStore(db).answers("s1")
    assert len(answers) == N_READERS * N_CASES
    want = {(f"r{i}", f"k{j:02d}") for i in range(N_READERS) for j in range(N_CASES)}
    assert {(a.reader, a.case_id) for a in answers} == want


def test_ten_readers_in_processes_lose_nothing(tmp_path):
    db = tmp_path / "q.sqlite"
    make_store(db)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_answer_all, args=(db, f"r{i}")) for i in range(N_READERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * N_READERS
    store = QuizStore(db)
    assert len(store.answers("s1")) == N_READERS * N_CASES
    assert len(store.answer_records("s1")) == N_READERS * (N_CASES - 2)  # calibration answers are not scored
    assert len(store.readers("s1")) == N_READERS


def test_csv_export(tmp_path):
    db = tmp_path / "q.sqlite"
    store = make_store(db)
    _answer_all(db, "alice")
    n = results_to_csv(db, tmp_path / "answers.csv")
    rows = list(csv.DictReader(open(tmp_path / "answers.csv", encoding="utf-8")))
    assert n == len(rows) == N_CASES
    assert rows[0]["block"] == "calibration" and rows[-1]["block"] == "scored"
    for row, ans in zip(rows, store.answers("s1")):
        assert row["truth"] == ans.truth and row["answer"] == ans.answer
        assert row["correct"] == str(int(ans.truth == ans.answer))
    assert float(rows[3]["ef"]) == 33.0


def test_a_version_1_database_gains_the_method_and_source_of_each_case(tmp_path):
    from echolvfm_core.quiz.store import SCHEMA_VERSION

    path = tmp_path / "v1.sqlite"
    store = QuizStore(path)
    store.add_study(StudyRecord(id="s", created=utc_now(), model_version="m", seed=0, config={},
                                real_pool_source="x", media_dir=str(tmp_path)),
                    [CaseRecord(study="s", case_id="c", truth="real", ef=None, video="v.mp4", position=0,
                                block="scored")])
    store.close()
    with sqlite3.connect(path) as conn:  # the schema as version 1 wrote it
        conn.execute("ALTER TABLE cases DROP COLUMN method")
        conn.execute("ALTER TABLE cases DROP COLUMN source")
        conn.execute("PRAGMA user_version=1")
    again = QuizStore(path)
    assert again._connect().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert [(c.case_id, c.method, c.source) for c in again.cases("s")] == [("c", None, None)]
