"""Gradient of Resize: per resized axis, the transposed interpolation matrix.

Resize is separable and linear in X for the modes 'nearest' and 'linear' (and 'cubic'), so
Y = X ×_axis M_axis for each resized axis, and dX = dY ×_axis M_axis^T. M is computed at
prepare time by resizing the identity with onnx's reference implementation of the same node,
which makes every coordinate_transformation_mode and nearest_mode exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from ..context import RuleContext
from ._common import contract_axis

Grads = list[str | None]


def _axis_matrix(
    node: onnx.NodeProto, opset: int, n_in: int, n_out: int, scale: float | None, roi: tuple[float, float] | None
) -> np.ndarray:
    """M [n_out, n_in] such that resizing a vector v along this axis gives M @ v."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.pop("axes", None)
    attrs.pop("keep_aspect_ratio_policy", None)
    inputs = ["x", "roi", "scales" if scale is not None else "", "sizes" if scale is None else ""]
    one = helper.make_node("Resize", inputs, ["y"], **attrs)
    inits = [helper.make_tensor("roi", TensorProto.FLOAT, [4], [0.0, roi[0], 1.0, roi[1]] if roi else [0, 0, 1, 1])]
    if scale is not None:
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, scale]))
    else:
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [2], [n_in, n_out]))
    graph = helper.make_graph(
        [one],
        "resize_matrix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_in, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    (y,) = ReferenceEvaluator(model).run(None, {"x": np.eye(n_in, dtype=np.float32)})
    return np.asarray(y, np.float64).T  # row j of eye resized = column j of M


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """M [n_out, n_in] of ONNX Resize, mode linear, half_pixel: bilinear upsampling per axis."""
    node = helper.make_node(
        "Resize", ["x", "roi", "", "sizes"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel"
    )
    return _axis_matrix(node, 13, n_in, n_out, None, None)


def _const_or_none(ctx: RuleContext, node: onnx.NodeProto, index: int) -> np.ndarray | None:
    """A constant operand, or None when absent, empty, or computed at run time."""
    if index >= len(node.input) or not node.input[index]:
        return None
    value = ctx.info.const(node.input[index])
    return None if value is None or value.size == 0 else value


def _replication_factors(
    node: onnx.NodeProto, opset: int, scales: np.ndarray | None, roi: np.ndarray | None, n_axes: int
) -> list[int] | None:
    """Integer factors k when this Resize repeats every input element k times per axis
    (nearest mode, integer scales; checked on the node's own interpolation matrix), else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"nearest")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest" or scales is None or roi is not None:
        return None
    if any(float(v) != int(v) or int(v) < 1 for v in scales):
        return None
    factors = [int(v) for v in scales]
    for k in set(factors) - {1}:
        m = _axis_matrix(node, opset, 7, 7 * k, float(k), None)
        if not np.array_equal(m, np.kron(np.eye(7), np.ones((k, 1)))):
            return None
    return factors


def _sum_pool(ctx: RuleContext, dy: str, x: str, factors: list[int]) -> str:
    """Transpose of k-fold replication: the sum over each k x k block (any spatial size)."""
    b = ctx.b
    pooled = b.op("AveragePool", [dy], kernel_shape=factors, strides=factors)
    return b.op("Mul", [pooled, ctx.scalar_like(x, float(np.prod(factors)))])


def resize(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X ×_a M_a over resized axes a:  dX = dY ×_a M_a^T (M folded at prepare time)."""
    dy = dys[0]
    assert dy is not None
    a = ctx.attrs(node)
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear", "cubic"):
        raise ctx.unsupported(node, f"mode={mode!r}")
    if int(a.get("antialias", 0)):
        raise ctx.unsupported(node, "antialias=1")
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.info.shape(x), ctx.info.shape(y)
    if xs is None or ys is None or len(xs) != len(ys):
        raise ctx.unsupported(node, "input or output of unknown shape")
    rank = len(xs)
    scales = _const_or_none(ctx, node, 1 if node.op_type == "Upsample" or ctx.opset < 11 else 2)
    sizes = _const_or_none(ctx, node, 3) if ctx.opset >= 11 else None
    roi = _const_or_none(ctx, node, 1) if ctx.opset >= 11 else None
    scales_at_run_time = len(node.input) > 2 and bool(node.input[2]) and ctx.info.const(node.input[2]) is None
    if scales is None and sizes is None and scales_at_run_time and ctx.opset >= 11:
        # run-time scales: the matrix would depend on the value, not only on the sizes
        raise ctx.unsupported(node, "scales computed at run time")
    axes_attr = a.get("axes")
    axes = [int(v) % rank for v in axes_attr] if axes_attr else list(range(rank))
    factors = _replication_factors(node, ctx.opset, scales, roi, len(axes))
    if factors is not None and axes == list(range(rank)) and factors[:2] == [1, 1]:
        return [_sum_pool(ctx, dy, x, factors[2:])] + [None] * (len(node.input) - 1)
    g = dy
    for j, ax in enumerate(axes):
        scale = float(scales[j]) if scales is not None else None
        if xs[ax] == ys[ax] and scale in (None, 1.0):
            continue
        n_in, n_out = xs[ax], ys[ax]
        if not isinstance(n_in, int) or not isinstance(n_out, int):
            raise ctx.unsupported(node, f"axis {ax} resized between sizes unknown at prepare time ({n_in} -> {n_out})")
        r = (float(roi[j]), float(roi[len(axes) + j])) if roi is not None else None
        m = _axis_matrix(node, ctx.opset, n_in, n_out, scale, r)
        g = contract_axis(ctx, g, m, ax, rank, x)
    return [g] + [None] * (len(node.input) - 1)
