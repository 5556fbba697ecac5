"""Shared training helpers."""
import pytest

from echolvfm_core.training.common import warmup_cosine


def test_warmup_cosine_known_points():
    f = warmup_cosine(warmup=10, steps=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_preset_from_args_overrides_only_the_steps():
    from argparse import Namespace

    from echolvfm_core.training.common import preset_from_args
    from echolvfm_core.training.generator import train_preset

    base = train_preset("cpu")
    assert preset_from_args(train_preset, Namespace(preset="cpu", steps=None)) == base
    cfg = preset_from_args(train_preset, Namespace(preset="cpu", steps=7))
    assert cfg.steps == 7 and cfg.batch_size == base.batch_size and cfg.flow == base.flow


def test_cpu_meanflow_preset_trains_the_meanflow_term_on_the_bundled_warp_network():
    """The MeanFlow term is on for a real share of the steps, and the network is the cpu preset's (so it warm-starts
    from the bundled generator) with its displacement output, which the warp prediction and its supervision read."""
    from echolvfm_core.training.generator import train_preset

    cfg = train_preset("cpu_meanflow")
    assert cfg.flow.mf_weight > 0 and cfg.flow.linear_ratio <= 0.5 and cfg.flow.share_r_neq_t > 0
    assert cfg.flow.prediction == "warp" and cfg.flow.displacement_weight > 0
    assert cfg.model == train_preset("cpu").model and cfg.model.displacement_channels == 2
