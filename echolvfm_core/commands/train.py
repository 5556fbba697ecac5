"""``echolvfm train MODEL``: one readable training script per model, under :mod:`echolvfm_core.training`.

The scripts report through logging and tqdm; while one runs, the library's INFO messages go to standard output,
one plain line each (tqdm's bar stays on standard error).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: model name -> module in echolvfm_core.training exposing ``train(args) -> int``.
TRAINERS = {
    "vae": "vae",
    "segmenter": "segmenter",
    "ef-regressor": "ef_regressor",
    "generator": "generator",
    "jepa": "jepa",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one of the bundled models on a prepared data set")
    models = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, module in TRAINERS.items():
        mp = models.add_parser(name, help=f"train the {name}")
        mp.add_argument("--data", required=True, help="folder written by `echolvfm prepare`")
        mp.add_argument("--preset", default="demo", help="size / schedule preset (demo, tiny, ...)")
        mp.add_argument("--out", required=True, help="output folder (checkpoints, final model, metrics)")
        mp.add_argument("--seed", type=int, default=0)
        mp.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        mp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        mp.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
        if name == "generator":
            mp.add_argument("--vae", default=None, help="codec folder (default: the bundled assets/vae)")
            mp.add_argument("--flow", default="meanflow", choices=("meanflow", "linear"),
                            help="objective: the one-step MeanFlow of the preset, or the linear flow-matching baseline "
                                 "on the same data and schedule (EF dropout for classifier-free guidance)")
            mp.add_argument("--init", default=None,
                            help="warm start: a saved generator folder whose matching weights initialise the network")
            mp.add_argument("--lr", type=float, default=None,
                            help="override the preset's peak learning rate (e.g. a lower one to continue a warm start)")
        if name == "ef-regressor":
            mp.add_argument("--backbone", default="r2plus1d", choices=("r2plus1d", "jepa"),
                            help="video backbone: a (2+1)D CNN trained with the regressor, or the EchoJEPA encoder "
                                 "(frozen)")
            mp.add_argument("--jepa", default=None, help="EchoJEPA folder for --backbone jepa (default: assets/jepa)")
        mp.set_defaults(func=_runner(module))


def _runner(module: str):
    def run(args: argparse.Namespace) -> int:
        from ..cli import CommandError
        from ..training.common import TrainingError

        mod = importlib.import_module(f"echolvfm_core.training.{module}")
        library = logging.getLogger("echolvfm_core")
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        level = library.level
        library.addHandler(handler)
        library.setLevel(logging.INFO)
        try:
            return int(mod.train(args) or 0)
        except TrainingError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            library.removeHandler(handler)
            library.setLevel(level)

    return run
