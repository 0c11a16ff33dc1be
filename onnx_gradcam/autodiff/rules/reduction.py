"""Gradients of the Reduce* ops (Sum, Mean, Max, Min, L2, LogSumExp), axes as attribute or input,
keepdims either way."""

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


def _kept(ctx: RuleContext, node: onnx.NodeProto, v: str, axes: list[int]) -> str:
    """A reduced tensor (the output or its gradient) with the reduced axes kept as size 1."""
    keepdims = int(ctx.attrs(node).get("keepdims", 1))
    return v if keepdims or not axes else ctx.b.unsqueeze(v, axes)


def _extremum(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None]) -> Grads:
    dy = dys[0]
    assert dy is not None
    axes = _axes(ctx, node)
    assert axes is not None
    rest: Grads = [None] * (len(node.input) - 1)
    if not axes:  # noop_with_empty_axes: Y = X
        return [dy, *rest]
    x, b = node.input[0], ctx.b
    mask = b.op("Cast", [b.op("Equal", [x, _kept(ctx, node, node.output[0], axes)])], to=ctx.info.grad_dtype(x))
    count = b.reduce("ReduceSum", mask, axes, keepdims=True)
    return [b.op("Mul", [mask, b.op("Div", [_kept(ctx, node, dy, axes), count])]), *rest]


def reduce_max(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = max_axes X:  dX = dY [X = Y] / #{X = Y} (Y, dY broadcast back over the reduced axes):
    every position that attains the maximum gets an equal share of dY, as in torch.amax."""
    return _extremum(ctx, node, dys)


def reduce_min(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = min_axes X:  dX = dY [X = Y] / #{X = Y} (Y, dY broadcast back over the reduced axes):
    every position that attains the minimum gets an equal share of dY, as in torch.amin."""
    return _extremum(ctx, node, dys)


def reduce_l2(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = sqrt(Σ_axes X^2):  dX = dY X / Y, and 0 where Y = 0 (torch's norm subgradient).

    With noop_with_empty_axes and no axes, Y = |X| and the same formula gives dY sign(X).
    """
    dy = dys[0]
    assert dy is not None
    axes = _axes(ctx, node)
    assert axes is not None
    x, b = node.input[0], ctx.b
    y = _kept(ctx, node, node.output[0], axes)
    zero = ctx.scalar_like(x, 0.0)
    safe = b.op("Where", [b.op("Equal", [y, zero]), ctx.scalar_like(x, 1.0), y])
    return [b.op("Mul", [x, b.op("Div", [_kept(ctx, node, dy, axes), safe])])] + [None] * (len(node.input) - 1)


def reduce_log_sum_exp(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = log Σ_axes e^X:  dX = dY e^(X - Y) (the softmax over the reduced axes; dY itself for
    noop_with_empty_axes with no axes, where Y = X)."""
    dy = dys[0]
    assert dy is not None
    axes = _axes(ctx, node)
    assert axes is not None
    x, b = node.input[0], ctx.b
    weights = b.op("Exp", [b.op("Sub", [x, _kept(ctx, node, node.output[0], axes)])])
    return [b.op("Mul", [weights, _kept(ctx, node, dy, axes)])] + [None] * (len(node.input) - 1)
