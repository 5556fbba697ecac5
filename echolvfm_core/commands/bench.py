"""``echolvfm bench SECTION``: speed benchmarks (never timed unit tests). Writes JSON that docs/benchmarks.md cites.

Sections: ``codec`` (VAE encode/decode of a loop), ``generator`` (one-step vs multi-step sampling, MeanFlow+JVP vs
flow-matching training step, random weights of a preset), ``segmenter`` and ``posterior`` (the EF instruments), and
one section per :data:`ENTRY_POINT_GROUP` entry point of the installed packages: the app declares ``app`` (slider
release to playable video through its API, ``app.bench:benchmark_app``) in pyproject.toml, so the library never
imports the app. Each result records the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import platform
from importlib.metadata import entry_points
from pathlib import Path

#: Sections measured by the library itself.
SECTIONS = ("codec", "generator", "segmenter", "posterior")
#: Entry points of this group add sections: each names a callable ``(models: Path, device: str, n: int,
#: threads: int | None, case: str) -> dict`` (``n``: timed repeats; ``case``: the ``--case`` flag).
ENTRY_POINT_GROUP = "echolvfm.bench"


def _installed_sections() -> dict:
    """Section name -> entry point, for the sections that installed packages add."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in SECTIONS}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (JSON results for docs/benchmarks.md)")
    p.add_argument("section", choices=SECTIONS + tuple(sorted(_installed_sections())))
    p.add_argument("--models", default=None, help="models folder (default: the bundled assets/)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="generator: float32, bfloat16 or float16")
    p.add_argument("--preset", default="demo", help="generator preset (demo, paper, tiny)")
    p.add_argument("--batch", type=int, default=1, help="generator: videos per sampling call")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--case", choices=("sample", "cine"), default="sample",
                   help="app: the 30-frame sample (model grid) or the 120-frame cine (a beat rendered at display "
                        "resolution; needs pydicom-data)")
    p.add_argument("--out", default=None, help="write the JSON result here as well")
    p.set_defaults(func=run)


def machine(device: str) -> dict:
    """Where a benchmark ran: CPU model and cores, torch version and threads, GPU name when on CUDA."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import CommandError
    from ..pipelines.counterfactual import default_models_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    models = Path(args.models) if args.models else default_models_dir()

    def need(name: str) -> Path:
        folder = models / name
        if not folder.exists():
            raise CommandError(f"the {args.section} benchmark needs a trained model in {folder}.")
        return folder

    if args.section == "codec":
        from ..models.vae import EchoCodec, bench_codec

        result = bench_codec(EchoCodec.from_pretrained(need("vae"), device=args.device), frames=args.frames,
                             repeats=args.repeats)
    elif args.section == "generator":
        from ..pipelines.bench import bench_generator

        result = bench_generator(preset=args.preset, batch=args.batch, device=args.device, dtype=args.dtype,
                                 frames=args.frames, repeats=args.repeats)
    elif args.section == "segmenter":
        from ..estimators.bench import bench_segmenter
        from ..estimators.segmentation import SegmentationEF

        result = bench_segmenter(SegmentationEF.from_pretrained(need("segmenter"), device=args.device),
                                 frames=args.frames, repeats=args.repeats)
    elif args.section == "posterior":
        from ..estimators.bench import bench_posterior
        from ..estimators.ef_posterior import EFPosteriorEstimator

        result = bench_posterior(EFPosteriorEstimator.from_pretrained(need("ef_regressor"), device=args.device),
                                 frames=args.frames, repeats=args.repeats)
    else:
        benchmark = _installed_sections()[args.section].load()
        result = benchmark(models=models, device=args.device, n=args.repeats, threads=args.threads, case=args.case)
    result = {"section": args.section, "machine": machine(args.device), **result}
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
