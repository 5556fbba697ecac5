"""Reader sessions: order, calibration feedback, blinding of what the browser gets, concurrency, kill -9 + resume."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from echolvfm_core.quiz.store import CaseRecord, QuizStore, StudyRecord, utc_now
from echolvfm_core.quiz.study import CaseView, ReaderSession, load_study, reader_order

ROOT = Path(__file__).resolve().parents[1]
N_CAL, N_SCORED = 4, 20


def make_study(db: Path, study_id: str = "s1") -> QuizStore:
    """A stored study (4 calibration + 20 scored cases, half real) whose videos are never opened here."""
    store = QuizStore(db)
    record = StudyRecord(id=study_id, created=utc_now(), model_version="m-test", seed=11, config={},
                         real_pool_source="unit test", media_dir=str(db.parent / "media"))
    cases = [
        CaseRecord(study=study_id, case_id=f"tok{i:03d}", truth="synthetic" if i % 2 else "real",
                   ef=20.0 + 2 * i if i % 2 else None, video=f"{i:03d}.mp4", position=i,
                   block="calibration" if i < N_CAL else "scored")
        for i in range(N_CAL + N_SCORED)
    ]
    store.add_study(record, cases)
    return store


def take(db: Path, reader: str, n: int | None = None) -> list[str]:
    """Answer up to ``n`` cases (all when None) as ``reader``; returns the tokens answered, in order."""
    session = ReaderSession(db, "s1", reader)
    done = []
    while n is None or len(done) < n:
        view = session.next_case()
        if view is None:
            break
        session.answer(view.token, "real", 3, ms=10)
        done.append(view.token)
    return done


def test_order_is_per_reader_seeded_and_calibration_first(tmp_path):
    db = tmp_path / "q.sqlite"
    make_study(db)
    study = load_study(db, "s1")
    a1, n_cal = reader_order(study, "alice")
    assert n_cal == N_CAL
    assert reader_order(study, "alice")[0] == a1  # same reader, same order
    assert reader_order(study, "bob")[0] != a1  # another reader, another order
    truth_block = {c.case_id: c.block for c in study.cases}
    assert [truth_block[t] for t in a1] == ["calibration"] * N_CAL + ["scored"] * N_SCORED
    assert ReaderSession(db, "s1", "  alice ").order == tuple(a1)  # surrounding spaces dropped


def test_calibration_feedback_then_blind_scored_block(tmp_path):
    db = tmp_path / "q.sqlite"
    store = make_study(db)
    truth = {c.case_id: c.truth for c in store.cases("s1")}
    s = ReaderSession(db, "s1", "alice")
    for k in range(N_CAL):
        view = s.next_case()
        assert (view.block, view.index, view.block_size, view.answered) == ("calibration", k + 1, N_CAL, k)
        fb = s.answer(view.token, "real", 2, ms=500)
        assert fb.truth == truth[view.token] and fb.correct == (truth[view.token] == "real")
    view = s.next_case()
    assert (view.block, view.index, view.block_size, view.total) == ("scored", 1, N_SCORED, N_CAL + N_SCORED)
    fb = s.answer(view.token, "synthetic", 5, ms=700)
    assert fb.truth is None and fb.correct is None and not fb.duplicate
    again = s.answer(view.token, "real", 1, ms=1)
    assert again.duplicate and again.truth is None
    stored = store.answers("s1", reader="alice")[-1]
    assert (stored.answer, stored.confidence, stored.ms) == ("synthetic", 5, 700)
    p = s.progress()
    assert (p.calibration_answered, p.scored_answered, p.done) == (N_CAL, 1, False)


def test_only_the_case_on_screen_can_be_answered(tmp_path):
    db = tmp_path / "q.sqlite"
    make_study(db)
    s = ReaderSession(db, "s1", "alice")
    current = s.next_case().token
    other = next(t for t in s.order if t != current)
    with pytest.raises(ValueError, match="not the one on screen"):
        s.answer(other, "real", 3, ms=10)
    with pytest.raises(ValueError, match="not the one on screen"):
        s.answer("forged-token", "real", 3, ms=10)
    with pytest.raises(ValueError, match="'real' or 'synthetic'"):
        s.answer(current, "maybe", 3, ms=10)
    with pytest.raises(ValueError, match="printable"):
        ReaderSession(db, "s1", "  ")


def _served_ten_minutes_ago(db: Path, reader: str) -> None:
    past = (datetime.now(timezone.utc) - timedelta(minutes=10)).isoformat(timespec="milliseconds")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE readers SET served_at = ? WHERE reader = ?", (past, reader))


def test_server_side_clock_restarts_when_the_case_is_served_again(tmp_path):
    """The case on screen when the server went down for ten minutes: served again on resume, its clock restarts;
    answered without being served again, the ten minutes count."""
    db = tmp_path / "q.sqlite"
    store = make_study(db)
    for reader, resumed in (("alice", True), ("bob", False)):
        s = ReaderSession(db, "s1", reader)
        view = s.next_case()
        _served_ten_minutes_ago(db, reader)
        if resumed:
            assert ReaderSession(db, "s1", reader).next_case().token == view.token  # after the restart
        s.answer(view.token, "real", 3)  # no ms: measured on the server
    ms = {a.reader: a.ms for a in store.answers("s1")}
    assert ms["alice"] < 60_000 and 600_000 <= ms["bob"] < 700_000


def test_payloads_never_carry_the_truth(tmp_path):
    db = tmp_path / "q.sqlite"
    store = make_study(db)
    cases = {c.case_id: c for c in store.cases("s1")}
    s = ReaderSession(db, "s1", "alice")
    seen = 0
    while (view := s.next_case()) is not None:
        payload = view.to_dict()
        assert set(payload) == {"token", "video", "block", "index", "block_size", "answered", "total"}
        case = cases[view.token]
        assert Path(payload["video"]).name == case.video
        payload["video"] = Path(payload["video"]).name  # the folder is the test's tmp_path, named by pytest
        text = json.dumps(payload).lower()
        for word in ("real", "synthetic", "truth", "ef", str(case.ef)):
            assert word not in text, (word, text)
        fb = s.answer(view.token, "synthetic", 3, ms=1).to_dict()
        if view.block == "scored":
            assert fb["truth"] is None and fb["correct"] is None
            assert "real" not in json.dumps(fb) and "synthetic" not in json.dumps(fb)
        seen += 1
    assert seen == N_CAL + N_SCORED and s.progress().done


def test_ten_session_readers_in_threads_and_processes(tmp_path):
    # (tests/test_quiz_store.py runs ten whole readers in ten processes against the store itself)
    db = tmp_path / "q.sqlite"
    store = make_study(db)
    n = 8  # answers per reader
    threads = [threading.Thread(target=take, args=(db, f"t{i}", n)) for i in range(8)]
    # spawn, not fork: forking while other threads are inside SQLite copies their in-process lock state
    procs = [mp.get_context("spawn").Process(target=take, args=(db, f"p{i}", n)) for i in range(2)]
    for w in procs + threads:
        w.start()
    for w in threads + procs:
        w.join(60)
    assert [p.exitcode for p in procs] == [0] * 2
    answers = store.answers("s1")
    assert len(answers) == 10 * n
    assert len({(a.reader, a.case_id) for a in answers}) == len(answers)
    for reader in [f"t{i}" for i in range(8)] + [f"p{i}" for i in range(2)]:
        session = ReaderSession(db, "s1", reader)
        assert {a.case_id for a in answers if a.reader == reader} == set(session.order[:n])
        assert session.next_case().token == session.order[n]


KILLED_WORKER = textwrap.dedent(
    """
    import sys
    from echolvfm_core.quiz.study import ReaderSession
    db, readers = sys.argv[1], sys.argv[2:]
    sessions = [ReaderSession(db, "s1", r) for r in readers]
    while True:
        for s in sessions:
            view = s.next_case()
            if view is None:
                continue
            s.answer(view.token, "synthetic", 4, ms=123)
            print(s.reader, view.token, flush=True)  # printed only after the commit returned
    """
)


def test_killed_server_keeps_committed_answers_and_resumes(tmp_path):
    db = tmp_path / "q.sqlite"
    make_study(db)
    take(db, "r0", 3)  # an earlier session of r0
    readers = ["r0", "r1", "r2"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(db), *readers], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    reported = []
    try:
        for line in proc.stdout:
            reported.append(tuple(line.split()))
            if len(reported) == 25:  # mid-study: about 8 answers each
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) == 25

    conn = sqlite3.connect(db)  # the database, WAL included, is intact
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    store = QuizStore(db)  # "restarted server"
    stored = {(a.reader, a.case_id) for a in store.answers("s1")}
    assert set(reported) <= stored  # every answer whose commit returned survived
    for reader in readers:
        session = ReaderSession(db, "s1", reader)
        answered = [t for t in session.order if (reader, t) in stored]
        n = len(answered)
        assert answered == list(session.order[:n])  # answers form a prefix of the reader's order: no gaps
        assert 0 < n < N_CAL + N_SCORED
        view = session.next_case()
        assert isinstance(view, CaseView) and view.token == session.order[n] and view.answered == n
