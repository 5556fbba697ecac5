"""Study results shared by ``echolvfm quiz report`` and the Results tab: the report dict, its text table, plotly
figures for the browser and the same figures as PNG files (plain functions, no Gradio).

PNGs are drawn with matplotlib (:func:`save_pngs`), because plotly's own image export needs kaleido and a browser
on the server.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from echolvfm_core.quiz_stats import summarize

from .store import QuizStore

__all__ = ["study_report", "format_report", "automatic_reader_text", "confusion_figure", "readers_confusion_figure", "accuracy_figure",
           "save_pngs"]

# A light look without plotly's template (as in app/figures.py).
_PLAIN = dict(template="none", plot_bgcolor="white", paper_bgcolor="white", font=dict(size=12))


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


def _pct(x: float | None) -> str:
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
    return f"Automatic reader (C2ST{how}): {_pct(a['accuracy']).strip()}  (95 % CI {ci})"


def format_report(r: dict) -> str:
    """Readable text of a :func:`study_report` dict: summary, automatic reader, confusion matrix, per-reader table,
    per-method shares, kappas, groups."""
    s, c, ci = r["study"], r["confusion"], r["ci95"]
    accuracy = f"Accuracy:       {_pct(r['accuracy'])}"
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
    if len(r.get("per_method") or {}) > 1:
        lines += ["", "Synthetic cases judged synthetic, per generator:"]
        for name, m in r["per_method"].items():
            ci_txt = "" if m["ci95"] is None else f"  (95 % CI {100 * m['ci95'][0]:.1f}-{100 * m['ci95'][1]:.1f} %)"
            lines.append(f"  {name}: {_pct(m['share']).strip()} of {m['n']}{ci_txt}")
    if r["cohen_kappa"]:
        lines += ["", "Cohen's kappa (cases both answered):"]
        lines += [f"  {k['readers'][0]} / {k['readers'][1]}: {_num(k['kappa'])}  (n = {k['n']})"
                  for k in r["cohen_kappa"]]
    lines += ["", "Accuracy by EF (%):"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_ef_bin"]]
    lines += ["", "Accuracy by confidence:"]
    lines += [f"  {g['label']:>8}: {_pct(g['accuracy'])}  (n = {g['n']})" for g in r["per_confidence"]]
    return "\n".join(lines)


def _confusion_cells(confusion: dict) -> tuple[list[list[int]], list[list[str]]]:
    """Counts (rows truth real/synthetic, columns answer) and their cell labels: count and share of the row."""
    z = [[confusion["rr"], confusion["rs"]], [confusion["sr"], confusion["ss"]]]
    text = []
    for row in z:
        total = sum(row)
        text.append([f"{v}<br>({100 * v / total:.0f} %)" if total else str(v) for v in row])
    return z, text


def _confusion_trace(confusion: dict) -> go.Heatmap:
    z, text = _confusion_cells(confusion)
    return go.Heatmap(
        z=z, x=["judged real", "judged synthetic"], y=["real", "synthetic"], text=text, texttemplate="%{text}",
        colorscale="Blues", showscale=False, hovertemplate="truth %{y}, %{x}: %{z}<extra></extra>",
    )


def confusion_figure(confusion: dict, title: str = "Pooled") -> go.Figure:
    """Heatmap of a confusion dict {rr, rs, sr, ss}: rows truth, columns answer; cells show count and row share."""
    fig = go.Figure(_confusion_trace(confusion))
    fig.update_layout(title=title, yaxis=dict(autorange="reversed", title="truth"), height=280, width=340,
                      margin=dict(l=70, r=10, t=40, b=40), **_PLAIN)
    return fig


def readers_confusion_figure(per_reader: dict) -> go.Figure:
    """One confusion heatmap per reader side by side (the report's ``per_reader``), titled with the reader's ID and
    accuracy."""
    from plotly.subplots import make_subplots

    names = list(per_reader) or ["no answers yet"]
    titles = [f"{n} ({_pct(per_reader[n]['accuracy']).strip()})" if n in per_reader else n for n in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, horizontal_spacing=0.12)
    for i, name in enumerate(names, start=1):
        confusion = per_reader[name]["confusion"] if name in per_reader else {"rr": 0, "rs": 0, "sr": 0, "ss": 0}
        fig.add_trace(_confusion_trace(confusion), row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
    fig.update_layout(height=300, width=max(340, 300 * len(names)), margin=dict(l=70, r=10, t=50, b=40), **_PLAIN)
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


def save_pngs(report: dict, folder: str | Path) -> list[Path]:
    """Write the report's figures as PNG files into ``folder``: ``confusion.png`` (pooled, then each reader) and
    ``accuracy.png`` (by EF bin and by confidence, chance level dashed). Returns their paths."""
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    panels = [("Pooled", report["confusion"], report["accuracy"])]
    panels += [(name, r["confusion"], r["accuracy"]) for name, r in report["per_reader"].items()]
    fig = Figure(figsize=(3.2 * len(panels), 3.2), dpi=120, layout="constrained")
    for ax, (name, confusion, accuracy) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        z, text = _confusion_cells(confusion)
        peak = max(1, max(map(max, z)))
        ax.imshow(z, cmap="Blues", vmin=0, vmax=peak)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, text[i][j].replace("<br>", "\n"), ha="center", va="center",
                        color="white" if z[i][j] > 0.6 * peak else "black")
        ax.set_xticks([0, 1], ["judged real", "judged synthetic"])
        ax.set_yticks([0, 1], ["real", "synthetic"])
        ax.set_title(f"{name} ({_pct(accuracy).strip()})", fontsize=10)
    confusion_png = folder / "confusion.png"
    fig.savefig(confusion_png)

    fig = Figure(figsize=(9, 3.4), dpi=120, layout="constrained")
    for ax, (groups, title) in zip(fig.subplots(1, 2), ((report["per_ef_bin"], "Accuracy by EF (%)"),
                                                        (report["per_confidence"], "Accuracy by confidence"))):
        labels = [g["label"] for g in groups]
        heights = [0.0 if g["accuracy"] is None else 100 * g["accuracy"] for g in groups]
        bars = ax.bar(labels, heights, color="#4c78a8")
        ax.bar_label(bars, [f"n = {g['n']}" for g in groups], fontsize=8)
        ax.axhline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 110)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
    accuracy_png = folder / "accuracy.png"
    fig.savefig(accuracy_png)
    return [confusion_png, accuracy_png]
