"""Layout of EchoLVFM Studio: builds the ``gr.Blocks`` and wires events to :class:`app.callbacks.StudioCallbacks`.

Nothing here runs a model or parses flags: :func:`build_demo` only lays out components and connects them. Every
event that runs a model shares one queue (``concurrency_id="model"``, one at a time), so concurrent users wait in
line instead of thrashing the CPU. Other tabs (the quiz, its results) are added by passing builder functions in
``extra_tabs``; each is called inside ``gr.Tabs()`` after the Explore and About tabs.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr

from .callbacks import StudioCallbacks
from .cases import list_cases
from .engine import EF_RANGE, MODEL_DESCRIPTIONS, OBSERVED_MODES, StudioEngine

__all__ = ["CSS", "MODEL_QUEUE", "about_markdown", "build_demo"]

#: concurrency_id shared by every event that runs a model.
MODEL_QUEUE = "model"

_HEADER = """# EchoLVFM Studio
Load an apical four-chamber echo, then drag the EF slider: the same heart is generated at the ejection fraction you
ask for, next to the original, and its EF is measured back. **Generated loops are synthetic: for teaching and
research, not for diagnosis.**"""

#: Extra CSS, passed to ``launch(css=...)`` (Gradio 6 takes theme and CSS at launch).
CSS = """
#cf-video video, #orig-video video { background: #000; }
.readout p { margin: 0.2em 0; }
"""


#: Passed to ``launch(head=...)``: quiz case videos get no context menu ("Save video as"), no native download
#: entry in their controls and no picture-in-picture, so a reader cannot take a case out of the quiz. And a key that
#: moves a slider releases it when let go: Gradio fires a slider's release event on pointerup only, so without this
#: the arrow keys would move the EF slider without regenerating.
HEAD = """<script>
(() => {
  const sliderKeys = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"]);
  document.addEventListener("keyup", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.type === "range" && sliderKeys.has(e.key))
      t.dispatchEvent(new PointerEvent("pointerup", {bubbles: true}));
  }, true);
  const lock = (v) => {
    v.setAttribute("controlsList", "nodownload noremoteplayback");
    v.disablePictureInPicture = true;
  };
  document.addEventListener("contextmenu", (e) => {
    if (e.target.closest && e.target.closest("#quiz-video")) e.preventDefault();
  }, true);
  new MutationObserver(() => document.querySelectorAll("#quiz-video video").forEach(lock))
    .observe(document.documentElement, {childList: true, subtree: true});
})();
</script>"""


def generator_kind(engine: StudioEngine) -> str:
    """What the bundled generator is, as its saved training configuration says."""
    path = engine.model_dir("generator") / "training_config.json"
    if not path.is_file():
        return "a one-step generator"
    cfg = json.loads(path.read_text())
    if cfg.get("objective") == "linear":
        return "a linear flow-matching generator (the bundled one is the 25-step baseline, as its card below says)"
    if cfg.get("flow", {}).get("mf_weight", 1.0) == 0:
        return ("a one-step generator (it runs the MeanFlow sampler; the bundled one was trained by regression of the "
                "one-step sample, as its card below says)")
    return ("a one-step latent MeanFlow generator (the bundled one was trained with the MeanFlow objective, as its "
            "card below says)")


def about_markdown(engine: StudioEngine) -> str:
    """The About panel: what the model is, its training data, measured EF adherence (from the bundled model cards,
    or their ``metrics.json`` when a card is missing), and the synthetic-data warning."""
    parts = [
        "## About EchoLVFM Studio",
        "**What the model is.** EchoLVFM is a latent video generative model: a video autoencoder compresses the "
        f"echo loop into a small latent video, and {generator_kind(engine)}, conditioned on a target ejection "
        "fraction and on the frames of the original that you choose to keep (end-diastole by default), produces "
        "the latent of the same heart beating at that EF; the decoder turns it back into a loop. The EF of every "
        "generated loop is measured back by two independent instruments: an LV segmenter with the area-length "
        "method, and a diffusion-regression EF estimator that returns a posterior (mean and 90 % interval).",
        "**How a counterfactual is shown.** On a cine with whole beats (the 120-frame built-in cine, most scanner "
        "cines), the Studio finds the beats on the LV area curve and works on the beat you pick: the generator's "
        "displacement field at the requested EF, minus its field at the beat's own measured EF, moves every "
        "acquired frame of that beat. The speckle, resolution, framing and frame rate are the acquisition's; only "
        "the wall motion changes. The generator learnt its motion on CAMUS hearts, so the first time a beat is "
        "rendered its motion gain is calibrated on the beat itself (the gain whose renderings at 30 and 70 % the "
        "segmenter measures closest to the request); the EF on the video is read on the beat's end-diastolic frame "
        "and the frames around its end-systole. Loops shorter than a whole beat (the 30-frame sample) and the other "
        "observed-frame modes show the decoded 112-pixel loop instead, which is blurred.",
        "**Generated loops are synthetic.** They are not acquisitions of any patient, must not be used for "
        "diagnosis or treatment decisions, and downloaded files are marked as synthetic (DICOM: a derived, "
        "synthetic image with the reason in its description).",
    ]
    for name, what in MODEL_DESCRIPTIONS.items():
        parts.append(f"### {what[0].upper() + what[1:]} (`{name}`)")
        if not engine.available(name):
            parts.append(f"Not trained yet: {engine.missing_message(name)}")
            continue
        card = engine.model_card(name)
        if card:
            body = card.strip()
            if body.startswith("# "):
                body = body.split("\n", 1)[1].strip() if "\n" in body else ""
            parts.append(re.sub(r"^#{1,3} ", "#### ", body, flags=re.MULTILINE))  # headings below the panel's
            continue
        metrics = _flat(engine.metrics(name) or {})
        if metrics:
            rows = "\n".join(f"| {k} | {_fmt_metric(v)} |" for k, v in metrics.items())
            parts.append("Bundled without a model card; its measured metrics (metrics.json):\n\n"
                         "| Metric | Value |\n|---|---|\n" + rows)
        else:
            parts.append("Bundled without a model card or measured metrics (metrics.json).")
    return "\n\n".join(parts)


def _flat(d: dict, prefix: str = "") -> dict:
    """Scalars of a metrics dict, nested keys joined by dots (lists such as training histories are left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _fmt_metric(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _status_markdown(engine: StudioEngine) -> str:
    missing = [engine.missing_message(n) for n, ok in engine.status().items() if not ok]
    if not missing:
        return ""
    return "> **Some models are missing**, so some features are off: " + " ".join(missing)


def build_demo(engine: StudioEngine, work_root: Path, data_dir: Path | None = None,
               extra_tabs: Sequence[Callable[[], None]] = (), header: str | None = None) -> gr.Blocks:
    """Lay out the Studio and connect its events.

    Args:
        engine: the shared model engine (models load lazily on first use).
        work_root: folder for per-session files (inside the app's controlled temporary folder).
        data_dir: optional folder of cases to pick from (--data).
        extra_tabs: functions that add further ``gr.Tab`` s (quiz, results), called inside the tab set.
        header: the page's header (Markdown) instead of the Explore tab's (e.g. for quiz readers).
    """
    cb = StudioCallbacks(engine, work_root, data_dir)
    cases = list_cases(data_dir)
    lo, hi = EF_RANGE
    with gr.Blocks(title="EchoLVFM Studio", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        # Per-session state (loaded case with its cached latents, last result); dropped 4 h after its last update
        # or when the session ends, and its files with it.
        state = gr.State(None, time_to_live=4 * 3600, delete_callback=StudioCallbacks.drop_session)
        gr.Markdown(header or _HEADER)
        status = _status_markdown(engine)
        if status:
            gr.Markdown(status, elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Explore", id="explore"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        with gr.Accordion("Load an echo", open=True):
                            sample_btn = gr.Button("Built-in sample", elem_id="sample-btn")
                            cine_btn = gr.Button("Built-in cine, 120 frames, several beats", elem_id="cine-btn")
                            upload = gr.File(label="Upload DICOM, NIfTI, AVI, MP4, GIF or WebM",
                                             file_types=None, type="filepath", elem_id="upload")
                            case_dd = gr.Dropdown(choices=cases, value=None, label=f"Case from {data_dir}",
                                                  visible=bool(cases), elem_id="case-dd")
                        orig_video = gr.Video(label="Loaded echo (preprocessed, sector outlined)",
                                              autoplay=True, loop=True, interactive=False, elem_id="orig-video")
                        case_md = gr.Markdown("Loading the built-in sample…", elem_classes="readout",
                                              elem_id="case-md")
                    with gr.Column(scale=2, min_width=480):
                        with gr.Row():
                            ef_slider = gr.Slider(lo, hi, value=40, step=1, label="Requested EF (%)",
                                                  info="Generates on release (mouse or arrow keys)", scale=4,
                                                  elem_id="ef-slider")
                            ef_box = gr.Number(value=40, minimum=lo, maximum=hi, precision=0,
                                               label="EF (type + Enter)", scale=1, elem_id="ef-box")
                        cf_video = gr.Video(label="Original | counterfactual (synthetic)", autoplay=True,
                                            loop=True, interactive=False, elem_id="cf-video")
                        latency_md = gr.Markdown("", elem_id="latency-md")
                        beat_dd = gr.Dropdown(choices=[], value=None, label="Beat (the counterfactual is made for "
                                              "this beat and played at the input's frame rate)", visible=False,
                                              elem_id="beat-dd")
                        with gr.Row():
                            mode = gr.Radio([(v, k) for k, v in OBSERVED_MODES.items()], value="ed",
                                            label="Observed frames", scale=3, elem_id="mode",
                                            info="Only end-diastole (or first k = 1) follows the requested EF: "
                                                 "more observed frames keep the original's motion and EF")
                            k = gr.Slider(1, 64, value=4, step=1, label="k (first k frames)", scale=1,
                                          info="Regenerates on release", elem_id="k")
                            length = gr.Slider(4, 64, value=32, step=1, label="Output length (frames)", scale=1,
                                               info="Regenerates on release", elem_id="length")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed", scale=1, elem_id="seed")
                            another = gr.Button("Another sample", scale=1, elem_id="another-btn")
                            contours = gr.Checkbox(value=False, label="LV contour", scale=1, elem_id="contours")
                            reject = gr.Checkbox(value=False, label="Rejection sampling", scale=1, elem_id="reject")
                            reject_k = gr.Slider(2, 16, value=4, step=1, label="Candidates k", scale=1,
                                                 info="Regenerates on release", elem_id="reject-k")
                        readout_md = gr.Markdown("", elem_classes="readout", elem_id="readout-md")
                        with gr.Row():
                            ef_plot = gr.Plot(label="EF: posterior (violin, mean, 90 % interval) and segmentation")
                            area_plot = gr.Plot(label="LV area over time")
                        with gr.Accordion("Download the counterfactual (marked synthetic)", open=False):
                            export_btn = gr.Button("Prepare MP4, GIF and DICOM")
                            downloads = gr.File(label="Downloads", file_count="multiple", interactive=False)
                        with gr.Accordion("Raw numbers", open=False):
                            raw = gr.JSON(label="Readouts", elem_id="raw-json")
            with gr.Tab("About", id="about"):
                gr.Markdown(about_markdown(engine))
            for add_tab in extra_tabs:
                add_tab()

        model = dict(concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        case_out = [orig_video, case_md, raw, ef_plot, area_plot, length, k, cf_video, latency_md, downloads,
                    beat_dd]
        gen_in = [state, ef_slider, mode, k, length, seed, reject, reject_k, contours, beat_dd]
        gen_out = [state, cf_video, latency_md, raw]
        meas_out = [state, ef_plot, area_plot, readout_md, raw]

        def then_generate(event):
            """After a successful load, show the counterfactual at the slider's EF (when the generator is bundled)."""
            if not engine.available("generator"):
                return event
            return (event.success(cb.generate, gen_in, gen_out, api_visibility="private", **model)
                    .success(cb.measure, [state], meas_out, api_visibility="private", **model))

        def load(trigger, open_case, inputs, source=None, **api):
            """A load in two steps (see :mod:`app.callbacks`): only the session is an output of the step that can
            fail, so a bad file leaves every panel as it was; its progress shows on the case panel, which a failure
            then rewrites, and the ``source`` it came from (upload box, case list) lets go of what failed."""
            opened = trigger(open_case, inputs, [state], show_progress_on=[case_md], **api, **model)
            opened.failure(cb.load_failed, [state], [case_md], api_visibility="private", queue=False)
            if source is not None:
                opened.failure(None, None, [source], js="() => null", queue=False)
            then_generate(opened.success(cb.show_case, [state], case_out, api_visibility="private"))

        # Every control that changes the counterfactual regenerates it (sliders on release, by mouse or keys), then
        # measures it; the typed EF too.
        ef_slider.change(None, [ef_slider], [ef_box], js="(v) => v", queue=False)
        gr.on([ef_slider.release, mode.input, k.release, length.release, seed.submit, contours.input, reject.input,
               reject_k.release, beat_dd.input], cb.generate, gen_in, gen_out, api_name="counterfactual",
              trigger_mode="always_last", **model).success(cb.measure, [state], meas_out, api_name="measure",
                                                           **model)
        ef_box.submit(None, [ef_box], [ef_slider], js="(v) => v", queue=False)
        ef_box.submit(cb.generate, [state, ef_box, *gen_in[2:]], gen_out, api_visibility="private",
                      trigger_mode="always_last", **model).success(
            cb.measure, [state], meas_out, api_visibility="private", **model)
        another.click(cb.new_seed, None, [seed], api_visibility="private", queue=False).then(
            cb.generate, gen_in, gen_out, api_visibility="private", **model).success(
            cb.measure, [state], meas_out, api_visibility="private", **model)
        export_btn.click(cb.export, [state], [downloads], api_name="export", **model)
        # Loading (registered after the public generate/measure endpoints so those keep their plain API names).
        # The page load stays one step: it is the public /load_sample, whose outputs API clients read, and it
        # reads no user file.
        then_generate(demo.load(cb.load_sample, [state], [state, *case_out], api_name="load_sample", **model))
        load(sample_btn.click, cb.open_sample, [state], api_visibility="private")
        load(cine_btn.click, cb.open_cine, [state], api_name="load_cine")
        load(upload.upload, cb.open_upload, [upload, state], source=upload, api_name="load_upload")
        load(case_dd.input, cb.open_case, [case_dd, state], source=case_dd, api_name="load_case")
        demo.unload(cb.unload)
    return demo
