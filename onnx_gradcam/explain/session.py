"""onnxruntime sessions with deliberately chosen providers (CPU, CUDA).

Also the one place where onnxruntime's own exceptions become this package's one-line errors.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import BadInputError, OnnxGradCamError, ProviderUnavailableError

DEVICES = ("auto", "cpu", "cuda")
_ORT_DEFAULT_SEVERITY = 2  # onnxruntime's own default (warnings and above)


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
    """onnxruntime lists CUDAExecutionProvider and the CUDA driver loads (a session may still
    fail to get CUDA when the CUDA or cuDNN libraries do not match; create_session checks that)."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present()


@contextmanager
def _quiet_default_logger() -> Iterator[None]:
    """Silence the process-wide logger while probing CUDA: a CUDA provider that fails to load
    logs an error and a warning there, which a fallback to the CPU must not print."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def create_session(
    model: bytes | str, device: str = "auto", threads: int | None = None, spin: bool = True
) -> tuple[ort.InferenceSession, SessionInfo]:
    """A session on the asked device. 'auto' uses CUDA only when a session really gets it; an
    explicit 'cuda' that cannot load is an error, never a silent fallback.

    `spin=False`: the intra-op threads sleep between runs instead of busy-waiting for the next one
    (onnxruntime's default), leaving the cores to other work in the process, such as a server's
    event loop between batches."""
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r}: to fix this, use one of {', '.join(DEVICES)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the default-class initializer note is expected, not a problem
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device in ("auto", "cuda") and cuda_available():
        with _quiet_default_logger():
            sess = _new_session(model, opts, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        if sess.get_providers()[0] == "CUDAExecutionProvider":
            return sess, SessionInfo("CUDAExecutionProvider")
    if device == "cuda":
        driver = "found" if _cuda_driver_present() else "not found"
        raise ProviderUnavailableError(
            f"CUDA was asked for but onnxruntime cannot use it here (providers: "
            f"{', '.join(ort.get_available_providers())}; CUDA driver {driver}): to fix this, install "
            "onnxruntime-gpu with the CUDA and cuDNN versions it was built for, or use --device cpu"
        )
    note = "note: CUDA is not available here; running on the CPU" if device == "auto" and _wants_note() else ""
    sess = _new_session(model, opts, ["CPUExecutionProvider"])
    return sess, SessionInfo("CPUExecutionProvider", note)


def _new_session(model: bytes | str, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors share no base class but Exception
        raise OnnxGradCamError(
            f"onnxruntime cannot load the model ({_first_line(exc)}): to fix this, check that the model "
            "runs in onnxruntime as exported, or report the model to onnx-gradcam"
        ) from exc


def run_session(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None
) -> list[np.ndarray]:
    """session.run with onnxruntime's errors (wrong shapes, dtypes, failed kernels) as one-line errors."""
    try:
        return list(session.run(outputs, dict(feeds)))
    except Exception as exc:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        raise BadInputError(
            f"onnxruntime could not run the model on inputs {shapes} ({_first_line(exc)}): "
            "to fix this, give inputs of the shape and type the model declares"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _wants_note() -> bool:
    return sys.platform.startswith("linux") and "CUDAExecutionProvider" in ort.get_available_providers()
