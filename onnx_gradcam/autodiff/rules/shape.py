"""Gradients of ops that only move data: reshapes, transposes, concatenation, slicing, padding,
broadcasting copies (Expand, Tile) and gathers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ...errors import UnsupportedOpError
from ..context import RuleContext
from ._common import contract_axis, contract_axis_with, norm_axis, unbroadcast

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
    (a Pad for unit steps, its pads computed at run time where bounds or sizes are known only
    then; an index scatter otherwise)."""
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
    try:
        params = _slice_params(ctx, node, rank)
    except UnsupportedOpError:
        runtime = _slice_back_at_run_time(ctx, node, dy, rank)
        if runtime is None:
            raise
        return [runtime] + [None] * (len(node.input) - 1)
    for ax, lo, hi, step in params:
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


def _slice_back_at_run_time(ctx: RuleContext, node: onnx.NodeProto, dy: str, rank: int) -> str | None:
    """Unit-step Slice with bounds or axis sizes known only at run time: dX = Pad(dY, pads), the
    pads computed as the spec normalises the bounds, start' = clamp(start < 0 ? start + d : start,
    0, d), likewise end', pads (start', d - max(start', end')). None where steps are not all 1 or
    axes not constant (the caller's error stands)."""
    if ctx.opset < 11 or len(node.input) < 3:
        return None
    axes_value = ctx.const_input(node, 3) if len(node.input) > 3 and node.input[3] else None
    steps = ctx.const_input(node, 4) if len(node.input) > 4 and node.input[4] else None
    if steps is not None and np.any(steps != 1):
        return None
    if axes_value is not None:
        axes = [norm_axis(int(v), rank) for v in axes_value]
    else:
        starts_shape = ctx.info.static_shape(node.input[1])
        if starts_shape is None or len(starts_shape) != 1:
            return None
        axes = list(range(starts_shape[0]))
    b = ctx.b
    i64 = onnx.TensorProto.INT64
    dims = b.op("Gather", [b.shape_of(node.input[0]), b.const(np.array(axes, np.int64), "axes")], axis=0)
    zero = b.const(np.array(0, np.int64), "zero")

    def bound(v: str) -> str:
        v = b.op("Cast", [v], to=i64)
        v = b.op("Where", [b.op("Less", [v, zero]), b.op("Add", [v, dims]), v])
        return b.op("Min", [b.op("Max", [v, zero]), dims])

    start, end = bound(node.input[1]), bound(node.input[2])
    after = b.op("Sub", [dims, b.op("Max", [start, end])])
    where = b.const(np.array(axes + [rank + a for a in axes], np.int64), "pad_positions")
    pads = b.op(
        "ScatterElements",
        [b.const(np.zeros(2 * rank, np.int64), "pads"), where, b.op("Concat", [start, after], axis=0)],
    )
    return b.op("Pad", [dy, pads])


def _scatter_axis(ctx: RuleContext, g: str, picked: Sequence[int], dim: int, axis: int, rank: int, like: str) -> str:
    """Undo a gather of `picked` positions along `axis`: g contracted with one-hot(picked, dim)."""
    onehot = np.zeros([len(picked), dim])
    for row, col in enumerate(picked):
        onehot[row, col] += 1.0
    return contract_axis(ctx, g, onehot, axis, rank, like)


