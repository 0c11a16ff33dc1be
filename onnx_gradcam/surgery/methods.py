"""CAM methods: how a map is made from the feature map A [N, C, ...] and its gradient G = dS/dA.

Each returns Σ_k (weights ⊙ A)_k before the final ReLU, following the published formula and
pytorch-grad-cam's implementation (including its small constants, so maps agree on models
whose activations are tiny).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..autodiff.builder import GraphBuilder


def _const(b: GraphBuilder, v: float) -> str:
    return b.const(np.array(v, np.float32), "eps")


def _channel_sum(b: GraphBuilder, x: str) -> str:
    return b.reduce("ReduceSum", x, [1], keepdims=False)


def gradcam(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """Grad-CAM (Selvaraju et al., ICCV 2017): α_k = mean_ij G_kij;  Σ_k α_k A_k."""
    alpha = b.reduce("ReduceMean", g, axes, keepdims=True)
    return _channel_sum(b, b.op("Mul", [alpha, a]))


def gradcam_plus_plus(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018): a_kij = G² / (2 G² + Σ_ij A_k · G³ + 1e-6)
    where G != 0, α_k = Σ_ij ReLU(G_kij) a_kij;  Σ_k α_k A_k."""
    g2 = b.op("Mul", [g, g])
    g3 = b.op("Mul", [g2, g])
    sum_a = b.reduce("ReduceSum", a, axes, keepdims=True)
    denom = b.op("Add", [b.op("Add", [b.op("Mul", [g2, _const(b, 2.0)]), b.op("Mul", [sum_a, g3])]), _const(b, 1e-6)])
    aij = b.op("Div", [g2, denom])
    aij = b.op("Where", [b.op("Equal", [g, _const(b, 0.0)]), _const(b, 0.0), aij])
    alpha = b.reduce("ReduceSum", b.op("Mul", [b.op("Relu", [g]), aij]), axes, keepdims=True)
    return _channel_sum(b, b.op("Mul", [alpha, a]))


def xgradcam(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """XGrad-CAM (Fu et al., BMVC 2020): α_k = Σ_ij G_kij A_kij / (Σ_ij A_kij + 1e-7);  Σ_k α_k A_k."""
    sum_a = b.reduce("ReduceSum", a, axes, keepdims=True)
    w = b.op("Div", [b.op("Mul", [g, a]), b.op("Add", [sum_a, _const(b, 1e-7)])])
    alpha = b.reduce("ReduceSum", w, axes, keepdims=True)
    return _channel_sum(b, b.op("Mul", [alpha, a]))


def hirescam(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """HiResCAM (Draelos & Carin, 2020): Σ_k G_k ⊙ A_k, element-wise, no spatial averaging."""
    return _channel_sum(b, b.op("Mul", [g, a]))


def layercam(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """LayerCAM (Jiang et al., IEEE TIP 2021): Σ_k ReLU(G_k) ⊙ A_k."""
    return _channel_sum(b, b.op("Mul", [b.op("Relu", [g]), a]))


def gradcam_elementwise(b: GraphBuilder, a: str, g: str, axes: list[int]) -> str:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): Σ_k ReLU(G_k ⊙ A_k)."""
    return _channel_sum(b, b.op("Relu", [b.op("Mul", [g, a])]))


METHODS: dict[str, Callable[[GraphBuilder, str, str, list[int]], str]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "layercam": layercam,
    "gradcam-elementwise": gradcam_elementwise,
}
