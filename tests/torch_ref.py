"""torch-side references shared by the tests: activation/gradient hooks, Grad-CAM, resizing."""

from __future__ import annotations

import copy
from collections.abc import Callable

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


def autograd_at(
    model: torch.nn.Module,
    layer: str,
    score: Callable[[torch.Tensor], torch.Tensor],
    features: np.ndarray | None = None,
) -> Callable[[np.ndarray, str], dict[str, np.ndarray]]:
    """A reference for tests/conditioning.py: (x, "float32" | "float64") -> {'out': the model's
    output, 'a': the activation of submodule `layer`, 'g': d score(out) / d a}, on a copy of the
    model in that dtype (the model itself is left as it is).

    With `features` (the prepared model's own feature tensor for the same x), the layer's output
    is replaced by them: the head is then differentiated at exactly the activation the prepared
    model differentiated. This separates the engine's exactness from the forward pass's, which
    in a deep random net amplifies float32 rounding (BatchNorm nets at initialisation are
    chaotic: Yang et al., ICLR 2019) and is a property of the model, not of the gradient.
    """

    def run(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        dt = getattr(torch, dtype)
        net = copy.deepcopy(model).to(dt).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        module = net.get_submodule(layer)
        if features is not None:
            module.register_forward_hook(lambda _m, _i, _o: torch.from_numpy(features).to(dt).requires_grad_(True))
        store = hooked(module)
        out = net(torch.from_numpy(x).to(dt).requires_grad_(features is None))
        score(out).backward()
        return {
            "out": out.detach().double().numpy(),
            "a": store["a"].detach().double().numpy(),
            "g": store["g"].double().numpy(),
        }

    return run


def forward_at(model: torch.nn.Module, layer: str) -> Callable[[np.ndarray, str], dict[str, np.ndarray]]:
    """(x, dtype) -> {'out': the model's output, 'a': submodule `layer`'s output}, no gradient."""

    def run(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        dt = getattr(torch, dtype)
        net = copy.deepcopy(model).to(dt).eval()
        store: dict[str, torch.Tensor] = {}
        net.get_submodule(layer).register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
        with torch.no_grad():
            out = net(torch.from_numpy(x).to(dt))
        return {"out": out.double().numpy(), "a": store["a"].double().numpy()}

    return run


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


def with_raw(reference):  # type: ignore[no-untyped-def]
    """Add Grad-CAM's raw map, ReLU(Σ_k mean(g_k) a_k), to an `autograd_at` reference's results."""

    def run(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        r = reference(x, dtype)
        r["raw"] = gradcam_reference(r["a"], r["g"])
        return r

    return run
