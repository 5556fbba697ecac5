"""The Explore tab's callbacks in-process, without models: loading works, every model feature says what is missing."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from app.callbacks import StudioCallbacks
from app.cases import list_cases
from app.engine import StudioEngine
from app.ui import about_markdown, build_demo


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Callbacks over an engine without models, and the first output of loading the built-in sample."""
    root = tmp_path_factory.mktemp("nomodels")
    callbacks = StudioCallbacks(StudioEngine(root / "models", device="cpu"), root / "work")
    return callbacks, callbacks.load_sample(None, None)


def test_sample_loads_without_models_and_generation_says_what_is_missing(loaded):
    callbacks, out = loaded
    session, video, text, info = out[:4]
    assert Path(video).is_file() and Path(video).parent.parent == callbacks.work_root / "sessions"
    assert info["frames"] >= 10 and info["fps"] > 0 and 0.1 < info["sector_fraction"] < 0.9
    assert "segmenter is not bundled" in text and "posterior model is not bundled" in text
    assert "generator is not bundled" in out[9]
    with pytest.raises(gr.Error, match=r"(autoencoder|generator) is not bundled in .* yet"):
        callbacks.generate(session, 40, "ed", 4, info["frames"], 0, False, 4, False)
    with pytest.raises(gr.Error, match="Generate a counterfactual first"):
        callbacks.measure(session)


def test_bad_upload_is_a_message_and_keeps_the_session(loaded, tmp_path):
    callbacks, out = loaded
    session = out[0]
    case = session.case
    bad = tmp_path / "notes.txt"
    bad.write_text("not an echo")
    with pytest.raises(gr.Error) as err:
        callbacks.open_upload(str(bad), session, None)
    assert "notes.txt" in err.value.message and "Traceback" not in err.value.message
    assert session.case is case and session.failed_load == err.value.message  # the loaded case survives
    text = callbacks.load_failed(session)  # the case panel after the failure
    assert text.startswith(f"> **Not loaded**: {err.value.message} Counterfactuals still use **{case.name}**.")
    assert f"**{case.name}** · {case.n_frames} frames" in text
    with pytest.raises(gr.Error, match="between 10 and 90"):
        callbacks.generate(session, None, "ed", 4, 30, 0, False, 4, False)


def test_session_files_are_deleted_with_the_session(tmp_path):
    callbacks = StudioCallbacks(StudioEngine(tmp_path / "models", device="cpu"), tmp_path / "work")
    session = callbacks._session(None, None)
    session.folder.mkdir(parents=True)
    (session.folder / "x.mp4").write_bytes(b"0")
    callbacks.drop_session(session)
    assert not session.folder.exists()


