"""Figures of a study's results for the Results tab: plotly figures for the browser and the same figures as PNG
files (plain functions, no Gradio). The report dict and its text come from :mod:`echolvfm_core.quiz.report`.

PNGs are drawn with matplotlib (:func:`save_pngs`), because plotly's own image export needs kaleido and a browser
on the server.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

from echolvfm_core.quiz.report import percent_text

__all__ = ["accuracy_figure", "confusion_figure", "readers_confusion_figure", "save_pngs"]

# A light look without plotly's template (as in app/figures.py).
_PLAIN = dict(template="none", plot_bgcolor="white", paper_bgcolor="white", font=dict(size=12))


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
    titles = [f"{n} ({percent_text(per_reader[n]['accuracy']).strip()})" if n in per_reader else n for n in names]
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
        ax.set_title(f"{name} ({percent_text(accuracy).strip()})", fontsize=10)
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