def gather(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = take(X, idx, axis):  dX = dY contracted with one-hot(idx) along axis (repeated
    indices add up). The one-hot matrix is a constant where idx is one and X's size along axis
    is known, else built at run time: onehot[k, j] = (idx[k] mod size == j), j = 0..size-1
    (indices computed by the model, such as TopK's, carry no gradient themselves)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    axis = norm_axis(int(ctx.attrs(node).get("axis", 0)), rank)
    if ctx.info.const(node.input[1]) is None and node.input[1] not in ctx.info.folded:
        return [_gather_run_time(ctx, node, dy, axis, rank), None]
    idx = ctx.const_input(node, 1)
    assert idx is not None
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


def _gather_run_time(ctx: RuleContext, node: onnx.NodeProto, dy: str, axis: int, rank: int) -> str:
    """Gather's dX for indices computed at run time: dY with the index axes collapsed into one,
    contracted with the one-hot of the flattened indices."""
    x, indices = node.input[0], node.input[1]
    idx_rank = ctx.info.rank(indices)
    yshape = ctx.info.shape(node.output[0])
    if idx_rank is None or yshape is None:
        raise ctx.unsupported(node, "indices computed at run time, of unknown rank or output shape")
    b = ctx.b
    g = dy
    if idx_rank == 0:
        g = b.unsqueeze(g, [axis])
    elif idx_rank > 1:
        after = yshape[axis + idx_rank :]
        if not all(isinstance(d, int) for d in after):
            raise ctx.unsupported(node, f"indices computed at run time, then output axes of unknown size {after}")
        before = [d if isinstance(d, int) else 0 for d in yshape[:axis]]  # 0: Reshape copies that axis
        g = b.op("Reshape", [g, b.const(np.array([*before, -1, *after], np.int64), "shape")])
    flat = b.op("Reshape", [indices, b.const(np.array([-1, 1], np.int64), "shape")])
    if ctx.info.dtype(indices) != onnx.TensorProto.INT64:
        flat = b.op("Cast", [flat], to=onnx.TensorProto.INT64)
    return contract_axis_with(ctx, g, _onehot_of(ctx, flat, x, axis, wrap=True), axis, rank)


def _onehot_of(ctx: RuleContext, picked: str, x: str, axis: int, wrap: bool) -> str:
    """[k, size] with onehot[i, j] = (picked[i] == j) for int64 indices [k, 1], size = X's size
    along axis at run time; with `wrap`, negative indices count from the end (picked mod size)."""
    b = ctx.b
    size = b.shape_of(x, axis, axis + 1)  # [1]
    if wrap:
        picked = b.op("Mod", [b.op("Add", [picked, size]), size])
    zero, one = b.const(np.array(0, np.int64), "zero"), b.const(np.array(1, np.int64), "one")
    positions = b.op("Range", [zero, b.squeeze(size, [0]), one])  # [size]
    return b.op("Cast", [b.op("Equal", [picked, positions])], to=ctx.info.grad_dtype(x))


def _run_time_onehot(ctx: RuleContext, idx: np.ndarray, x: str, axis: int) -> str:
    """[len(idx), size] with onehot[k, j] = (idx[k] mod size == j), size = X's size along axis
    at run time (a negative index counts from the end, as Gather reads it)."""
    picked = ctx.b.const(idx.astype(np.int64).reshape(-1, 1), "indices")  # [k, 1]
    return _onehot_of(ctx, picked, x, axis, wrap=bool((idx < 0).any()))


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


def expand(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = expand(X, shape) (broadcasting):  dX = unbroadcast(dY), the sum over the copies;
    the shape may be a run-time value (the broadcast axes are then found at run time)."""
    dy = dys[0]
    assert dy is not None
    return [unbroadcast(ctx, dy, node.input[0], node.output[0]), None]


def tile(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = tile(X, r):  dX[i] = Σ_k dY[k d + i] per axis (d = X's size), the sum over the copies:
    dY reshaped to [r_0, d_0, r_1, d_1, ...] and summed over the r axes. r may be a run-time value."""
    dy = dys[0]
    assert dy is not None
    x, reps = node.input[0], node.input[1]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    b = ctx.b
    value = ctx.info.const(reps)
    if value is None and reps in ctx.info.folded:
        value = np.array(ctx.info.folded[reps], np.int64)
    static = ctx.info.static_shape(x)
    if value is not None and np.all(value == 1):
        return [dy, None]
    if value is not None and static is not None:
        target = b.const(np.stack([value.astype(np.int64), np.array(static, np.int64)], axis=1).reshape(-1), "shape")
    else:  # interleave the repeats with X's shape at run time
        r = b.const(value.astype(np.int64), "repeats") if value is not None else reps
        pairs = b.op("Concat", [b.unsqueeze(r, [1]), b.unsqueeze(b.shape_of(x), [1])], axis=1)  # [rank, 2]
        target = b.op("Reshape", [pairs, b.const(np.array([-1], np.int64), "shape")])
    copies = b.op("Reshape", [dy, target])
    return [b.reduce("ReduceSum", copies, list(range(0, 2 * rank, 2)), keepdims=False), None]


def gather_elements(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y[.., i, ..] = X[.., idx[.., i, ..], ..] along axis:  dX = dY added into zeros shaped like X at
    the gathered positions (repeated indices add up): ScatterElements(reduction='add') from opset
    16; below, dY times a one-hot of the indices, summed over the gathered axis."""
    dy = dys[0]
    assert dy is not None
    x, idx = node.input
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    axis = norm_axis(int(ctx.attrs(node).get("axis", 0)), rank)
    b = ctx.b
    if ctx.opset >= 16:
        return [b.op("ScatterElements", [ctx.zeros_like(x), idx, dy], axis=axis, reduction="add"), None]
    # onehot[.., i, .., j] = (idx[.., i, ..] mod d == j), j < d = X's size along axis
    shape = ctx.info.shape(x)
    dim = shape[axis] if shape is not None else None
    size = b.const(np.array([dim], np.int64), "size") if isinstance(dim, int) else b.shape_of(x, axis, axis + 1)
    if ctx.info.dtype(idx) != onnx.TensorProto.INT64:
        idx = b.op("Cast", [idx], to=onnx.TensorProto.INT64)
    picked = b.unsqueeze(b.op("Mod", [b.op("Add", [idx, size]), size]), [rank])  # negative ones count from the end
    zero, one = b.const(np.array(0, np.int64), "zero"), b.const(np.array(1, np.int64), "one")
    positions = b.op("Range", [zero, b.squeeze(size, [0]), one])
    onehot = b.op("Cast", [b.op("Equal", [picked, positions])], to=ctx.info.grad_dtype(x))
    spread = b.reduce("ReduceSum", b.op("Mul", [onehot, b.unsqueeze(dy, [rank])]), [axis], keepdims=True)
    perm = list(range(rank + 1))
    perm[axis], perm[rank] = rank, axis
    g = b.squeeze(b.transpose(spread, perm), [rank])
    # the indices may be shorter than X on the other axes: zeros after them
    ishape, xshape = ctx.info.static_shape(node.input[1]), ctx.info.static_shape(x)
    if ishape is None or xshape is None or any(i != s for a, (i, s) in enumerate(zip(ishape, xshape)) if a != axis):
        ends = b.op("Sub", [b.shape_of(x), b.shape_of(g)])
        g = b.op("Pad", [g, b.op("Concat", [b.const(np.zeros(rank, np.int64), "pads"), ends], axis=0)])
    return [g, None]


# -- depth <-> space, top-k ---------------------------------------------------------------


def _mode(ctx: RuleContext, node: onnx.NodeProto) -> str:
    mode = ctx.attrs(node).get("mode", b"DCR")
    return mode.decode() if isinstance(mode, bytes) else str(mode)


def depth_to_space(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = DepthToSpace(X, b), a permutation of X's elements:  dX = SpaceToDepth(dY, b) in mode
    DCR (its exact inverse); in mode CRD the channels of that come in the order (i, j, c) and are
    put back in X's order (c, i, j) by a Gather along axis 1."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    block = int(ctx.attrs(node)["blocksize"])
    mode = _mode(ctx, node)
    if mode not in ("DCR", "CRD"):
        raise ctx.unsupported(node, f"mode={mode!r}")
    b = ctx.b
    dx = b.op("SpaceToDepth", [dy], blocksize=block)  # channel (i * b + j) * C' + c
    if mode == "CRD":
        shape = ctx.info.shape(x)
        channels = shape[1] if shape is not None and len(shape) == 4 else None
        if not isinstance(channels, int):
            raise ctx.unsupported(node, "mode='CRD' with a channel count unknown at prepare time")
        inner = channels // (block * block)
        order = [(ij * inner) + c for c in range(inner) for ij in range(block * block)]  # X's channel c*b*b + ij
        dx = b.op("Gather", [dx, b.const(np.array(order, np.int64), "channels")], axis=1)
    return [dx]


def space_to_depth(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = SpaceToDepth(X, b), a permutation of X's elements:  dX = DepthToSpace(dY, b, mode DCR),
    its exact inverse."""
    dy = dys[0]
    assert dy is not None
    return [ctx.b.op("DepthToSpace", [dy], blocksize=int(ctx.attrs(node)["blocksize"]))]


def top_k(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Values, Indices = TopK(X, K, axis):  dX = zeros shaped like X with dValues scattered to
    Indices along axis (each index is picked once per slice; the Indices output carries no
    gradient, whatever `largest` and `sorted` say)."""
    dy = dys[0]
    if dy is None:  # only the indices are used downstream: an integer output, no gradient
        raise ctx.unsupported(node, "a gradient through its Indices output, which is an integer index")
    x = node.input[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    axis = norm_axis(int(ctx.attrs(node).get("axis", -1)), rank)
    scatter = "ScatterElements" if ctx.opset >= 11 else "Scatter"  # the same op, renamed at opset 11
    dx = ctx.b.op(scatter, [ctx.zeros_like(x), node.output[1], dy], axis=axis)
    return [dx] + [None] * (len(node.input) - 1)
