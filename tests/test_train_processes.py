"""Generator training in two processes: ``accelerate launch`` of ``echolvfm train generator --preset tiny``, gloo on
CPU.

accelerate's ``--cpu --num_processes 2`` starts a single process (its CPU launcher spreads processes only through
mpirun with a hostfile), so the test launches through torchrun (``--multi_gpu``) and ``--device cpu`` makes each
process's Accelerator a CPU one: two processes, gloo, one model kept in step by DDP.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from echolvfm_core.cli import main
from echolvfm_core.models.unet import EchoVelocityUNet
from echolvfm_core.models.vae import EchoCodec, build_vae

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo process group")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_generator(tmp_path):
    data, out = tmp_path / "prep", tmp_path / "run"
    assert main(["prepare", "--out", str(data), "--phantom", "3", "--loops-per-patient", "2", "--workers", "1",
                 "--quiet"]) == 0
    torch.manual_seed(0)
    EchoCodec(build_vae("tiny")).save_pretrained(tmp_path / "vae")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    run = ["-m", "echolvfm_core.cli", "train", "generator", "--data", str(data), "--preset", "tiny", "--out", str(out),
           "--device", "cpu", "--vae", str(tmp_path / "vae")]
    done = subprocess.run(launch + run, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 4
    assert metrics["final_loss"] and all(math.isfinite(v) for v in metrics["final_loss"].values())
    assert [h["step"] for h in metrics["history"]] == [2]  # the tiny preset checkpoints at step 2 as well
    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert [p.name for p in ckpt.glob("model*.safetensors")] == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "final", "latents_train.pt", "latents_valid.pt",
                                                     "metrics.json", "samples"]
    net = EchoVelocityUNet.from_pretrained(out / "final")
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert json.loads((out / "final" / "metrics.json").read_text())["processes"] == 2
