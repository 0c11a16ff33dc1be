"""onnx-gradcam: Grad-CAM for any exported ONNX CNN, computed inside the graph.

`prepare()` rewrites a model so one forward pass returns its prediction and its Grad-CAM map.
"""

from __future__ import annotations

from ._version import __version__
from .api import Explainer, ExplainResult, load_bytes, overlay, plot_tokens, prepare, prepare_model
from .errors import (
    BadInputError,
    LayerNotFoundError,
    OnnxGradCamError,
    ProviderUnavailableError,
    UnsupportedOpError,
    VerificationError,
)
from .evaluate.run import EvaluationResult, evaluate  # the function shadows the subpackage's name; see evaluate/run.py
from .explain.seeds import box_seed, class_seed, output_seed, region_seed
from .surgery.prepare import PRESETS, PrepareReport, Preprocess

__all__ = [
    "__version__",
    "prepare",
    "Explainer",
    "ExplainResult",
    "overlay",
    "load_bytes",
    "plot_tokens",
    "class_seed",
    "region_seed",
    "box_seed",
    "output_seed",
    "prepare_model",
    "evaluate",
    "EvaluationResult",
    "Preprocess",
    "PrepareReport",
    "PRESETS",
    "OnnxGradCamError",
    "UnsupportedOpError",
    "LayerNotFoundError",
    "BadInputError",
    "ProviderUnavailableError",
    "VerificationError",
]
