"""Reader-study statistics for the blinded real-vs-synthetic realism quiz (pure functions, no I/O).

Conventions: every case has a truth and every answer a label, both ``"real"`` or ``"synthetic"``. The task scored
is *spotting synthetic*: a synthetic case judged synthetic is a true positive. Confusion keys read
"truth then answer": ``rr`` real judged real, ``rs`` real judged synthetic, ``sr`` synthetic judged real,
``ss`` synthetic judged synthetic (the EchoLVFM paper's pooled matrix is rr 59, rs 61, sr 40, ss 80).

Undefined quantities (an accuracy over zero answers, a kappa whose chance agreement is 1) are ``None`` rather
than NaN so that the results serialise to strict JSON.

References: Clopper & Pearson (1934) exact binomial interval; Cohen (1960) kappa; Fleiss (1971) kappa for many
raters, "Measuring nominal scale agreement among many raters", Psychol. Bull. 76(5).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "REAL",
    "SYNTHETIC",
    "CATEGORIES",
    "DEFAULT_EF_EDGES",
    "Confusion",
    "BinomialSummary",
    "AnswerRecord",
    "GroupAccuracy",
    "ReaderStats",
    "PairKappa",
    "StudyStats",
    "confusion",
    "binomial_summary",
    "cohen_kappa",
    "fleiss_kappa",
    "accuracy_by_ef",
    "accuracy_by_confidence",
    "synthetic_share_by_method",
    "summarize",
]

REAL = "real"
SYNTHETIC = "synthetic"
CATEGORIES = (REAL, SYNTHETIC)

#: EF bin edges in % (clinical bands: severely / moderately / mildly reduced, normal, hyperdynamic); the last bin
#: includes its upper edge.
DEFAULT_EF_EDGES = (0.0, 30.0, 40.0, 50.0, 60.0, 70.0, 100.0)


def _check_label(value: str, what: str) -> str:
    if value not in CATEGORIES:
        raise ValueError(f"{what} must be 'real' or 'synthetic'; got {value!r}.")
    return value


@dataclass(frozen=True)
class Confusion:
    """2 x 2 counts, truth then answer: rr, rs (real judged synthetic), sr (synthetic judged real), ss."""

    rr: int = 0
    rs: int = 0
    sr: int = 0
    ss: int = 0

    @property
    def n(self) -> int:
        return self.rr + self.rs + self.sr + self.ss

    @property
    def correct(self) -> int:
        return self.rr + self.ss

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def sensitivity(self) -> float | None:
        """Fraction of synthetic cases judged synthetic: ss / (ss + sr)."""
        return self.ss / (self.ss + self.sr) if self.ss + self.sr else None

    @property
    def specificity(self) -> float | None:
        """Fraction of real cases judged real: rr / (rr + rs)."""
        return self.rr / (self.rr + self.rs) if self.rr + self.rs else None

    def as_matrix(self) -> np.ndarray:
        """int64 (2, 2): rows truth (real, synthetic), columns answer (real, synthetic)."""
        return np.array([[self.rr, self.rs], [self.sr, self.ss]], dtype=np.int64)

    def to_dict(self) -> dict[str, int]:
        return {"rr": self.rr, "rs": self.rs, "sr": self.sr, "ss": self.ss}


def confusion(truth: Iterable[str], answer: Iterable[str]) -> Confusion:
    """Count (truth, answer) pairs; both sequences hold "real" / "synthetic" and must have the same length."""
    truth, answer = list(truth), list(answer)
    if len(truth) != len(answer):
        raise ValueError(f"truth and answer must have the same length; got {len(truth)} and {len(answer)}.")
    counts = {"rr": 0, "rs": 0, "sr": 0, "ss": 0}
    for t, a in zip(truth, answer):
        counts[_check_label(t, "truth")[0] + _check_label(a, "answer")[0]] += 1
    return Confusion(**counts)


@dataclass(frozen=True)
class BinomialSummary:
    """``k`` successes out of ``n``: proportion, exact Clopper-Pearson interval and exact two-sided p-value vs p0."""

    k: int
    n: int
    proportion: float | None
    ci95: tuple[float, float] | None
    p_value: float | None


def binomial_summary(k: int, n: int, p0: float = 0.5, level: float = 0.95) -> BinomialSummary:
    """Exact binomial inference for a proportion (``scipy.stats.binomtest``).

    The interval is Clopper-Pearson at ``level``; the p-value is two-sided exact against ``p0`` (for p0 = 0.5,
    twice the smaller tail). With ``n == 0`` everything but the counts is ``None``.
    """
    if not (0 <= k <= n):
        raise ValueError(f"need 0 <= k <= n; got k={k}, n={n}.")
    if n == 0:
        return BinomialSummary(k=0, n=0, proportion=None, ci95=None, p_value=None)
    from scipy.stats import binomtest

    res = binomtest(int(k), int(n), p=p0, alternative="two-sided")
    ci = res.proportion_ci(confidence_level=level, method="exact")
    return BinomialSummary(
        k=int(k), n=int(n), proportion=k / n, ci95=(float(ci.low), float(ci.high)), p_value=float(res.pvalue)
    )


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e) (statsmodels' ``cohens_kappa`` of
    their contingency table).

    ``a[i]`` and ``b[i]`` are the two raters' labels for item i (any hashable labels). Returns ``None`` when there
    are no items or when chance agreement p_e is 1 (both raters used one and the same label throughout).
    """
    from statsmodels.stats.inter_rater import cohens_kappa

    if len(a) != len(b):
        raise ValueError(f"the two raters must rate the same items; got {len(a)} and {len(b)} labels.")
    labels = sorted(set(a) | set(b), key=str)
    if len(labels) < 2:  # no items, or p_e = 1
        return None
    index = {label: i for i, label in enumerate(labels)}
    table = np.zeros((len(labels), len(labels)))
    for x, y in zip(a, b):
        table[index[x], index[y]] += 1
    return float(cohens_kappa(table, return_results=False))


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa from a count table (statsmodels' ``fleiss_kappa``; Fleiss (1971) eqs. 2-9).

    Args:
        counts: int array (N subjects, k categories); ``counts[i, j]`` = raters who put subject i in category j.
            Every row must sum to the same number of raters n >= 2.

    Returns kappa = (P_bar - P_e) / (1 - P_e), or ``None`` for zero subjects or when P_e is 1 (all ratings in one
    category).
    """
    from statsmodels.stats import inter_rater

    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be (subjects, categories); got shape {counts.shape}.")
    if counts.shape[0] == 0:
        return None
    if np.any(counts < 0):
        raise ValueError("counts must be non-negative.")
    per_row = counts.sum(axis=1)
    n = int(per_row[0])
    if np.any(per_row != n) or n < 2:
        raise ValueError(
            f"every subject needs the same number (>= 2) of ratings; got row sums {sorted(set(per_row.tolist()))}."
        )
    if np.count_nonzero(counts.sum(axis=0)) < 2:  # P_e = 1
        return None
    return float(inter_rater.fleiss_kappa(counts, method="fleiss"))


@dataclass(frozen=True)
class AnswerRecord:
    """One scored answer. ``ef`` in % (requested EF for synthetic cases, known EF for real ones, or None);
    ``confidence`` 1-5; ``ms`` time on the case in milliseconds."""

    reader: str
    case: str
    truth: str
    answer: str
    confidence: int
    ms: int
    ef: float | None = None
    method: str | None = None

    @property
    def correct(self) -> bool:
        return self.truth == self.answer


@dataclass(frozen=True)
class GroupAccuracy:
    """Accuracy within a group of answers (an EF bin or a confidence level)."""

    label: str
    n: int
    correct: int
    accuracy: float | None


@dataclass(frozen=True)
class ReaderStats:
    """Statistics of one reader (or of all answers pooled). ``ci95`` is the exact interval of ``accuracy``,
    ``p_value`` the exact two-sided test of accuracy = 50 %, ``mean_seconds`` the mean time per case."""

    n: int
    accuracy: float | None
    ci95: tuple[float, float] | None
    p_value: float | None
    confusion: Confusion
    sensitivity: float | None
    specificity: float | None
    mean_seconds: float | None

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "ci95": list(self.ci95) if self.ci95 is not None else None,
            "p_value": self.p_value,
            "confusion": self.confusion.to_dict(),
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "mean_seconds": self.mean_seconds,
        }


@dataclass(frozen=True)
class PairKappa:
    """Cohen's kappa between two readers on the ``n`` cases both answered."""

    reader_a: str
    reader_b: str
    n: int
    kappa: float | None


@dataclass(frozen=True)
class StudyStats:
    """Everything the results tab and ``echolvfm quiz report`` show.

    ``pooled`` counts every scored answer of every reader; ``fleiss_kappa`` uses the ``fleiss_n_cases`` cases
    answered by all readers (None with fewer than two readers or no such case).
    """

    pooled: ReaderStats
    per_reader: dict[str, ReaderStats]
    cohen_kappa: list[PairKappa]
    fleiss_kappa: float | None
    fleiss_n_cases: int
    per_ef_bin: list[GroupAccuracy]
    per_confidence: list[GroupAccuracy]
    per_method: dict[str, BinomialSummary] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict; top-level keys n, accuracy, ci95, p_value, confusion {rr, rs, sr, ss}, sensitivity,
        specificity, fleiss_kappa, per_reader, plus mean_seconds, cohen_kappa, per_ef_bin, per_confidence."""
        out = self.pooled.to_dict()
        out["fleiss_kappa"] = self.fleiss_kappa
        out["fleiss_n_cases"] = self.fleiss_n_cases
        out["per_reader"] = {r: s.to_dict() for r, s in self.per_reader.items()}
        out["cohen_kappa"] = [
            {"readers": [p.reader_a, p.reader_b], "n": p.n, "kappa": p.kappa} for p in self.cohen_kappa
        ]
        out["per_ef_bin"] = [asdict(g) for g in self.per_ef_bin]
        out["per_confidence"] = [asdict(g) for g in self.per_confidence]
        out["per_method"] = {m: {"n": b.n, "judged_synthetic": b.k, "share": b.proportion,
                                 "ci95": None if b.ci95 is None else list(b.ci95)}
                             for m, b in self.per_method.items()}
        return out


def _reader_stats(records: Sequence[AnswerRecord]) -> ReaderStats:
    conf = confusion([r.truth for r in records], [r.answer for r in records])
    b = binomial_summary(conf.correct, conf.n)
    return ReaderStats(
        n=conf.n,
        accuracy=b.proportion,
        ci95=b.ci95,
        p_value=b.p_value,
        confusion=conf,
        sensitivity=conf.sensitivity,
        specificity=conf.specificity,
        mean_seconds=float(np.mean([r.ms for r in records]) / 1000.0) if records else None,
    )


def _group(label: str, records: Sequence[AnswerRecord]) -> GroupAccuracy:
    correct = sum(r.correct for r in records)
    n = len(records)
    return GroupAccuracy(label=label, n=n, correct=correct, accuracy=correct / n if n else None)


def accuracy_by_ef(records: Sequence[AnswerRecord], edges: Sequence[float] = DEFAULT_EF_EDGES) -> list[GroupAccuracy]:
    """Accuracy per EF bin [edges[i], edges[i+1]) (last bin closed), in order; answers whose case has no EF, or an
    EF outside the edges, go to a final "unknown" group when there are any."""
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"EF bin edges must be at least two increasing numbers; got {edges}.")
    bins: list[list[AnswerRecord]] = [[] for _ in range(len(edges) - 1)]
    unknown: list[AnswerRecord] = []
    for r in records:
        if r.ef is None or not (edges[0] <= r.ef <= edges[-1]):
            unknown.append(r)
            continue
        i = min(int(np.searchsorted(edges, r.ef, side="right")) - 1, len(bins) - 1)
        bins[i].append(r)
    out = [_group(f"{lo:g}-{hi:g}", b) for lo, hi, b in zip(edges, edges[1:], bins)]
    if unknown:
        out.append(_group("unknown", unknown))
    return out


def accuracy_by_confidence(records: Sequence[AnswerRecord]) -> list[GroupAccuracy]:
    """Accuracy at each confidence level 1-5 (all five listed, empty ones with accuracy None)."""
    return [_group(str(level), [r for r in records if r.confidence == level]) for level in range(1, 6)]


def synthetic_share_by_method(records: Sequence[AnswerRecord]) -> dict[str, BinomialSummary]:
    """Per generator (``method`` of the synthetic cases), the answers on its cases judged synthetic: the share the
    EchoLVFM paper reports per method, with its exact interval (p-value against 50 %)."""
    methods = sorted({r.method for r in records if r.truth == SYNTHETIC and r.method is not None})
    out = {}
    for m in methods:
        rs = [r for r in records if r.truth == SYNTHETIC and r.method == m]
        out[m] = binomial_summary(sum(r.answer == SYNTHETIC for r in rs), len(rs))
    return out


def summarize(records: Iterable[AnswerRecord], ef_edges: Sequence[float] = DEFAULT_EF_EDGES) -> StudyStats:
    """All study statistics from scored answers (one per reader and case; duplicates are an error)."""
    records = list(records)
    seen: set[tuple[str, str]] = set()
    for r in records:
        _check_label(r.truth, "truth")
        _check_label(r.answer, "answer")
        if (r.reader, r.case) in seen:
            raise ValueError(f"reader {r.reader!r} has more than one answer for case {r.case!r}.")
        seen.add((r.reader, r.case))
    readers = sorted({r.reader for r in records})
    by_reader = {name: [r for r in records if r.reader == name] for name in readers}
    answers = {name: {r.case: r.answer for r in rs} for name, rs in by_reader.items()}

    pairs = []
    for a, b in itertools.combinations(readers, 2):
        common = sorted(answers[a].keys() & answers[b].keys())
        pairs.append(
            PairKappa(a, b, len(common), cohen_kappa([answers[a][c] for c in common], [answers[b][c] for c in common]))
        )

    fleiss, n_fleiss = None, 0
    if len(readers) >= 2:
        common = sorted(set.intersection(*(set(answers[name]) for name in readers)))
        n_fleiss = len(common)
        if common:
            table = np.array(
                [[sum(answers[name][c] == cat for name in readers) for cat in CATEGORIES] for c in common]
            )
            fleiss = fleiss_kappa(table)

    return StudyStats(
        pooled=_reader_stats(records),
        per_reader={name: _reader_stats(rs) for name, rs in by_reader.items()},
        cohen_kappa=pairs,
        fleiss_kappa=fleiss,
        fleiss_n_cases=n_fleiss,
        per_ef_bin=accuracy_by_ef(records, ef_edges),
        per_confidence=accuracy_by_confidence(records),
        per_method=synthetic_share_by_method(records),
    )
