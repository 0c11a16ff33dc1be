"""Gradients of activations and of (Log)Softmax.

Relu's backward is swappable: ctx.relu_mode "guided" passes only positive gradients where the
forward input was positive (Springenberg et al., 2015), the rule Guided Backprop needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from ..context import RuleContext
from ._common import norm_axis, unbroadcast

Grads = list[str | None]


def _where_positive(ctx: RuleContext, x: str, dy: str, other: str | None = None) -> str:
    zero = ctx.scalar_like(x, 0.0)
    return ctx.b.op("Where", [ctx.b.op("Greater", [x, zero]), dy, other or zero])


def relu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = max(X, 0):  dX = dY * (X > 0);  guided: dX = max(dY, 0) * (X > 0)."""
    dy = dys[0]
    assert dy is not None
    if ctx.relu_mode == "guided":
        dy = ctx.b.op("Relu", [dy])
    return [_where_positive(ctx, node.input[0], dy)]


def leaky_relu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X if X > 0 else alpha X:  dX = dY if X > 0 else alpha dY."""
    dy = dys[0]
    assert dy is not None
    alpha = float(ctx.attrs(node).get("alpha", 0.01))
    x = node.input[0]
    return [_where_positive(ctx, x, dy, ctx.b.op("Mul", [dy, ctx.scalar_like(x, alpha)]))]


def prelu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X if X > 0 else slope X:  dX = dY if X > 0 else slope dY;  dslope = Σ dY X [X <= 0]."""
    dy = dys[0]
    assert dy is not None
    x, slope = node.input
    dx = _where_positive(ctx, x, dy, ctx.b.op("Mul", [dy, slope])) if wrt[0] else None
    dslope = None
    if wrt[1]:
        neg_part = _where_positive(ctx, x, ctx.scalar_like(x, 0.0), ctx.b.op("Mul", [dy, x]))
        dslope = unbroadcast(ctx, neg_part, slope, node.output[0])
    return [dx, dslope]


