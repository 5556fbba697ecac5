"""Writing a prepared data folder (``echolvfm prepare``; the format and its reader are
:mod:`echolvfm_core.data.prepared`).

:func:`prepare` reads and preprocesses the CAMUS ED/ES pairs (in worker processes when asked), registers each pair
(ED -> ES velocity) and measures how well the registration and the rendered loops agree with the expert labels,
draws each loop's recipe (timing, counterfactual strength alpha, or a phantom anatomy), measures every loop's EF on
its rendered labels, and writes ``meta.json``, ``pairs.npz``, ``manifest.csv``, ``recipes.json`` and
``prepare_report.json``.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..echo import Echo
from ..ef import ef_from_pair
from ..io import display_name, to_uint8
from .loops import (
    CardiacPair,
    CycleTiming,
    RegistrationConfig,
    pair_agreement,
    register_pairs,
    sample_timing,
    sharpness,
)
from .prepared import (
    DATA_FILES,
    EF_METHOD,
    FORMAT,
    MANIFEST_FIELDS,
    VERSION,
    cardiac_pair,
    loop_measures,
    render_camus_recipe,
    render_phantom_recipe,
)

__all__ = ["ALPHA_RANGE", "PHANTOM_EF_RANGE", "PrepareConfig", "prepare"]

log = logging.getLogger(__name__)

#: Range of counterfactual deformation scales (the first loop of every patient uses alpha = 1).
ALPHA_RANGE = (0.3, 1.5)
#: Range of EFs (%) requested from phantoms.
PHANTOM_EF_RANGE = (10.0, 80.0)
VALID_FRACTION = 0.1
#: Loops per patient whose frames are rendered at prepare time to measure sharpness (alpha = 1 and one other).
SHARPNESS_LOOPS = 2
#: Sharpness is measured this many pixels inside the fan's edge.
SHARPNESS_MARGIN = 4


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of one preparation (saved in meta.json).

    Attributes:
        loops_per_patient: K loops per CAMUS patient (the first at alpha = 1, the others at alphas stratified over
            :data:`ALPHA_RANGE`); 0 prepares only the real frames.
        size: model grid side S.
        fine_factor: images are also kept at ``fine_factor * S`` for sharp warping (see :class:`CardiacPair`).
        phantom: number of phantom loops, grouped ``max(K, 1)`` per phantom anatomy.
        seed: seed of splits, timings, alphas and phantoms.
        workers: worker processes (1 runs everything in this process).
        patients: restrict to these CAMUS patient ids / numbers (None: all).
        blend_width: ED -> ES cross-fade width in phase units.
        registration: :class:`RegistrationConfig`.
    """

    loops_per_patient: int = 4
    size: int = 112
    fine_factor: int = 2
    phantom: int = 0
    seed: int = 0
    workers: int = 1
    patients: tuple[str, ...] | None = None
    blend_width: float = 0.3
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self) -> None:
        if self.loops_per_patient < 0 or self.phantom < 0:
            raise ValueError("loops_per_patient and phantom must be zero or more.")
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels; got {self.size}.")
        if self.fine_factor < 2:
            raise ValueError(f"fine_factor must be an integer >= 2; got {self.fine_factor}.")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1; got {self.workers}.")


@dataclass
class _Loaded:
    patient: str
    split: str | None
    images: np.ndarray  # (2, S, S) uint8
    labels: np.ndarray  # (2, S, S) uint8
    mask: np.ndarray  # (S, S) bool
    fine: np.ndarray | None  # (2, kS, kS) uint8
    spacing_mm: tuple[float, float]
    ef_native: float
    ef_grid: float


