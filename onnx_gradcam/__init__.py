"""onnx-gradcam: Grad-CAM for any exported ONNX CNN, computed inside the graph.

`prepare()` rewrites a model so one forward pass returns its prediction and its Grad-CAM map.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BadInputError,
    LayerNotFoundError,
    OnnxGradCamError,
    ProviderUnavailableError,
    UnsupportedOpError,
    VerificationError,
)

if TYPE_CHECKING:
    from .api import Explainer, ExplainResult, load_bytes, overlay, plot_tokens, prepare, prepare_model
    from .explain.seeds import box_seed, class_seed, output_seed, region_seed
    from .surgery.prepare import PRESETS, PrepareReport, Preprocess

# Public names imported on first use (module __getattr__, PEP 562): `import onnx_gradcam` and
# `onnx-gradcam --help` load neither onnx nor onnxruntime nor NumPy.
_LAZY = {
    "prepare": ".api",
    "Explainer": ".api",
    "ExplainResult": ".api",
    "overlay": ".api",
    "load_bytes": ".api",
    "plot_tokens": ".api",
    "prepare_model": ".api",
    "class_seed": ".explain.seeds",
    "region_seed": ".explain.seeds",
    "box_seed": ".explain.seeds",
    "output_seed": ".explain.seeds",
    "Preprocess": ".surgery.prepare",
    "PrepareReport": ".surgery.prepare",
    "PRESETS": ".surgery.prepare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