def clip(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = min(max(X, lo), hi):  dX = dY * (lo < X < hi), as torch's hardtanh/relu6."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    a = ctx.attrs(node)
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else None
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if lo is None and "min" in a:
        lo = ctx.scalar_like(x, float(a["min"]))
    if hi is None and "max" in a:
        hi = ctx.scalar_like(x, float(a["max"]))
    zero = ctx.scalar_like(x, 0.0)
    out = dy
    if lo is not None:
        out = ctx.b.op("Where", [ctx.b.op("Greater", [x, lo]), out, zero])
    if hi is not None:
        out = ctx.b.op("Where", [ctx.b.op("Less", [x, hi]), out, zero])
    return [out] + [None] * (len(node.input) - 1)


def sigmoid(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = 1 / (1 + e^-X):  dX = dY * Y * (1 - Y)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    one_minus = ctx.b.op("Sub", [ctx.scalar_like(y, 1.0), y])
    return [ctx.b.op("Mul", [dy, ctx.b.op("Mul", [y, one_minus])])]


def hard_sigmoid(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = clip(alpha X + beta, 0, 1):  dX = alpha dY where 0 < alpha X + beta < 1."""
    dy = dys[0]
    assert dy is not None
    a = ctx.attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    return [_hard_window(ctx, node.input[0], dy, alpha, beta, scale=alpha)]


def _hard_window(ctx: RuleContext, x: str, dy: str, alpha: float, beta: float, scale: float) -> str:
    # pass scale * dY where 0 < alpha x + beta < 1, i.e. strictly inside (lo, hi)
    lo, hi = (-beta) / alpha, (1.0 - beta) / alpha
    inside = ctx.b.op(
        "And",
        [ctx.b.op("Greater", [x, ctx.scalar_like(x, lo)]), ctx.b.op("Less", [x, ctx.scalar_like(x, hi)])],
    )
    scaled = ctx.b.op("Mul", [dy, ctx.scalar_like(x, scale)]) if scale != 1.0 else dy
    return ctx.b.op("Where", [inside, scaled, ctx.scalar_like(x, 0.0)])


def hard_swish(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X * clip(X/6 + 1/2, 0, 1):  dX = dY * (0 if X < -3, X/3 + 1/2 if X <= 3, else 1)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    slope = b.op("Add", [b.op("Mul", [x, ctx.scalar_like(x, 1.0 / 3.0)]), ctx.scalar_like(x, 0.5)])
    mid = b.op("Where", [b.op("Greater", [x, ctx.scalar_like(x, 3.0)]), ctx.scalar_like(x, 1.0), slope])
    factor = b.op("Where", [b.op("Less", [x, ctx.scalar_like(x, -3.0)]), ctx.scalar_like(x, 0.0), mid])
    return [b.op("Mul", [dy, factor])]


def tanh(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = tanh(X):  dX = dY * (1 - Y^2)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    one_minus = ctx.b.op("Sub", [ctx.scalar_like(y, 1.0), ctx.b.op("Mul", [y, y])])
    return [ctx.b.op("Mul", [dy, one_minus])]


def erf(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = erf(X):  dX = dY * 2/sqrt(pi) * exp(-X^2)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    e = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    return [b.op("Mul", [dy, b.op("Mul", [e, ctx.scalar_like(x, 2.0 / math.sqrt(math.pi))])])]


def gelu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X Φ(X):  dX = dY (Φ(X) + X φ(X));  tanh form: Y = X/2 (1 + tanh u), u = c (X + 0.044715 X^3)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    s = lambda v: ctx.scalar_like(x, v)  # noqa: E731
    if ctx.attrs(node).get("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = b.op("Mul", [x, x])
        u = b.op("Mul", [b.op("Mul", [x, b.op("Add", [s(1.0), b.op("Mul", [x2, s(0.044715)])])]), s(c)])
        t = b.op("Tanh", [u])
        du = b.op("Mul", [b.op("Add", [s(1.0), b.op("Mul", [x2, s(3 * 0.044715)])]), s(c)])
        sech2 = b.op("Sub", [s(1.0), b.op("Mul", [t, t])])
        d = b.op(
            "Add",
            [
                b.op("Mul", [b.op("Add", [s(1.0), t]), s(0.5)]),
                b.op("Mul", [b.op("Mul", [b.op("Mul", [x, s(0.5)]), sech2]), du]),
            ],
        )
    else:
        cdf = b.op("Mul", [b.op("Add", [s(1.0), b.op("Erf", [b.op("Mul", [x, s(1.0 / math.sqrt(2.0))])])]), s(0.5)])
        pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), s(-0.5)])]), s(1.0 / math.sqrt(2 * math.pi))])
        d = b.op("Add", [cdf, b.op("Mul", [x, pdf])])
    return [b.op("Mul", [dy, d])]


def _axis(ctx: RuleContext, node: onnx.NodeProto) -> int:
    rank = ctx.info.rank(node.input[0])
    axis = int(ctx.attrs(node).get("axis", -1 if ctx.opset >= 13 else 1))
    if ctx.opset < 13 and not (rank is not None and norm_axis(axis, rank) == rank - 1):
        raise ctx.unsupported(node, f"axis={axis} at opset < 13 (coerced to 2-D)")
    return axis


def softmax(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = softmax(X):  dX = Y * (dY - Σ_axis dY Y)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    axis = _axis(ctx, node)
    s = ctx.b.reduce("ReduceSum", ctx.b.op("Mul", [dy, y]), [axis], keepdims=True)
    return [ctx.b.op("Mul", [y, ctx.b.op("Sub", [dy, s])])]


def log_softmax(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = log softmax(X):  dX = dY - exp(Y) Σ_axis dY."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    axis = _axis(ctx, node)
    s = ctx.b.reduce("ReduceSum", dy, [axis], keepdims=True)
    return [ctx.b.op("Sub", [dy, ctx.b.op("Mul", [ctx.b.op("Exp", [y]), s])])]


def softplus(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = log(1 + e^X):  dX = dY * sigmoid(X)."""
    dy = dys[0]
    assert dy is not None
    return [ctx.b.op("Mul", [dy, ctx.b.op("Sigmoid", [node.input[0]])])]


def mish(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X tanh(softplus(X)):  dX = dY (T + X sigmoid(X) (1 - T^2)),  T = tanh(softplus(X))."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    t = b.op("Tanh", [b.op("Softplus", [x])])
    sech2 = b.op("Sub", [ctx.scalar_like(x, 1.0), b.op("Mul", [t, t])])
    d = b.op("Add", [t, b.op("Mul", [b.op("Mul", [x, b.op("Sigmoid", [x])]), sech2])])
    return [b.op("Mul", [dy, d])]


def elu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X if X > 0 else alpha (e^X - 1):  dX = dY if X > 0 else dY (Y + alpha)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    alpha = float(ctx.attrs(node).get("alpha", 1.0))
    below = ctx.b.op("Mul", [dy, ctx.b.op("Add", [y, ctx.scalar_like(y, alpha)])])
    return [_where_positive(ctx, x, dy, below)]


_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


def selu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = gamma X if X > 0 else gamma alpha (e^X - 1):  dX = gamma dY if X > 0 else dY (Y + gamma alpha)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    a = ctx.attrs(node)
    alpha, gamma = float(a.get("alpha", _SELU_ALPHA)), float(a.get("gamma", _SELU_GAMMA))
    b = ctx.b
    above = b.op("Mul", [dy, ctx.scalar_like(x, gamma)])
    below = b.op("Mul", [dy, b.op("Add", [y, ctx.scalar_like(y, gamma * alpha)])])
    zero = ctx.scalar_like(x, 0.0)
    return [b.op("Where", [b.op("Greater", [x, zero]), above, below])]


def celu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = max(0, X) + min(0, alpha (e^(X/alpha) - 1)):  dX = dY if X > 0 else dY e^(X/alpha)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    alpha = float(ctx.attrs(node).get("alpha", 1.0))
    b = ctx.b
    below = b.op("Mul", [dy, b.op("Exp", [b.op("Mul", [x, ctx.scalar_like(x, 1.0 / alpha)])])])
    return [_where_positive(ctx, x, dy, below)]


def softsign(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X / (1 + abs(X)):  dX = dY / (1 + abs(X))^2."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = ctx.b
    d = b.op("Add", [ctx.scalar_like(x, 1.0), b.op("Abs", [x])])
    return [b.op("Div", [dy, b.op("Mul", [d, d])])]


def thresholded_relu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X if X > alpha else 0:  dX = dY * (X > alpha)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    alpha = float(ctx.attrs(node).get("alpha", 1.0))
    b = ctx.b
    return [b.op("Where", [b.op("Greater", [x, ctx.scalar_like(x, alpha)]), dy, ctx.scalar_like(x, 0.0)])]
