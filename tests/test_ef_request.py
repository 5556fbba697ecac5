"""One range of requested EFs for the CLI and the app, checked before any model loads."""
from __future__ import annotations

import pytest

from echolvfm_core.cli import main
from echolvfm_core.ef import EF_REQUEST_RANGE, check_requested_ef
from echolvfm_core.pipelines import counterfactual


def test_check_requested_ef_bounds():
    lo, hi = EF_REQUEST_RANGE
    assert check_requested_ef(lo) == lo and check_requested_ef(hi) == hi and check_requested_ef("55") == 55.0
    for bad in (lo - 0.5, hi + 0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"between {lo:g} and {hi:g}"):
            check_requested_ef(bad)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as loading the generator."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the EF request was checked")

    monkeypatch.setattr(counterfactual.CounterfactualPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(counterfactual, "load_generator", refuse)


@pytest.mark.parametrize("ef", ["150", "95", "5"])
def test_generate_refuses_an_ef_outside_the_range_before_loading(sample_path, tmp_path, capsys, no_model_loads, ef):
    assert main(["generate", str(sample_path), "--ef", ef, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"between {EF_REQUEST_RANGE[0]:g} and {EF_REQUEST_RANGE[1]:g}" in err[0]


def test_quiz_create_and_calibrate_refuse_efs_outside_the_range_before_loading(sample_path, tmp_path, capsys,
                                                                                no_model_loads):
    assert main(["quiz", "create", str(tmp_path / "q.sqlite"), "--pool", *[str(sample_path)] * 10, "--cases", "4",
                 "--ef-range", "5,95"]) == 2
    assert "--ef-range" in capsys.readouterr().err
    assert main(["calibrate-gain", "--prepared", str(tmp_path), "--efs", "40,150"]) == 2
    assert "--efs" in capsys.readouterr().err