def test_cases_from_a_data_folder(tmp_path, sample_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("x")
    (data / ".hidden").write_text("x")
    (data / "echo1").write_bytes(Path(sample_path).read_bytes())  # extensionless DICOM
    assert list_cases(data) == ["echo1"]
    cb = StudioCallbacks(StudioEngine(tmp_path / "models", device="cpu"), tmp_path / "work", data)
    session = cb.open_case("echo1", None, None)
    info = cb.show_case(session)[2]
    assert info["name"] == "echo1" and info["source_format"] == "dicom"
    with pytest.raises(gr.Error, match="Pick a case"):
        cb.open_case("../etc/passwd", session, None)
    assert session.case.name == "echo1" and session.failed_load == "Pick a case from the list."
    session = cb.open_case("echo1", session, None)  # a good load clears the failure
    assert session.failed_load is None


def test_about_and_layout_without_models(tmp_path):
    engine = StudioEngine(tmp_path, device="cpu")
    about = about_markdown(engine)
    assert about.count("Not trained yet") == 4 and "must not be used for diagnosis" in about
    demo = build_demo(engine, tmp_path / "work")
    names = {d.get("api_name") for d in demo.config["dependencies"] if d.get("api_visibility") == "public"}
    assert {"load_sample", "load_upload", "counterfactual", "measure", "export"} <= names
    model_fns = [f for f in demo.fns.values() if f.api_name in ("load_sample", "counterfactual", "measure")]
    assert len(model_fns) == 3 and all(f.concurrency_id == "model" and f.concurrency_limit == 1 for f in model_fns)
    release = next(d for d in demo.config["dependencies"] if d.get("api_name") == "counterfactual")
    assert release["trigger_mode"] == "always_last" and release["targets"][0][1] == "release"


def test_every_control_of_the_counterfactual_regenerates_it(tmp_path):
    """Controls and video cannot disagree: each control the counterfactual reads triggers it (sliders on release)."""
    demo = build_demo(StudioEngine(tmp_path, device="cpu"), tmp_path / "work")
    types = {c["id"]: c["type"] for c in demo.config["components"]}
    gen = next(d for d in demo.config["dependencies"] if d.get("api_name") == "counterfactual")
    event = {"slider": "release", "radio": "input", "checkbox": "input", "dropdown": "input", "number": "submit"}
    controls = {(i, event[types[i]]) for i in gen["inputs"] if types[i] != "state"}
    assert len(controls) == 9 and controls == set(gen["targets"])


def test_a_load_that_fails_touches_no_panel(tmp_path):
    """The step of a page load that can fail writes only the session; on failure the case panel (where its progress
    showed) is rewritten and the upload box or case list lets go of what failed; nothing else gets an error badge."""
    demo = build_demo(StudioEngine(tmp_path, device="cpu"), tmp_path / "work")
    comps = {c["id"]: c for c in demo.config["components"]}
    elem = {i: c["props"].get("elem_id") for i, c in comps.items()}
    deps = demo.config["dependencies"]
    opens = [d for d in deps if d["targets"] and elem.get(d["targets"][0][0]) in ("sample-btn", "cine-btn", "upload",
                                                                             "case-dd")]
    assert len(opens) == 4
    for d in opens:
        source = elem[d["targets"][0][0]]
        assert [comps[o]["type"] for o in d["outputs"]] == ["state"]
        assert [elem[o] for o in d["show_progress_on"]] == ["case-md"]
        after = [f for f in deps if f["trigger_after"] == d["id"]]
        failed = sorted(elem[o] for f in after if f["trigger_only_on_failure"] for o in f["outputs"])
        assert failed == sorted(["case-md"] + ([source] if source in ("upload", "case-dd") else []))
        assert any(f["trigger_only_on_success"] and "orig-video" in [elem[o] for o in f["outputs"]] for f in after)
    public = {d["api_name"] for d in deps if d["api_visibility"] == "public"}
    assert public == {"load_sample", "load_cine", "load_upload", "load_case", "counterfactual", "measure", "export"}


def test_about_reads_model_cards_and_metrics(tmp_path):
    (tmp_path / "segmenter").mkdir()
    (tmp_path / "segmenter" / "config.json").write_text("{}")
    (tmp_path / "segmenter" / "MODEL_CARD.md").write_text("# LV segmenter\n\n## Data\nCAMUS valid split\n")
    (tmp_path / "generator").mkdir()
    (tmp_path / "generator" / "config.json").write_text("{}")
    (tmp_path / "generator" / "metrics.json").write_text('{"ef_adherence": {"mae": 4.25}, "history": [1, 2]}')
    about = about_markdown(StudioEngine(tmp_path, device="cpu"))
    assert "#### Data\nCAMUS valid split" in about and "# LV segmenter\n" not in about  # title dropped
    assert "| ef_adherence.mae | 4.25 |" in about and "history" not in about
    assert about.count("Not trained yet") == 2
    assert "and a one-step generator, conditioned" in about  # no training configuration: nothing claimed
    kinds = {'{"flow": {"mf_weight": 1.0}}': "trained with the MeanFlow objective",
             '{"flow": {"mf_weight": 0.0}}': "trained by regression of the one-step sample",
             '{"objective": "linear", "flow": {}}': "the 25-step baseline"}
    for config, phrase in kinds.items():
        (tmp_path / "generator" / "training_config.json").write_text(config)
        about = about_markdown(StudioEngine(tmp_path, device="cpu"))
        assert phrase in about and sum(p in about for p in kinds.values()) == 1


def test_a_failed_load_keeps_the_last_case_and_lets_go_of_its_arrays(loaded, tmp_path, sample_path, monkeypatch):
    """A NIfTI loop is decoded and preprocessed before it is refused (NIfTI carries no frame rate): the session keeps
    its case, and the refused loop's frames are freed when the request ends, by reference counting alone (a
    traceback caught in a reference cycle would hold them until the next full garbage collection)."""
    import weakref

    import nibabel as nib
    import numpy as np

    import echolvfm_core.io as eio

    callbacks, out = loaded
    session = out[0]
    case = session.case
    frames = eio.load_echo(sample_path).frames  # (T, H, W) in [0, 1]
    path = tmp_path / "loop.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(frames.transpose(2, 1, 0) * 255).astype(np.uint8), np.eye(4)), path)
    decoded = []
    load_echo = eio.load_echo

    def recording_load_echo(*args, **kwargs):
        echo = load_echo(*args, **kwargs)
        decoded.append(weakref.ref(echo.frames))
        return echo

    monkeypatch.setattr(eio, "load_echo", recording_load_echo)

    message, alive = _message_and_survivors(lambda: callbacks.open_upload(str(path), session, None), decoded)
    assert message == "loop.nii.gz has no frame rate, so it cannot be shown as a loop."
    assert session.case is case and session.failed_load == message
    assert alive == [False]


def test_a_failed_request_lets_go_of_its_arrays():
    """What a callback held when it failed is freed with the error, by reference counting alone."""
    import weakref

    import numpy as np

    from app.callbacks import user_errors

    held = []

    @user_errors
    def request():
        frames = np.zeros((30, 112, 112), np.float32)
        held.append(weakref.ref(frames))
        raise ValueError("No LV in these frames.")

    message, alive = _message_and_survivors(request, held)
    assert message == "No LV in these frames." and alive == [False]


def _message_and_survivors(call, refs: list) -> tuple[str, list[bool]]:
    """Run a callback that should fail with garbage collection off: its user message, and which of the weak
    references it recorded still point at something (freed by reference counting alone, or not)."""
    import gc

    gc.disable()
    try:
        try:
            call()
            message = "no error"
        except gr.Error as exc:
            message = exc.message
        return message, [ref() is not None for ref in refs]
    finally:
        gc.enable()
