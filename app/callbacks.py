"""Plain callback functions of the Studio's Explore tab (the layout lives in :mod:`app.ui`).

Each callback takes the per-session :class:`Session` (held in a ``gr.State``) and component values, calls the
:class:`~app.engine.StudioEngine`, and returns component values. User errors (bad uploads, missing models,
out-of-range values) become ``gr.Error`` with a one-sentence message and leave the session as it was, so the next
request still works. Files are written into the session's own folder under the app's temporary folder, named with
random tokens, and deleted when the session ends.

Loading from the page runs in two steps: ``open_*`` reads the echo into the session and returns only the session,
then :meth:`StudioCallbacks.show_case` fills the panels. A load that fails thus raises before any panel is an
output (no panel shows an error), and :meth:`StudioCallbacks.load_failed` says on the case panel what was not loaded
and that the last good case is still the one in use.
"""
from __future__ import annotations

import functools
import logging
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from echolvfm_core.echo import EchoLoadError

from .cases import list_cases, load_case
from .engine import (
    EF_RANGE,
    CounterfactualResult,
    LoadedCase,
    Measurement,
    ModelUnavailable,
    StudioEngine,
)
from .figures import EFReadout, area_figure, ef_figure

__all__ = ["Session", "StudioCallbacks", "user_errors"]

log = logging.getLogger(__name__)

@dataclass
class Session:
    """Per-browser-session state: its folder, the loaded case (with its cached latents), the last result."""

    folder: Path
    case: LoadedCase | None = None
    result: CounterfactualResult | None = None
    failed_load: str | None = None  # why the last load failed, until the next one succeeds


def _user_message(exc: Exception) -> str:
    """What a user is told of ``exc`` (not a ``gr.Error``): its own message for errors a user can cause, else a
    brief note (and the traceback in the server log)."""
    if isinstance(exc, (EchoLoadError, ModelUnavailable, ValueError)):
        return str(exc)
    log.exception("request failed")  # the session must survive anything a request triggers
    return f"The request failed ({type(exc).__name__}); see the server log."


# The handlers below raise the user's error straight from the expression, never from a local variable: an error
# bound to a name in the handler's frame sits in a reference cycle with its own traceback (which holds that frame),
# and through its cause's traceback it would keep a failed request's arrays (a decoded loop, ...) alive until the
# next full garbage collection.


