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
