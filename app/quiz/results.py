"""Study results shared by ``echolvfm quiz report`` and the Results tab: the report dict, its text table and plotly
figures (plain functions, no Gradio).

Figures are plotly, so the browser's plot toolbar ("Download plot as a png") exports them as PNG without any
server-side image renderer.
"""
from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from echolvfm_core.quiz_stats import summarize

from .store import QuizStore

__all__ = ["study_report", "format_report", "confusion_figure", "accuracy_figure"]

# A light look without plotly's template (as in app/figures.py).
_PLAIN = dict(template="none", plot_bgcolor="white", paper_bgcolor="white", font=dict(size=12))


def study_report(store: QuizStore, study_id: str) -> dict:
    """Statistics of a study's scored answers, JSON-ready.

    Keys: those of :meth:`echolvfm_core.quiz_stats.StudyStats.to_dict` (n, accuracy, ci95, p_value,
    confusion {rr, rs, sr, ss}, sensitivity, specificity, fleiss_kappa, per_reader, mean_seconds, fleiss_n_cases,
    cohen_kappa, per_ef_bin, per_confidence) plus ``n_readers`` and ``study`` (id, created, model_version, seed,
    real_pool_source, config).
    """
    study = store.study(study_id)
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
    """Readable text of a :func:`study_report` dict: summary, confusion matrix, per-reader table, kappas, groups."""
    s, c, ci = r["study"], r["confusion"], r["ci95"]
    accuracy = f"Accuracy:       {_pct(r['accuracy'])}"
    if ci is not None:
        accuracy += f"  (95 % CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f} %, exact binomial p = {r['p_value']:.4g} vs 50 %)"
    lines = [
        f"Study {s['id']}  (created {s['created']}, model {s['model_version']}, seed {s['seed']})",
        f"Real pool: {s['real_pool_source']}",
        "",
        f"Scored answers: {r['n']} from {r['n_readers']} reader(s)",
        accuracy,
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
        lines += [f"  {k['readers'][0]} / {k['readers'][1]}: {_num(k['kappa'])}  (n = {k['n']})"
                  for k in r["cohen_kappa"]]
    lines += ["", "Accuracy by EF (%):"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_ef_bin"]]
    lines += ["", "Accuracy by confidence:"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_confidence"]]
    return "\n".join(lines)


def confusion_figure(confusion: dict, title: str = "Pooled") -> go.Figure:
    """Heatmap of a confusion dict {rr, rs, sr, ss}: rows truth, columns answer; cells show count and row share."""
    z = [[confusion["rr"], confusion["rs"]], [confusion["sr"], confusion["ss"]]]
    text = []
    for row in z:
        total = sum(row)
        text.append([f"{v}<br>({100 * v / total:.0f} %)" if total else str(v) for v in row])
    fig = go.Figure(
        go.Heatmap(
            z=z, x=["judged real", "judged synthetic"], y=["real", "synthetic"], text=text, texttemplate="%{text}",
            colorscale="Blues", showscale=False, hovertemplate="truth %{y}, %{x}: %{z}<extra></extra>",
        )
    )
    fig.update_layout(title=title, yaxis=dict(autorange="reversed", title="truth"), height=280, width=340,
                      margin=dict(l=70, r=10, t=40, b=40), **_PLAIN)
    return fig


def accuracy_figure(groups: Sequence[dict], title: str, x_title: str) -> go.Figure:
    """Bar chart of accuracy per group (the report's ``per_ef_bin`` or ``per_confidence`` rows), n on each bar and
    the 50 % chance level as a dashed line; empty groups are drawn as gaps."""
    labels = [g["label"] for g in groups]
    acc = [None if g["accuracy"] is None else 100 * g["accuracy"] for g in groups]
    fig = go.Figure(go.Bar(x=labels, y=acc, text=[f"n = {g['n']}" for g in groups], textposition="outside",
                           marker_color="#4c78a8", hovertemplate="%{x}: %{y:.1f} %<extra></extra>"))
    fig.add_hline(y=50, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis=dict(title=x_title, type="category"),
                      yaxis=dict(title="accuracy (%)", range=[0, 110]), height=300,
                      margin=dict(l=60, r=10, t=40, b=50), **_PLAIN)
    return fig