def user_errors(fn):
    """Turn the errors a user can cause into ``gr.Error`` messages; log anything else and say so briefly."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(_user_message(exc), print_exception=False) from exc

    return wrapped


def _readouts(case: LoadedCase | None, result: CounterfactualResult | None) -> list[EFReadout]:
    out = []
    original = result.original if result is not None and result.original is not None else None
    for label, meas in (("Original", original or (case.measurement if case else None)),
                        ("Counterfactual", result.measurement if result else None)):
        if meas is None:
            continue
        post = meas.posterior
        out.append(EFReadout(
            label=label, segmentation_ef=meas.ef,
            samples=None if post is None else post.samples,
            mean=None if post is None else float(post.mean),
            p05=None if post is None else float(post.p05),
            p95=None if post is None else float(post.p95),
        ))
    return out


def _unit(meas: Measurement) -> str:
    return "mm²" if meas.area_unit == "mm^2" else meas.area_unit


def _fmt(ef: float | None) -> str:
    return "n/a" if ef is None else f"{ef:.0f} %"


def _ef_line(label: str, meas: Measurement | None) -> str:
    if meas is None:
        return f"**{label}**: not measured yet"
    post = meas.posterior
    posterior = "n/a" if post is None else f"{post.mean:.0f} % (90 % interval {post.p05:.0f}-{post.p95:.0f} %)"
    return f"**{label}**: segmentation {_fmt(meas.ef)} · posterior {posterior}"


def _kept_motion_note(result: CounterfactualResult) -> str | None:
    """Why a counterfactual that keeps more than one frame of the original cannot have the EF asked for (None when
    it keeps only the end-diastolic frame). Keeping a second frame keeps the original's motion: with the bundled
    models on the built-in sample a request of 30 % measured 53-64 % with the first 4 or 8, every other or all
    frames kept, against 21 % with end-diastole only."""
    n = len(result.observed)
    if n <= 1:
        return None
    return (f"**This cannot follow the requested EF**: it keeps {n} frames of the original, and with them the "
            "original's motion, so its EF stays near the original's; only end-diastole (or the first frame) "
            "observed follows the request.")


class StudioCallbacks:
    """The Explore tab's callbacks, bound to one engine, one work folder and an optional --data folder."""

    def __init__(self, engine: StudioEngine, work_root: Path, data_dir: Path | None = None):
        self.engine = engine
        self.work_root = Path(work_root)
        self.data_dir = None if data_dir is None else Path(data_dir)

    # ------------------------------------------------------------------------------------------- sessions
    def _session(self, state: Session | None, request: gr.Request | None) -> Session:
        if state is not None:
            return state
        key = getattr(request, "session_hash", None) or secrets.token_hex(8)
        return Session(folder=self.work_root / "sessions" / f"{key}-{secrets.token_hex(4)}")

    @staticmethod
    def drop_session(state: Session | None) -> None:
        """Delete a session's files (``gr.State`` delete callback and unload)."""
        if state is not None:
            shutil.rmtree(state.folder, ignore_errors=True)

    def unload(self, request: gr.Request) -> None:
        """Delete the files of a closed browser session."""
        key = getattr(request, "session_hash", None)
        if key:
            for folder in (self.work_root / "sessions").glob(f"{key}-*"):
                shutil.rmtree(folder, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- loading
    def _open(self, state: Session | None, request: gr.Request | None,
              load: Callable[[Path], LoadedCase]) -> Session:
        """Step 1 of a load: ``load(session folder)`` becomes the session's case. On failure the session keeps its
        case, remembers why (for :meth:`load_failed`) and the error is raised as a ``gr.Error``."""
        session = self._session(state, request)
        try:
            case = load(session.folder)
        except gr.Error as exc:
            session.failed_load = exc.message
            raise
        except Exception as exc:
            session.failed_load = _user_message(exc)
            raise gr.Error(session.failed_load, print_exception=False) from exc
        session.case, session.result, session.failed_load = case, None, None
        return session

    def open_sample(self, state: Session | None, request: gr.Request | None) -> Session:
        """The built-in sample (pydicom's 30-frame cine) into the session."""
        return self._open(state, request, lambda folder: self.engine.load(None, folder))

    def open_cine(self, state: Session | None, request: gr.Request | None) -> Session:
        """The second built-in case: pydicom-data's 120-frame cine of several beats (the sample's full cine)."""
        from echolvfm_core.io import sample_cine_path

        def load(folder: Path) -> LoadedCase:
            path = sample_cine_path()
            if path is None:
                raise gr.Error("The 120-frame built-in cine needs the pydicom-data package "
                               "(pip install pydicom-data).", print_exception=False)
            return self.engine.load(path, folder, name="Built-in cine (120 frames)")

        return self._open(state, request, load)

    def open_upload(self, file: str | None, state: Session | None, request: gr.Request | None) -> Session:
        """An uploaded file into the session."""
        def load(folder: Path) -> LoadedCase:
            if not file:
                raise gr.Error("Choose a file to upload first.", print_exception=False)
            return self.engine.load(file, folder, name=Path(file).name)

        return self._open(state, request, load)

    def open_case(self, choice: str | None, state: Session | None, request: gr.Request | None) -> Session:
        """A case of the --data folder into the session."""
        def load(folder: Path) -> LoadedCase:
            if self.data_dir is None:
                raise gr.Error("The app was started without --data, so there are no cases to pick from.",
                               print_exception=False)
            if not choice or choice not in list_cases(self.data_dir):
                raise gr.Error("Pick a case from the list.", print_exception=False)
            return self.engine.load(load_case(self.data_dir, choice), folder, name=choice)

        return self._open(state, request, load)

    def _case_text(self, case: LoadedCase) -> str:
        """The case panel: what was loaded, its measured EF, notes, and its beats."""
        info = case.summary()
        notes = "".join(f"\n\n> {n}" for n in case.measurement.notes)
        if case.echo.synthetic:
            notes = ("\n\n> This loop is itself synthetic (real end-diastolic / end-systolic frames with synthesised "
                     "motion), not an acquired cine." + notes)
        shown = (f"{info['input_frames']} frames at {info['input_fps']:.1f} fps "
                 f"({info['input_frames'] / info['input_fps']:.1f} s), shown at {info['display_size']} px · "
                 if info.get("input_frames") else "")
        text = (
            f"**{case.name}** · {shown}model input {info['frames']} frames at {info['fps']:.1f} fps "
            f"({info['duration_s']:.1f} s), {info['model_size']} × {info['model_size']} · "
            f"sector {100 * info['sector_fraction']:.0f} % of the image\n\n"
            + _ef_line("Measured EF of the original", case.measurement) + notes
        )
        beats = case.cine.beats if case.cine is not None else None
        if beats is not None:
            hr = beats.heart_rate_bpm
            text += (f"\n\n**Beats**: {len(beats.beats)} found ({beats.method.replace('_', ' ')})"
                     + (f" · heart rate {hr:.0f} bpm" if hr else " · no whole cycle: the loop is played as one"))
        return text

    @user_errors
    def show_case(self, state: Session | None):
        """Step 2 of a load: the panels of the session's case (video, case text, raw numbers, EF and area figures,
        length and k ranges, beat picker) with the previous counterfactual, latency line and downloads cleared."""
        if state is None or state.case is None:
            raise gr.Error("Load an echo first.", print_exception=False)
        case = state.case
        ef_fig = ef_figure(_readouts(case, None))
        area = case.measurement.lv_area
        area_fig = area_figure({} if area is None else {"Original": area}, case.fps, _unit(case.measurement),
                               markers={"Original": (case.measurement.ed_index, case.measurement.es_index)})
        longest = self.engine.max_frames() or case.n_frames
        length = gr.update(value=min(case.n_frames, longest), maximum=longest)
        k = gr.update(maximum=case.n_frames)
        missing = [self.engine.missing_message(n) for n in ("vae", "generator") if not self.engine.available(n)]
        gen_note = (" ".join(missing) + " Counterfactuals are off until then.") if missing else ""
        if case.cine is not None:
            beat = gr.update(choices=case.cine.beat_choices(), value=0, visible=True)
        else:
            beat = gr.update(choices=[], value=None, visible=False)
        return (str(case.video), self._case_text(case), case.summary(), ef_fig, area_fig, length, k, None, gen_note,
                None, beat)

    def load_failed(self, state: Session | None) -> str:
        """After a failed load, the case panel: what was not loaded and why, and which case counterfactuals still
        use (with its description)."""
        why = None if state is None else state.failed_load
        note = f"> **Not loaded**: {why}" if why else "> **The last load failed**; see its message."
        if state is None or state.case is None:
            return note + " Load another echo."
        return f"{note} Counterfactuals still use **{state.case.name}**.\n\n{self._case_text(state.case)}"

    @user_errors
    def load_sample(self, state: Session | None, request: gr.Request):
        """Both steps for the built-in sample at once (the page load; the public ``/load_sample``)."""
        session = self.open_sample(state, request)
        return (session, *self.show_case(session))

    # ----------------------------------------------------------------------------------- counterfactuals
    @user_errors
    def generate(self, state: Session | None, ef: float, mode: str, k: float, length: float, seed: float,
                 reject: bool, reject_k: float, contours: bool, beat: float | None = None):
        """Slider release: the counterfactual video, a latency line and the raw numbers."""
        if state is None or state.case is None:
            raise gr.Error("Load an echo first.", print_exception=False)
        if ef is None:
            raise gr.Error(f"Type an EF between {EF_RANGE[0]:.0f} and {EF_RANGE[1]:.0f} %.", print_exception=False)
        result = self.engine.counterfactual(
            state.case, float(ef), state.folder, observed_mode=mode, k=int(k), length=int(length),
            seed=int(seed or 0), reject_k=int(reject_k) if reject else 1, contours=bool(contours),
            beat=None if beat is None else int(beat),
        )
        state.result = result
        where = (f"beat {result.beat + 1}, {result.display.shape[0]} frames at {result.fps:.0f} fps, "
                 f"{result.display.shape[-1]} px (acquired frames moved)" if result.display is not None
                 else f"{len(result.observed)} observed frame(s), model grid")
        seg = result.segmentation
        measured = "not measured" if seg is None or seg.ef is None else f"measured **{seg.ef:.0f} %**"
        line = (f"Requested EF **{result.requested_ef:.0f} %** · {measured} · generated in "
                f"**{result.latency_ms:.0f} ms** · seed {result.seed} · {state.case.name}, {where}"
                + (f" · best of {result.candidates}" if result.candidates > 1 else ""))
        kept = _kept_motion_note(result)
        return state, str(result.video), line + (f"\n\n> {kept}" if kept else ""), result.summary()

    @user_errors
    def measure(self, state: Session | None):
        """After the video is shown: EF of the counterfactual by both instruments, the figures, a readout line."""
        if state is None or state.case is None or state.result is None:
            raise gr.Error("Generate a counterfactual first.", print_exception=False)
        case, result = state.case, state.result
        meas = self.engine.measure_result(case, result)
        original = result.original or case.measurement
        curves, markers = {}, {}
        for label, m in (("Original", original), ("Counterfactual", meas)):
            if m.lv_area is not None:
                curves[label], markers[label] = m.lv_area, (m.ed_index, m.es_index)
        kept = _kept_motion_note(result)
        text = "\n\n".join([
            f"**Requested EF**: {result.requested_ef:.0f} %",
            _ef_line("Counterfactual", meas),
            _ef_line("Original" + (" (this beat)" if result.original is not None else ""), original),
        ] + [f"> {n}" for n in meas.notes + ([kept] if kept else [])])
        ef_fig = ef_figure(_readouts(case, result), result.requested_ef)
        area_fig = area_figure(curves, result.fps, _unit(original), markers=markers)
        return state, ef_fig, area_fig, text, {**case.summary(), **result.summary()}

    @staticmethod
    def new_seed() -> int:
        """A fresh random seed for "Another sample"."""
        return secrets.randbelow(2**31)

    @user_errors
    def export(self, state: Session | None):
        """MP4, GIF and DICOM (marked synthetic) of the last counterfactual."""
        if state is None or state.case is None or state.result is None:
            raise gr.Error("Generate a counterfactual first.", print_exception=False)
        return [str(p) for p in self.engine.export(state.case, state.result, state.folder / "export")]
