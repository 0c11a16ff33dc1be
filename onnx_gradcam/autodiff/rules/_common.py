"""Helpers shared by several rules: undoing broadcasting, static dims, axis handling."""

from __future__ import annotations

import numpy as np
import onnx

from ..context import RuleContext


def unbroadcast(ctx: RuleContext, grad: str, x: str, y: str) -> str:
    """Sum `grad` (shaped like broadcast result y) back to the shape of input x.

    dX = ReduceSum(dY, axes where x was broadcast, keepdims) reshaped to x's shape.
    Static when both shapes are known; otherwise the axes are found at run time.
    """
    xs, ys = ctx.info.shape(x), ctx.info.shape(y)
    if xs is not None and ys is not None and xs == ys:
        return grad
    if xs is not None and ys is not None and len(xs) <= len(ys):
        lead = len(ys) - len(xs)
        axes: list[int] = list(range(lead))
        known = True
        for i, dx in enumerate(xs):
            dy = ys[lead + i]
            if dx == dy:
                continue
            if dx == 1:
                axes.append(lead + i)
            else:
                known = False
                break
        if known:
            if not axes:
                return grad
            out = ctx.b.reduce("ReduceSum", grad, axes, keepdims=True)
            if lead:
                out = ctx.b.op("Reshape", [out, _shape_or_const(ctx, x)])
            return out
    return _unbroadcast_dynamic(ctx, grad, x)


def _shape_or_const(ctx: RuleContext, x: str) -> str:
    s = ctx.info.static_shape(x)
    if s is not None:
        return ctx.b.const(np.array(s, np.int64), "shape")
    return ctx.b.shape_of(x)


def _unbroadcast_dynamic(ctx: RuleContext, grad: str, x: str) -> str:
    # axes = positions where x's (left-padded) dim is 1 and grad's is not
    b = ctx.b
    gshape = b.shape_of(grad)
    xshape = b.shape_of(x)
    grank = b.op("Shape", [gshape])
    xrank = b.op("Shape", [xshape])
    pad_len = b.op("Sub", [grank, xrank])
    ones = b.op("ConstantOfShape", [pad_len], value=onnx.helper.make_tensor("v", onnx.TensorProto.INT64, [1], [1]))
    xpad = b.op("Concat", [ones, xshape], axis=0)
    one = b.const(np.array(1, np.int64), "one")
    mask = b.op("And", [b.op("Equal", [xpad, one]), b.op("Not", [b.op("Equal", [gshape, one])])])
    axes = b.squeeze(b.op("NonZero", [mask]), [0])
    summed = b.op("ReduceSum", [grad, axes], keepdims=1, noop_with_empty_axes=1)
    return b.op("Reshape", [summed, xshape])


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def spatial_pads(pads: list[int] | None, n: int) -> tuple[list[int], list[int]]:
    if not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def contract_axis(ctx: RuleContext, g: str, matrix: np.ndarray, axis: int, rank: int, like: str) -> str:
    """out[..., i, ...] = Σ_o g[..., o, ...] matrix[o, i] along `axis` (matrix is [out, in]).

    The transposed-linear-map gradient of any op that mixes one axis linearly with constant
    weights (gather, strided slice, resize): the matrix is built at prepare time.
    """
    if axis == rank - 2:
        return ctx.b.op("MatMul", [ctx.const_like(like, matrix.T, "axis_matrix"), g])
    return contract_axis_with(ctx, g, ctx.const_like(like, matrix, "axis_matrix"), axis, rank)


def contract_axis_with(ctx: RuleContext, g: str, matrix: str, axis: int, rank: int) -> str:
    """`contract_axis` with a matrix tensor [out, in] (one computed at run time)."""
    b = ctx.b
    if axis == rank - 1:
        return b.op("MatMul", [g, matrix])
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = b.transpose(g, perm)
    spread = b.op("MatMul", [moved, matrix])
    return b.transpose(spread, [int(i) for i in np.argsort(perm)])
