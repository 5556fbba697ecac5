"""Reader-study statistics against hand-computed and published values."""
from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import beta

from echolvfm_core.quiz_stats import (
    AnswerRecord,
    Confusion,
    accuracy_by_confidence,
    accuracy_by_ef,
    binomial_summary,
    cohen_kappa,
    confusion,
    fleiss_kappa,
    summarize,
    synthetic_share_by_method,
)


def _records(reader, rr, rs, sr, ss, start=0):
    """Records of one reader with the given confusion counts, cases c<start>... in the order rr, rs, sr, ss."""
    cells = [("real", "real")] * rr + [("real", "synthetic")] * rs + [("synthetic", "real")] * sr
    cells += [("synthetic", "synthetic")] * ss
    return [
        AnswerRecord(reader=reader, case=f"c{start + i}", truth=t, answer=a, confidence=3, ms=1000)
        for i, (t, a) in enumerate(cells)
    ]


def _exact_two_sided_p_half(k: int, n: int) -> float:
    """Two-sided exact binomial p-value at p = 1/2 by summing pmf terms with integer arithmetic."""
    pmf = [Fraction(math.comb(n, i), 2**n) for i in range(n + 1)]
    return float(sum(p for p in pmf if p <= pmf[k]))


def test_paper_pooled_matrix():
    # EchoLVFM paper, pooled over two cardiologists: R as R 59, R as S 61, S as R 40, S as S 80.
    truth = ["real"] * 120 + ["synthetic"] * 120
    answer = ["real"] * 59 + ["synthetic"] * 61 + ["real"] * 40 + ["synthetic"] * 80
    c = confusion(truth, answer)
    assert c == Confusion(rr=59, rs=61, sr=40, ss=80)
    assert c.n == 240 and c.correct == 139
    assert c.accuracy == pytest.approx(139 / 240)
    assert round(100 * c.accuracy) == 58
    assert c.sensitivity == pytest.approx(80 / 120)
    assert c.specificity == pytest.approx(59 / 120)

    b = binomial_summary(139, 240)
    lo = beta.ppf(0.025, 139, 240 - 139 + 1)  # Clopper-Pearson via beta quantiles
    hi = beta.ppf(0.975, 139 + 1, 240 - 139)
    assert b.ci95 == pytest.approx((lo, hi), abs=1e-9)
    assert b.p_value == pytest.approx(_exact_two_sided_p_half(139, 240), rel=1e-9)
    assert 0.01 < b.p_value < 0.02  # ~0.017: above chance at the 5 % level
    assert b.ci95[0] < 139 / 240 < b.ci95[1]


def test_binomial_non_half_null_and_edges():
    # p0 = 0.3, k = 5, n = 10: two-sided exact = sum of pmf(i) <= pmf(5).
    pmf = [math.comb(10, i) * 0.3**i * 0.7 ** (10 - i) for i in range(11)]
    want = sum(p for p in pmf if p <= pmf[5] * (1 + 1e-7))
    assert binomial_summary(5, 10, p0=0.3).p_value == pytest.approx(want, rel=1e-9)
    # k = 0: lower bound 0, upper bound 1 - (alpha/2)^(1/n).
    b = binomial_summary(0, 10)
    assert b.ci95[0] == 0.0 and b.ci95[1] == pytest.approx(1 - 0.025 ** (1 / 10))
    empty = binomial_summary(0, 0)
    assert empty.proportion is None and empty.ci95 is None and empty.p_value is None
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_summary(5, 4)


def test_cohen_kappa_textbook():
    # Wikipedia "Cohen's kappa" example: 50 proposals, A yes/B yes 20, A yes/B no 5, A no/B yes 10, no/no 15 -> 0.4.
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # Same agreement (60 %), different marginals: 45/15/25/15 -> 0.1304 (Wikipedia).
    a = ["y"] * 60 + ["n"] * 40
    b = ["y"] * 45 + ["n"] * 15 + ["y"] * 25 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.1304, abs=1e-4)
    assert cohen_kappa(["real"] * 4, ["real"] * 4) is None  # chance agreement 1: undefined
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["real"], [])