def _load_patients(root: str, patient_ids: list[str], size: int, fine: int | None) -> list[_Loaded | tuple[str, str]]:
    """Read and preprocess patients (one worker task): a _Loaded per patient, or (patient, reason) when skipped."""
    from ..echo import EchoLoadError
    from ..io import read_camus
    from ..preprocess import find_sector, preprocess

    out: list[_Loaded | tuple[str, str]] = []
    for patient_id in patient_ids:
        try:  # one patient at a time, so that an unreadable file skips its patient only
            p = next(read_camus(root, views=("4CH",), patients=[patient_id], half_sequences=False), None)
        except EchoLoadError as exc:
            out.append((patient_id, str(exc)))
            continue
        if p is None:
            out.append((patient_id, "no 4CH ED and ES images"))
            continue
        view = p.views["4CH"]
        ed, es = view.ed, view.es
        if ed.labels is None or es.labels is None:
            out.append((p.patient_id, "no expert labels"))
            continue
        if ed.frames.shape != es.frames.shape:
            out.append((p.patient_id, f"ED {ed.frames.shape[1:]} and ES {es.frames.shape[1:]} differ in size"))
            continue
        frames = np.concatenate([ed.frames, es.frames])
        labels = np.concatenate([ed.labels, es.labels])
        try:
            sector = find_sector(frames)  # one fan for both frames, so both get the same crop
            pre = preprocess(
                Echo(frames=frames, labels=labels, spacing_mm=ed.spacing_mm, source_format=ed.source_format,
                     labelled=(0, 1)),
                size=size,
                display_size=size * fine if fine else size,
                sector=sector,
            )
            lab = pre.echo.labels
            ef_native = ef_from_pair(ed.labels[0], es.labels[0], ed.spacing_mm, EF_METHOD).ef
            ef_grid = ef_from_pair(lab[0], lab[1], None, EF_METHOD).ef
        except ValueError as exc:  # EchoLoadError is a ValueError; EF maths raises ValueError on bad labels
            out.append((p.patient_id, str(exc)))
            continue
        spacing = pre.echo.spacing_mm or (float("nan"), float("nan"))
        out.append(
            _Loaded(
                patient=p.patient_id,
                split=p.split,
                images=to_uint8(pre.echo.frames, clip=True),
                labels=lab.astype(np.uint8),
                mask=pre.mask.astype(bool),
                fine=to_uint8(pre.display.frames, clip=True) if fine else None,
                spacing_mm=(float(spacing[0]), float(spacing[1])),
                ef_native=float(ef_native),
                ef_grid=float(ef_grid),
            )
        )
    return out


def _register_and_measure(
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    fine: np.ndarray,
    recipes: list[list[tuple[str, dict]]],
    config: RegistrationConfig,
    blend_width: float,
) -> tuple[np.ndarray, list[dict], list[list[dict]]]:
    """Register a batch of pairs, then render each pair's loops to measure them (one worker task).

    Returns:
        (float16 velocities (B, 2, g, g), per-pair agreement dicts, per-pair lists of per-loop measures).
    """
    from scipy.ndimage import binary_erosion

    vel = register_pairs(images[:, 0], images[:, 1], labels[:, 0], labels[:, 1], config).astype(np.float16)
    pairs = {"images": images, "labels": labels, "mask": masks, "fine": fine, "velocity": vel}
    agreements, measures = [], []
    objects: dict[int, CardiacPair] = {}
    for i in range(len(images)):
        objects[i] = cardiac_pair(pairs, i)
        ag = pair_agreement(objects[i], config)
        agreements.append({"ssim_raw": ag.ssim_raw, "ssim_es": ag.ssim_es, "ssim_mid": ag.ssim_mid,
                           "dice_es": ag.dice_es})
        core = binary_erosion(masks[i], iterations=SHARPNESS_MARGIN)  # speckle, not the fan's edge
        real_sharp = sharpness(images[i], core)
        per_loop = []
        for j, (loop_id, recipe) in enumerate(recipes[i]):
            # EF needs only the labels; images (for the sharpness check) of the first SHARPNESS_LOOPS loops.
            with_images = j < SHARPNESS_LOOPS
            loop = render_camus_recipe(pairs, {**recipe, "pair": i}, config, blend_width, with_images, objects)
            ef, es, ef_maxmin = loop_measures(loop.labels, loop.es_index)
            sharp = sharpness(loop.frames, core) / real_sharp if with_images and real_sharp > 0 else None
            per_loop.append(
                {
                    "loop_id": loop_id,
                    "ef": ef,
                    "ef_maxmin": ef_maxmin,
                    "es_index": es,
                    "n_frames": len(loop.labels),
                    "sharpness_ratio": sharp,
                }
            )
        measures.append(per_loop)
    return vel, agreements, measures


