"""``echolvfm quiz``: set up a realism study and read its results (the work is done in :mod:`echolvfm_core.quiz`).

    echolvfm quiz create DB [--pool DIR_OR_FILE|color3d|sample ...] [--data DIR --camus-loops N] --cases N
        [--calibration K] [--ef-range 20,75] [--models DIR ...] [--max-detectability X] [--seed S]
        [--pool-label TEXT] [--size PX --fps F --frames N]
                                                    a blinded study of acquired beats and their counterfactuals;
                                                    runs the automatic reader and prints the study's ID
    echolvfm quiz report DB [--study ID] [--json]   statistics of the scored answers (text table or JSON)
    echolvfm quiz export DB OUT.csv [--study ID]    raw answers, one row per answer, every block
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli import CommandError
from ..quiz_reader import DEFAULT_MAX_DETECTABILITY


def _ef_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in %% such as 20,75; got {text!r}") from None
    return lo, hi


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quiz", help="realism quiz: set up a study, statistics report, raw answer export")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    cp = actions.add_parser(
        "create", help="set up a blinded real-vs-synthetic study (half real, half generated) and print its ID",
        description="The pool's cines are cut into whole beats; each beat goes to one arm only. Real cases show a "
                    "window of a real-arm beat; synthetic cases show a window of a synthetic-arm beat rendered by a "
                    "generator (its motion moving the beat's own frames) at an EF drawn from --ef-range. Every case "
                    "goes through one presentation (window, frame rate, size, grey levels, encoder, frame sizes and "
                    "file size). Before storing, an automatic reader (a classifier two-sample test, cross-validated "
                    "over the cases) tries to tell the arms apart; its accuracy and 95 %% interval are stored with "
                    "the study. Videos go to media/<study ID>/ next to DB.")
    cp.add_argument("db", help="quiz database (quiz.sqlite; created when missing)")
    cp.add_argument("--pool", nargs="+", default=None, metavar="DIR_OR_FILE",
                    help="acquired cines: folders (their files), files, 'color3d' (pydicom-data's 120-frame cine) "
                         "or 'sample' (pydicom's 30-frame cut of it); default: the built-in cine")
    cp.add_argument("--data", default=None, metavar="DIR",
                    help="a CAMUS folder or an `echolvfm prepare` folder to add --camus-loops real-anatomy loops from")
    cp.add_argument("--camus-loops", type=int, default=0, metavar="N",
                    help="loops of real CAMUS anatomy with synthesised motion to add (labelled so in each case's "
                         "provenance), one per patient")
    cp.add_argument("--camus-split", default="valid",
                    help="CAMUS split the loops come from ('any' for all; default valid, unseen by the generator)")
    cp.add_argument("--cases", type=int, required=True, help="scored cases, even (half real, half synthetic)")
    cp.add_argument("--calibration", type=int, default=4, metavar="K",
                    help="practice cases shown first, with feedback, not scored (default 4)")
    cp.add_argument("--ef-range", type=_ef_range, default=(20.0, 75.0), metavar="LOW,HIGH",
                    help="EFs (%%) of the synthetic cases (default 20,75)")
    cp.add_argument("--models", nargs="+", default=None, metavar="DIR",
                    help="folders with generator/ and vae/ (the first also segmenter/); with several, synthetic "
                         "cases are dealt over their generators and the report gives each one's share judged "
                         "synthetic (default: the bundled assets/)")
    cp.add_argument("--max-detectability", type=float, default=DEFAULT_MAX_DETECTABILITY, metavar="X",
                    help="refuse the study when the automatic reader's accuracy is above X (default "
                         f"{DEFAULT_MAX_DETECTABILITY}; 1 never refuses)")
    cp.add_argument("--size", type=int, default=256, metavar="PX", help="video side in pixels (default 256)")
    cp.add_argument("--fps", type=float, default=30.0, help="video frame rate (default 30)")
    cp.add_argument("--frames", type=int, default=24, metavar="N",
                    help="frames per video: a window of N / fps seconds of one beat, played cyclically (default 24)")
    cp.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    cp.add_argument("--seed", type=int, default=0,
                    help="seed of the arms, windows, EFs, generators and automatic reader (default 0)")
    cp.add_argument("--pool-label", default=None, metavar="TEXT",
                    help="what the --pool cines are, e.g. 'acquired A4C cines, site X' (stored and shown in the "
                         "results as 'TEXT: N cines cut into M whole beats')")
    cp.set_defaults(func=create)

    rp = actions.add_parser("report", help="accuracy, exact CI and p-value, confusion, kappas of a study")
    rp.add_argument("db", help="quiz database (quiz.sqlite)")
    rp.add_argument("--study", default=None, help="study ID (needed when the database holds several)")
    rp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rp.set_defaults(func=report)

    ep = actions.add_parser("export", help="write every answer to a CSV file")
    ep.add_argument("db", help="quiz database (quiz.sqlite)")
    ep.add_argument("out", help="CSV file to write")
    ep.add_argument("--study", default=None, help="only this study (default: all)")
    ep.set_defaults(func=export)


def _open(db: str):
    from ..quiz.store import QuizStore

    if not Path(db).is_file():  # QuizStore would create an empty database
        raise FileNotFoundError(2, os.strerror(2), db)
    return QuizStore(db)


def _pick_study(store, study_id: str | None):
    studies = store.studies()
    if study_id is not None:
        try:
            return store.study(study_id)
        except KeyError:
            raise CommandError(f"No study {study_id!r} in the database; it holds {[s.id for s in studies]}.") from None
    if not studies:
        raise CommandError("The database holds no study yet.")
    if len(studies) > 1:
        ids = ", ".join(s.id for s in studies)
        raise CommandError(f"The database holds {len(studies)} studies; pick one with --study ({ids}).")
    return studies[0]


def create(args: argparse.Namespace) -> int:
    from ..echo import EchoLoadError
    from ..ef import check_requested_ef
    from ..estimators.segmentation import SegmentationEF
    from ..models.vae import EchoCodec
    from ..pipelines.counterfactual import default_models_dir, load_generator
    from ..pipelines.render import BeatRenderer
    from ..quiz.pool import acquired_pool, camus_pool, combine_pools, default_pool_specs
    from ..quiz.present import VideoSpec
    from ..quiz.store import QuizStore
    from ..quiz.study import MIN_POOL_BEATS, create_study
    from ..quiz.synth import BeatSynth, model_version
    from ..quiz_reader import automatic_reader

    try:
        for ef in args.ef_range:
            check_requested_ef(ef, "--ef-range")
        spec = VideoSpec(size=args.size, fps=args.fps, n_frames=args.frames)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if (args.data is None) != (args.camus_loops == 0):
        raise CommandError("--data and --camus-loops go together: --data DIR --camus-loops N (N >= 1).")
    if args.camus_loops < 0 or not 0.5 <= args.max_detectability <= 1.0:
        raise CommandError("--camus-loops must be >= 0 and --max-detectability between 0.5 and 1.")
    folders = [Path(m) for m in args.models] if args.models else [default_models_dir()]
    for folder in folders:
        for name in ("generator", "vae") + (("segmenter",) if folder == folders[0] else ()):
            if not (folder / name / "config.json").is_file():
                raise CommandError(f"No {name} in {folder / name}; point --models at folders with generator/ and "
                                   "vae/ (and segmenter/ in the first).")
    seg = SegmentationEF.from_pretrained(folders[0] / "segmenter", device=args.device)
    pool = acquired_pool(args.pool if args.pool else default_pool_specs(), seg, args.pool_label)
    if args.camus_loops:
        split = None if args.camus_split == "any" else args.camus_split
        try:
            pool = combine_pools(pool, camus_pool(args.data, args.camus_loops, seg, split, args.seed))
        except ValueError as exc:  # no patient could be prepared
            raise CommandError(str(exc)) from None
    if pool.skipped:
        print(f"Left out {len(pool.skipped)}: " + "; ".join(pool.skipped))
    if len(pool) < MIN_POOL_BEATS:
        raise CommandError(f"The pool holds {len(pool)} whole beat(s); a realism study needs at least "
                           f"{MIN_POOL_BEATS} (one real, one synthetic): add cines with --pool.")
    generators = {}
    for folder in folders:
        try:
            renderer = BeatRenderer(load_generator(folder / "generator", device=args.device),
                                    EchoCodec.from_pretrained(folder / "vae", device=args.device))
        except ValueError as exc:
            raise CommandError(f"{folder / 'generator'}: {exc}") from None
        generators[model_version(folder / "generator")] = BeatSynth(renderer, seg)

    def detect(real, synthetic, real_groups, synthetic_groups):
        return automatic_reader(real, synthetic, real_groups, synthetic_groups, seed=args.seed).to_dict()

    db = Path(args.db)
    try:
        study = create_study(
            pool.beats, args.cases, generators, out_dir=db.parent, real_pool_source=pool.source,
            ef_range=args.ef_range, seed=args.seed, calibration_n=args.calibration, spec=spec, store=QuizStore(db),
            detector=detect, max_detectability=args.max_detectability,
        )
    except (ValueError, EchoLoadError) as exc:
        raise CommandError(str(exc)) from None
    c = study.record.config
    a = c["automatic_reader"]
    print(f"Study {study.id} in {db}: {c['n_cases']} scored + {c['calibration_n']} calibration cases "
          f"({c['n_real']} real from {len(c['beats']['real'])} beat(s), {c['n_synthetic']} synthetic from "
          f"{len(c['beats']['synthetic'])} beat(s), at most {c['max_cases_per_beat']} cases per beat), model "
          f"{study.record.model_version}, seed {args.seed}")
    print(f"Real pool: {study.record.real_pool_source}")
    print(f"Automatic reader (C2ST, {a['folds']} folds{'' if a['grouped_by_source'] else ', not grouped by beat'}): "
          f"accuracy {a['accuracy']:.3f} (95 % CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}, {a['n']} cases); "
          f"studies above {args.max_detectability:g} are refused")
    print(study.id)
    return 0


def report(args: argparse.Namespace) -> int:
    from ..quiz.report import format_report, study_report

    store = _open(args.db)
    r = study_report(store, _pick_study(store, args.study).id)
    print(json.dumps(r, indent=2, allow_nan=False) if args.json else format_report(r))
    return 0


def export(args: argparse.Namespace) -> int:
    from ..quiz.store import results_to_csv

    store = _open(args.db)
    if args.study is not None:
        _pick_study(store, args.study)
    n = results_to_csv(store, args.out, args.study)
    print(f"Wrote {n} answers to {args.out}")
    return 0
