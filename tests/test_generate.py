"""Counterfactual pipeline, rejection sampling, `echolvfm generate`, generator training and benchmark (tiny models)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echolvfm_core.cli import main
from echolvfm_core.flows import MeanFlow, MeanFlowConfig, ObservationConfig
from echolvfm_core.models.unet import EchoVelocityUNet
from echolvfm_core.models.vae import EchoCodec, build_vae
from echolvfm_core.pipelines import generator_card
from echolvfm_core.pipelines.bench import bench_generator
from echolvfm_core.pipelines.counterfactual import (
    FLOW_FILE,
    CounterfactualPipeline,
    load_generator,
    save_generator,
)
from echolvfm_core.training import generator as gen_train


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return EchoCodec(build_vae("tiny"))


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(1)
    return MeanFlow(EchoVelocityUNet.from_preset("tiny", max_frames=12)).eval()


def _frames(t=8, s=112, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (t, s, s)).astype(np.float32)


def brightness_ef(frames: np.ndarray) -> float:
    """A deterministic stand-in EF measurement: mean grey level in %."""
    return float(frames.mean() * 100)


def test_generate_shapes_determinism_and_timings(flow, codec):
    pipe = CounterfactualPipeline(flow, codec)
    frames = _frames()
    a = pipe.generate(frames, ef=40, observed=[0, 3], seed=3, n=2)
    b = pipe.generate(frames, ef=40, observed=[0, 3], seed=3, n=2)
    c = pipe.generate(frames, ef=40, observed=[0, 3], seed=4, n=2)
    assert a.latents.shape == (2, 4, 8, 28, 28) and a.frames.shape == (2, 8, 112, 112)
    assert a.frames.min() >= 0 and a.frames.max() <= 1
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    assert not torch.equal(a.latents[0], a.latents[1])  # n loops, different noise
    assert a.requested_ef == 40 and a.observed == (0, 3) and a.steps == 1 and a.measured_ef is None
    assert a.latency_ms > 0 and set(a.timings_ms) == {"encode", "flow", "decode"}
    longer = pipe.generate(frames, ef=40, length=12, seed=0)
    assert longer.length == 12 and longer.frames.shape[1] == 12
    assert pipe.generate(frames[:1], ef=40, seed=0).length == 12  # a still: max_frames of this network


def test_latent_input_and_validation(flow, codec):
    pipe = CounterfactualPipeline(flow)  # latents only
    lat = torch.randn(4, 6, 28, 28)
    out = pipe.generate(lat, ef=55, observed=[1], seed=0, steps=2)
    assert out.frames is None and out.latents.shape == (1, 4, 6, 28, 28) and out.steps == 2
    with pytest.raises(ValueError, match="ef must be"):
        pipe.generate(lat, ef=150)
    with pytest.raises(ValueError, match="outside the input"):
        pipe.generate(lat, ef=50, observed=[6])
    with pytest.raises(ValueError, match="length must be"):
        pipe.generate(lat, ef=50, length=13)
    with pytest.raises(ValueError, match="beyond the generated length"):
        pipe.generate(lat, ef=50, observed=[5], length=4)
    with pytest.raises(ValueError, match="no codec"):
        pipe.generate(_frames(), ef=50)
    with pytest.raises(ValueError, match="Rejection sampling needs"):
        pipe.generate(lat, ef=50, reject=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CounterfactualPipeline(flow, codec).generate(_frames() * 3, ef=50)
    with pytest.raises(ValueError, match="preprocess"):
        CounterfactualPipeline(flow, codec).generate(_frames(s=96), ef=50)


def test_rejection_sampling_keeps_the_closest_candidate(flow, codec):
    pipe = CounterfactualPipeline(flow, codec, measure_ef=brightness_ef)
    target = 50.0
    out = pipe.generate(_frames(), ef=target, seed=0, n=2, reject=3)
    assert out.frames.shape[0] == 2 and len(out.candidate_efs) == 2
    for kept, candidates in zip(out.measured_ef, out.candidate_efs):
        assert len(candidates) == 3
        assert abs(kept - target) == min(abs(e - target) for e in candidates)
    for k in range(2):
        assert out.measured_ef[k] == pytest.approx(brightness_ef(out.frames[k]), abs=1e-4)
    # The same seed without rejection reproduces the first candidate of the first group.
    plain = pipe.generate(_frames(), ef=target, seed=0, n=6)
    assert plain.measured_ef[0] == pytest.approx(out.candidate_efs[0][0], abs=1e-4)


def test_save_and_load_generator(tmp_path, flow):
    save_generator(flow.net, tmp_path / "g", "meanflow", MeanFlowConfig(adaptive_p=0.5))
    spec = json.loads((tmp_path / "g" / FLOW_FILE).read_text())
    assert spec["flow"] == "meanflow" and spec["config"]["adaptive_p"] == 0.5
    loaded = load_generator(tmp_path / "g")
    assert isinstance(loaded, MeanFlow) and loaded.config.adaptive_p == 0.5
    lat = torch.randn(4, 5, 28, 28)
    a = CounterfactualPipeline(flow).generate(lat, ef=30, seed=1)
    b = CounterfactualPipeline(loaded).generate(lat, ef=30, seed=1)
    torch.testing.assert_close(a.latents, b.latents)
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, flow, codec):
    from echolvfm_core.models.segmenter import LVSegmenter, segmenter_preset

    root = tmp_path_factory.mktemp("models")
    save_generator(flow.net, root / "generator")
    codec.save_pretrained(root / "vae")
    torch.manual_seed(0)
    LVSegmenter.from_config(dict(vars(segmenter_preset("tiny")))).save_pretrained(root / "segmenter")
    return root


def test_cli_generate_writes_a_video_and_json(models_dir, sample_path, tmp_path, capsys):
    out = tmp_path / "cf.mp4"
    args = ["generate", str(sample_path), "--ef", "30", "--observed", "0,5", "--frames", "12", "--seed", "2",
            "--json", "--models", str(models_dir)]
    assert main([*args, "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"requested_ef", "measured_ef", "latency_ms", "frames"} <= set(record)
    assert record["requested_ef"] == 30 and record["frames"] == 12 and record["observed"] == [0, 5]
    assert out.stat().st_size > 0
    from echolvfm_core.io import load_echo

    assert load_echo(out).n_frames == 12
    assert main([*args, "--reject", "2", "--out", str(tmp_path / "cf.gif")]) == 0
    assert len(json.loads(capsys.readouterr().out)["candidate_efs"]) == 2


def test_cli_generate_observes_the_end_diastolic_frame_the_segmenter_finds(models_dir, tmp_path, capsys):
    import shutil

    from echolvfm_core.data.loops import CycleTiming
    from echolvfm_core.data.phantom import render_phantom
    from echolvfm_core.io import write_mp4

    # a phantom cycle that starts 5 frames before end-diastole, measured with the bundled (trained) segmenter
    loop = render_phantom(21, 55.0, CycleTiming(16), fps=30.0)
    path = tmp_path / "late.mp4"
    write_mp4(np.roll(loop.frames, 5, axis=0).astype(np.float32) / 255.0, path, fps=30.0)
    models = tmp_path / "models"
    for name in ("generator", "vae"):
        shutil.copytree(models_dir / name, models / name)
    shutil.copytree(Path(__file__).resolve().parents[1] / "assets" / "segmenter", models / "segmenter")
    args = ["generate", str(path), "--ef", "40", "--json", "--models", str(models), "--out", str(tmp_path / "cf.mp4")]
    assert main([*args, "--observed", "ed"]) == 0
    (observed,) = json.loads(capsys.readouterr().out)["observed"]
    assert abs(observed - 5) <= 1
    shutil.rmtree(models / "segmenter")
    assert main([*args, "--observed", "ed"]) == 2
    assert "--observed ed needs a segmenter" in capsys.readouterr().err


def test_cli_generate_errors(models_dir, sample_path, tmp_path, capsys):
    assert main(["generate", str(sample_path), "--ef", "30", "--out", str(tmp_path / "x.avi"),
                 "--models", str(models_dir)]) == 2
    assert "--out must end in" in capsys.readouterr().err
    assert main(["generate", str(sample_path), "--ef", "30", "--out", str(tmp_path / "x.mp4"),
                 "--models", str(tmp_path)]) == 2
    assert "No generator" in capsys.readouterr().err
    assert main(["generate", str(sample_path), "--ef", "130", "--out", str(tmp_path / "x.mp4"),
                 "--models", str(models_dir)]) == 2
    assert "ef must be" in capsys.readouterr().err


def _loops(values, patients, efs, frames=14, hw=4):
    lat = [torch.full((4, frames, hw, hw), float(v), dtype=torch.float16) for v in values]
    n = len(values)
    return gen_train.LatentLoops(lat, np.asarray(efs, float), np.zeros(n, np.int64), list(patients),
                                 [f"l{i}" for i in range(n)])


def test_clip_sampler_pads_observes_and_pairs_counterfactuals():
    loops = _loops([1, 2, 3], ["p0", "p0", "p1"], [60.0, 30.0, 45.0])
    obs = ObservationConfig(min_frames=6, max_frames=12)
    sampler = gen_train.ClipSampler(loops, obs, counterfactual_prob=1.0, random_start_prob=0.5)
    g = torch.Generator().manual_seed(0)
    batch = sampler.batch(64, g)
    fm, observed = batch.cond.frame_mask, batch.cond.observed
    lengths = fm.sum(1)
    assert (lengths >= 6).all() and (lengths <= 12).all()
    # padded to the longest clip of the batch, not beyond
    assert batch.x.shape == (64, 4, int(lengths.max()), 4, 4)
    short = sampler.batch(1, torch.Generator().manual_seed(3))
    assert short.x.shape[2] == int(short.cond.frame_mask.sum()) and short.cond.frame_mask.all()
    assert not (observed & ~fm).any() and observed.any(1).all()
    assert (batch.x[~fm[:, None].expand(-1, 4, -1)[:, :, :, None, None].expand_as(batch.x)] == 0).all()
    for k in range(64):
        target = float(batch.x[k, 0, 0, 0, 0])
        source = float(batch.cond.cond[k, 0, observed[k].nonzero()[0, 0], 0, 0])
        ef = float(batch.cond.ef[k])
        assert ef == {1.0: 60.0, 2.0: 30.0, 3.0: 45.0}[target]
        # Patient p0 has two loops: with counterfactual_prob 1 the observed frames come from the other one.
        assert source == {1.0: 2.0, 2.0: 1.0, 3.0: 3.0}[target]
    again = sampler.batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, batch.x) and torch.equal(again.cond.observed, observed)


def test_whole_cycle_clips_resample_the_loop_to_the_clip_length():
    # loop frames carry their index, so the clip shows which frames were taken
    lat = [torch.arange(14, dtype=torch.float16)[None, :, None, None].expand(4, 14, 2, 2).clone() for _ in range(2)]
    loops = gen_train.LatentLoops(lat, np.array([60.0, 30.0]), np.zeros(2, np.int64), ["p0", "p0"], ["a", "b"])
    obs = ObservationConfig(probs=(0, 1, 0, 0, 0), min_frames=6, max_frames=20)  # ED observed
    sampler = gen_train.ClipSampler(loops, obs, counterfactual_prob=1.0, whole_cycle_prob=1.0)
    batch = sampler.batch(16, torch.Generator().manual_seed(0))
    for k in range(16):
        length = int(batch.cond.frame_mask[k].sum())
        assert 6 <= length <= 20
        taken = batch.x[k, 0, :length, 0, 0]
        assert taken.tolist() == (torch.arange(length) * 14 // length).float().tolist()  # one cycle, from ED
        assert batch.cond.observed[k].nonzero().flatten().tolist() == [0]
        assert float(batch.cond.cond[k, 0, 0, 0, 0]) == 0.0  # the sibling's ED frame


def test_clip_sampler_gives_the_known_motion_of_single_frame_clips():
    from echolvfm_core.data.prepared import LoopDeformation

    # each latent carries (loop * 100 + frame), so a clip shows which loop and frames it took
    frames, hw = 14, 4
    lat = [(100 * k + torch.arange(frames, dtype=torch.float16))[None, :, None, None].expand(4, frames, hw, hw).clone()
           for k in range(3)]
    loops = gen_train.LatentLoops(lat, np.array([60.0, 30.0, 45.0]), np.zeros(3, np.int64), ["p0", "p0", "p1"],
                                  ["a", "b", "c"])
    # a uniform velocity (0.2 normalised units to the right): exp(s v) = s v exactly, 0.2 * (hw - 1) / 2 = 0.3 pixel
    velocity = np.zeros((2, hw, hw), np.float32)
    velocity[0] = 0.2
    phases = np.arange(frames) / frames
    deformations = [LoopDeformation(velocity, 1.0 * phases), LoopDeformation(velocity, 0.5 * phases), None]
    obs = ObservationConfig(probs=(1, 1, 1, 0, 0), min_frames=6, max_frames=12)
    sampler = gen_train.ClipSampler(loops, obs, counterfactual_prob=0.5, deformations=deformations)
    batch = sampler.batch(64, torch.Generator().manual_seed(0))
    known = batch.displacement_known
    assert batch.displacement.shape == (64, 2, batch.x.shape[2], hw, hw) and 0 < int(known.sum()) < 64
    for k in range(64):
        observed = batch.cond.observed[k].nonzero().flatten()
        target = batch.x[k, 0, :, 0, 0]
        assert bool(known[k]) == (len(observed) == 1 and int(target[0]) // 100 < 2)
        if not known[k]:
            assert not batch.displacement[k].any()
            continue
        source = int(batch.cond.cond[k, 0, observed[0], 0, 0])
        length = int(batch.cond.frame_mask[k].sum())
        scale = [deformations[int(v) // 100].scale[int(v) % 100] for v in target[:length]]
        expected = (torch.tensor(scale) - deformations[source // 100].scale[source % 100]) * 0.3
        torch.testing.assert_close(batch.displacement[k, 0, :length],
                                   expected[:, None, None].expand(-1, hw, hw).float())
        assert not batch.displacement[k, 1].any() and not batch.displacement[k, :, length:].any()
    with pytest.raises(ValueError, match="one entry per loop"):
        gen_train.ClipSampler(loops, obs, deformations=deformations[:2])


def test_training_writes_final_model_samples_and_resumes(tmp_path, codec):
    data = tmp_path / "prep"
    assert main(["prepare", "--out", str(data), "--phantom", "3", "--loops-per-patient", "2", "--workers", "1",
                 "--quiet"]) == 0
    codec.save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    args = ["train", "generator", "--data", str(data), "--preset", "tiny", "--out", str(out), "--device", "cpu",
            "--vae", str(tmp_path / "vae")]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["resumed_from"] == 0 and np.isfinite(metrics["final_loss"]["loss"])
    assert (out / "latents_train.pt").is_file()
    assert (out / "samples" / "step_000003.png").is_file() and (out / "samples" / "final.png").is_file()
    pipe = CounterfactualPipeline(load_generator(out / "final"), codec)
    assert pipe.generate(_frames(t=6), ef=50, seed=0).frames.shape == (1, 6, 112, 112)
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "--preset tiny --seed 0" in card and "Not measured yet" in card
    assert "Objective: masked MeanFlow" in card and "regulariser weight 0.1 on instantaneous samples" in card
    # `evaluate --card` leaves the generation section beside the model; the card then shows its numbers
    agree = {"r2": 0.25, "mae": 9.5, "rmse": 12.0, "n": 6, "unmeasured": 0}
    generation = {**{k: agree for k in ("rec", "gen", "rec_reject", "gen_reject")}, "es_ssim": 0.61, "n": 2,
                  "seeds": 3, "reject": 4}
    (out / "final" / generator_card.EVALUATION_FILE).write_text(json.dumps(
        {"split": "valid", "data": "prep", "seed": 0, "generation": generation}))
    card = generator_card.write_model_card(out / "final").read_text()
    assert "| Rec | 0.250 | 9.50 | 12.00 | 6 | 0 |" in card and "ES SSIM" in card and "Not measured" not in card
    # Resume: one more step from the checkpoint at step 4, the latent cache is reused.
    mtime = (out / "latents_train.pt").stat().st_mtime
    assert main([*args, "--resume", "--steps", "5"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 5 and resumed["resumed_from"] == 4
    assert (out / "latents_train.pt").stat().st_mtime == mtime


def test_bench_generator_reports_both_samplers_and_training_steps():
    r = bench_generator("tiny", batch=1, device="cpu", frames=4, repeats=1, linear_steps=2)
    assert r["one_step"]["videos_per_s"] > 0 and r["linear"]["network_calls"] == 4
    assert r["speedup"] > 0 and r["train_step"]["meanflow_jvp"]["ms"] > 0 and r["train_step"]["ratio"] > 0


def _loop(n_frames: int, ef: float, seed: int):
    from echolvfm_core.data.prepared import LoopSample

    frames = (_frames(n_frames, seed=seed) * 255).astype(np.uint8)
    return LoopSample(frames, np.zeros_like(frames), ef, 0, n_frames // 3, 30.0, f"p{seed}", 1.0, "valid",
                      "camus", f"p{seed}_a0")


def test_agreement_known_answer():
    from echolvfm_core.pipelines.evaluation import agreement

    out = agreement([30, 50, 70, 40], [35, 45, 70, None])
    assert out["n"] == 3 and out["unmeasured"] == 1
    assert out["mae"] == pytest.approx(10 / 3)
    assert out["rmse"] == pytest.approx(np.sqrt(50 / 3))
    assert out["r2"] == pytest.approx(1 - 50 / 800)  # requested 30, 50, 70: mean 50, total sum of squares 800


def test_gen_ef_draw_keeps_its_distance():
    from echolvfm_core.pipelines.evaluation import GEN_EF_RANGE, draw_gen_ef

    rng = np.random.default_rng(0)
    draws = [draw_gen_ef(50.0, rng) for _ in range(500)]
    assert all(abs(d - 50) >= 5 and GEN_EF_RANGE[0] <= d <= GEN_EF_RANGE[1] for d in draws)


def test_evaluate_generation_protocol_counts(flow, codec):
    from echolvfm_core.pipelines.evaluation import evaluate_generation

    pipe = CounterfactualPipeline(flow, codec, measure_ef=brightness_ef)
    loops = [_loop(8, 55.0, 0), _loop(15, 35.0, 1)]  # the second is longer than max_frames (12): resampled
    out = evaluate_generation(pipe, loops, seeds=2, reject=3, progress=False)
    assert out["n"] == 2 and out["seeds"] == 2 and out["reject"] == 3
    for key in ("rec", "gen", "rec_reject", "gen_reject"):
        assert out[key]["n"] + out[key]["unmeasured"] == 4
    assert -1.0 <= out["es_ssim"] <= 1.0
    assert np.isfinite(out["rec"]["mae"]) and np.isfinite(out["gen_reject"]["mae"])
    with pytest.raises(ValueError, match="segmenter"):
        evaluate_generation(CounterfactualPipeline(flow, codec), loops)


def test_evaluate_generation_of_a_linear_baseline_without_rejection_reports_its_steps_and_time(codec):
    from echolvfm_core.flows import LinearFlow
    from echolvfm_core.pipelines.evaluation import evaluate_generation

    torch.manual_seed(2)
    linear = LinearFlow(EchoVelocityUNet.from_preset("tiny", max_frames=12)).eval()
    pipe = CounterfactualPipeline(linear, codec, measure_ef=brightness_ef)
    out = evaluate_generation(pipe, [_loop(8, 55.0, 0)], seeds=2, reject=1, steps=3, guidance=2.0, progress=False)
    assert set(out) >= {"rec", "gen", "ms_per_video", "flow_ms_per_video"} and "rec_reject" not in out
    assert out["steps"] == 3 and out["guidance"] == 2.0 and out["rec"]["n"] == 2
    assert out["ms_per_video"] >= out["flow_ms_per_video"] > 0


def test_seed_spread_known_answer():
    """A stub generator whose loops carry their seed index: the measured EF is the request plus 2 x that index, the
    ES frame the index itself, so the spreads are those of 0, 2, 4 and 0, 1, 2 and the requests' gap comes back."""
    from types import SimpleNamespace

    from echolvfm_core.pipelines.evaluation import seed_spread

    class Stub:
        codec, max_frames = object(), 12

        def generate(self, frames, ef, observed, seed, n):
            loops = np.stack([np.full((8, 4, 4), (k + 1) / 10 + ef / 1000, np.float32) for k in range(n)])
            return SimpleNamespace(frames=loops)

    def measure(loop):
        k = int(float(loop[0, 0, 0]) * 10) - 1
        ef = (float(loop[0, 0, 0]) - (k + 1) / 10) * 1000
        return ef + 2 * k, k

    out = seed_spread(Stub(), [_loop(8, 55.0, 0), _loop(8, 30.0, 1)], measure, seeds=3, gap=10.0, progress=False)
    assert out["n"] == 2 and out["seeds"] == 3 and out["unmeasured"] == 0
    assert out["ef_sd"] == pytest.approx(2.0, abs=1e-3) and out["es_frame_sd"] == pytest.approx(1.0)
    assert out["request_gap"] == pytest.approx(10.0, abs=1e-3)
    with pytest.raises(ValueError, match="seeds"):
        seed_spread(Stub(), [_loop(8, 55.0, 0)], measure, seeds=1)


