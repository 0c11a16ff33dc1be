"""Gradients of BatchNormalization (inference form), LayerNormalization and LRN (local response
normalisation across channels)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..context import RuleContext
from ._common import norm_axis, unbroadcast

Grads = list[str | None]


def batch_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = scale (X - mean) / sqrt(var + eps) + B:  dX = dY * scale / sqrt(var + eps), per channel.

    The factor is folded at prepare time when its inputs are constants.
    """
    dy = dys[0]
    assert dy is not None
    a = ctx.attrs(node)
    if int(a.get("training_mode", 0)) != 0:
        raise ctx.unsupported(node, "training_mode=1 (export the model in eval mode)")
    x = node.input[0]
    eps = float(a.get("epsilon", 1e-5))
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    scale, var = ctx.info.const(node.input[1]), ctx.info.const(node.input[4])
    b = ctx.b
    if scale is not None and var is not None:
        factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)).reshape([-1] + [1] * (rank - 2))
        f = ctx.const_like(x, factor, "bn_factor")
    else:
        denom = b.op("Sqrt", [b.op("Add", [node.input[4], ctx.scalar_like(x, eps)])])
        f = b.unsqueeze(b.op("Div", [node.input[1], denom]), list(range(1, rank - 1)))
    return [b.op("Mul", [dy, f])] + [None] * (len(node.input) - 1)


def layer_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = xhat * scale + B over axes [axis, rank), xhat = (X - mu) / sigma:
    g = dY * scale;  dX = (g - mean(g) - xhat * mean(g * xhat)) / sigma;
    dscale = unbroadcast(dY * xhat);  dB = unbroadcast(dY)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    a = ctx.attrs(node)
    axis = norm_axis(int(a.get("axis", -1)), rank)
    eps = float(a.get("epsilon", 1e-5))
    axes = list(range(axis, rank))
    b = ctx.b
    mean = b.reduce("ReduceMean", x, axes, keepdims=True)
    centred = b.op("Sub", [x, mean])
    var = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes, keepdims=True)
    inv_sigma = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, ctx.scalar_like(x, eps)])])])
    xhat = b.op("Mul", [centred, inv_sigma])
    out: Grads = [None] * len(node.input)
    if wrt[0]:
        g = b.op("Mul", [dy, node.input[1]])
        g_mean = b.reduce("ReduceMean", g, axes, keepdims=True)
        gx_mean = b.reduce("ReduceMean", b.op("Mul", [g, xhat]), axes, keepdims=True)
        inner = b.op("Sub", [b.op("Sub", [g, g_mean]), b.op("Mul", [xhat, gx_mean])])
        out[0] = b.op("Mul", [inner, inv_sigma])
    if len(wrt) > 1 and wrt[1]:
        out[1] = unbroadcast(ctx, b.op("Mul", [dy, xhat]), node.input[1], y)
    if len(wrt) > 2 and wrt[2]:
        out[2] = unbroadcast(ctx, dy, node.input[2], y)
    return out


def _channel_window_sum(ctx: RuleContext, t: str, rank: int, before: int, after: int) -> str:
    """out[:, c] = Σ_{c' = c - before}^{c + after} t[:, c'] over zero-padded channels: one Pad and
    before + after + 1 Slices of it (their ends counted from the end, so C may be dynamic)."""
    b = ctx.b
    size = before + after + 1
    if size == 1:
        return t
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    padded = b.op("Pad", [t, b.const(np.array(pads, np.int64), "pads")])
    axis = b.const(np.array([1], np.int64), "axes")
    parts = []
    for j in range(size):
        end = j - (size - 1) if j < size - 1 else np.iinfo(np.int64).max
        starts, ends = b.const(np.array([j], np.int64), "starts"), b.const(np.array([end], np.int64), "ends")
        parts.append(b.op("Slice", [padded, starts, ends, axis]))
    return b.op("Sum", parts)


def lrn(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X S^-beta,  S = bias + alpha / size Σ_{c' = c - lo}^{c + hi} X[c']^2 (lo = floor((size - 1) / 2),
    hi = ceil((size - 1) / 2), channels outside [0, C) left out):
    dX = dY S^-beta - (2 alpha beta / size) X Σ_{c = c' - hi}^{c' + lo} (dY Y / S)[c]."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    a = ctx.attrs(node)
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    lo, hi = (size - 1) // 2, size // 2
    b = ctx.b
    squares = _channel_window_sum(ctx, b.op("Mul", [x, x]), rank, lo, hi)
    s = b.op("Add", [b.op("Mul", [squares, ctx.scalar_like(x, alpha / size)]), ctx.scalar_like(x, bias)])
    direct = b.op("Mul", [dy, b.op("Pow", [s, ctx.scalar_like(x, -beta)])])
    spread = _channel_window_sum(ctx, b.op("Div", [b.op("Mul", [dy, y]), s]), rank, hi, lo)
    coupled = b.op("Mul", [b.op("Mul", [x, spread]), ctx.scalar_like(x, 2.0 * alpha * beta / size)])
    return [b.op("Sub", [direct, coupled])]