FLEISS_1971_TABLE = np.array(
    [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
)


def test_fleiss_kappa_published_example():
    # Fleiss (1971) worked example as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa = 0.210.
    assert round(fleiss_kappa(FLEISS_1971_TABLE), 3) == 0.210
    assert fleiss_kappa(np.zeros((0, 2), dtype=int)) is None
    assert fleiss_kappa(np.array([[3, 0], [3, 0]])) is None
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_fleiss_two_raters_equals_scotts_pi():
    # With two raters Fleiss' kappa is Scott's pi: (p_o - p_e) / (1 - p_e), p_e from pooled marginals.
    a = ["real"] * 6 + ["synthetic"] * 4
    b = ["real"] * 4 + ["synthetic"] * 2 + ["synthetic"] * 3 + ["real"] * 1
    p_o = sum(x == y for x, y in zip(a, b)) / 10
    p_real = (a.count("real") + b.count("real")) / 20
    p_e = p_real**2 + (1 - p_real) ** 2
    table = np.array([[(x == "real") + (y == "real"), (x == "synthetic") + (y == "synthetic")] for x, y in zip(a, b)])
    assert fleiss_kappa(table) == pytest.approx((p_o - p_e) / (1 - p_e))


def test_summarize_two_readers():
    # Reader A and B each answer the paper's per-reader half (cases c0..c119) with different matrices.
    ra = _records("A", 30, 30, 20, 40)
    rb = _records("B", 29, 31, 20, 40)
    stats = summarize(ra + rb)
    assert stats.pooled.confusion == Confusion(59, 61, 40, 80)
    assert stats.pooled.accuracy == pytest.approx(139 / 240)
    assert stats.per_reader["A"].confusion == Confusion(30, 30, 20, 40)
    assert stats.per_reader["B"].accuracy == pytest.approx(69 / 120)
    assert stats.pooled.mean_seconds == pytest.approx(1.0)
    # A and B differ only on case c29 (A real, B synthetic): Cohen's kappa by hand.
    pair = stats.cohen_kappa[0]
    assert (pair.reader_a, pair.reader_b, pair.n) == ("A", "B", 120)
    a_real, b_real = 50 / 120, 49 / 120
    p_e = a_real * b_real + (1 - a_real) * (1 - b_real)
    assert pair.kappa == pytest.approx((119 / 120 - p_e) / (1 - p_e))
    assert stats.fleiss_n_cases == 120 and stats.fleiss_kappa is not None

    d = stats.to_dict()
    required = ("n", "accuracy", "ci95", "p_value", "confusion", "sensitivity", "specificity", "fleiss_kappa")
    assert set(required + ("per_reader",)) <= set(d)
    assert d["confusion"] == {"rr": 59, "rs": 61, "sr": 40, "ss": 80}
    assert d["n"] == 240 and set(d["per_reader"]) == {"A", "B"}
    json.dumps(d, allow_nan=False)


def test_kappas_use_only_shared_cases():
    ra = _records("A", 2, 0, 0, 2)  # c0..c3
    rb = _records("B", 2, 0, 0, 2, start=2)  # c2..c5
    rc = _records("C", 1, 0, 0, 0, start=3)  # c3 only
    stats = summarize(ra + rb + rc)
    ns = {(p.reader_a, p.reader_b): p.n for p in stats.cohen_kappa}
    assert ns == {("A", "B"): 2, ("A", "C"): 1, ("B", "C"): 1}
    assert stats.fleiss_n_cases == 1  # only c3 was answered by all three


def test_groups_by_ef_and_confidence():
    def rec(i, ef, conf, ok):
        return AnswerRecord("A", f"c{i}", "synthetic", "synthetic" if ok else "real", conf, 500, ef)

    recs = [rec(0, 30.0, 1, True), rec(1, 35.0, 1, False), rec(2, 100.0, 5, True), rec(3, None, 5, True)]
    recs.append(rec(4, 12.0, 2, False))
    groups = {g.label: g for g in accuracy_by_ef(recs)}
    assert (groups["30-40"].n, groups["30-40"].correct) == (2, 1)
    assert (groups["70-100"].n, groups["70-100"].accuracy) == (1, 1.0)
    assert (groups["0-30"].n, groups["0-30"].accuracy) == (1, 0.0)
    assert groups["unknown"].n == 1 and groups["40-50"].accuracy is None
    conf = {g.label: g for g in accuracy_by_confidence(recs)}
    assert list(conf) == ["1", "2", "3", "4", "5"]
    assert conf["1"].accuracy == 0.5 and conf["5"].accuracy == 1.0 and conf["3"].n == 0
    with pytest.raises(ValueError, match="increasing"):
        accuracy_by_ef(recs, edges=(50, 40))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="'real' or 'synthetic'"):
        confusion(["real"], ["fake"])
    with pytest.raises(ValueError, match="same length"):
        confusion(["real"], [])
    dup = _records("A", 1, 0, 0, 0) * 2
    with pytest.raises(ValueError, match="more than one answer"):
        summarize(dup)
    empty = summarize([])
    assert empty.pooled.n == 0 and empty.pooled.accuracy is None and empty.fleiss_kappa is None
    json.dumps(empty.to_dict(), allow_nan=False)


def test_share_judged_synthetic_per_generator_and_its_report_lines():
    """Two generators, 10 answers on each one's cases: 7 and 3 judged synthetic; real cases carry no method."""
    from echolvfm_core.quiz.report import format_report

    records = [AnswerRecord("r", f"a{i}", "synthetic", "synthetic" if i < 7 else "real", 3, 1000, 40.0, "one-step")
               for i in range(10)]
    records += [AnswerRecord("r", f"b{i}", "synthetic", "synthetic" if i < 3 else "real", 3, 1000, 40.0, "linear")
                for i in range(10)]
    records += [AnswerRecord("r", f"c{i}", "real", "real", 3, 1000) for i in range(5)]
    shares = synthetic_share_by_method(records)
    assert list(shares) == ["linear", "one-step"]
    assert (shares["one-step"].k, shares["one-step"].n, shares["linear"].proportion) == (7, 10, 0.3)
    assert shares["one-step"].ci95 == pytest.approx((beta.ppf(0.025, 7, 4), beta.ppf(0.975, 8, 3)))
    r = summarize(records).to_dict()
    assert r["per_method"]["linear"] == {"n": 10, "judged_synthetic": 3, "share": 0.3,
                                         "ci95": list(shares["linear"].ci95)}
    text = format_report(r | {"n_readers": 1, "automatic_reader": {"accuracy": 0.625, "ci95": [0.43, 0.79], "n": 24,
                                                                   "folds": 4, "grouped_by_source": True},
                              "study": {"id": "s", "created": "t", "model_version": "m", "seed": 0,
                                        "real_pool_source": "x", "config": {}}})
    assert "one-step: 70.0 % of 10  (95 % CI 34.8-93.3 %)" in text
    assert "Automatic reader (C2ST over 24 cases, 4 folds): 62.5 %  (95 % CI 43.0-79.0 %)" in text
