"""NIfTI and CAMUS readers: orientation, spacing, half-sequence direction, layouts, errors, and the real CAMUS data."""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from echolvfm_core.echo import EchoLoadError, LoadLimits
from echolvfm_core.io import CamusPatient, load_echo, read_camus


def save_nifti(path, display: np.ndarray, zooms=(0.3, 0.3)) -> None:
    """Save a display-orientation array ((H, W) or (T, H, W)) the way CAMUS stores it: (x, y[, t])."""
    stored = display.T if display.ndim == 2 else display.transpose(2, 1, 0)
    img = nib.Nifti1Image(np.ascontiguousarray(stored), np.eye(4))
    img.header.set_zooms(tuple(zooms) + (1.0,) * (stored.ndim - 2))
    nib.save(img, str(path))


def heart(t: int, n: int, h: int = 40, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Display-orientation (image uint8 (H, W), labels uint8 (H, W)) at phase t of n: LV shrinks from ED to ES."""
    yy, xx = np.mgrid[:h, :w]
    scale = 1.0 - 0.35 * t / max(n - 1, 1)
    lv = ((yy - 14) / (9 * scale)) ** 2 + ((xx - 19) / (5 * scale)) ** 2 <= 1
    myo = ~lv & (((yy - 14) / (9 * scale + 2)) ** 2 + ((xx - 19) / (5 * scale + 2)) ** 2 <= 1)
    la = ((yy - 31) / 5) ** 2 + ((xx - 20) / 4) ** 2 <= 1
    labels = np.zeros((h, w), np.uint8)
    labels[lv], labels[myo], labels[la & ~myo & ~lv] = 1, 2, 3
    image = np.full((h, w), 30, np.uint8)
    image[myo] = 200
    image[lv | la] = 10 + t  # the blood pool darkens a little with the phase, so every frame differs
    return image, labels


def make_patient(root, pid="patient0001", view="4CH", n=6, *, stored_reversed=False, cfg=True, half=True, gt=True,
                 ed_es=True, zooms=(0.3, 0.3)):
    """A synthetic CAMUS patient folder; returns (folder, display images (n, H, W) in ED -> ES order)."""
    folder = root / pid
    folder.mkdir(parents=True, exist_ok=True)
    imgs, labs = map(np.stack, zip(*(heart(t, n) for t in range(n)), strict=True))
    stem = f"{pid}_{view}"
    if ed_es:
        for phase, i in (("ED", 0), ("ES", n - 1)):
            save_nifti(folder / f"{stem}_{phase}.nii.gz", imgs[i], zooms)
            if gt:
                save_nifti(folder / f"{stem}_{phase}_gt.nii.gz", labs[i], zooms)
    if half:
        order = slice(None, None, -1) if stored_reversed else slice(None)
        save_nifti(folder / f"{stem}_half_sequence.nii.gz", imgs[order], zooms)
        if gt:
            save_nifti(folder / f"{stem}_half_sequence_gt.nii.gz", labs[order], zooms)
    if cfg:
        ed, es = (n, 1) if stored_reversed else (1, n)
        (folder / f"Info_{view}.cfg").write_text(
            f"ED: {ed}\nES: {es}\nNbFrame: {n}\nSex: F\nAge: 61\nImageQuality: Medium\nEF: 48.5\nFrameRate: 40\n"
        )
    return folder, imgs


# ----------------------------------------------------------------------------------------------- plain NIfTI
def test_plain_2d_nifti_is_one_frame_in_display_orientation(tmp_path):
    display = np.arange(12 * 7, dtype=np.uint8).reshape(12, 7)
    save_nifti(tmp_path / "a.nii.gz", display, zooms=(0.2, 0.5))  # x spacing 0.2, y spacing 0.5
    echo = load_echo(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(echo.frames[0], display / np.float32(255))
    assert echo.frames.shape == (1, 12, 7) and echo.fps is None and echo.source_format == "nifti"
    assert echo.spacing_mm == pytest.approx((0.5, 0.2))  # (row = y, column = x)


def test_plain_3d_nifti_is_a_loop_with_time_last(tmp_path):
    display = np.random.default_rng(0).integers(0, 256, (5, 9, 8), dtype=np.uint8)
    save_nifti(tmp_path / "loop.nii", display)
    echo = load_echo(tmp_path / "loop.nii")
    np.testing.assert_array_equal(echo.frames, display / np.float32(255))


def test_float_nifti_scaled_and_nan_rejected(tmp_path):
    display = np.linspace(-5.0, 15.0, 6 * 4, dtype=np.float32).reshape(6, 4)
    save_nifti(tmp_path / "f.nii.gz", display)
    echo = load_echo(tmp_path / "f.nii.gz")
    assert echo.frames.min() == 0.0 and echo.frames.max() == 1.0
    display[2, 2] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", display)
    with pytest.raises(EchoLoadError, match="non-finite"):
        load_echo(tmp_path / "nan.nii.gz")


def test_4d_nifti_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 3), np.uint8), np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(EchoLoadError, match="4-D NIfTI.*only 2-D images and 2-D\\+time loops"):
        load_echo(tmp_path / "v.nii.gz")


def test_nifti_limits_and_truncation(tmp_path):
    save_nifti(tmp_path / "big.nii.gz", np.zeros((40, 30), np.uint8))
    with pytest.raises(EchoLoadError, match="larger than the limit of 16"):
        load_echo(tmp_path / "big.nii.gz", limits=LoadLimits(max_side=16))
    data = (tmp_path / "big.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(EchoLoadError):
        load_echo(tmp_path / "cut.nii.gz")


# ------------------------------------------------------------------------------------------------ CAMUS files
def test_camus_still_has_labels_and_view(tmp_path):
    folder, imgs = make_patient(tmp_path, half=False, cfg=True)
    ed = load_echo(folder / "patient0001_4CH_ED.nii.gz")
    np.testing.assert_array_equal(ed.frames[0], imgs[0] / np.float32(255))
    assert ed.labels.dtype == np.uint8 and ed.labels.shape == (1, 40, 32) and ed.labelled == (0,)
    assert set(np.unique(ed.labels)) == {0, 1, 2, 3}
    assert (ed.info.view, ed.info.ed_index, ed.info.es_index, ed.info.ef, ed.info.sex) == ("4CH", 0, None, 48.5, "F")
    es = load_echo(folder / "patient0001_4CH_ES.nii.gz")
    assert es.info.es_index == 0 and (es.labels == 1).sum() < (ed.labels == 1).sum()
    with pytest.raises(EchoLoadError, match="label map, not an image"):
        load_echo(folder / "patient0001_4CH_ED_gt.nii.gz")


@pytest.mark.parametrize(
    "stored_reversed, cfg, ed_es, gt",
    [
        (False, True, True, True),  # stored ED -> ES, cfg says so
        (True, True, True, True),  # stored ES -> ED, cfg ED > ES
        (True, False, True, False),  # no cfg: the end frame matching the ED image is ED
        (True, False, False, True),  # no cfg, no ED file: the end frame with the larger LV cavity is ED
    ],
)
def test_half_sequence_is_ordered_ed_to_es(tmp_path, stored_reversed, cfg, ed_es, gt):
    folder, imgs = make_patient(tmp_path, stored_reversed=stored_reversed, cfg=cfg, ed_es=ed_es, gt=gt)
    echo = load_echo(folder / "patient0001_4CH_half_sequence.nii.gz")
    np.testing.assert_array_equal(echo.frames, imgs / np.float32(255))
    assert (echo.info.ed_index, echo.info.es_index) == (0, 5)
    if gt:
        assert echo.labelled == tuple(range(6))
        lv = (echo.labels == 1).sum(axis=(1, 2))
        assert np.all(np.diff(lv) <= 0) and lv[0] > lv[-1]
    assert echo.fps == (40.0 if cfg else None)


def test_half_sequence_direction_unknown_without_evidence(tmp_path):
    folder, _ = make_patient(tmp_path, cfg=False, ed_es=False, gt=False)
    echo = load_echo(folder / "patient0001_4CH_half_sequence.nii.gz")
    assert echo.info.ed_index is None and echo.info.es_index is None


# ---------------------------------------------------------------------------------------------- read_camus
def test_read_camus_full_release_layout(tmp_path):
    make_patient(tmp_path / "training", "patient0001", "4CH")
    make_patient(tmp_path / "training", "patient0001", "2CH", stored_reversed=True)
    make_patient(tmp_path / "testing", "patient0002", "4CH", gt=False, cfg=False, half=False)
    patients = list(read_camus(tmp_path))
    assert [p.patient_id for p in patients] == ["patient0001", "patient0002"]
    p1, p2 = patients
    assert isinstance(p1, CamusPatient) and (p1.split, p2.split) == ("train", "test")
    assert set(p1.views) == {"4CH", "2CH"} and set(p2.views) == {"4CH"}
    v = p1.views["2CH"]
    assert v.view == "2CH" and v.image_quality == "Medium"
    assert (v.info.ef, v.info.age, v.info.sex, v.info.ed_index, v.info.es_index) == (48.5, 61.0, "F", 0, 5)
    np.testing.assert_array_equal(v.half_sequence.frames[0], v.ed.frames[0])
    np.testing.assert_array_equal(v.half_sequence.frames[-1], v.es.frames[0])
    assert p2.views["4CH"].ed.labels is None and p2.views["4CH"].half_sequence is None

    only = list(read_camus(tmp_path, views=("2CH",), patients=[2, "patient0001"], half_sequences=False))
    assert [p.patient_id for p in only] == ["patient0001"] and only[0].views["2CH"].half_sequence is None


def test_read_camus_split_files(tmp_path):
    make_patient(tmp_path / "database_nifti", "patient0003", half=False)
    (tmp_path / "database_split").mkdir()
    (tmp_path / "database_split" / "subgroup_validation.txt").write_text("patient0003\n")
    assert next(read_camus(tmp_path)).split == "valid"
    (tmp_path / "splits.csv").write_text("patient,split\npatient0003,train\n")
    assert next(read_camus(tmp_path)).split == "train"


def test_read_camus_errors_are_raised_at_call_and_loading_is_lazy(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EchoLoadError, match="holds no CAMUS patient folders"):
        read_camus(tmp_path / "empty")
    with pytest.raises(EchoLoadError, match="No folder"):
        read_camus(tmp_path / "missing")
    folder, _ = make_patient(tmp_path / "data", half=False)
    with pytest.raises(EchoLoadError, match="None of the requested patients"):
        read_camus(tmp_path / "data", patients=[7])
    (folder / "patient0001_4CH_ES.nii.gz").write_bytes(b"not a nifti")
    patients = read_camus(tmp_path / "data")  # nothing read yet
    with pytest.raises(EchoLoadError, match="patient0001_4CH_ES.nii.gz"):
        next(patients)


# ----------------------------------------------------------------------------------------- real CAMUS data
@pytest.mark.camus
def test_camus_real_sample_patients(camus_root):
    patients = list(read_camus(camus_root, patients=range(1, 6)))
    assert [p.patient_id for p in patients] == [f"patient{i:04d}" for i in range(1, 6)]
    for p in patients:
        v = p.views["4CH"]
        assert p.split in ("train", "valid") and set(p.views) == {"4CH"} and v.half_sequence is None
        assert v.ed.frames.shape == v.es.frames.shape and v.ed.labelled == (0,)
        assert v.ed.spacing_mm == pytest.approx((0.308, 0.308), abs=0.01)
        assert set(np.unique(v.ed.labels)) == {0, 1, 2, 3}


@pytest.mark.camus
def test_camus_clinical_orientation_all_patients(camus_root):
    """Display = transpose of nibabel's array: apex up, LV on the right, LA below the LV.

    Measured on the 449 patients x (ED, ES): the LV cavity centroid is above the LA centroid in every frame; it is in
    the right half of the image in about 85 % of frames (the cavity straddles the midline, centroid at 43-63 % of
    the width), so the right-half test is on the majority and the median; mirroring the image would give ~15 %.
    """
    t0 = time.perf_counter()
    right, above, x_rel, n_patients, splits = 0, 0, [], 0, {}
    for p in read_camus(camus_root, views=("4CH",), half_sequences=False):
        n_patients += 1
        splits[p.split] = splits.get(p.split, 0) + 1
        for echo in (p.views["4CH"].ed, p.views["4CH"].es):
            lab = echo.labels[0]
            ly, lx = np.nonzero(lab == 1)
            ay, _ = np.nonzero(lab == 3)
            x_rel.append(lx.mean() / lab.shape[1])
            right += lx.mean() > lab.shape[1] / 2
            above += ly.mean() < ay.mean()
    elapsed = time.perf_counter() - t0
    n = 2 * n_patients
    assert n_patients == 449 and splits == {"train": 399, "valid": 50}
    assert above == n, f"LV above LA in only {above}/{n} frames"
    assert right / n > 0.75 and np.median(x_rel) > 0.5, f"LV on the right in {right}/{n} frames"
    print(f"read_camus, 449 patients (4CH ED+ES + labels): {elapsed:.1f} s; LV right {right}/{n}, above LA {above}/{n}")


def _zero_nifti_gz(path, shape) -> None:
    """A valid gzip NIfTI of uint8 zeros of ``shape`` (x, y, t), streamed: it is small on disk, huge once read
    (489 kB for 1024 x 1024 x 480)."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    chunk = bytes(1 << 20)
    with gzip.open(path, "wb") as fh:
        fh.write(header.binaryblock + b"\0" * 4)
        for _ in range(int(np.prod(shape)) // len(chunk)):
            fh.write(chunk)


def test_nifti_declaring_a_huge_loop_is_refused_before_reading(tmp_path):
    """A few hundred kB that declare 1024 x 1024 x 480 voxels: refused from the header, with default limits, in
    one sentence, before any large allocation."""
    import tracemalloc

    path = tmp_path / "bomb.nii.gz"
    _zero_nifti_gz(path, (1024, 1024, 480))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(EchoLoadError) as err:
            load_echo(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    message = str(err.value)
    assert message.startswith("'bomb.nii.gz' ") and "ECHOLVFM_MAX_BYTES" in message and message.count(". ") == 0


@pytest.mark.parametrize("name, content", [
    ("notgzip.nii.gz", b"\x1f\x8b" + b"junk" * 100),  # nibabel cannot tell the file type
    ("short.nii", None),  # a valid header whose data ends early
])
def test_nifti_errors_name_the_file_never_its_folder(tmp_path, name, content):
    folder = tmp_path / "uploads-of-jane-doe"
    folder.mkdir()
    if content is None:
        img = nib.Nifti1Image(np.zeros((40, 30), np.uint8), np.eye(4))
        content = img.header.binaryblock + b"\0" * 4 + bytes(100)
    (folder / name).write_bytes(content)
    with pytest.raises(EchoLoadError) as err:
        load_echo(folder / name)
    message = str(err.value)
    assert f"'{name}'" in message and "jane-doe" not in message and str(tmp_path) not in message
    assert "\n" not in message
