"""torch-side references shared by the tests: activation/gradient hooks, Grad-CAM, resizing."""

from __future__ import annotations

import numpy as np
import torch


def hooked(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Forward hook on `module`: store['a'] is its output, store['g'] its gradient after backward."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _i, o):  # type: ignore[no-untyped-def]
        store["a"] = o
        o.register_hook(lambda grad: store.__setitem__("g", grad))

    module.register_forward_hook(hook)
    return store


def gradcam_reference(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """ReLU(Σ_k mean(g_k) a_k) over any number of spatial axes."""
    axes = tuple(range(2, a.ndim))
    return np.maximum((g.mean(axis=axes, keepdims=True) * a).sum(1), 0)


def resize(a: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, half-pixel (torch's align_corners=False), to size x size."""
    t = torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.reshape(-1), y.reshape(-1))[0, 1])
