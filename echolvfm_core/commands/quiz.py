"""``echolvfm quiz``: realism-quiz results from a quiz database (the work is done in :mod:`app.quiz`).

    echolvfm quiz report DB [--study ID] [--json]   statistics of the scored answers (text table or JSON)
    echolvfm quiz export DB OUT.csv [--study ID]    raw answers, one row per answer, every block
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quiz", help="realism-quiz results: statistics report and raw answer export")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    rp = actions.add_parser("report", help="accuracy, exact CI and p-value, confusion, kappas of a study")
    rp.add_argument("db", help="quiz database (quiz.sqlite)")
    rp.add_argument("--study", default=None, help="study ID (needed when the database holds several)")
    rp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rp.set_defaults(func=report)

    ep = actions.add_parser("export", help="write every answer to a CSV file")
    ep.add_argument("db", help="quiz database (quiz.sqlite)")
    ep.add_argument("out", help="CSV file to write")
    ep.add_argument("--study", default=None, help="only this study (default: all)")
    ep.set_defaults(func=export)


def _open(db: str):
    from app.quiz.store import QuizStore

    if not Path(db).is_file():  # QuizStore would create an empty database
        raise FileNotFoundError(2, os.strerror(2), db)
    return QuizStore(db)


def _pick_study(store, study_id: str | None):
    studies = store.studies()
    if study_id is not None:
        try:
            return store.study(study_id)
        except KeyError:
            raise CommandError(f"No study {study_id!r} in the database; it holds {[s.id for s in studies]}.") from None
    if not studies:
        raise CommandError("The database holds no study yet.")
    if len(studies) > 1:
        ids = ", ".join(s.id for s in studies)
        raise CommandError(f"The database holds {len(studies)} studies; pick one with --study ({ids}).")
    return studies[0]


def report(args: argparse.Namespace) -> int:
    from app.quiz.results import format_report, study_report

    store = _open(args.db)
    r = study_report(store, _pick_study(store, args.study).id)
    print(json.dumps(r, indent=2, allow_nan=False) if args.json else format_report(r))
    return 0


def export(args: argparse.Namespace) -> int:
    from app.quiz.store import results_to_csv

    store = _open(args.db)
    if args.study is not None:
        _pick_study(store, args.study)
    n = results_to_csv(store, args.out, args.study)
    print(f"Wrote {n} answers to {args.out}")
    return 0
