"""``echolvfm quiz``: realism-quiz results from a quiz database.

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


def study_report(store, study) -> dict:
    """JSON-ready report of a study: the statistics of :func:`echolvfm_core.quiz_stats.summarize` plus a ``study``
    block (id, created, model_version, seed, real_pool_source, config) and ``n_readers``."""
    from echolvfm_core.quiz_stats import summarize

    out = summarize(store.answer_records(study.id)).to_dict()
    out["n_readers"] = len(out["per_reader"])
    out["study"] = {
        "id": study.id,
        "created": study.created,
        "model_version": study.model_version,
        "seed": study.seed,
        "real_pool_source": study.real_pool_source,
        "config": study.config,
    }
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f} %"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_report(r: dict) -> str:
    """Readable text table of a :func:`study_report` dict."""
    s = r["study"]
    c = r["confusion"]
    ci = r["ci95"]
    lines = [
        f"Study {s['id']}  (created {s['created']}, model {s['model_version']}, seed {s['seed']})",
        f"Real pool: {s['real_pool_source']}",
        "",
        f"Scored answers: {r['n']} from {r['n_readers']} reader(s)",
        f"Accuracy:       {_pct(r['accuracy'])}"
        + (f"  (95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %, exact binomial p = {r['p_value']:.4g} vs 50 %)"
           if ci else ""),
        f"Sensitivity:    {_pct(r['sensitivity'])}  (synthetic judged synthetic)",
        f"Specificity:    {_pct(r['specificity'])}  (real judged real)",
        f"Fleiss' kappa:  {_num(r['fleiss_kappa'])}  over {r['fleiss_n_cases']} case(s) answered by every reader",
        f"Mean time:      {_num(r['mean_seconds'], '.1f')} s per case",
        "",
        "Confusion (rows truth, columns answer):",
        f"{'':>12}{'real':>8}{'synthetic':>11}",
        f"{'real':>12}{c['rr']:>8}{c['rs']:>11}",
        f"{'synthetic':>12}{c['sr']:>8}{c['ss']:>11}",
        "",
        f"{'reader':<20}{'n':>5}{'accuracy':>10}{'95 % CI':>18}{'p':>9}{'sens':>9}{'spec':>9}{'s/case':>8}",
    ]
    for name, p in r["per_reader"].items():
        ci_txt = "-" if p["ci95"] is None else f"{100 * p['ci95'][0]:.1f}-{100 * p['ci95'][1]:.1f} %"
        lines.append(
            f"{name[:20]:<20}{p['n']:>5}{_pct(p['accuracy']):>10}{ci_txt:>18}{_num(p['p_value'], '.3g'):>9}"
            f"{_pct(p['sensitivity']):>9}{_pct(p['specificity']):>9}{_num(p['mean_seconds'], '.1f'):>8}"
        )
    if r["cohen_kappa"]:
        lines += ["", "Cohen's kappa (cases both answered):"]
        lines += [
            f"  {k['readers'][0]} / {k['readers'][1]}: {_num(k['kappa'])}  (n = {k['n']})" for k in r["cohen_kappa"]
        ]
    lines += ["", "Accuracy by EF (%):"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_ef_bin"]]
    lines += ["", "Accuracy by confidence:"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_confidence"]]
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    store = _open(args.db)
    r = study_report(store, _pick_study(store, args.study))
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
