"""Shared test fixtures and helpers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


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