def test_warm_start_copies_every_weight_that_fits(tmp_path):
    torch.manual_seed(0)
    warp = EchoVelocityUNet.from_preset("tiny", displacement_channels=2)
    save_generator(warp, tmp_path / "g")
    torch.manual_seed(1)
    plain = EchoVelocityUNet.from_preset("tiny")
    fresh = gen_train.load_init_weights(plain, tmp_path / "g")
    assert fresh == ["conv_out.bias", "conv_out.weight"]  # the output has no displacement channels here
    saved = warp.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in plain.state_dict().items() if k not in fresh)
    with pytest.raises(gen_train.GeneratorTrainingError, match="No generator weights"):
        gen_train.load_init_weights(plain, tmp_path / "missing")


def test_linear_baseline_trains_with_the_presets_schedule_and_samples_with_guidance(tmp_path, codec):
    from echolvfm_core.flows import LinearFlow

    data = tmp_path / "prep"
    assert main(["prepare", "--out", str(data), "--phantom", "3", "--loops-per-patient", "2", "--workers", "1",
                 "--quiet"]) == 0
    codec.save_pretrained(tmp_path / "vae")
    torch.manual_seed(0)
    save_generator(EchoVelocityUNet.from_preset(gen_train.train_preset("tiny").model), tmp_path / "init")
    earlier = ["echolvfm train generator --preset tiny --out runs/first", "echolvfm train generator --out runs/init"]
    (tmp_path / "init" / "metrics.json").write_text(json.dumps({"lineage": earlier[:1], "command": earlier[1]}))
    out = tmp_path / "linear"
    args = ["train", "generator", "--data", str(data), "--preset", "tiny", "--flow", "linear", "--out", str(out),
            "--device", "cpu", "--vae", str(tmp_path / "vae")]
    assert main([*args, "--init", str(tmp_path / "init"), "--lr", "1e-4"]) == 0
    spec = json.loads((out / "final" / FLOW_FILE).read_text())
    assert spec["flow"] == "linear" and spec["config"]["ef_dropout"] == 0.1
    loaded = load_generator(out / "final")
    assert isinstance(loaded, LinearFlow)
    cf = CounterfactualPipeline(loaded, codec).generate(_frames(t=6), ef=50, seed=0, guidance=2.0)
    assert cf.steps == 25 and cf.frames.shape == (1, 6, 112, 112)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["objective"] == "linear" and metrics["steps"] == gen_train.train_preset("tiny").steps
    assert all(flag in metrics["command"] for flag in ("--flow linear", "--init", "--lr 0.0001"))
    assert json.loads((out / "final" / "training_config.json").read_text())["lr"] == 1e-4
    assert metrics["lineage"] == earlier  # the commands that made the warm start, oldest first
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "Linear flow-matching baseline" in card and "masked linear flow matching" in card
    assert "\n".join([*earlier, metrics["command"]]) in card and "The last of the 3 training runs" in card
    with pytest.raises(ValueError, match="displacement"):
        gen_train.GeneratorTrainConfig(model=gen_train.train_preset("cpu").model, objective="linear")


