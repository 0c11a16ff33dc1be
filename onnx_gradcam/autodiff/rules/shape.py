"""Gradients of ops that only move data: reshapes, transposes, concatenation, slicing, padding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..context import RuleContext
from ._common import contract_axis, contract_axis_with, norm_axis

Grads = list[str | None]


def reshape_back(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Flatten, Reshape, Squeeze, Unsqueeze:  dX = reshape(dY, shape(X))."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    dx = ctx.b.op("Reshape", [dy, ctx.reshape_to(x)])
    if dy in ctx.linear_back:
        _flattened_channel_sum(ctx, node, dy, dx)
    return [dx] + [None] * (len(node.input) - 1)


def _flattened_channel_sum(ctx: RuleContext, node: onnx.NodeProto, dy: str, dx: str) -> None:
    """Flatten of X [N, C, *S] into a dense layer's input [N, C*P], P = prod(S), with
    dY = alpha dZ M:  Σ_s dX[n, c, s] = alpha dZ Mc,  Mc[i, c] = Σ_p M[i, c*P + p].

    Mc is folded at prepare time, so Grad-CAM's channel weights cost a product with a
    [outputs, C] matrix instead of the whole weight (vgg16: 8 MB instead of 411 MB)."""
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.info.static_dims(x, 1), ctx.info.static_dims(y, 1)
    back = ctx.linear_back[dy]
    weight = ctx.info.const(back.weight)
    if xs is None or ys is None or len(xs) < 2 or len(ys) != 1 or weight is None or weight.ndim != 2:
        return
    channels, positions = xs[0], int(np.prod(xs[1:]))
    m = weight if back.rows_out else weight.T
    if ys[0] != channels * positions or m.shape[1] != ys[0]:
        return
    mc = m.reshape(m.shape[0], channels, positions).sum(axis=2, dtype=np.float64)
    mc_name = ctx.const_like(x, mc, "flatten_channel_weight")
    b = ctx.b
    alpha = back.alpha if back.alpha != 1.0 else None
    if back.gather:
        sums = b.op("Gather", [mc_name, back.dy], axis=0)
        if alpha is not None:
            sums = b.op("Mul", [sums, ctx.scalar_like(x, alpha)])
    else:
        sums = b.op("Gemm", [back.dy, mc_name], alpha=alpha)
    shape = b.const(np.array([0, channels] + [1] * (len(xs) - 1), np.int64), "shape")
    ctx.channel_sum[dx] = b.op("Reshape", [sums, shape])


def transpose(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = transpose(X, perm):  dX = transpose(dY, inverse(perm))."""
    dy = dys[0]
    assert dy is not None
    rank = ctx.info.rank(node.input[0])
    perm = ctx.attrs(node).get("perm")
    if perm is None:
        if rank is None:
            raise ctx.unsupported(node, "a default perm on an input of unknown rank")
        perm = list(reversed(range(rank)))
    return [ctx.b.transpose(dy, list(np.argsort(perm)))]


def _axis_sizes(ctx: RuleContext, names: Sequence[str], axis: int) -> str:
    """The sizes of `names` along axis, as a 1-D int64 tensor (constant where static)."""
    dims = []
    for n in names:
        s = ctx.info.shape(n)
        dims.append(s[axis] if s is not None and isinstance(s[axis], int) else None)
    if all(d is not None for d in dims):
        return ctx.b.const(np.array(dims, np.int64), "split")
    parts = [ctx.b.shape_of(n, axis, axis + 1) for n in names]
    return ctx.b.op("Concat", parts, axis=0)


