"""Plotly figures for the Studio readouts (plain functions, no Gradio).

Both figures take plain arrays so that they can be tested and reused outside the app:

* :func:`ef_figure` - the EF posterior of the original and of the counterfactual as violins, each with its mean and
  90 % interval, the EF measured by segmentation as a diamond, and the requested EF as a vertical line.
* :func:`area_figure` - LV cavity area over time for the original and the counterfactual loop, with ED and ES marked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

__all__ = ["EFReadout", "area_figure", "ef_figure"]

_COLOURS = {"Original": "#4c78a8", "Counterfactual": "#e45756"}
# A light look without plotly's template (which would add ~10 kB of JSON to every readout sent to the browser).
_PLAIN = dict(template="none", plot_bgcolor="white", paper_bgcolor="white", font=dict(size=12))


@dataclass(frozen=True)
class EFReadout:
    """What is known about the EF of one loop (all values in %; ``None`` where the instrument is missing).

    Attributes:
        label: "Original" or "Counterfactual".
        segmentation_ef: EF by LV segmentation and the area-length method.
        samples: (N,) posterior samples of the diffusion-regression EF estimator, or ``None``.
        mean: posterior mean.
        p05: 5th percentile of the posterior.
        p95: 95th percentile of the posterior.
    """

    label: str
    segmentation_ef: float | None = None
    samples: np.ndarray | None = None
    mean: float | None = None
    p05: float | None = None
    p95: float | None = None


def ef_figure(readouts: list[EFReadout], requested_ef: float | None = None) -> go.Figure:
    """Posterior violins (with mean and 90 % interval) and segmentation EFs of each readout, EF in % on x."""
    fig = go.Figure()
    for r in readouts:
        colour = _COLOURS.get(r.label, "#54a24b")
        if r.samples is not None and len(r.samples) > 1:
            fig.add_trace(go.Violin(
                x=np.asarray(r.samples, dtype=float), y=[r.label] * len(r.samples), orientation="h", name=r.label,
                line_color=colour, side="positive", width=1.6, points=False, meanline_visible=False,
                showlegend=False, hoverinfo="skip",
            ))
        if r.mean is not None and r.p05 is not None and r.p95 is not None:
            fig.add_trace(go.Scatter(
                x=[r.mean], y=[r.label], mode="markers", marker=dict(color=colour, size=11, symbol="circle"),
                error_x=dict(type="data", symmetric=False, array=[r.p95 - r.mean], arrayminus=[r.mean - r.p05],
                             thickness=2, width=8, color=colour),
                name=f"{r.label}: posterior {r.mean:.0f} % (90 % interval {r.p05:.0f}-{r.p95:.0f})",
            ))
        if r.segmentation_ef is not None:
            fig.add_trace(go.Scatter(
                x=[r.segmentation_ef], y=[r.label], mode="markers",
                marker=dict(color="black", size=11, symbol="diamond-open", line=dict(width=2)),
                name=f"{r.label}: segmentation {r.segmentation_ef:.0f} %",
            ))
    if requested_ef is not None:
        fig.add_vline(x=requested_ef, line_dash="dash", line_color=_COLOURS["Counterfactual"],
                      annotation_text=f"requested {requested_ef:.0f} %", annotation_position="top")
    if not fig.data:
        return _empty("No EF instrument is available.")
    fig.update_layout(
        xaxis=dict(title="Ejection fraction (%)", range=[0, 100], gridcolor="#e5e5e5", automargin=True),
        yaxis=dict(title=None, automargin=True), height=340, margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="v", y=-0.3, yanchor="top", x=0), **_PLAIN,
    )
    return fig


def area_figure(curves: dict[str, np.ndarray], fps: float, unit: str = "px",
                markers: dict[str, tuple[int | None, int | None]] | None = None) -> go.Figure:
    """LV area over time.

    Args:
        curves: label -> (T,) LV cavity area per frame, in ``unit`` (pixels at model resolution unless stated).
        fps: frame rate (frames per second) shared by the curves; the x axis is time in seconds.
        unit: area unit shown on the y axis ("px" or "mm²").
        markers: label -> (ED frame index, ES frame index) drawn as markers on that curve.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    fig = go.Figure()
    for label, area in curves.items():
        area = np.asarray(area, dtype=float)
        t = np.arange(len(area)) / fps
        colour = _COLOURS.get(label, "#54a24b")
        fig.add_trace(go.Scatter(x=t, y=area, mode="lines", name=label, line=dict(color=colour, width=2)))
        ed, es = (markers or {}).get(label, (None, None))
        for idx, phase, symbol in ((ed, "ED", "circle"), (es, "ES", "triangle-down")):
            if idx is not None and 0 <= idx < len(area):
                fig.add_trace(go.Scatter(
                    x=[t[idx]], y=[area[idx]], mode="markers+text", text=[phase], textposition="top center",
                    marker=dict(color=colour, size=9, symbol=symbol), showlegend=False,
                    name=f"{label} {phase}",
                ))
    if not fig.data:
        return _empty("No LV area curve to show (no segmenter, or no LV found).")
    fig.update_layout(
        xaxis=dict(title="Time (s)", gridcolor="#e5e5e5", automargin=True),
        yaxis=dict(title=f"LV area ({unit})", gridcolor="#e5e5e5", automargin=True),
        height=340, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h", y=-0.25, yanchor="top"),
        **_PLAIN,
    )
    return fig


def _empty(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(xaxis=dict(visible=False), yaxis=dict(visible=False), height=120,
                      margin=dict(l=10, r=10, t=10, b=10), **_PLAIN)
    return fig
