"""`echolvfm quiz report` / `export` on a database holding the EchoLVFM paper's pooled reader-study matrix."""
from __future__ import annotations

import csv
import json
import math
from fractions import Fraction

import pytest
from scipy.stats import beta

from echolvfm_core.cli import main
from echolvfm_core.quiz.store import CaseRecord, QuizStore, StudyRecord, utc_now

# Two readers, 120 cases each (60 real, 60 synthetic); pooled R as R 59, R as S 61, S as R 40, S as S 80.
READERS = {"cardiologist-A": (30, 30, 20, 40), "cardiologist-B": (29, 31, 20, 40)}


def paper_db(path, study_id="paper", answers=True):
    store = QuizStore(path)
    store.add_study(
        StudyRecord(id=study_id, created=utc_now(), model_version="echolvfm-paper", seed=0, config={},
                    real_pool_source="EchoNet-Dynamic test videos", media_dir=str(path.parent)),
        [CaseRecord(study=study_id, case_id=f"c{i:03d}", truth="real" if i < 60 else "synthetic",
                    ef=None if i < 60 else 20.0 + i % 50, video=f"{i:03d}.mp4", position=i, block="scored")
         for i in range(120)],
    )
    for reader, (rr, rs, sr, ss) in READERS.items() if answers else ():
        store.register_reader(study_id, reader, [f"c{i:03d}" for i in range(120)], 0)
        answers = ["real"] * rr + ["synthetic"] * rs + ["real"] * sr + ["synthetic"] * ss
        for i, a in enumerate(answers):
            store.submit_answer(study_id, reader, f"c{i:03d}", a, 3, 4000)
    return store


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "quiz.sqlite"
    paper_db(path)
    return path


def test_report_json_reproduces_hand_computed_statistics(db, capsys):
    assert main(["quiz", "report", str(db), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("n", "accuracy", "ci95", "p_value", "confusion", "sensitivity", "specificity", "fleiss_kappa",
                "per_reader"):
        assert key in r
    assert r["n"] == 240
    assert r["confusion"] == {"rr": 59, "rs": 61, "sr": 40, "ss": 80}
    assert r["accuracy"] == pytest.approx(139 / 240) and round(100 * r["accuracy"]) == 58
    assert r["ci95"] == pytest.approx([beta.ppf(0.025, 139, 102), beta.ppf(0.975, 140, 101)], abs=1e-9)
    pmf = [Fraction(math.comb(240, i), 2**240) for i in range(241)]
    assert r["p_value"] == pytest.approx(float(sum(p for p in pmf if p <= pmf[139])), rel=1e-9)
    assert r["sensitivity"] == pytest.approx(80 / 120) and r["specificity"] == pytest.approx(59 / 120)
    assert r["per_reader"]["cardiologist-A"]["confusion"] == {"rr": 30, "rs": 30, "sr": 20, "ss": 40}
    assert r["per_reader"]["cardiologist-B"]["accuracy"] == pytest.approx(69 / 120)
    assert r["mean_seconds"] == pytest.approx(4.0)
    # the readers differ on one case only: Scott's pi / Fleiss' kappa of two raters, by hand
    p_real = (50 + 49) / 240
    p_e = p_real**2 + (1 - p_real) ** 2
    assert r["fleiss_kappa"] == pytest.approx((119 / 120 - p_e) / (1 - p_e))
    assert r["study"]["real_pool_source"] == "EchoNet-Dynamic test videos"


def test_report_text_and_export(db, tmp_path, capsys):
    assert main(["quiz", "report", str(db)]) == 0
    text = capsys.readouterr().out
    assert "57.9 %" in text and "EchoNet-Dynamic test videos" in text and "cardiologist-B" in text
    assert main(["quiz", "export", str(db), str(tmp_path / "a.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "a.csv", encoding="utf-8")))
    assert len(rows) == 240 and sum(int(r["correct"]) for r in rows) == 139


def test_report_errors(tmp_path, capsys):
    assert main(["quiz", "report", str(tmp_path / "missing.sqlite")]) == 2
    assert not (tmp_path / "missing.sqlite").exists()
    db = tmp_path / "quiz.sqlite"
    paper_db(db, answers=False)
    paper_db(db, study_id="second", answers=False)
    assert main(["quiz", "report", str(db)]) == 2
    assert "pick one with --study" in capsys.readouterr().err
    assert main(["quiz", "report", str(db), "--study", "nope"]) == 2
    assert main(["quiz", "report", str(db), "--study", "second", "--json"]) == 0


def test_results_figures(db):
    from app.quiz.results import accuracy_figure, confusion_figure
    from echolvfm_core.quiz.report import study_report

    r = study_report(QuizStore(db), "paper")
    heat = confusion_figure(r["confusion"]).data[0]
    assert [list(row) for row in heat.z] == [[59, 61], [40, 80]]
    assert heat.text[0][0] == "59<br>(49 %)"
    bars = accuracy_figure(r["per_confidence"], "By confidence", "confidence").data[0]
    assert list(bars.x) == ["1", "2", "3", "4", "5"] and bars.y[2] == pytest.approx(100 * 139 / 240)
    assert bars.y[0] is None  # no answers at confidence 1: a gap, not 0 %
    by_ef = accuracy_figure(r["per_ef_bin"], "By EF", "EF (%)").data[0]
    assert list(by_ef.x)[-1] == "unknown"  # the real cases carry no EF here