def test_train_generator_reports_a_missing_codec_as_a_one_line_error(tmp_path, capsys):
    assert main(["train", "generator", "--data", str(tmp_path), "--preset", "tiny", "--out", str(tmp_path / "o"),
                 "--vae", str(tmp_path / "no_vae")]) == 2
    assert "No VAE in" in capsys.readouterr().err


def test_model_card_shows_the_objective_the_seed_spread_and_the_linear_baseline(tmp_path):
    from dataclasses import asdict

    final = tmp_path / "final"
    final.mkdir()
    (final / "training_config.json").write_text(json.dumps(asdict(gen_train.train_preset("cpu_meanflow"))))
    (final / "metrics.json").write_text(json.dumps({"preset": "cpu_meanflow", "parameters": 1e6, "steps": 1000,
                                                    "seed": 0, "init": "assets/generator"}))
    agree = {"r2": 0.7, "mae": 5.5, "rmse": 7.0, "n": 150, "unmeasured": 0}
    rows = {key: {"rec": agree, "gen": agree, "steps": 25, "guidance": w, "seeds": 1, "ms_per_video": ms}
            for key, w, ms in (("unguided", 1.0, 1600.0), ("guided", 2.0, 3000.0))}
    spread = {"ef_sd": 1.2, "es_frame_sd": 0.5, "request_gap": 8.0, "pixel_sd": 0.003, "n": 50, "seeds": 8,
              "gap": 10.0, "unmeasured": 0}
    gen = {"rec": agree, "gen": agree, "es_ssim": 0.7, "n": 50, "seeds": 3, "reject": 1, "steps": 1,
           "ms_per_video": 40.0, "seed_spread": spread,
           "baseline": {"folder": "runs/lin", "solver": "midpoint", "speed_ratio": 40.0, "speed_ratio_guided": 75.0,
                        **rows}}
    (final / generator_card.EVALUATION_FILE).write_text(json.dumps({"split": "valid", "data": "prep", "seed": 0,
                                                               "generation": gen}))
    card = generator_card.write_model_card(final).read_text()
    assert "One-step latent MeanFlow generator" in card and "masked MeanFlow on 50% of the steps" in card
    assert "Improved Mean Flows" in card and "Warm start: `assets/generator`" in card
    assert "| Rec | 0.700 | 5.50 |" in card and "best of k |" not in card  # evaluated without rejection
    assert "standard deviation over seeds is 1.20 points" in card and "40.0x" in card
    assert "| linear, 25 midpoint steps, guidance 2, Gen | 0.700 | 5.50 | 7.00 | 3000 |" in card


