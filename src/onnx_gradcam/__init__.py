"""onnx-gradcam: Grad-CAM for any exported ONNX CNN, computed inside the graph.

`prepare()` rewrites a model so one forward pass returns its prediction and its Grad-CAM map.
"""

from __future__ import annotations

from ._version import __version__
from .api import Explainer, ExplainResult, overlay, prepare
from .errors import (
    BadInputError,
    LayerNotFoundError,
    OnnxGradCamError,
    ProviderUnavailableError,
    UnsupportedOpError,
)
from .surgery.prepare import PRESETS, PrepareReport, Preprocess, prepare_model

__all__ = [
    "__version__",
    "prepare",
    "Explainer",
    "ExplainResult",
    "overlay",
    "prepare_model",
    "Preprocess",
    "PrepareReport",
    "PRESETS",
    "OnnxGradCamError",
    "UnsupportedOpError",
    "LayerNotFoundError",
    "BadInputError",
    "ProviderUnavailableError",
]