def _phantom_measure(loop_id: str, recipe: dict, size: int) -> dict:
    loop = render_phantom_recipe(recipe, size)
    ef, es, ef_maxmin = loop_measures(loop.labels, CycleTiming(**recipe["timing"]).es_index)
    return {"loop_id": loop_id, "ef": ef, "ef_maxmin": ef_maxmin, "es_index": es, "n_frames": len(loop.frames)}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # share the cores between worker processes instead of oversubscribing them


def _seeded_split(ids: list[str], seed: int, salt: int) -> dict[str, str]:
    """Patient-level split: a seeded VALID_FRACTION of ``ids`` (at least one when there are two or more) is valid."""
    rng = np.random.default_rng([seed, salt])
    order = rng.permutation(len(ids))
    n_valid = round(VALID_FRACTION * len(ids))
    if len(ids) >= 2:
        n_valid = max(n_valid, 1)
    valid = {ids[i] for i in order[:n_valid]}
    return {p: ("valid" if p in valid else "train") for p in ids}


def _alphas(k: int, rng: np.random.Generator) -> list[float]:
    """alpha = 1 first, then k - 1 alphas stratified over ALPHA_RANGE."""
    if k == 0:
        return []
    edges = np.linspace(*ALPHA_RANGE, k) if k > 1 else np.array([])
    out = [1.0]
    for j in range(k - 1):
        out.append(round(float(rng.uniform(edges[j], edges[j + 1])), 4))
    return out


def _max_abs(values: list[float]) -> float | None:
    return float(np.max(np.abs(values))) if len(values) else None