def test_model_card_shows_the_realism_of_rendered_counterfactuals(tmp_path):
    """`evaluate --sections realism --card` keeps a summary beside the generation section, and the card shows it."""
    from dataclasses import asdict

    final = tmp_path / "final"
    final.mkdir()
    (final / "training_config.json").write_text(json.dumps(asdict(gen_train.train_preset("cpu_meanflow"))))
    (final / "metrics.json").write_text(json.dumps({"preset": "cpu_meanflow", "parameters": 1e6, "steps": 10}))
    ratios = {"hf_share": 1.04, "gradient": 0.99, "bits_per_pixel": 1.0, "frame_change": 0.86}
    cine = {"frames": 120, "fps": 30.0003, "side": 513, "method": "lv_area", "heart_rate_bpm": 62.1,
            "beats": [{}, {}, {}], "renders": [{"requested": 30.0}], "ratios_mean": ratios,
            "measured_mean": {"30.0": 27.84, "50.0": 50.47, "70.0": None}}
    realism = {"n_patients": 49, "ratios_pooled": ratios, "ratios_paired_median": ratios,
               "c2st": {"accuracy": 0.694, "ci95": [0.597, 0.776], "n_test": 98, "n_train": 80},
               "ef_adherence": {"rec": {"r2": 0.77, "mae": 5.09}, "gen": {"r2": 0.9, "mae": 5.66}},
               "acquired_cines": {"color3d": cine}}
    summary = generator_card.realism_summary(realism)
    assert "renders" not in summary["acquired_cines"]["color3d"] and summary["acquired_cines"]["color3d"]["beats"] == 3
    (final / generator_card.EVALUATION_FILE).write_text(json.dumps({"realism": {"split": "valid", **summary}}))
    card = generator_card.write_model_card(final).read_text()
    assert "## Realism of rendered counterfactuals (valid split)" in card and "Not measured yet" in card
    assert "| frame-to-frame change | 0.86 | 0.86 | 0.8-1.25 |" in card and "accuracy 0.694 (95 % interval" in card
    row = "| color3d | 120 frames, 30 fps, 513 px | 3 (lv_area) | 1.04 / 0.99 / 0.86 / 1.00 | 27.8 / 50.5 / - |"
    assert row in card


def test_linear_baseline_shares_the_one_step_models_output_parameterisation():
    """A "warp" run's baseline predicts through the same warp, with the same network and motion supervision; a
    velocity run's baseline is a plain velocity network."""
    warp = gen_train.as_linear_baseline(gen_train.train_preset("cpu_meanflow"))
    assert warp.objective == "linear" and warp.model == gen_train.train_preset("cpu_meanflow").model
    assert (warp.linear.prediction, warp.linear.residual, warp.linear.displacement_weight) == ("warp", True, 3.0)
    assert warp.linear.ef_dropout == 0.1
    plain = gen_train.as_linear_baseline(gen_train.train_preset("tiny"))
    assert plain.model.displacement_channels == 0 and plain.linear.prediction == "u"
