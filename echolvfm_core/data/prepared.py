"""Prepared training data: real CAMUS ED/ES pairs, their registrations and loop recipes; loops rendered on access.

A prepared folder (written by :func:`prepare`, i.e. ``echolvfm prepare``)::

    meta.json            format, version, grid size, registration config, EF method, seed
    pairs.npz            per CAMUS patient: preprocessed ED/ES images and labels (uint8, S x S), fan mask,
                         finer copies of the images (uint8, kS x kS), ED -> ES velocity (float16), EFs
    manifest.csv         one row per loop: loop_id, patient, split, source, alpha, ef, ed_index, es_index, fps,
                         n_frames (EF in %, area-length, measured on the rendered labels at prepare time)
    recipes.json         per loop: how to render it (pair index or phantom anatomy seed, timing, alpha)
    prepare_report.json  measured registration quality, EF agreement, sizes and timings

Full loops of ~450 patients x K alphas x ~30 frames would not fit the size budget, so frames are rendered
deterministically from the stored pair and recipe in :meth:`PreparedLoops.__getitem__` (about 0.1 s per 30-frame
loop on one CPU core; an LRU cache keeps recent ones, ``cache_size=len(ds)`` all of them, about 0.8 MB a loop).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..echo import ClinicalInfo, Echo
from ..ef import ef_from_pair, ejection_fraction, lv_volumes
from ..io._common import display_name
from .loops import (
    CardiacPair,
    CycleTiming,
    RegistrationConfig,
    pair_agreement,
    register_pairs,
    render_loop,
    sample_timing,
    sharpness,
)
from .phantom import render_phantom

__all__ = [
    "FORMAT",
    "MANIFEST_FIELDS",
    "VERSION",
    "LoopDeformation",
    "LoopSample",
    "PrepareConfig",
    "PreparedLoops",
    "RealFrames",
    "collate_loops",
    "prepare",
]

log = logging.getLogger(__name__)

FORMAT, VERSION = "echolvfm-prepared", 1
MANIFEST_FIELDS = ("loop_id", "patient", "split", "source", "alpha", "ef", "ed_index", "es_index", "fps", "n_frames")
EF_METHOD = "area_length"
#: Range of counterfactual deformation scales (the first loop of every patient uses alpha = 1).
ALPHA_RANGE = (0.3, 1.5)
#: Range of EFs (%) requested from phantoms.
PHANTOM_EF_RANGE = (10.0, 80.0)
VALID_FRACTION = 0.1
#: Loops per patient whose frames are rendered at prepare time to measure sharpness (alpha = 1 and one other).
SHARPNESS_LOOPS = 2
#: Sharpness is measured this many pixels inside the fan's edge.
SHARPNESS_MARGIN = 4
_DATA_FILES = ("meta.json", "pairs.npz", "manifest.csv", "recipes.json")


@dataclass
class LoopSample:
    """One training loop.

    Attributes:
        frames: uint8 (T, S, S); frame 0 is end-diastole.
        labels: uint8 (T, S, S), 0 background, 1 LV cavity, 2 myocardium, 3 left atrium, every frame.
        ef: EF in % (area-length) measured on ``labels``: ``(V[ed] - V[es]) / V[ed]``.
        ed_index: 0. es_index: end of ejection (peak contraction of the motion; for alpha = 1 the real ES frame).
        fps: frames per second.
        patient: patient id ("patient0001", "phantom0003").
        alpha: deformation scale relative to the real ED -> ES motion (1 = the real pair; 1 for phantoms).
        split: "train", "valid" (or "test").
        source: "camus" (real anatomy, synthesised motion) or "phantom" (fully synthetic).
        loop_id: unique id, e.g. "patient0001_a0".
    """

    frames: np.ndarray
    labels: np.ndarray
    ef: float
    ed_index: int
    es_index: int
    fps: float
    patient: str
    alpha: float
    split: str
    source: str
    loop_id: str

    def to_echo(self) -> Echo:
        """The loop as a synthetic :class:`Echo` (frames float32 in [0, 1], labels on every frame)."""
        return Echo(
            frames=self.frames.astype(np.float32) / 255.0,
            fps=self.fps,
            source_format=f"prepared-{self.source}",
            labels=self.labels.copy(),
            labelled=tuple(range(len(self.frames))),
            info=ClinicalInfo(view="4CH", ef=self.ef, ed_index=self.ed_index, es_index=self.es_index),
            synthetic=True,
        )


@dataclass
class RealFrames:
    """The real (unwarped) preprocessed CAMUS frames of a data set's split.

    Attributes:
        images: uint8 (N, S, S); labels: uint8 (N, S, S).
        patients: patient id per frame; phases: "ED" or "ES" per frame (each patient gives ED then ES).
    """

    images: np.ndarray
    labels: np.ndarray
    patients: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_loops(samples: list[LoopSample], max_frames: int | None = None) -> dict:
    """Batch loops of different lengths for a DataLoader (``collate_fn=collate_loops``).

    Loops are zero-padded at the end to the longest (or cut to ``max_frames``); ``mask`` marks real frames.

    Returns:
        dict with tensors frames uint8 (B, T, S, S), labels uint8 (B, T, S, S), mask bool (B, T), n_frames int64
        (B,), ef float32 (B,) in %, ed_index / es_index int64 (B,), fps / alpha float32 (B,), and lists patient,
        split, source, loop_id.
    """
    import torch

    if not samples:
        raise ValueError("cannot collate an empty list of loops.")
    lengths = [len(s.frames) for s in samples]
    t = max(lengths) if max_frames is None else int(max_frames)
    size = samples[0].frames.shape[1:]
    frames = torch.zeros((len(samples), t, *size), dtype=torch.uint8)
    labels = torch.zeros((len(samples), t, *size), dtype=torch.uint8)
    mask = torch.zeros((len(samples), t), dtype=torch.bool)
    for b, s in enumerate(samples):
        if s.frames.shape[1:] != size:
            raise ValueError(f"loops of one batch must share a frame size; got {s.frames.shape[1:]} and {size}.")
        n = min(len(s.frames), t)
        frames[b, :n] = torch.from_numpy(s.frames[:n])
        labels[b, :n] = torch.from_numpy(s.labels[:n])
        mask[b, :n] = True
    return {
        "frames": frames,
        "labels": labels,
        "mask": mask,
        "n_frames": torch.tensor([min(n, t) for n in lengths], dtype=torch.int64),
        "ef": torch.tensor([s.ef for s in samples], dtype=torch.float32),
        "ed_index": torch.tensor([s.ed_index for s in samples], dtype=torch.int64),
        "es_index": torch.tensor([s.es_index for s in samples], dtype=torch.int64),
        "fps": torch.tensor([s.fps for s in samples], dtype=torch.float32),
        "alpha": torch.tensor([s.alpha for s in samples], dtype=torch.float32),
        "patient": [s.patient for s in samples],
        "split": [s.split for s in samples],
        "source": [s.source for s in samples],
        "loop_id": [s.loop_id for s in samples],
    }


# ------------------------------------------------------------------------------------------------------ reading


class PreparedLoops:
    """A prepared folder as a map-style data set of :class:`LoopSample`.

    Args:
        root: folder written by :func:`prepare`.
        split: keep only this split ("train", "valid", ...); None keeps all.
        source: keep only "camus" or "phantom" loops; None keeps both.
        cache_size: rendered loops kept in memory (LRU); 0 disables the cache.
    """

    def __init__(self, root: str | Path, split: str | None = None, source: str | None = None, cache_size: int = 256) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(2, "not a prepared data folder (no meta.json)", str(meta_path))
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(
                f"{self.root} holds format {self.meta.get('format')!r} version {self.meta.get('version')!r}; "
                f"expected {FORMAT!r} version {VERSION} (re-run echolvfm prepare)."
            )
        if source not in (None, "camus", "phantom"):
            raise ValueError(f"source must be 'camus', 'phantom' or None; got {source!r}.")
        self.split, self.source = split, source
        self.size = int(self.meta["size"])
        self.registration = RegistrationConfig(**self.meta["registration"])
        self.blend_width = float(self.meta["blend_width"])
        with np.load(self.root / "pairs.npz", allow_pickle=False) as z:
            self._pairs = {k: z[k] for k in z.files}
        self._pair_index = {str(p): i for i, p in enumerate(self._pairs["patient"])}
        self._recipes = json.loads((self.root / "recipes.json").read_text())
        rows = _read_manifest(self.root / "manifest.csv")
        self.manifest = [r for r in rows if (split is None or r["split"] == split) and (source is None or r["source"] == source)]
        self._by_patient: dict[str, list[int]] = {}
        for i, r in enumerate(self.manifest):
            self._by_patient.setdefault(r["patient"], []).append(i)
        self._cache: OrderedDict[int, LoopSample] = OrderedDict()
        self._pair_objects: dict[int, CardiacPair] = {}  # keep each pair's filled source images
        self.cache_size = int(cache_size)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> LoopSample:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer; got {type(index).__name__}.")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"loop index {index} out of range for {n} loops.")
        index = int(index) % n
        if index in self._cache:
            self._cache.move_to_end(index)
            cached = self._cache[index]  # copies, so a caller editing its arrays cannot change the cache
            return dataclasses.replace(cached, frames=cached.frames.copy(), labels=cached.labels.copy())
        row = self.manifest[index]
        frames, labels = self._render(row)
        sample = LoopSample(
            frames=frames,
            labels=labels,
            ef=row["ef"],
            ed_index=row["ed_index"],
            es_index=row["es_index"],
            fps=row["fps"],
            patient=row["patient"],
            alpha=row["alpha"],
            split=row["split"],
            source=row["source"],
            loop_id=row["loop_id"],
        )
        if self.cache_size > 0:
            self._cache[index] = dataclasses.replace(sample, frames=frames.copy(), labels=labels.copy())
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return sample

    def _render(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        recipe = self._recipes[row["loop_id"]]
        if row["source"] == "phantom":
            loop = _render_phantom_recipe(recipe, self.size)
            return loop.frames, loop.labels
        loop = _render_camus_recipe(self._pairs, recipe, self.registration, self.blend_width, pair_objects=self._pair_objects)
        return loop.frames, loop.labels

    def counterfactual(self, patient: str, alpha: float, timing: CycleTiming | None = None, fps: float = 30.0) -> LoopSample:
        """Render a CAMUS patient's pair at any ``alpha`` (not only the prepared ones), EF measured on its labels.

        Args:
            patient: a CAMUS patient id of this folder (prepared with loops, so its registration is stored).
            alpha: deformation scale in (0, 3]; 1 reproduces the real ED -> ES motion.
            timing: cycle timing (default: 30 frames with the default phases).
            fps: frame rate stored in the sample.
        """
        if "velocity" not in self._pairs:
            raise ValueError(f"{self.root} was prepared without loops (--loops-per-patient 0); it holds no registrations.")
        if patient not in self._pair_index:
            raise KeyError(f"no CAMUS patient {patient!r} in {self.root}.")
        timing = timing or CycleTiming(30)
        i = self._pair_index[patient]
        recipe = {"pair": i, "alpha": float(alpha), "timing": timing.to_dict()}
        loop = _render_camus_recipe(self._pairs, recipe, self.registration, self.blend_width, pair_objects=self._pair_objects)
        ef, es, _ = _loop_measures(loop.labels, loop.es_index)
        return LoopSample(
            frames=loop.frames, labels=loop.labels, ef=ef, ed_index=0, es_index=es, fps=float(fps), patient=patient,
            alpha=float(alpha), split=str(self._pairs["split"][i]), source="camus", loop_id=f"{patient}_alpha{alpha:g}",
        )

    def deformation(self, index: int) -> LoopDeformation | None:
        """How loop ``index`` moves its end-diastolic image, or None for a phantom loop (no registration).

        Frame k of a counterfactual loop (alpha != 1) is the ED image warped by ``exp(scale[k] * velocity)``; an
        alpha = 1 loop follows the same deformation and cross-fades into the real ES image around mid-systole, whose
        registration to ED is that same field at scale 1.
        """
        row = self.manifest[index]
        if row["source"] != "camus":
            return None
        recipe = self._recipes[row["loop_id"]]
        phases = CycleTiming(**recipe["timing"]).phases()
        velocity = np.asarray(self._pairs["velocity"][int(recipe["pair"])], dtype=np.float32)
        return LoopDeformation(velocity, float(recipe["alpha"]) * phases)

    @property
    def patients(self) -> list[str]:
        """Patient ids with at least one loop in this view, in manifest order."""
        return list(self._by_patient)

    def loops_of(self, patient: str) -> list[int]:
        """Indices (into this data set) of the loops of one patient: same anatomy, different EFs."""
        return list(self._by_patient.get(patient, []))

    def real_frames(self) -> RealFrames:
        """The real preprocessed CAMUS ED and ES frames of this view's split (empty for ``source="phantom"``)."""
        p = self._pairs
        keep = np.ones(len(p["patient"]), dtype=bool)
        if self.split is not None:
            keep &= p["split"] == self.split
        if self.source == "phantom":
            keep[:] = False
        idx = np.flatnonzero(keep)
        s = self.size
        images = p["images"][idx].reshape(-1, s, s)
        labels = p["labels"][idx].reshape(-1, s, s)
        patients = [str(x) for x in np.repeat(p["patient"][idx], 2)]
        phases = ["ED", "ES"] * len(idx)
        return RealFrames(images=images, labels=labels, patients=patients, phases=phases)


