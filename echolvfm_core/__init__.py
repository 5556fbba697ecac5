"""EchoLVFM Studio core library: echo I/O, preprocessing, training data, models, flows and instruments."""
from .echo import LABELS, ClinicalInfo, Echo, EchoLoadError, LoadLimits

__all__ = ["Echo", "EchoLoadError", "ClinicalInfo", "LoadLimits", "LABELS"]
__version__ = "0.1.0"
