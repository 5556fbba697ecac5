"""Shared training helpers."""
import pytest

from echolvfm_core.training.common import warmup_cosine


def test_warmup_cosine_known_points():
    f = warmup_cosine(warmup=10, steps=110, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_preset_from_args_overrides_only_the_steps_and_the_learning_rate():
    from argparse import Namespace

    from echolvfm_core.training.common import preset_from_args
    from echolvfm_core.training.generator import train_preset

    base = train_preset("cpu")
    assert preset_from_args(train_preset, Namespace(preset="cpu", steps=None)) == base
    assert preset_from_args(train_preset, Namespace(preset="cpu", steps=None, lr=None)) == base
    cfg = preset_from_args(train_preset, Namespace(preset="cpu", steps=7))
    assert cfg.steps == 7 and cfg.batch_size == base.batch_size and cfg.flow == base.flow
    cfg = preset_from_args(train_preset, Namespace(preset="cpu", steps=None, lr=5e-5))
    assert cfg.lr == 5e-5 and cfg.steps == base.steps and cfg.flow == base.flow


def test_cpu_meanflow_preset_trains_the_meanflow_term_on_the_bundled_warp_network():
    """The MeanFlow term is on for a real share of the steps, and the network is the cpu preset's (so it warm-starts
    from the bundled generator) with its displacement output, which the warp prediction and its supervision read."""
    from echolvfm_core.training.generator import train_preset

    cfg = train_preset("cpu_meanflow")
    assert cfg.flow.mf_weight > 0 and cfg.flow.linear_ratio <= 0.5 and cfg.flow.share_r_neq_t > 0
    assert cfg.flow.prediction == "warp" and cfg.flow.displacement_weight > 0
    assert cfg.model == train_preset("cpu").model and cfg.model.displacement_channels == 2


def test_cpu_meanflow_recon_half_preset_halves_only_the_regulariser():
    """The continuation preset keeps the MeanFlow objective, the displacement supervision and the network of
    cpu_meanflow (so it warm-starts from one of its results) and halves the one-step reconstruction regulariser, the
    term that pulls every noise draw onto the training loop."""
    import dataclasses

    from echolvfm_core.training.generator import train_preset

    base, half = train_preset("cpu_meanflow"), train_preset("cpu_meanflow_recon_half")
    assert half.model == base.model and half.flow.mf_weight == base.flow.mf_weight > 0
    assert half.flow.recon_weight == base.flow.recon_weight / 2
    assert dataclasses.replace(half.flow, recon_weight=base.flow.recon_weight) == base.flow


def _linear_run(out, steps: int, stop_after: int | None = None, resume: bool = False, decay: float = 0.9):
    """A one-weight model trained by TrainingRun with an EMA; stops early after ``stop_after`` steps (a crash)."""
    import torch

    from echolvfm_core.training.common import (
        TrainingRun,
        adamw_warmup_cosine,
        ema_weights,
    )

    run = TrainingRun(out, steps, seed=0, device="cpu", desc="test", checkpoint_every=2)
    model = torch.nn.Linear(1, 1, bias=False)
    model, optimizer, scheduler = run.accelerator.prepare(model, *adamw_warmup_cosine(model.parameters(), 0.1, 0.0, 1,
                                                                                      steps))
    ema = run.ema(model, decay)
    run.restore(resume)
    seen = run.state.setdefault("weights", [])
    while run.step < steps and (stop_after is None or run.step < stop_after):
        loss = (model(torch.ones(1, 1)) - 3.0).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.step(model.parameters())
        seen.append(float(model.weight.detach()))
        run.advance()
    summary = run.end()
    return summary, seen, float(ema_weights(ema, model).weight), float(model.weight.detach())


def test_training_run_ema_follows_the_warm_up_rule_and_resumes_exactly(tmp_path):
    straight, weights, ema, last = _linear_run(tmp_path / "straight", steps=5)
    # EMAModel's warm-up: the first update copies the weights, update s >= 2 uses min(decay, s / (s + 9))
    expected = weights[0]
    for s, w in enumerate(weights[1:], start=2):
        d = min(0.9, s / (s + 9))
        expected = d * expected + (1 - d) * w
    assert ema == pytest.approx(expected) and ema != pytest.approx(last)
    assert straight["steps"] == 5 and straight["resumed_from"] == 0 and straight["steps_per_second"] > 0

    _linear_run(tmp_path / "crashed", steps=5, stop_after=3)  # the checkpoint of step 2 survives
    resumed, seen, ema_resumed, last_resumed = _linear_run(tmp_path / "crashed", steps=5, resume=True)
    assert resumed["resumed_from"] == 2 and len(seen) == 5  # the JSON state came back with the checkpoint
    assert last_resumed == pytest.approx(last) and ema_resumed == pytest.approx(ema)
