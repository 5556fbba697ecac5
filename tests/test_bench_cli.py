"""``echolvfm bench``: results carry the machine and the section's figures; a missing model is a one-line error."""
import json

from echolvfm_core.cli import main


def test_bench_generator_tiny_writes_json_with_machine(tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert main(["bench", "generator", "--preset", "tiny", "--frames", "4", "--repeats", "1", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["section"] == "generator" and result["machine"]["cores"] >= 1
    assert result["one_step"]["ms_per_video"] > 0 and result["linear"]["ms_per_video"] > 0
    assert result["train_step"]["meanflow_jvp"]["ms"] > 0


def test_bench_without_model_exits_2(tmp_path, capsys):
    assert main(["bench", "codec", "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a trained model" in err and len(err.strip().splitlines()) == 1


def fake_benchmark(models, device, n, threads, case):
    return {"got": {"models": str(models), "device": device, "n": n, "threads": threads, "case": case}}


def test_an_installed_section_runs_through_its_entry_point(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from echolvfm_core.commands import bench

    fake = EntryPoint(name="fake", value=f"{__name__}:fake_benchmark", group=bench.ENTRY_POINT_GROUP)
    monkeypatch.setattr(bench, "entry_points", lambda group: [fake] if group == bench.ENTRY_POINT_GROUP else [])
    out = tmp_path / "fake.json"
    assert main(["bench", "fake", "--models", str(tmp_path), "--repeats", "3", "--case", "cine",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["section"] == "fake" and result["machine"]["device"] == "cpu"
    assert result["got"] == {"models": str(tmp_path), "device": "cpu", "n": 3, "threads": None, "case": "cine"}


def test_the_app_declares_its_bench_section_as_an_entry_point():
    """`echolvfm bench app` reaches the app only through the entry point that pyproject.toml declares."""
    from importlib.metadata import EntryPoint
    from pathlib import Path

    import tomllib

    from app.bench import benchmark_app
    from echolvfm_core.commands.bench import ENTRY_POINT_GROUP

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][ENTRY_POINT_GROUP]
    assert declared == {"app": "app.bench:benchmark_app"}
    assert EntryPoint(name="app", value=declared["app"], group=ENTRY_POINT_GROUP).load() is benchmark_app
