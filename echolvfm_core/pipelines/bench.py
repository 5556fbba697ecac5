"""Speed of the generator (random weights of a preset; ``echolvfm bench generator``): one-step MeanFlow sampling vs
multi-step linear-flow sampling, and a MeanFlow training step (with its JVP) vs plain flow matching."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..flows import Conditioning, LinearFlow, MeanFlow, VideoBatch
from ..models.unet import EchoVelocityUNet, jvp_flash_available

__all__ = ["bench_generator"]


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float, float | None]:
    """(median wall seconds, median process CPU seconds, peak CUDA memory in MiB or None) after one warm-up call.

    The CPU time (all threads of this process) tells the work done even on a shared machine, where wall time
    also counts the time other processes hold the cores.
    """
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return float(np.median(wall)), float(np.median(cpu)), peak


def bench_generator(preset: str = "demo", batch: int = 1, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    frames: int = 32, repeats: int = 5, linear_steps: int = 25, train_batch: int | None = None,
                    seed: int = 0) -> dict:
    """Time the generator in one process: one-step MeanFlow vs ``linear_steps``-step midpoint sampling, and one
    training step (forward + backward) MeanFlow with JVP (every sample r < t) vs plain flow matching.

    Args:
        preset: network preset (random weights: the timing does not depend on them).
        batch: videos per sampling call; train_batch: clips per training step (default ``batch``).
        device: "cpu" or "cuda"; dtype: "float32", "bfloat16" or "float16" (training steps run under autocast
            for half types on CUDA, in float32 on CPU).
        frames: frames per video (latent 28 x 28).

    Returns:
        dict with ``one_step`` / ``linear`` {ms_per_call, ms_per_video, videos_per_s, cpu_ms_per_call},
        ``speedup`` (linear time / one-step time), ``train_step`` {meanflow_jvp, flow_matching: {ms, cpu_ms,
        peak_mib}, ratio}, and the setup. Times are medians of wall time (``cpu_ms``: process CPU time).
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    g = torch.Generator().manual_seed(seed)
    net = EchoVelocityUNet.from_preset(preset).to(dev).eval()
    c, hw = net.config.latent_channels, net.config.sample_size

    def make_batch(b: int) -> VideoBatch:
        x = torch.randn(b, c, frames, hw, hw, generator=g)
        obs = torch.zeros(b, frames, dtype=torch.bool)
        obs[:, 0] = True
        cond = Conditioning.from_latents(x, obs, torch.ones_like(obs), torch.full((b,), 50.0))
        return VideoBatch(x, cond).to(dev)

    result = {
        "preset": preset, "parameters": sum(p.numel() for p in net.parameters()), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dt).replace("torch.", ""), "batch": batch, "frames": frames, "threads": torch.get_num_threads(),
        "jvp_flash_attention": jvp_flash_available() and dev.type == "cuda",
    }
    infer_net = copy.deepcopy(net)
    if dt != torch.float32:
        infer_net.to(dt)
    if dev.type == "cpu":
        infer_net.to(memory_format=torch.channels_last)  # as the pipeline runs it on CPU
    cond = make_batch(batch).cond.to(dev, dt)
    one = MeanFlow(infer_net)
    lin = LinearFlow(infer_net)
    with torch.inference_mode():
        t_one, c_one, _ = _timed(lambda: one.sample(cond, steps=1, generator=torch.Generator(dev).manual_seed(0)),
                                 dev, repeats)
        t_lin, c_lin, _ = _timed(lambda: lin.sample(cond, steps=linear_steps, solver="midpoint",
                                                    generator=torch.Generator(dev).manual_seed(0)),
                                 dev, max(1, repeats // 3))
    for name, wall, cpu in (("one_step", t_one, c_one), ("linear", t_lin, c_lin)):
        result[name] = {"ms_per_call": round(wall * 1e3, 2), "ms_per_video": round(wall * 1e3 / batch, 2),
                        "videos_per_s": round(batch / wall, 2), "cpu_ms_per_call": round(cpu * 1e3, 2)}
    result["linear"]["steps"] = linear_steps
    result["linear"]["network_calls"] = 2 * linear_steps
    result["speedup"] = round(t_lin / t_one, 1)
    del infer_net

    tb = train_batch or batch
    train_data = make_batch(tb)
    net.train()
    autocast = dev.type == "cuda" and dt in (torch.bfloat16, torch.float16)

    def step(flow):
        def run():
            net.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dt, enabled=autocast):
                loss = flow(train_data, generator=torch.Generator(dev).manual_seed(0)).loss
            loss.backward()
        return run

    t_mf, c_mf, mem_mf = _timed(step(MeanFlow(net, share_r_neq_t=1.0)), dev, max(1, repeats // 2))
    t_fm, c_fm, mem_fm = _timed(step(LinearFlow(net, ef_dropout=0.0)), dev, max(1, repeats // 2))
    result["train_step"] = {
        "batch": tb,
        "meanflow_jvp": {"ms": round(t_mf * 1e3, 1), "cpu_ms": round(c_mf * 1e3, 1),
                         "peak_mib": None if mem_mf is None else round(mem_mf, 1)},
        "flow_matching": {"ms": round(t_fm * 1e3, 1), "cpu_ms": round(c_fm * 1e3, 1),
                          "peak_mib": None if mem_fm is None else round(mem_fm, 1)},
        "ratio": round(t_mf / t_fm, 2),
    }
    return result