def _read_manifest(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        out.append(
            {
                "loop_id": r["loop_id"],
                "patient": r["patient"],
                "split": r["split"],
                "source": r["source"],
                "alpha": float(r["alpha"]),
                "ef": float(r["ef"]),
                "ed_index": int(r["ed_index"]),
                "es_index": int(r["es_index"]),
                "fps": float(r["fps"]),
                "n_frames": int(r["n_frames"]),
            }
        )
    return out


def _pair(pairs: dict, i: int) -> CardiacPair:
    return CardiacPair(
        ed_image=pairs["images"][i, 0],
        es_image=pairs["images"][i, 1],
        ed_labels=pairs["labels"][i, 0],
        es_labels=pairs["labels"][i, 1],
        velocity=pairs["velocity"][i].astype(np.float32),
        mask=pairs["mask"][i],
        ed_fine=pairs["fine"][i, 0],
        es_fine=pairs["fine"][i, 1],
    )


def _render_camus_recipe(
    pairs: dict, recipe: dict, config: RegistrationConfig, blend_width: float, images: bool = True, pair_objects: dict | None = None
):
    i = int(recipe["pair"])
    if pair_objects is None:
        pair = _pair(pairs, i)
    else:
        pair = pair_objects.get(i) or pair_objects.setdefault(i, _pair(pairs, i))
    return render_loop(pair, CycleTiming(**recipe["timing"]), float(recipe["alpha"]), config, blend_width, images)


def _render_phantom_recipe(recipe: dict, size: int):
    return render_phantom(int(recipe["anatomy_seed"]), float(recipe["requested_ef"]), CycleTiming(**recipe["timing"]), float(recipe["fps"]), size)


def _loop_measures(labels: np.ndarray, es_phase: int) -> tuple[float, int, float]:
    """EF of a rendered loop whose frame 0 is ED and whose ES is the timing's ES phase (end of ejection).

    Returns:
        (EF in % = (V[0] - V[es]) / V[0] of the area-length volumes of ``labels``, ES index, and the EF a reader
        taking the largest and smallest volume of the loop would get; the two differ only where intermediate
        frames wobble by more than the stroke volume, i.e. in nearly akinetic hearts).
    """
    vols = lv_volumes(labels, method=EF_METHOD)
    ef = float(ejection_fraction(vols[0], vols[es_phase]))
    return ef, int(es_phase), float(ejection_fraction(vols.max(), vols.min()))


# ------------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class LoopDeformation:
    """The stationary ED -> ES velocity of a CAMUS loop's pair and the scale it is applied at in every frame.

    Attributes:
        velocity: (2, g, g) float32 coarse velocity in normalised units (see :mod:`echolvfm_core.data.loops`).
        scale: (T,) alpha times the deformation phase of each frame (0 at ED); frame k is the ED image warped by
            :func:`~echolvfm_core.data.loops.exp_velocity` of ``velocity`` at ``scale[k]``.
    """

    velocity: np.ndarray
    scale: np.ndarray


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


def _u8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


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
                Echo(frames=frames, labels=labels, spacing_mm=ed.spacing_mm, source_format=ed.source_format, labelled=(0, 1)),
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
                images=_u8(pre.echo.frames),
                labels=lab.astype(np.uint8),
                mask=pre.mask.astype(bool),
                fine=_u8(pre.display.frames) if fine else None,
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
        objects[i] = _pair(pairs, i)
        ag = pair_agreement(objects[i], config)
        agreements.append({"ssim_raw": ag.ssim_raw, "ssim_es": ag.ssim_es, "ssim_mid": ag.ssim_mid, "dice_es": ag.dice_es})
        core = binary_erosion(masks[i], iterations=SHARPNESS_MARGIN)  # speckle, not the fan's edge
        real_sharp = sharpness(images[i], core)
        per_loop = []
        for j, (loop_id, recipe) in enumerate(recipes[i]):
            # EF needs only the labels; images (for the sharpness check) of the first SHARPNESS_LOOPS loops.
            with_images = j < SHARPNESS_LOOPS
            loop = _render_camus_recipe(pairs, {**recipe, "pair": i}, config, blend_width, with_images, objects)
            ef, es, ef_maxmin = _loop_measures(loop.labels, loop.es_index)
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
    loop = _render_phantom_recipe(recipe, size)
    ef, es, ef_maxmin = _loop_measures(loop.labels, CycleTiming(**recipe["timing"]).es_index)
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
        ProcessPoolExecutor(workers, mp_context=_spawn(), initializer=_init_worker, initargs=(threads,)) if workers > 1 else None
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
            bar = tqdm(total=len(ids), desc="read + preprocess", unit="patient", disable=not progress, dynamic_ncols=True)
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
                rows.append({"loop_id": loop_id, "patient": x.patient, "split": splits[i], "source": "camus", "alpha": alpha, "fps": round(fps, 4)})
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
                    recipe = {"anatomy_seed": anatomy_seed, "requested_ef": ef_req, "fps": round(fps, 4), "timing": timing.to_dict()}
                    loop_id = f"{name}_e{q}"
                    recipes[loop_id] = recipe
                    phantom_rows.append({"loop_id": loop_id, "patient": name, "split": phantom_split[name], "source": "phantom", "alpha": 1.0, "fps": round(fps, 4)})
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
        all_rows.append({**r, "ef": round(m["ef"], 4), "ed_index": 0, "es_index": m["es_index"], "n_frames": m["n_frames"]})
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
    report["data_bytes"] = sum((out / name).stat().st_size for name in _DATA_FILES)
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
    alpha1_maxmin_err = [measures[r["loop_id"]]["ef_maxmin"] - float(pairs["ef_grid"][index[r["patient"]]]) for r in alpha1]
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
            "note": "EF of the real labels at the model grid minus at the native resolution in mm (area-length): the cost of resampling",
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
