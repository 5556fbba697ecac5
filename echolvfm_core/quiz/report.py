"""Study results for ``echolvfm quiz report`` and the app's Results tab: the report dict of a study's scored answers
and its text table (the app draws the figures, :mod:`app.quiz.results`)."""
from __future__ import annotations

from ..quiz_stats import summarize
from .store import QuizStore

__all__ = ["automatic_reader_text", "format_report", "percent_text", "study_report"]


def study_report(store: QuizStore, study_id: str) -> dict:
    """Statistics of a study's scored answers, JSON-ready.

    Keys: those of :meth:`echolvfm_core.quiz_stats.StudyStats.to_dict` (n, accuracy, ci95, p_value,
    confusion {rr, rs, sr, ss}, sensitivity, specificity, fleiss_kappa, per_reader, mean_seconds, fleiss_n_cases,
    cohen_kappa, per_ef_bin, per_confidence, per_method) plus ``n_readers``, ``automatic_reader`` (the C2ST run when
    the study was created, or None) and ``study`` (id, created, model_version, seed, real_pool_source, config).
    """
    study = store.study(study_id)
    out = summarize(store.answer_records(study.id)).to_dict()
    out["n_readers"] = len(out["per_reader"])
    out["automatic_reader"] = study.config.get("automatic_reader")
    out["study"] = {
        "id": study.id,
        "created": study.created,
        "model_version": study.model_version,
        "seed": study.seed,
        "real_pool_source": study.real_pool_source,
        "config": study.config,
    }
    return out


def percent_text(x: float | None) -> str:
    """A share in [0, 1] as "ddd.d %" (None: "-")."""
    return "-" if x is None else f"{100 * x:5.1f} %"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def automatic_reader_text(a: dict | None) -> str:
    """One line on the automatic reader of a study (None: it was not run)."""
    if not a:
        return "Automatic reader: not run for this study"
    ci = f"{100 * a['ci95'][0]:.1f}-{100 * a['ci95'][1]:.1f} %"
    how = f" over {a['n']} cases, {a['folds']} folds" if "n" in a else ""
    if a.get("grouped_by_source") is False:
        how += ", not grouped by beat"
    return f"Automatic reader (C2ST{how}): {percent_text(a['accuracy']).strip()}  (95 % CI {ci})"


def format_report(r: dict) -> str:
    """Readable text of a :func:`study_report` dict: summary, automatic reader, confusion matrix, per-reader table,
    per-method shares, kappas, groups."""
    s, c, ci = r["study"], r["confusion"], r["ci95"]
    accuracy = f"Accuracy:       {percent_text(r['accuracy'])}"
    if ci is not None:
        accuracy += f"  (95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %, exact binomial p = {r['p_value']:.4g} vs 50 %)"
    lines = [
        f"Study {s['id']}  (created {s['created']}, model {s['model_version']}, seed {s['seed']})",
        f"Real pool: {s['real_pool_source']}",
        "",
        automatic_reader_text(r.get("automatic_reader")),
        "",
        f"Scored answers: {r['n']} from {r['n_readers']} reader(s)",
        accuracy,
        f"Sensitivity:    {percent_text(r['sensitivity'])}  (synthetic judged synthetic)",
        f"Specificity:    {percent_text(r['specificity'])}  (real judged real)",
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
            f"{name[:20]:<20}{p['n']:>5}{percent_text(p['accuracy']):>10}{ci_txt:>18}{_num(p['p_value'], '.3g'):>9}"
            f"{percent_text(p['sensitivity']):>9}{percent_text(p['specificity']):>9}{_num(p['mean_seconds'], '.1f'):>8}"
        )
    if len(r.get("per_method") or {}) > 1:
        lines += ["", "Synthetic cases judged synthetic, per generator:"]
        for name, m in r["per_method"].items():
            ci_txt = "" if m["ci95"] is None else f"  (95 % CI {100 * m['ci95'][0]:.1f}-{100 * m['ci95'][1]:.1f} %)"
            lines.append(f"  {name}: {percent_text(m['share']).strip()} of {m['n']}{ci_txt}")
    if r["cohen_kappa"]:
        lines += ["", "Cohen's kappa (cases both answered):"]
        lines += [f"  {k['readers'][0]} / {k['readers'][1]}: {_num(k['kappa'])}  (n = {k['n']})"
                  for k in r["cohen_kappa"]]
    lines += ["", "Accuracy by EF (%):"]
    lines += [f"  {g['label']:>8}: {percent_text(g['accuracy'])}  (n = {g['n']})" for g in r["per_ef_bin"]]
    lines += ["", "Accuracy by confidence:"]
    lines += [f"  {g['label']:>8}: {percent_text(g['accuracy'])}  (n = {g['n']})" for g in r["per_confidence"]]
    return "\n".join(lines)
