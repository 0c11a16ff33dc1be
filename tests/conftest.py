"""Shared test fixtures and helpers."""

from __future__ import annotations

import contextlib

import numpy as np
import onnxruntime as ort

# The suite runs TensorFlow (tests/test_keras.py) and torch's dynamo exporter in one process.
# Importing triton (which torch.export pulls in) after TensorFlow segfaults (measured: torch
# 2.14.1, triton 3.x, tensorflow-cpu 2.21; the other order works), so triton comes first.
with contextlib.suppress(ImportError):
    import triton.runtime.autotuner  # noqa: F401


def cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    """A CPU session with onnxruntime's warnings silenced (the default-class initializer note)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| relative to the reference's largest magnitude."""
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = (
        float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
        if expected.size
        else 0.0
    )
    return diff / scale if scale > 0 else diff


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """The conditioning margins of the exactness cases (tests/conditioning.py), per test file."""
    from .conditioning import MARGINS

    if not MARGINS:
        return
    terminalreporter.section("conditioning: largest float32-vs-float64 error / tolerance per test file")
    for test_file in sorted({m[0] for m in MARGINS}):
        rows = [m for m in MARGINS if m[0] == test_file and not m[1].endswith("(derived)")]
        derived = [m for m in MARGINS if m[0] == test_file and m[1].endswith("(derived)")]
        if rows:
            worst = max(rows, key=lambda m: m[2])
            line = f"{test_file}: {len(rows)} cases, largest {worst[2]:.2e} ({worst[1]})"
        else:
            line = f"{test_file}: no conditioned case"
        if derived:
            widest = max(derived, key=lambda m: m[2])
            line += f"; {len(derived)} forward comparisons, widest derived tolerance {widest[2]:.1e} ({widest[1]})"
        terminalreporter.write_line(line)
