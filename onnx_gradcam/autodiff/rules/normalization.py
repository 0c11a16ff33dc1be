"""Gradients of the normalisations: BatchNormalization (inference form), LayerNormalization,
InstanceNormalization, GroupNormalization, MeanVarianceNormalization and LRN (across channels)."""

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


# -- statistics over the sample itself (instance, group, mean-variance) ---------------------


def _standardise(ctx: RuleContext, x: str, axes: list[int], eps: float, like: str) -> tuple[str, str]:
    """(xhat, 1 / sigma) of X over `axes`: xhat = (X - mean) / sigma, sigma = sqrt(var + eps);
    `like` is a forward tensor of X's element type."""
    b = ctx.b
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes, keepdims=True)])
    var = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes, keepdims=True)
    inv_sigma = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, ctx.scalar_like(like, eps)])])])
    return b.op("Mul", [centred, inv_sigma]), inv_sigma


def _standardise_back(ctx: RuleContext, g: str, xhat: str, inv_sigma: str, axes: list[int]) -> str:
    """The input gradient of xhat over `axes` for g = dL/dxhat:
    (g - mean(g) - xhat * mean(g * xhat)) / sigma."""
    b = ctx.b
    g_mean = b.reduce("ReduceMean", g, axes, keepdims=True)
    gx_mean = b.reduce("ReduceMean", b.op("Mul", [g, xhat]), axes, keepdims=True)
    inner = b.op("Sub", [b.op("Sub", [g, g_mean]), b.op("Mul", [xhat, gx_mean])])
    return b.op("Mul", [inner, inv_sigma])


def _channel_shaped(ctx: RuleContext, v: str, rank: int) -> str:
    """A per-channel vector [C] as [C, 1, ..., 1], to broadcast over [N, C, *spatial]."""
    return ctx.b.op("Reshape", [v, ctx.b.const(np.array([-1] + [1] * (rank - 2), np.int64), "shape")])


def instance_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = scale[c] * xhat + B[c], xhat = (X - mu) / sqrt(var + eps) over each sample's and
    channel's spatial axes:  dX = scale[c] (g - mean(g) - xhat mean(g xhat)) / sigma with
    g = dY;  dscale = Σ_{n,s} dY xhat;  dB = Σ_{n,s} dY."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None or rank < 3:
        raise ctx.unsupported(node, f"an input of rank {rank} (it needs [N, C, *spatial] of known rank)")
    eps = float(ctx.attrs(node).get("epsilon", 1e-5))
    spatial = list(range(2, rank))
    b = ctx.b
    xhat, inv_sigma = _standardise(ctx, x, spatial, eps, x)
    out: Grads = [None] * len(node.input)
    if wrt[0]:
        g = b.op("Mul", [dy, _channel_shaped(ctx, node.input[1], rank)])
        out[0] = _standardise_back(ctx, g, xhat, inv_sigma, spatial)
    batch_and_spatial = [0, *spatial]
    if len(wrt) > 1 and wrt[1]:
        out[1] = b.reduce("ReduceSum", b.op("Mul", [dy, xhat]), batch_and_spatial, keepdims=False)
    if len(wrt) > 2 and wrt[2]:
        out[2] = b.reduce("ReduceSum", dy, batch_and_spatial, keepdims=False)
    return out


def group_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """X [N, C, *S] in G groups of C/G channels, xhat = (X - mu) / sqrt(var + eps) over each
    sample's group (its channels and S); Y = scale * xhat + bias, with scale and bias per group
    [G] at opset 18 and per channel [C] from opset 21:  g = dY * scale;  dX = (g - mean(g) -
    xhat mean(g xhat)) / sigma per group;  dscale, dbias = Σ dY xhat, Σ dY over N, S (and the
    group's channels at opset 18)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    shape = ctx.info.shape(x)
    if shape is None or len(shape) < 3:
        raise ctx.unsupported(node, f"an input of shape {shape} (it needs [N, C, *spatial] of known rank)")
    rank = len(shape)
    a = ctx.attrs(node)
    groups = int(a["num_groups"])
    eps = float(a.get("epsilon", 1e-5))
    per_channel = ctx.opset >= 21
    b = ctx.b
    grouped = b.const(np.array([0, groups, -1], np.int64), "shape")  # [N, G, C/G * prod(S)]
    xhat, inv_sigma = _standardise(ctx, b.op("Reshape", [x, grouped]), [2], eps, x)
    if per_channel:
        scale = _channel_shaped(ctx, node.input[1], rank)  # [C, 1, ...] against [N, C, *S]
    else:
        scale = b.op("Reshape", [node.input[1], b.const(np.array([groups, 1], np.int64), "shape")])  # vs [N, G, -1]
    dy_grouped = b.op("Reshape", [dy, grouped])
    out: Grads = [None] * len(node.input)
    if wrt[0]:
        g = b.op("Reshape", [b.op("Mul", [dy, scale]), grouped]) if per_channel else b.op("Mul", [dy_grouped, scale])
        out[0] = b.op("Reshape", [_standardise_back(ctx, g, xhat, inv_sigma, [2]), ctx.reshape_to(x)])
    for index in (1, 2):
        if not (len(wrt) > index and wrt[index]):
            continue
        term = b.op("Mul", [dy_grouped, xhat]) if index == 1 else dy_grouped  # [N, G, C/G * prod(S)]
        if per_channel:  # back to [N, C, *S], summed over N and S
            full = b.op("Reshape", [term, ctx.reshape_to(x)])
            out[index] = b.reduce("ReduceSum", full, [0, *range(2, rank)], keepdims=False)
        else:
            out[index] = b.reduce("ReduceSum", term, [0, 2], keepdims=False)
    return out


def mean_variance_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = c / (s + 1e-9), c = X - mean(X), s = sqrt(mean(c^2)) over `axes` (default [0, 2, 3]):
    gc = dY / (s + 1e-9) - Y mean(dY Y) / s;  dX = gc - mean(gc).

    (s is guarded below by 1e-30: where X is constant over the axes, c = Y = 0 and so is dX.)"""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    axes = sorted({norm_axis(int(v), rank) for v in ctx.attrs(node).get("axes", [0, 2, 3])})
    if any(not 0 <= v < rank for v in axes):
        raise ctx.unsupported(node, f"axes {axes} on an input of rank {rank}")
    b = ctx.b
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes, keepdims=True)])
    s = b.op("Sqrt", [b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes, keepdims=True)])
    direct = b.op("Div", [dy, b.op("Add", [s, ctx.scalar_like(x, 1e-9)])])
    projected = b.reduce("ReduceMean", b.op("Mul", [dy, y]), axes, keepdims=True)
    guarded = b.op("Max", [s, ctx.scalar_like(x, 1e-30)])
    gc = b.op("Sub", [direct, b.op("Div", [b.op("Mul", [y, projected]), guarded])])
    dx = b.op("Sub", [gc, b.reduce("ReduceMean", gc, axes, keepdims=True)])
    return [dx]


# -- maxpool branch: local response normalisation across channels ---------------------------


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
