"""Echo readers and writers.

``load_echo(path)`` reads a DICOM, NIfTI (plain or CAMUS) or video file into an :class:`~echolvfm_core.echo.Echo`;
``read_camus`` and ``read_echonet`` iterate over data-set folders; ``write_mp4``, ``write_gif`` and ``write_dicom``
write loops (``to_uint8`` is their 8-bit conversion, the app's too). Heavy libraries (pydicom, nibabel, imageio,
PyAV) are imported only when a function needs them.
"""
from ._common import display_name
from .camus import CamusPatient, CamusView, read_camus
from .echonet import EchoNetRecord, read_echonet
from .load import detect_kind, load_echo, sample_cine_path, sample_echo_path
from .writers import to_uint8, write_dicom, write_gif, write_mp4

__all__ = [
    "load_echo",
    "detect_kind",
    "sample_echo_path",
    "sample_cine_path",
    "read_camus",
    "CamusPatient",
    "CamusView",
    "read_echonet",
    "EchoNetRecord",
    "write_mp4",
    "write_gif",
    "write_dicom",
    "to_uint8",
    "display_name",
]
