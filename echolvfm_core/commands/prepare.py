"""``echolvfm prepare``: build a training set of cardiac loops from CAMUS ED/ES pairs (and optional phantoms)."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare training loops from CAMUS ED/ES pairs (real anatomy, synthesised motion, exact EF)",
        description=(
            "Preprocess CAMUS apical 4CH ED/ES pairs onto the model grid, register ED to ES, and write loop recipes "
            "(K alphas per patient, variable length and timing) with EF measured on the rendered labels. "
            "Loops are rendered on access by echolvfm_core.data.PreparedLoops."
        ),
    )
    p.add_argument("--camus", default=None, help="CAMUS folder (patientNNNN/ folders, optional splits.csv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--loops-per-patient", type=int, default=4, help="loops per patient (0: real frames only)")
    p.add_argument("--size", type=int, default=112, help="model grid side in pixels")
    p.add_argument("--phantom", type=int, default=0, help="number of phantom loops to add")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes")
    p.add_argument("--patients", nargs="+", default=None, help="only these CAMUS patients (ids or numbers)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..cli import CommandError
    from ..data.prepare import PrepareConfig, prepare

    if args.camus is None and args.phantom == 0:
        raise CommandError("give --camus DIR, --phantom N, or both.")
    try:
        config = PrepareConfig(
            loops_per_patient=args.loops_per_patient,
            size=args.size,
            phantom=args.phantom,
            seed=args.seed,
            workers=args.workers,
            patients=tuple(args.patients) if args.patients else None,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    report = prepare(args.camus, args.out, config, progress=not args.quiet)
    counts = report["counts"]
    print(
        f"prepared {counts['patients']} patients, {counts['loops_camus']} CAMUS loops, "
        f"{counts['loops_phantom']} phantom "
        f"loops in {report['timing_s']['total_s']:.0f} s, {report['data_bytes'] / 1e6:.1f} MB -> {args.out}"
    )
    valid = counts["by_split"].get("valid", {})
    if "ssim_es" in valid:
        print(f"valid split: median SSIM(ED warped to ES, real ES) = {valid['ssim_es']['median']:.3f}")
    err = report["ef_alpha1_minus_real_labels"]
    if err.get("n"):
        print(f"alpha = 1 loops: EF minus EF of the real labels, max |error| = {err['max_abs']:.2f} points")
    if counts["skipped"]:
        print(f"skipped {len(counts['skipped'])} patients: " + json.dumps(counts["skipped"][:5]))
    return 0
