"""Gradients of element-wise arithmetic (with broadcasting) and identity-like ops."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from ..context import RuleContext
from ._common import unbroadcast

Grads = list[str | None]


def add(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = A + B:  dA = unbroadcast(dY),  dB = unbroadcast(dY)."""
    dy, y = dys[0], node.output[0]
    assert dy is not None
    return [unbroadcast(ctx, dy, x, y) if w else None for x, w in zip(node.input, wrt)]


def sum_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Σ X_i:  dX_i = unbroadcast(dY)."""
    return add(ctx, node, dys, wrt)


def sub(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = A - B:  dA = unbroadcast(dY),  dB = unbroadcast(-dY)."""
    dy, y = dys[0], node.output[0]
    assert dy is not None
    a, b = node.input
    da = unbroadcast(ctx, dy, a, y) if wrt[0] else None
    db = unbroadcast(ctx, ctx.b.op("Neg", [dy]), b, y) if wrt[1] else None
    return [da, db]


def mul(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = A * B:  dA = unbroadcast(dY * B),  dB = unbroadcast(dY * A)."""
    dy, y = dys[0], node.output[0]
    assert dy is not None
    a, b = node.input
    da = unbroadcast(ctx, ctx.b.op("Mul", [dy, b]), a, y) if wrt[0] else None
    db = unbroadcast(ctx, ctx.b.op("Mul", [dy, a]), b, y) if wrt[1] else None
    return [da, db]


def div(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = A / B:  dA = unbroadcast(dY / B),  dB = unbroadcast(-dY * Y / B)."""
    dy, y = dys[0], node.output[0]
    assert dy is not None
    a, b = node.input
    da = unbroadcast(ctx, ctx.b.op("Div", [dy, b]), a, y) if wrt[0] else None
    db = None
    if wrt[1]:
        db = unbroadcast(ctx, ctx.b.op("Neg", [ctx.b.op("Div", [ctx.b.op("Mul", [dy, y]), b])]), b, y)
    return [da, db]


def neg(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = -X:  dX = -dY."""
    assert dys[0] is not None
    return [ctx.b.op("Neg", [dys[0]])]


def identity(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X (Identity; Dropout at inference):  dX = dY."""
    return [dys[0]] + [None] * (len(node.input) - 1)


def cast(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = cast(X):  dX = cast(dY) back to X's type (float32 for an integer X, as dynamic
    quantization's Cast of an int32 accumulator: its gradient is a real number)."""
    assert dys[0] is not None
    x = node.input[0]
    if ctx.info.grad_dtype(x) == ctx.info.grad_dtype(node.output[0]):
        return [dys[0]]
    return [ctx.b.op("Cast", [dys[0]], to=ctx.info.grad_dtype(x))]


def pow_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X ** p (p constant):  dX = dY * p * X ** (p - 1)."""
    dy = dys[0]
    assert dy is not None
    x, p = node.input
    if wrt[1]:
        raise ctx.unsupported(node, "an exponent that depends on the feature tensor")
    pv = ctx.const_input(node, 1)
    assert pv is not None
    xm = ctx.b.op("Pow", [x, ctx.const_like(p, pv - 1, "exponent")])
    dx = ctx.b.op("Mul", [ctx.b.op("Mul", [dy, xm]), ctx.const_like(x, pv, "exponent")])
    return [unbroadcast(ctx, dx, x, node.output[0]), None]


def sqrt(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = sqrt(X):  dX = dY * 0.5 / Y."""
    assert dys[0] is not None
    y = node.output[0]
    return [ctx.b.op("Div", [ctx.b.op("Mul", [dys[0], ctx.scalar_like(y, 0.5)]), y])]


def exp(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = exp(X):  dX = dY * Y."""
    assert dys[0] is not None
    return [ctx.b.op("Mul", [dys[0], node.output[0]])]


def log(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = log(X):  dX = dY / X."""
    assert dys[0] is not None
    return [ctx.b.op("Div", [dys[0], node.input[0]])]


def reciprocal(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = 1 / X:  dX = -dY * Y * Y."""
    assert dys[0] is not None
    y = node.output[0]
    return [ctx.b.op("Neg", [ctx.b.op("Mul", [dys[0], ctx.b.op("Mul", [y, y])])])]


def _extremum(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    # dX_i = unbroadcast(dY [X_i = Y] / #{j : X_j = Y}): a tie splits dY equally among the tied operands
    dy, y = dys[0], node.output[0]
    assert dy is not None
    if len(node.input) == 1:
        return [dy]
    b = ctx.b
    dtype = ctx.info.grad_dtype(y)
    masks = [b.op("Cast", [b.op("Equal", [x, y])], to=dtype) for x in node.input]
    share = b.op("Div", [dy, b.op("Sum", masks)])
    return [unbroadcast(ctx, b.op("Mul", [share, m]), x, y) if w else None for x, m, w in zip(node.input, masks, wrt)]


def max_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = max(X_1..X_n), broadcasting:  dX_i = unbroadcast(dY [X_i = Y] / #{j: X_j = Y}): operands
    that tie for the maximum share dY equally (torch.maximum's 1/2 for two)."""
    return _extremum(ctx, node, dys, wrt)


def min_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = min(X_1..X_n), broadcasting:  dX_i = unbroadcast(dY [X_i = Y] / #{j: X_j = Y}): operands
    that tie for the minimum share dY equally (torch.minimum's 1/2 for two)."""
    return _extremum(ctx, node, dys, wrt)


def abs_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = abs(X):  dX = dY * sign(X) (0 at X = 0, as torch)."""
    assert dys[0] is not None
    return [ctx.b.op("Mul", [dys[0], ctx.b.op("Sign", [node.input[0]])])]


def where(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = C ? A : B, broadcasting:  dA = unbroadcast(C ? dY : 0),  dB = unbroadcast(C ? 0 : dY);  C has none."""
    dy, y = dys[0], node.output[0]
    assert dy is not None
    c, a, bb = node.input
    zero = ctx.scalar_like(y, 0.0)
    da = unbroadcast(ctx, ctx.b.op("Where", [c, dy, zero]), a, y) if wrt[1] else None
    db = unbroadcast(ctx, ctx.b.op("Where", [c, zero, dy]), bb, y) if wrt[2] else None
    return [None, da, db]
