"""What a counterfactual says about its EF, with tiny random models: the caption on its video and the export's file
names state the EF asked for beside the EF measured on it, and the observed-frames modes that keep the original's
motion say that they cannot follow the request."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from test_app_server import build_tiny_models

from app import video as vid
from app.callbacks import StudioCallbacks
from app.engine import PANEL_SIZE, StudioEngine, counterfactual_caption


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Callbacks over tiny random models and a session with the built-in sample loaded."""
    root = tmp_path_factory.mktemp("ef_readout")
    callbacks = StudioCallbacks(StudioEngine(build_tiny_models(root / "models"), device="cpu"), root / "work")
    return callbacks, callbacks.load_sample(None, None)[0]


@pytest.fixture()
def measures_58(monkeypatch):
    """The tiny random segmenter finds no LV; this stand-in measures 57.6 % on every loop it segments."""
    real = StudioEngine.measure

    def measure(self, frames, like=None, masks_only=False, seed=0, cyclic=False):
        return replace(real(self, frames, like, masks_only, seed, cyclic), ef=57.6, notes=[])

    monkeypatch.setattr(StudioEngine, "measure", measure)


def test_caption_states_both_efs_and_fits_a_panel():
    assert counterfactual_caption(30, 57.6) == "SYNTHETIC EF 30 asked, 58 measured"
    assert counterfactual_caption(30, None) == "SYNTHETIC EF 30 asked, unmeasured"

    def width(text):
        return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, PANEL_SIZE / 560.0, 1)[0][0]

    widest = max(width(counterfactual_caption(a, m)) for a in (10, 48, 88, 90) for m in (None, 0.0, 88.0, 99.4))
    assert widest + 10 <= PANEL_SIZE  # vid.caption's strip (text + 10 px) is cut at the panel's edge


def _first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="gray")


def test_video_and_export_state_the_measured_ef_beside_the_requested_one(loaded, measures_58):
    callbacks, session = loaded
    _, video, line, summary = callbacks.generate(session, 30, "ed", 4, 12, 0, False, 4, False)
    assert summary["requested_ef"] == 30 and summary["measured_ef"] == 57.6
    assert line.startswith("Requested EF **30 %** · measured **58 %** · generated in")
    assert "Built-in sample" in line  # the case it was made from is named
    # The right panel's caption is the new one, not the old "SYNTHETIC  EF 30 %" (compared in the bottom 16 rows, inside
    # the caption's black strip).
    panel = _first_frame(Path(video))[:, PANEL_SIZE + 4 :][-16:].astype(float)

    def drawn(text):
        return vid.caption(np.zeros((1, PANEL_SIZE, PANEL_SIZE), np.uint8), text)[0][-16:].astype(float)

    now, before = (np.abs(panel - drawn(t)).mean() for t in ("SYNTHETIC EF 30 asked, 58 measured",
                                                              "SYNTHETIC  EF 30 %"))
    assert now < 0.6 * before, (now, before)
    names = [Path(f).name for f in callbacks.export(session)]
    assert sorted(Path(n).suffix for n in names) == [".dcm", ".gif", ".mp4"]
    assert all(n.startswith("counterfactual_ef30-asked_ef58-measured_seed0_") for n in names), names


def test_without_a_measured_ef_video_and_names_say_unmeasured(loaded):
    callbacks, session = loaded  # the tiny segmenter finds no LV in the generated loop
    _, _, line, summary = callbacks.generate(session, 45, "ed", 4, 12, 3, False, 4, False)
    assert summary["measured_ef"] is None and "Requested EF **45 %** · not measured ·" in line
    assert all(Path(f).name.startswith("counterfactual_ef45-asked_unmeasured_seed3_")
               for f in callbacks.export(session))


@pytest.mark.parametrize("mode, k, follows", [("ed", 4, True), ("first_k", 1, True), ("first_k", 4, False),
                                              ("every_other", 4, False), ("all", 4, False)])
def test_modes_that_keep_the_original_motion_say_they_cannot_follow_the_ef(loaded, mode, k, follows):
    callbacks, session = loaded
    line = callbacks.generate(session, 30, mode, k, 12, 0, False, 4, False)[2]
    kept = session.result.observed
    assert ("**This cannot follow the requested EF**" in line) is not follows, line
    assert (kept == (0,)) is follows  # only the end-diastolic frame (frame 0 of the sample's loop) is kept
    if not follows:
        assert f"it keeps {len(kept)} frames of the original" in line
        assert "**This cannot follow the requested EF**" in callbacks.measure(session)[3]