def _split_before_13(ctx: RuleContext, dy: str, names: Sequence[str], axis: int) -> list[str]:
    """split(dY, sizes of `names`, axis) at opset 11-12: the split attribute where the sizes are
    static, else one Slice per piece from the sizes' running sum."""
    b = ctx.b
    dims = [(ctx.info.shape(n) or (None,) * (axis + 1))[axis] for n in names]
    if all(isinstance(d, int) for d in dims):
        return list(b.op("Split", [dy], axis=axis, split=[int(d) for d in dims], outputs=len(names)))  # type: ignore[arg-type]
    sizes = _axis_sizes(ctx, names, axis)
    ends = b.op("CumSum", [sizes, b.const(np.array(0, np.int64), "axis")])
    starts = b.op("Sub", [ends, sizes])
    axes = b.const(np.array([axis], np.int64), "axes")
    pieces = []
    for i in range(len(names)):
        at = b.const(np.array([i], np.int64), "index")
        bounds = [b.op("Gather", [starts, at]), b.op("Gather", [ends, at])]
        pieces.append(b.op("Slice", [dy, *bounds, axes]))
    return pieces


def concat(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = concat(X_1..X_n, axis):  dX_i = the i-th piece of split(dY, sizes of X_i, axis)."""
    dy = dys[0]
    assert dy is not None
    rank = ctx.info.rank(node.output[0])
    if rank is None:
        raise ctx.unsupported(node, "an output of unknown rank")
    axis = norm_axis(int(ctx.attrs(node)["axis"]), rank)
    pieces: list[str]
    if len(node.input) == 1:
        pieces = [dy]
    elif ctx.opset < 13:  # Split's sizes are an attribute before opset 13
        pieces = _split_before_13(ctx, dy, node.input, axis)
    else:
        pieces = ctx.b.op("Split", [dy, _axis_sizes(ctx, node.input, axis)], axis=axis, outputs=len(node.input))
    return [p if w else None for p, w in zip(pieces, wrt)]


def split(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y_1..Y_n = split(X, axis):  dX = concat(dY_i, or zeros shaped like Y_i, axis)."""
    rank = ctx.info.rank(node.input[0])
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    axis = norm_axis(int(ctx.attrs(node).get("axis", 0)), rank)
    parts = [dy if dy is not None else ctx.zeros_like(y) for dy, y in zip(dys, node.output)]
    return [ctx.b.op("Concat", parts, axis=axis)] + [None] * (len(node.input) - 1)


def _slice_params(ctx: RuleContext, node: onnx.NodeProto, rank: int) -> list[tuple[int, int, int, int]]:
    """(axis, start, stop, step) per sliced axis, normalised like Python's slice.indices."""
    a = ctx.attrs(node)
    if "starts" in a:  # opset < 10
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in ctx.const_input(node, 1)]  # type: ignore[union-attr]
        ends = [int(v) for v in ctx.const_input(node, 2)]  # type: ignore[union-attr]
        av = ctx.const_input(node, 3)
        axes = [int(v) for v in av] if av is not None else list(range(len(starts)))
        sv = ctx.const_input(node, 4)
        steps = [int(v) for v in sv] if sv is not None else [1] * len(starts)
    x = node.input[0]
    shape = ctx.info.shape(x)  # only the sliced axes need a static size (the batch may be symbolic)
    out = []
    for ax, st, en, sp in zip(axes, starts, ends, steps):
        ax = norm_axis(ax, rank)
        dim = shape[ax] if shape is not None else None
        if not isinstance(dim, int):
            raise ctx.unsupported(node, f"slicing axis {ax} of unknown size")
        lo, hi, step = slice(st, en, sp).indices(dim)
        out.append((ax, lo, hi, step))
    return out


