"""``echolvfm info``: text and JSON output on the built-in sample, one-line errors with exit code 2."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from echolvfm_core.cli import main


def test_info_json_on_sample(sample_path, capsys):
    assert main(["info", str(sample_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"frames", "fps", "height", "width", "spacing_mm", "format"}
    assert (out["frames"], out["height"], out["width"], out["format"]) == (30, 240, 320, "dicom")
    assert out["fps"] == pytest.approx(30.0, abs=0.01)
    assert out["spacing_mm"] == pytest.approx([0.5105, 0.5105], abs=1e-3)


def test_info_text_on_sample(sample_path, capsys):
    assert main(["info", str(sample_path)]) == 0
    out = capsys.readouterr().out
    assert "frames:   30" in out and "fps:      30" in out and "320 x 240" in out and "dicom" in out


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.dcm", None, "No file at 'missing.dcm'"),
        ("notes.avi", b"plain text, not a video\n", "could not be decoded as a video"),
        ("junk.dcm", b"\x00\x01" * 400, "not a DICOM file"),
    ],
)
def test_info_bad_input_one_line_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echolvfm info: error: ") and message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_installed_script(tmp_path, sample_path):
    exe = shutil.which("echolvfm")
    if exe is None:
        pytest.skip("the echolvfm script is not installed (pip install -e .)")
    ok = subprocess.run([exe, "info", str(sample_path), "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["frames"] == 30
    (tmp_path / "photo.avi").write_text("not a video")
    bad = subprocess.run([exe, "info", str(tmp_path / "photo.avi")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_python_m_cli_maps_command_errors_to_one_line_exit_2(tmp_path):
    """``python -m echolvfm_core.cli`` runs cli.py as ``__main__``: a CommandError raised by a command module must
    still be the class main() catches (one line, exit 2), as with the ``echolvfm`` script."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad = subprocess.run([sys.executable, "-m", "echolvfm_core.cli", "evaluate", "--prepared", str(tmp_path),
                          "--out", str(tmp_path / "o"), "--sections", "nope"],
                         capture_output=True, text=True, timeout=120, cwd=repo)
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echolvfm evaluate: error: unknown sections")
