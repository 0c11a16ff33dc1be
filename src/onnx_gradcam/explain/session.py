"""onnxruntime sessions with deliberately chosen providers (CPU, CUDA)."""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import onnxruntime as ort

from ..errors import BadInputError, ProviderUnavailableError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class SessionInfo:
    provider: str
    note: str = ""  # one quiet line when 'auto' fell back to the CPU


def _cuda_driver_present() -> bool:
    """True when the CUDA driver library loads (checked quietly: asking onnxruntime for CUDA
    on a machine without it prints a long error)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present()


def create_session(
    model: bytes | str, device: str = "auto", threads: int | None = None
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session on the asked device. 'auto' uses CUDA only when it really loads; an explicit
    'cuda' that cannot load is an error, never a silent fallback."""
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r}: to fix this, use one of {', '.join(DEVICES)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the default-class initializer note is expected, not a problem
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if device in ("auto", "cuda") and cuda_available():
        sess = ort.InferenceSession(model, opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if sess.get_providers()[0] == "CUDAExecutionProvider":
            return sess, SessionInfo("CUDAExecutionProvider")
    if device == "cuda":
        driver = "found" if _cuda_driver_present() else "not found"
        raise ProviderUnavailableError(
            f"CUDA was asked for but onnxruntime cannot use it here (providers: "
            f"{', '.join(ort.get_available_providers())}; CUDA driver {driver}): to fix this, install "
            "onnxruntime-gpu with a matching CUDA, or use --device cpu"
        )
    note = "note: CUDA is not available here; running on the CPU" if device == "auto" and _wants_note() else ""
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess, SessionInfo("CPUExecutionProvider", note)


def _wants_note() -> bool:
    return sys.platform.startswith("linux") and "CUDAExecutionProvider" in ort.get_available_providers()
