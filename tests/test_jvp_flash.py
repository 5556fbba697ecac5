"""jvp-flash-attention (the ``cuda`` extra) against math SDPA, run on CPU by Triton's interpreter.

Triton picks interpreter or compiler when a kernel is decorated, i.e. when ``jvp_flash_attention`` is first imported,
so each check runs this file in a fresh Python with ``TRITON_INTERPRET=1`` (``python tests/test_jvp_flash.py
CHECK``); the child prints its measurements as JSON and the tests here judge them. The interpreter computes bfloat16
wrongly, so the checks use float16 (the kernel alone) and float32 (the network and MeanFlow step).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MISSING = [name for name in ("triton", "jvp_flash_attention") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs the cuda extra ({', '.join(MISSING)} not installed)")


def _interpreted(check: str) -> dict:
    """Run ``check`` of this file under Triton's interpreter; its JSON output."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, __file__, check], check=False, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_output_and_jvp_match_math_sdpa():
    r = _interpreted("kernel")
    # The issue measured 2e-4 (output) and 1.2e-3 (JVP) on one draw; float16 rounding alone is up to 2.4e-4 at |o| ~ 0.5
    # and 4.9e-4 at |o| ~ 1 (math SDPA in float16 errs as much), so the bounds allow one rounding step of the output.
    assert r["out"] < 5e-4 and r["tangent"] < 2e-3, r
    assert r["masked_out"] < 5e-4 and r["masked_tangent"] < 2e-3, r
    assert r["grad"] < 5e-3, r


def test_meanflow_step_through_the_kernel_matches_math_sdpa():
    r = _interpreted("meanflow")
    assert r["calls"]["masked"] > 0 and r["calls"]["unmasked"] > 0, r  # the kernel ran, with and without key mask
    assert r["dudt_scale"] > 1e-3 and r["dudt"] < 1e-4 * r["dudt_scale"], r
    assert r["loss"] < 1e-5, r
    assert r["grad"] < 1e-4, r


# ------------------------------------------------------------------------------ run by the tests in a child process
def _kernel_check() -> dict:
    """Kernel vs math SDPA in float64 on float16 (1, 2, 64, 32) inputs: output, JVP, with and without a key mask,
    and the gradient of a loss on the primal output of ``torch.func.jvp`` (what the MeanFlow step back-propagates)."""
    import torch
    import torch.nn.functional as F
    from jvp_flash_attention.jvp_attention import JVPAttn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 64, 32, generator=g).half() for _ in range(6))
    keys = torch.ones(1, 64, dtype=torch.bool)
    keys[:, 45:] = False
    mask = keys[:, None, None, :].expand(1, 2, 64, 64)

    def math_jvp(attn_mask, primals):
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=attn_mask), primals,
                                  tuple(t.double() for t in (dq, dk, dv)))

    def kernel_jvp(attn_mask, primals):
        return torch.func.jvp(lambda *a: JVPAttn.fwd_dual(*a, attn_mask=attn_mask), primals, (dq, dk, dv))

    def err(a, b):
        return float((a.double() - b.double()).abs().max())

    out = {}
    for name, m in (("", None), ("masked_", mask)):
        o, t = kernel_jvp(m, (q, k, v))
        o_ref, t_ref = math_jvp(m, (q.double(), k.double(), v.double()))
        out[f"{name}out"], out[f"{name}tangent"] = err(o, o_ref), err(t, t_ref)
    weights = torch.randn(1, 2, 64, 32, generator=g)
    grads = []
    for run, primals in ((kernel_jvp, (q, k, v)), (math_jvp, (q.double(), k.double(), v.double()))):
        leaves = [p.detach().clone().requires_grad_() for p in primals]
        o, _ = run(mask, tuple(leaves))
        (o.double() * weights.double()).sum().backward()
        grads.append(leaves)
    out["grad"] = max(err(a.grad, b.grad) for a, b in zip(*grads))
    return out


def _meanflow_check() -> dict:
    """A one-level network whose spatial (4 x 8 = 32 tokens) and temporal (32 frames, the last 12 padding: key mask)
    attention both suit the kernel, in float32: the MeanFlow JVP du/dt, the loss and its gradients with the kernel
    against the same network on math SDPA (``set_jvp_flash(False)``)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from echolvfm_core.flows import Conditioning, MeanFlow, VideoBatch
    from echolvfm_core.models import unet

    calls = {"masked": 0, "unmasked": 0}
    fwd_dual = unet._JVPAttn.fwd_dual

    def counted(q, k, v, attn_mask=None):
        calls["unmasked" if attn_mask is None else "masked"] += 1
        return fwd_dual(q, k, v, attn_mask=attn_mask)

    unet._JVPAttn.fwd_dual = counted
    torch.manual_seed(0)
    net = unet.EchoVelocityUNet(block_out_channels=(32,), layers_per_block=1, transformer_layers_per_block=(1,),
                                attention_head_dim=32, norm_num_groups=8, sample_size=8)
    g = torch.Generator().manual_seed(1)
    frame_mask = torch.ones(1, 32, dtype=torch.bool)
    frame_mask[:, 20:] = False
    x = torch.randn(1, 4, 32, 4, 8, generator=g) * frame_mask[:, None, :, None, None]
    observed = torch.zeros(1, 32, dtype=torch.bool)
    observed[:, 0] = True
    batch = VideoBatch(x, Conditioning.from_latents(x, observed, frame_mask, torch.tensor([35.0])))
    c = batch.cond
    z, dz = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    r, t = torch.tensor([0.2]), torch.tensor([0.7])
    flow = MeanFlow(net, share_r_neq_t=1.0, adaptive_p=0.0)  # p = 0: the loss is the plain MSE

    def fn(z_, r_, t_):
        return net(z_, t_, t_ - r_, c.ef, c.cond, c.frame_mask)

    results = []
    for flash in (True, False):
        net.set_jvp_flash(flash)
        net.zero_grad()
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            _, dudt = torch.func.jvp(fn, (z, r, t), (dz, torch.zeros_like(r), torch.ones_like(t)))
        loss = flow(batch, generator=torch.Generator().manual_seed(2)).loss
        loss.backward()
        results.append((dudt, loss.detach(),
                        {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (d_flash, l_flash, g_flash), (d_math, l_math, g_math) = results
    grad = max(float((g_flash[n] - g_math[n]).abs().max() / g_math[n].abs().max().clamp_min(1e-12)) for n in g_math)
    return {"calls": calls, "dudt": float((d_flash - d_math).abs().max()), "dudt_scale": float(d_math.abs().max()),
            "loss": float((l_flash - l_math).abs() / l_math.abs()), "grad": grad}


if __name__ == "__main__":
    print(json.dumps({"kernel": _kernel_check, "meanflow": _meanflow_check}[sys.argv[1]]()))
