"""Gradients of pooling: global average/max, AveragePool (as a transposed depthwise conv),
MaxPool (scattering through the Indices output of a twin MaxPool)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from ..context import RuleContext
from ._common import spatial_pads
from .linear import conv_transpose_to, same_pads

Grads = list[str | None]
# X's and Y's dims ([0, C, *spatial]), kernel, strides, dilations, pads at begin and end
Geometry = tuple[tuple[int, ...], tuple[int, ...], list[int], list[int], list[int], list[int], list[int]]


def inverse_spatial_count(ctx: RuleContext, x: str) -> str:
    """1 / (number of spatial elements of x), constant where the shape is static."""
    shape = ctx.info.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return ctx.scalar_like(x, 1.0 / float(math.prod(int(d) for d in shape[2:] if isinstance(d, int))))
    b = ctx.b
    count = b.op("Cast", [b.op("ReduceProd", [b.shape_of(x, 2)], keepdims=0)], to=ctx.info.dtype(x))
    return b.op("Reciprocal", [count])


def global_average_pool(
    ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]
) -> Grads:
    """Y = mean_spatial X:  dX = broadcast(dY) / (H W)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    mean = b.op("Mul", [dy, inverse_spatial_count(ctx, x)])
    dx = b.op("Expand", [mean, b.shape_of(x)])
    ctx.spatial_constant[dx] = mean  # Grad-CAM's weights are this, without the Expand
    ctx.channel_sum[dx] = dy
    return [dx]


def global_max_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = max_spatial X:  dX = dY at the first arg-max of each channel (as torch), 0 elsewhere."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    flat_shape = b.const(np.array([0, 0, -1], np.int64), "shape")
    xf = b.op("Reshape", [x, flat_shape])
    idx = b.op("ArgMax", [xf], axis=2, keepdims=1)
    length = b.shape_of(xf, 2)
    positions = b.op(
        "Range",
        [b.const(np.array(0, np.int64), "zero"), b.squeeze(length, [0]), b.const(np.array(1, np.int64), "one")],
    )
    mask = b.op("Equal", [positions, idx])
    dyf = b.op("Reshape", [dy, flat_shape])
    dxf = b.op("Where", [mask, dyf, ctx.scalar_like(x, 0.0)])
    return [b.op("Reshape", [dxf, ctx.reshape_to(x)])]


def _pool_geometry(ctx: RuleContext, node: onnx.NodeProto) -> Geometry:
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.info.static_dims(x, 1), ctx.info.static_dims(y, 1)
    if xs is None or ys is None:
        raise ctx.unsupported(node, f"an input of unknown channel or spatial size {ctx.info.shape(x)}")
    xs, ys = (0, *xs), (0, *ys)  # index as [N, C, spatial...]; N is not used
    n = len(xs) - 2
    a = ctx.attrs(node)
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        begin = same_pads(auto_pad, xs[2:], kernel, strides, dilations)
        total = [
            max((o - 1) * s + (k - 1) * d + 1 - i, 0)
            for i, o, k, s, d in zip(xs[2:], ys[2:], kernel, strides, dilations)
        ]
        end = [t - bg for t, bg in zip(total, begin)]
    else:
        begin, end = spatial_pads(a.get("pads"), n)
    return xs, ys, kernel, strides, dilations, begin, end


def _window_counts(
    in_len: int, out_len: int, k: int, s: int, d: int, pb: int, pe: int, include_pad: bool
) -> np.ndarray:
    lo, hi = (-pb, in_len + pe) if include_pad else (0, in_len)
    counts = []
    for o in range(out_len):
        taps = [o * s - pb + j * d for j in range(k)]
        counts.append(sum(lo <= t < hi for t in taps))
    return np.array(counts, np.float64)


def _window_grid(geometry: Geometry, include_pad: bool) -> np.ndarray:
    """Each output window's number of taps over Y's spatial grid (padding counted or not), for
    the geometry `_pool_geometry` returns."""
    xs, ys, kernel, strides, dilations, begin, end = geometry
    n = len(kernel)
    grid = np.ones(ys[2:], np.float64)
    for axis in range(n):
        window = (kernel[axis], strides[axis], dilations[axis], begin[axis], end[axis])
        c = _window_counts(xs[2 + axis], ys[2 + axis], *window, include_pad)
        shape = [1] * n
        shape[axis] = -1
        grid = grid * c.reshape(shape)
    return grid


def average_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = window mean of X:  dX = conv_transpose(dY / count, ones), depthwise, where count is
    each window's divisor (padding counted or not, ceil_mode windows clipped), folded at prepare time."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    geometry = _pool_geometry(ctx, node)
    xs, ys, kernel, strides, dilations, begin, _ = geometry
    include_pad = bool(ctx.attrs(node).get("count_include_pad", 0))
    grid = _window_grid(geometry, include_pad)
    counts = 1.0 / np.maximum(grid, 1.0)
    channels = xs[1]
    b = ctx.b
    scaled = b.op("Mul", [dy, ctx.const_like(x, counts[None, None], "pool_divisor")])
    ones = ctx.const_like(x, np.ones([channels, 1, *kernel]), "pool_ones")
    dx = conv_transpose_to(ctx, scaled, ones, channels, kernel, strides, dilations, begin, xs[2:], ys[2:])
    if dy in ctx.channel_sum and (not include_pad or np.array_equal(grid, _window_grid(geometry, False))):
        # each window spreads dY over exactly the taps it divides by: spatial sums carry over
        ctx.channel_sum[dx] = ctx.channel_sum[dy]
    return [dx]


def max_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = window max of X:  dX[I] += dY, I the flat arg-max indices of a twin MaxPool with the
    same attributes (first maximum wins, as in torch and onnxruntime)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    a = ctx.attrs(node)
    if int(a.get("storage_order", 0)) != 0:
        raise ctx.unsupported(node, "storage_order=1")
    n = len(a["kernel_shape"])
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    overlap = any((k - 1) * d + 1 > s for k, s, d in zip(a["kernel_shape"], strides, dilations))
    if overlap and ctx.opset < 16:
        raise ctx.unsupported(node, f"overlapping windows at opset {ctx.opset} (ScatterElements needs opset 16 to add)")
    b = ctx.b
    twin_attrs = {k: v for k, v in a.items()}
    _, indices = b.op("MaxPool", [x], hint="maxpool_twin", outputs=2, **twin_attrs)
    flat = b.const(np.array([-1], np.int64), "shape")
    zeros = b.op("Reshape", [ctx.zeros_like(x), flat])
    scatter_attrs = {"reduction": "add"} if overlap else {}
    dxf = b.op(
        "ScatterElements",
        [zeros, b.op("Reshape", [indices, flat]), b.op("Reshape", [dy, flat])],
        axis=0,
        **scatter_attrs,
    )
    dx = b.op("Reshape", [dxf, ctx.reshape_to(x)])
    if dy in ctx.channel_sum:  # each window's dY lands on one tap: spatial sums carry over
        ctx.channel_sum[dx] = ctx.channel_sum[dy]
    return [dx]
