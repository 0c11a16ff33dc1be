"""The Grad-CAM subgraph: target class, seed, backward pass, channel weights, map.

    α_k = mean_ij ∂y^c/∂A^k_ij,   raw = ReLU(Σ_k α_k A^k),   map = normalise(resize(raw))
(Selvaraju et al., ICCV 2017 / IJCV 2020), y^c the score before softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..autodiff.backprop import backprop
from ..autodiff.builder import GraphBuilder
from ..autodiff.context import RuleContext, TensorInfo

CLASS_INPUT = "gradcam_class"
MAP = "gradcam_map"
RAW = "gradcam_raw"
TARGET = "gradcam_target"
SCORE = "gradcam_score"
FEATURES = "gradcam_features"
GRADIENT = "gradcam_gradient"


@dataclass(frozen=True)
class CamOutputs:
    map: str
    raw: str
    target: str
    score: str
    features: str | None = None
    gradient: str | None = None


def spatial_axes(shape: Sequence[object], layout: str) -> list[int]:
    """Spatial axes of the image input: [2..] for channels-first, [1..r-2] for channels-last."""
    rank = len(shape)
    return list(range(1, rank - 1)) if layout == "nhwc" else list(range(2, rank))


def detect_layout(shape: Sequence[object]) -> str:
    """'nchw' unless the last axis looks like channels (1, 3 or 4) and axis 1 does not."""
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "nhwc"
    return "nchw"


def class_seed(b: GraphBuilder, info: TensorInfo, logits: str, class_input: str) -> tuple[str, str, str]:
    """(seed, target, score): seed = one-hot of the chosen class (top-1 where class < 0)."""
    shape = info.shape(logits)
    assert shape is not None
    k = shape[1]
    dtype = info.dtype(logits)
    top1 = b.op("ArgMax", [logits], hint="top1", axis=1, keepdims=0)
    negative = b.op("Less", [class_input, b.const(np.array(0, np.int64), "zero")])
    target = b.op("Where", [negative, top1, class_input], hint="target")
    column = b.unsqueeze(target, [1])
    if isinstance(k, int):
        classes = b.const(np.arange(k, dtype=np.int64), "classes")
    else:
        classes = b.op("Range", [b.const(np.array(0, np.int64), "zero"),
                                 b.squeeze(b.shape_of(logits, 1, 2), [0]),
                                 b.const(np.array(1, np.int64), "one")])
    seed = b.op("Cast", [b.op("Equal", [column, classes])], hint="seed", to=dtype)
    score = b.squeeze(b.op("GatherElements", [logits, column], axis=1), [1])
    return seed, target, score


def append_gradcam(
    ctx: RuleContext,
    nodes: Sequence[onnx.NodeProto],
    image: str,
    layout: str,
    feature: str,
    reduction: str,
    class_input: str,
    expose_gradient: bool = False,
) -> CamOutputs:
    """Emit the whole Grad-CAM computation; returns the names of its internal results."""
    b, info = ctx.b, ctx.info
    seed, target, score = class_seed(b, info, reduction, class_input)
    grad = backprop(ctx, nodes, feature, {reduction: seed})
    rank = info.rank(feature)
    assert rank is not None
    feat_axes = list(range(2, rank))
    alpha = b.reduce("ReduceMean", grad, feat_axes, keepdims=True)
    weighted = b.reduce("ReduceSum", b.op("Mul", [alpha, feature]), [1], keepdims=False)
    raw = b.op("Relu", [weighted], hint="raw")
    image_shape = info.shape(image)
    assert image_shape is not None
    sizes = b.op(
        "Concat",
        [b.shape_of(raw, 0, 1), b.const(np.array([1], np.int64), "one"),
         b.op("Gather", [b.shape_of(image), b.const(np.array(spatial_axes(image_shape, layout), np.int64), "axes")],
              axis=0)],
        axis=0,
    )
    mode = "linear"
    up = b.op(
        "Resize",
        [b.unsqueeze(raw, [1]), "", "", sizes],
        hint="upsampled",
        mode=mode,
        coordinate_transformation_mode="half_pixel",
    )
    up = b.squeeze(up, [1])
    map_ = normalise(b, up, rank - 1)
    return CamOutputs(map_, raw, target, score, feature if expose_gradient else None,
                      grad if expose_gradient else None)


def normalise(b: GraphBuilder, x: str, rank: int) -> str:
    """Per-sample min-max to [0, 1]; a constant map becomes all zeros (no 0/0).

    map = (x - min) / (max - min) where max > min, else 0: scale-invariant, no epsilon.
    """
    axes = list(range(1, rank))
    lo = b.reduce("ReduceMin", x, axes, keepdims=True)
    hi = b.reduce("ReduceMax", x, axes, keepdims=True)
    span = b.op("Sub", [hi, lo])
    zero = b.const(np.array(0.0, np.float32), "zero")
    one = b.const(np.array(1.0, np.float32), "one")
    safe = b.op("Where", [b.op("Greater", [span, zero]), span, one])
    return b.op("Div", [b.op("Sub", [x, lo]), safe], hint="map")