def _summary(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {
        "n": int(v.size),
        "median": float(np.median(v)),
        "mean": float(v.mean()),
        "min": float(v.min()),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "max": float(v.max()),
    }


def prepare(
    camus: str | Path | None,
    out: str | Path,
    config: PrepareConfig = PrepareConfig(),
    progress: bool = True,
) -> dict:
    """Write a prepared data folder (see the module docstring) and return its report.

    Args:
        camus: CAMUS folder (patientNNNN/ folders, optional splits.csv); None for a phantom-only folder.
        out: output folder (created; existing prepared files in it are replaced).
        config: :class:`PrepareConfig`.
        progress: show tqdm progress bars.

    Returns:
        The report written to ``prepare_report.json``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if camus is None and config.phantom == 0:
        raise ValueError("nothing to prepare: give a CAMUS folder or ask for phantom loops.")
    k = config.loops_per_patient
    s = config.size
    workers = config.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    executor = (
        ProcessPoolExecutor(workers, mp_context=_spawn(), initializer=_init_worker, initargs=(threads,))
        if workers > 1 else None
    )
    timings: dict[str, float] = {}
    try:
        # 1. Read and preprocess the CAMUS pairs.
        loaded: list[_Loaded] = []
        skipped: list[tuple[str, str]] = []
        if camus is not None:
            t0 = time.perf_counter()
            ids = _camus_ids(camus, config.patients)
            chunks = [ids[i : i + 8] for i in range(0, len(ids), 8)]
            bar = tqdm(total=len(ids), desc="read + preprocess", unit="patient", disable=not progress,
                       dynamic_ncols=True)
            fine = config.fine_factor if k > 0 else None
            for result in _map(executor, _load_patients, [(str(camus), c, s, fine) for c in chunks]):
                for item in result:
                    if isinstance(item, _Loaded):
                        loaded.append(item)
                    else:
                        skipped.append(item)
                        log.warning("skipped %s: %s", *item)
                    bar.update(1)
            bar.close()
            timings["read_preprocess_s"] = time.perf_counter() - t0
            if not loaded:
                patient, why = skipped[0]
                more = f" (and {len(skipped) - 1} more, in the log)" if len(skipped) > 1 else ""
                raise ValueError(f"No usable CAMUS patient under {display_name(camus)}; {patient}: "
                                 f"{why.rstrip('.')}{more}.")
        loaded.sort(key=lambda x: x.patient)
        unsplit = [x.patient for x in loaded if not x.split]
        fallback = _seeded_split(unsplit, config.seed, 1) if unsplit else {}
        splits = [x.split or fallback[x.patient] for x in loaded]
        n = len(loaded)

        # 2. Recipes for the CAMUS loops.
        recipes: dict[str, dict] = {}
        rows: list[dict] = []
        pair_recipes: list[list[tuple[str, dict]]] = []
        for i, x in enumerate(loaded):
            rng = np.random.default_rng([config.seed, 2, i])
            mine = []
            for j, alpha in enumerate(_alphas(k, rng)):
                timing, fps = sample_timing(rng)
                recipe = {"pair": i, "alpha": alpha, "fps": round(fps, 4), "timing": timing.to_dict()}
                loop_id = f"{x.patient}_a{j}"
                recipes[loop_id] = recipe
                mine.append((loop_id, recipe))
                rows.append({"loop_id": loop_id, "patient": x.patient, "split": splits[i], "source": "camus",
                             "alpha": alpha, "fps": round(fps, 4)})
            pair_recipes.append(mine)

        pairs: dict[str, np.ndarray] = {
            "patient": np.array([x.patient for x in loaded], dtype="<U32"),
            "split": np.array(splits, dtype="<U16"),
            "images": np.stack([x.images for x in loaded]) if n else np.zeros((0, 2, s, s), np.uint8),
            "labels": np.stack([x.labels for x in loaded]) if n else np.zeros((0, 2, s, s), np.uint8),
            "mask": np.stack([x.mask for x in loaded]) if n else np.zeros((0, s, s), bool),
            "spacing_mm": np.array([x.spacing_mm for x in loaded], dtype=np.float32).reshape(-1, 2),
            "ef_native": np.array([x.ef_native for x in loaded], dtype=np.float32),
            "ef_grid": np.array([x.ef_grid for x in loaded], dtype=np.float32),
        }

        # 3. Register the pairs and measure their loops.
        measures: dict[str, dict] = {}
        agreements: list[dict] = []
        if k > 0 and n:
            t0 = time.perf_counter()
            pairs["fine"] = np.stack([x.fine for x in loaded])
            g = config.registration.grid
            velocity = np.zeros((n, 2, g, g), dtype=np.float16)
            b = config.registration.batch
            tasks = [
                (
                    pairs["images"][i : i + b],
                    pairs["labels"][i : i + b],
                    pairs["mask"][i : i + b],
                    pairs["fine"][i : i + b],
                    pair_recipes[i : i + b],
                    config.registration,
                    config.blend_width,
                )
                for i in range(0, n, b)
            ]
            bar = tqdm(total=n, desc="register + render", unit="patient", disable=not progress, dynamic_ncols=True)
            for t_i, (vel, ags, meas) in enumerate(_map(executor, _register_and_measure, tasks)):
                velocity[t_i * b : t_i * b + len(vel)] = vel
                agreements.extend(ags)
                for per_loop in meas:
                    for m in per_loop:
                        measures[m["loop_id"]] = m
                bar.update(len(vel))
            bar.close()
            pairs["velocity"] = velocity
            timings["register_render_s"] = time.perf_counter() - t0

        # 4. Phantom loops.
        phantom_rows: list[dict] = []
        if config.phantom:
            t0 = time.perf_counter()
            per = max(k, 1)
            n_anat = math.ceil(config.phantom / per)
            names = [f"phantom{j + 1:04d}" for j in range(n_anat)]
            phantom_split = _seeded_split(names, config.seed, 3)
            tasks = []
            count = 0
            for j, name in enumerate(names):
                rng = np.random.default_rng([config.seed, 4, j])
                anatomy_seed = int(rng.integers(0, 2**31 - 1))
                m = min(per, config.phantom - count)
                edges = np.linspace(*PHANTOM_EF_RANGE, m + 1)
                for q in range(m):
                    ef_req = round(float(rng.uniform(edges[q], edges[q + 1])), 2)
                    timing, fps = sample_timing(rng)
                    recipe = {"anatomy_seed": anatomy_seed, "requested_ef": ef_req, "fps": round(fps, 4),
                              "timing": timing.to_dict()}
                    loop_id = f"{name}_e{q}"
                    recipes[loop_id] = recipe
                    phantom_rows.append({"loop_id": loop_id, "patient": name, "split": phantom_split[name],
                                         "source": "phantom", "alpha": 1.0, "fps": round(fps, 4)})
                    tasks.append((loop_id, recipe, s))
                    count += 1
            bar = tqdm(total=len(tasks), desc="phantoms", unit="loop", disable=not progress, dynamic_ncols=True)
            for m in _map(executor, _phantom_measure, tasks):
                measures[m["loop_id"]] = m
                bar.update(1)
            bar.close()
            timings["phantom_s"] = time.perf_counter() - t0
    finally:
        if executor is not None:
            executor.shutdown()

    # 5. Write.
    all_rows = []
    for r in rows + phantom_rows:
        m = measures[r["loop_id"]]
        all_rows.append({**r, "ef": round(m["ef"], 4), "ed_index": 0, "es_index": m["es_index"],
                         "n_frames": m["n_frames"]})
    _write_manifest(out / "manifest.csv", all_rows)
    np.savez_compressed(out / "pairs.npz", **pairs)
    (out / "recipes.json").write_text(json.dumps(recipes))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "size": s,
        "fine_factor": config.fine_factor,
        "loops_per_patient": k,
        "phantom": config.phantom,
        "seed": config.seed,
        "blend_width": config.blend_width,
        "ef_method": EF_METHOD,
        "alpha_range": list(ALPHA_RANGE),
        "registration": config.registration.to_dict(),
        "camus": str(camus) if camus is not None else None,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    timings["total_s"] = time.perf_counter() - t_start
    report = _report(pairs, splits, agreements, all_rows, measures, recipes, skipped, timings, config, threads)
    report["data_bytes"] = sum((out / name).stat().st_size for name in DATA_FILES)
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2))
    return report


def _report(pairs, splits, agreements, rows, measures, recipes, skipped, timings, config, threads) -> dict:
    split_arr = np.array(splits)
    by_split: dict[str, dict] = {}
    for sp in sorted(set(splits)):
        sel = np.flatnonzero(split_arr == sp)
        entry: dict = {"patients": len(sel)}
        if agreements:
            for key in ("ssim_raw", "ssim_es", "ssim_mid", "dice_es"):
                entry[key] = _summary(agreements[i][key] for i in sel)
        by_split[sp] = entry
    camus_rows = [r for r in rows if r["source"] == "camus"]
    alpha1 = [r for r in camus_rows if r["alpha"] == 1.0]
    index = {str(p): i for i, p in enumerate(pairs["patient"])}
    alpha1_err = [r["ef"] - float(pairs["ef_grid"][index[r["patient"]]]) for r in alpha1]
    alpha1_maxmin_err = [measures[r["loop_id"]]["ef_maxmin"] - float(pairs["ef_grid"][index[r["patient"]]])
                         for r in alpha1]
    maxmin_gap = [measures[r["loop_id"]]["ef_maxmin"] - r["ef"] for r in rows]
    phantom_rows = [r for r in rows if r["source"] == "phantom"]
    phantom_err = [r["ef"] - recipes[r["loop_id"]]["requested_ef"] for r in phantom_rows]
    grid_vs_native = (pairs["ef_grid"] - pairs["ef_native"]).tolist()
    sharp_all = [measures[r["loop_id"]]["sharpness_ratio"] for r in camus_rows]
    sharp_a1 = [measures[r["loop_id"]]["sharpness_ratio"] for r in alpha1]
    return {
        "counts": {
            "patients": len(pairs["patient"]),
            "skipped": [{"patient": p, "reason": why} for p, why in skipped],
            "loops_camus": len(camus_rows),
            "loops_phantom": len(phantom_rows),
            "by_split": by_split,
        },
        "registration_note": (
            "SSIM (skimage, data_range 1) at the model grid: ssim_raw = ED vs ES unwarped; ssim_es = ED warped "
            "by exp(v) vs the real ES; ssim_mid = ED warped by exp(v/2) vs ES warped by exp(-v/2) (mid-systole); "
            "dice_es = mean Dice (LV, myo, LA) of warped ED labels vs ES labels."
        ),
        "sharpness_ratio": {
            "note": f"mean squared Laplacian inside the fan ({SHARPNESS_MARGIN} px from its edge), loop frames / "
            "the pair's real ED and ES frames "
            f"(first {SHARPNESS_LOOPS} loops of every patient: alpha = 1 and one counterfactual)",
            "measured_loops": _summary(sharp_all),
            "alpha_1_loops": _summary(sharp_a1),
        },
        "ef_alpha1_minus_real_labels": {
            "note": "EF of alpha = 1 loops (volumes of the rendered labels at frame 0 and the ES phase) minus EF of "
            "the real ED/ES labels, both at the model grid, area-length",
            **_summary(alpha1_err),
            "max_abs": _max_abs(alpha1_err),
            "n_over_1_point": int(np.sum(np.abs(alpha1_err) > 1.0)) if alpha1_err else 0,
        },
        "ef_alpha1_maxmin_minus_real_labels": {
            "note": "the same with the loop's EF read as (max V - min V) / max V over all frames, as a reader "
            "without the ES timing would: differs where intermediate frames wobble by more than the stroke volume",
            **_summary(alpha1_maxmin_err),
            "max_abs": _max_abs(alpha1_maxmin_err),
            "n_over_1_point": int(np.sum(np.abs(alpha1_maxmin_err) > 1.0)) if alpha1_maxmin_err else 0,
        },
        "ef_maxmin_minus_ef_all_loops": {**_summary(maxmin_gap), "max_abs": _max_abs(maxmin_gap)},
        "ef_grid_minus_native": {
            "note": "EF of the real labels at the model grid minus at the native resolution in mm (area-length): "
                    "the cost of resampling",
            **_summary(grid_vs_native),
            "max_abs": _max_abs(grid_vs_native),
        },
        "ef_camus_loops": _summary(r["ef"] for r in camus_rows),
        "ef_real_pairs": _summary(pairs["ef_grid"].tolist()),
        "ef_phantom_loops": _summary(r["ef"] for r in phantom_rows),
        "phantom_ef_minus_requested": {
            **_summary(phantom_err),
            "max_abs": _max_abs(phantom_err),
        },
        "n_frames": _summary(r["n_frames"] for r in rows),
        "timing_s": timings,
        "workers": config.workers,
        "threads_per_worker": threads if config.workers > 1 else None,
        "cpu_count": os.cpu_count(),
    }


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(MANIFEST_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in MANIFEST_FIELDS})


def _camus_ids(root: str | Path, patients: Iterable[str | int] | None) -> list[str]:
    """Patient ids under a CAMUS root, optionally restricted, without reading their files."""
    from ..io import read_camus
    from ..io.camus import camus_splits

    read_camus(root, views=("4CH",), patients=patients, half_sequences=False)  # validates the folder and ids now
    ids = list(camus_splits(root))
    if patients is not None:
        wanted = {f"patient{int(p):04d}" if str(p).isdigit() else str(p).lower() for p in patients}
        ids = [p for p in ids if p in wanted]
    return ids


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _map(executor: ProcessPoolExecutor | None, fn: Callable, tasks: list[tuple]):
    """Ordered map over argument tuples, in worker processes when an executor is given."""
    if executor is None:
        for args in tasks:
            yield fn(*args)
        return
    futures = [executor.submit(fn, *args) for args in tasks]
    for f in futures:
        yield f.result()
