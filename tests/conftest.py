"""Shared fixtures: the CAMUS data folder (skip when absent) and the built-in DICOM sample."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: ../shared/data/camus_4ch_edes next to the repository; ECHOLVFM_CAMUS overrides it.
DEFAULT_CAMUS = Path(__file__).resolve().parents[1].parent / "shared/data/camus_4ch_edes"


def camus_path() -> Path:
    """Where the CAMUS data is expected (ECHOLVFM_CAMUS, else ../shared/data/camus_4ch_edes)."""
    return Path(os.environ.get("ECHOLVFM_CAMUS", DEFAULT_CAMUS))


@pytest.fixture(scope="session")
def camus_root() -> Path:
    """The CAMUS data folder; the test is skipped when it is absent."""
    root = camus_path()
    if not root.is_dir():
        pytest.skip(f"CAMUS data not found at {root} (set ECHOLVFM_CAMUS)")
    return root


@pytest.fixture(scope="session")
def sample_path() -> Path:
    """pydicom's ``ybr_color`` example: a real apical 4CH cine, 30 frames, 320 x 240, YBR_FULL_422 JPEG baseline."""
    from pydicom.examples import get_path

    return Path(get_path("ybr_color"))
