"""EchoLVFM Studio core library: echo I/O, preprocessing, training data, models, flows and instruments."""
from .echo import LABELS, ClinicalInfo, Echo, EchoLoadError, LoadLimits
from .io import load_echo, read_camus, sample_echo_path, write_dicom, write_gif, write_mp4

__all__ = ["Echo", "EchoLoadError", "ClinicalInfo", "LoadLimits", "LABELS"]
__all__ += ["load_echo", "read_camus", "write_mp4", "write_gif", "write_dicom", "sample_echo_path"]
__version__ = "0.1.0"