def slice_(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = X[start:stop:step] on some axes:  dX = dY scattered back into zeros shaped like X
    (a Pad for unit steps; an index scatter otherwise)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    shape = ctx.info.shape(x)
    assert shape is not None
    g = dy
    b = ctx.b
    for ax, lo, hi, step in _slice_params(ctx, node, rank):
        dim = shape[ax]
        assert isinstance(dim, int)
        picked = list(range(lo, hi, step))
        if step == 1:
            pads = [0] * (2 * rank)
            pads[ax] = lo
            pads[rank + ax] = dim - (lo + len(picked))
            g = b.op("Pad", [g, b.const(np.array(pads, np.int64), "pads")])
        else:
            g = _scatter_axis(ctx, g, picked, dim, ax, rank, x)
    return [g] + [None] * (len(node.input) - 1)


def _scatter_axis(ctx: RuleContext, g: str, picked: Sequence[int], dim: int, axis: int, rank: int, like: str) -> str:
    """Undo a gather of `picked` positions along `axis`: g contracted with one-hot(picked, dim)."""
    onehot = np.zeros([len(picked), dim])
    for row, col in enumerate(picked):
        onehot[row, col] += 1.0
    return contract_axis(ctx, g, onehot, axis, rank, like)


def gather(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = take(X, idx, axis), idx constant:  dX = dY contracted with one-hot(idx) along axis
    (repeated indices add up). The one-hot matrix is a constant where X's size along axis is
    known, else built at run time: onehot[k, j] = (idx[k] mod size == j), j = 0..size-1."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    idx = ctx.const_input(node, 1)
    assert idx is not None
    axis = norm_axis(int(ctx.attrs(node).get("axis", 0)), rank)
    shape = ctx.info.shape(x)
    dim = shape[axis] if shape is not None else None
    b = ctx.b
    g = dy
    # collapse the index dims of dY into one axis at `axis`
    if idx.ndim == 0:
        g = b.unsqueeze(g, [axis])
    elif idx.ndim > 1:
        yshape = ctx.info.shape(node.output[0])
        if yshape is None:
            raise ctx.unsupported(node, "an output of unknown shape")
        dims = [0 if not isinstance(d, int) else d for d in yshape]
        new = dims[:axis] + [int(idx.size)] + dims[axis + idx.ndim :]
        g = b.op("Reshape", [g, b.const(np.array(new, np.int64), "shape")])
    if isinstance(dim, int):
        flat = [int(i) + dim if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        return [_scatter_axis(ctx, g, flat, dim, axis, rank, x), None]
    return [contract_axis_with(ctx, g, _run_time_onehot(ctx, idx.reshape(-1), x, axis), axis, rank), None]


def _run_time_onehot(ctx: RuleContext, idx: np.ndarray, x: str, axis: int) -> str:
    """[len(idx), size] with onehot[k, j] = (idx[k] mod size == j), size = X's size along axis
    at run time (a negative index counts from the end, as Gather reads it)."""
    b = ctx.b
    size = b.shape_of(x, axis, axis + 1)  # [1]
    picked = b.const(idx.astype(np.int64).reshape(-1, 1), "indices")  # [k, 1]
    if (idx < 0).any():
        picked = b.op("Mod", [b.op("Add", [picked, size]), size])
    zero, one = b.const(np.array(0, np.int64), "zero"), b.const(np.array(1, np.int64), "one")
    positions = b.op("Range", [zero, b.squeeze(size, [0]), one])  # [size]
    return b.op("Cast", [b.op("Equal", [picked, positions])], to=ctx.info.grad_dtype(x))


def pad(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = pad(X, pads) in constant mode:  dX = dY with the padding cut off again
    (negative pads, which crop, are padded back with zeros)."""
    dy = dys[0]
    assert dy is not None
    a = ctx.attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise ctx.unsupported(node, f"mode={mode!r}")
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    pads = list(a["pads"]) if "pads" in a else [int(v) for v in ctx.const_input(node, 1)]  # type: ignore[union-attr]
    axes_v = ctx.const_input(node, 3) if len(node.input) > 3 else None
    axes = [norm_axis(int(v), rank) for v in axes_v] if axes_v is not None else list(range(rank))
    k = len(axes)
    full = [0] * (2 * rank)
    for j, ax in enumerate(axes):
        full[ax], full[rank + ax] = pads[j], pads[k + j]
    b = ctx.b
    starts = [max(p, 0) for p in full[:rank]]
    ends = [-max(p, 0) if p > 0 else np.iinfo(np.int64).max for p in full[rank:]]
    g = b.op(
        "Slice",
        [dy, b.const(np.array(starts, np.int64), "starts"), b.const(np.array(ends, np.int64), "ends")],
    )
    back = [max(-p, 0) for p in full]
    if any(back):
        g = b.op("Pad", [g, b.const(np.array(back, np.int64), "pads")])
    return [g] + [None] * (len(node.input) - 1)
