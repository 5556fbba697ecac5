"""Prepared training data: real CAMUS ED/ES pairs, their registrations and loop recipes; loops rendered on access.

A prepared folder (written by :func:`echolvfm_core.data.prepare.prepare`, i.e. ``echolvfm prepare``)::

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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..echo import ClinicalInfo, Echo
from ..ef import ejection_fraction, lv_volumes
from .loops import (
    CardiacPair,
    CycleTiming,
    RegistrationConfig,
    render_loop,
)
from .phantom import render_phantom

__all__ = [
    "DATA_FILES",
    "EF_METHOD",
    "FORMAT",
    "MANIFEST_FIELDS",
    "VERSION",
    "LoopDeformation",
    "LoopSample",
    "PreparedLoops",
    "RealFrames",
    "cardiac_pair",
    "collate_loops",
    "loop_measures",
    "render_camus_recipe",
    "render_phantom_recipe",
]

log = logging.getLogger(__name__)

FORMAT, VERSION = "echolvfm-prepared", 1
MANIFEST_FIELDS = ("loop_id", "patient", "split", "source", "alpha", "ef", "ed_index", "es_index", "fps", "n_frames")
EF_METHOD = "area_length"
#: The files that make a folder a prepared data set (prepare_report.json is only a report).
DATA_FILES = ("meta.json", "pairs.npz", "manifest.csv", "recipes.json")


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
        root: folder written by :func:`~echolvfm_core.data.prepare.prepare`.
        split: keep only this split ("train", "valid", ...); None keeps all.
        source: keep only "camus" or "phantom" loops; None keeps both.
        cache_size: rendered loops kept in memory (LRU); 0 disables the cache.
    """

    def __init__(self, root: str | Path, split: str | None = None, source: str | None = None,
                 cache_size: int = 256) -> None:
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
        self.manifest = [r for r in rows
                         if (split is None or r["split"] == split) and (source is None or r["source"] == source)]
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
            loop = render_phantom_recipe(recipe, self.size)
            return loop.frames, loop.labels
        loop = render_camus_recipe(self._pairs, recipe, self.registration, self.blend_width,
                                   pair_objects=self._pair_objects)
        return loop.frames, loop.labels

    def counterfactual(self, patient: str, alpha: float, timing: CycleTiming | None = None,
                       fps: float = 30.0) -> LoopSample:
        """Render a CAMUS patient's pair at any ``alpha`` (not only the prepared ones), EF measured on its labels.

        Args:
            patient: a CAMUS patient id of this folder (prepared with loops, so its registration is stored).
            alpha: deformation scale in (0, 3]; 1 reproduces the real ED -> ES motion.
            timing: cycle timing (default: 30 frames with the default phases).
            fps: frame rate stored in the sample.
        """
        if "velocity" not in self._pairs:
            raise ValueError(
                f"{self.root} was prepared without loops (--loops-per-patient 0); it holds no registrations.")
        if patient not in self._pair_index:
            raise KeyError(f"no CAMUS patient {patient!r} in {self.root}.")
        timing = timing or CycleTiming(30)
        i = self._pair_index[patient]
        recipe = {"pair": i, "alpha": float(alpha), "timing": timing.to_dict()}
        loop = render_camus_recipe(self._pairs, recipe, self.registration, self.blend_width,
                                   pair_objects=self._pair_objects)
        ef, es, _ = loop_measures(loop.labels, loop.es_index)
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


def cardiac_pair(pairs: dict, i: int) -> CardiacPair:
    """Pair ``i`` of a loaded ``pairs.npz`` as a :class:`~echolvfm_core.data.loops.CardiacPair`."""
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


def render_camus_recipe(
    pairs: dict, recipe: dict, config: RegistrationConfig, blend_width: float, images: bool = True,
    pair_objects: dict | None = None
):
    """Render the CAMUS loop of ``recipe`` (pair index, timing, alpha) from the loaded ``pairs.npz``; with
    ``pair_objects``, each pair is built once and kept there."""
    i = int(recipe["pair"])
    if pair_objects is None:
        pair = cardiac_pair(pairs, i)
    else:
        pair = pair_objects.get(i) or pair_objects.setdefault(i, cardiac_pair(pairs, i))
    return render_loop(pair, CycleTiming(**recipe["timing"]), float(recipe["alpha"]), config, blend_width, images)


def render_phantom_recipe(recipe: dict, size: int):
    """Render the phantom loop of ``recipe`` (anatomy seed, requested EF, timing, fps) at ``size`` pixels."""
    return render_phantom(int(recipe["anatomy_seed"]), float(recipe["requested_ef"]), CycleTiming(**recipe["timing"]),
                          float(recipe["fps"]), size)


def loop_measures(labels: np.ndarray, es_phase: int) -> tuple[float, int, float]:
    """EF of a rendered loop whose frame 0 is ED and whose ES is the timing's ES phase (end of ejection).

    Returns:
        (EF in % = (V[0] - V[es]) / V[0] of the area-length volumes of ``labels``, ES index, and the EF a reader
        taking the largest and smallest volume of the loop would get; the two differ only where intermediate
        frames wobble by more than the stroke volume, i.e. in nearly akinetic hearts).
    """
    vols = lv_volumes(labels, method=EF_METHOD)
    ef = float(ejection_fraction(vols[0], vols[es_phase]))
    return ef, int(es_phase), float(ejection_fraction(vols.max(), vols.min()))


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
