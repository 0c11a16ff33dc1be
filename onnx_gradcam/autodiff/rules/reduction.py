"""Gradients of ReduceSum and ReduceMean, axes as attribute or input, keepdims either way."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from ..context import RuleContext
from ._common import norm_axis

Grads = list[str | None]


def _axes(ctx: RuleContext, node: onnx.NodeProto) -> list[int] | None:
    """The reduced axes, normalised; None for 'all axes'."""
    rank = ctx.info.rank(node.input[0])
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    a = ctx.attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.const_input(node, 1)
        axes = [int(v) for v in np.atleast_1d(value)] if value is not None else None
    if not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            return []
        return list(range(rank))
    return sorted(norm_axis(int(v), rank) for v in axes)


def _spread(ctx: RuleContext, node: onnx.NodeProto, dy: str, axes: list[int]) -> str:
    keepdims = int(ctx.attrs(node).get("keepdims", 1))
    g = dy if keepdims or not axes else ctx.b.unsqueeze(dy, axes)
    return ctx.b.op("Expand", [g, ctx.b.shape_of(node.input[0])])


def reduce_sum(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Σ_axes X:  dX = broadcast(dY) to X's shape."""
    dy = dys[0]
    assert dy is not None
    axes = _axes(ctx, node)
    assert axes is not None
    return [_spread(ctx, node, dy, axes)] + [None] * (len(node.input) - 1)


def reduce_mean(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = mean_axes X:  dX = broadcast(dY) / (number of reduced elements)."""
    dy = dys[0]
    assert dy is not None
    axes = _axes(ctx, node)
    assert axes is not None
    x = node.input[0]
    spread = _spread(ctx, node, dy, axes)
    shape = ctx.info.shape(x)
    dims = [shape[i] for i in axes] if shape is not None else [None]
    b = ctx.b
    if all(isinstance(d, int) for d in dims):
        count = float(math.prod(int(d) for d in dims if isinstance(d, int)))
        return [b.op("Mul", [spread, ctx.scalar_like(x, 1.0 / count)])] + [None] * (len(node.input) - 1)
    # count at run time: ReduceProd of the reduced dims of Shape(X)
    sizes = b.op("Gather", [b.shape_of(x), b.const(np.array(axes, np.int64), "axes")], axis=0)
    count = b.op("Cast", [b.op("ReduceProd", [sizes], keepdims=0)], to=ctx.info.dtype(x))
    return [b.op("Div", [spread, count])] + [None] * (len(node.input) - 1)
