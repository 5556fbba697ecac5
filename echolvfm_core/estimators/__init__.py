"""EF instruments: segmentation -> area-length EF (:mod:`.segmentation`), diffusion regression -> EF posterior
(:mod:`.ef_posterior`), and their latency benchmarks (:mod:`.bench`)."""
from .ef_posterior import EFPosterior, EFPosteriorEstimator, evaluate_ef_regression
from .segmentation import EFMeasurement, SegmentationEF, SegmentationError, evaluate_segmentation, measure_labels

__all__ = [
    "SegmentationEF",
    "EFMeasurement",
    "SegmentationError",
    "measure_labels",
    "evaluate_segmentation",
    "EFPosteriorEstimator",
    "EFPosterior",
    "evaluate_ef_regression",
]
