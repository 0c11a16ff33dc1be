"""Gradients of Gemm, MatMul and Conv; constant weights are transposed at prepare time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..context import LinearBack, RuleContext
from ._common import spatial_pads, unbroadcast

Grads = list[str | None]


def _swap_last(ctx: RuleContext, name: str) -> str:
    rank = ctx.info.rank(name)
    if rank is None:
        raise ValueError(name)
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return ctx.b.transpose(name, perm)


def _transposed_weight(ctx: RuleContext, name: str) -> str:
    """name with its last two axes swapped: folded for small constants, a Transpose node otherwise
    (runtimes fold it at load; the file does not carry a second copy of a large weight)."""
    value = ctx.info.const(name)
    if value is not None and value.nbytes <= 1 << 16:
        return ctx.const_like(name, np.swapaxes(value, -1, -2), "matmul_weight_t")
    return _swap_last(ctx, ctx.weight(name))


def gemm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = alpha A' B' + beta C, A' = A^T if transA, B' = B^T if transB:
    dA' = alpha dY B'^T (dA = dA'^T if transA),  dB' = alpha A'^T dY,  dC = unbroadcast(beta dY)."""
    dy = dys[0]
    assert dy is not None
    a = ctx.attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
    A, B = node.input[0], node.input[1]
    b = ctx.b
    out: Grads = [None] * len(node.input)
    if wrt[0]:
        # dA' = alpha dY B'^T is itself a Gemm of dY and B with transB flipped: no weight copy;
        # for a one-hot dY (the explained class) it is alpha times one row of B'^T: a Gather
        if dy in ctx.one_hot and not ta and ctx.info.const(B) is not None:
            row = ctx.gather_weight(B, ctx.one_hot[dy], axis=0 if tb else 1)
            row = row if tb else b.transpose(row, [1, 0])
            da = row if alpha == 1.0 else b.op("Mul", [row, ctx.scalar_like(node.output[0], alpha)])
            ctx.linear_back[da] = LinearBack(ctx.one_hot[dy], B, rows_out=bool(tb), alpha=alpha, gather=True)
            out[0] = da
        elif ta:
            out[0] = b.op("Gemm", [ctx.weight(B), dy], alpha=alpha if alpha != 1.0 else None, transA=tb, transB=1)
        else:
            da = ctx.product(dy, B, transpose=not tb, alpha=alpha)
            if ctx.info.const(B) is not None:
                ctx.linear_back[da] = LinearBack(dy, B, rows_out=bool(tb), alpha=alpha)
            out[0] = da
    if wrt[1]:
        at = A if ta else b.transpose(A, [1, 0])
        db = b.op("MatMul", [at, dy])
        if alpha != 1.0:
            db = b.op("Mul", [db, ctx.scalar_like(node.output[0], alpha)])
        out[1] = b.transpose(db, [1, 0]) if tb else db
    if len(node.input) > 2 and wrt[2]:
        dc = dy if beta == 1.0 else b.op("Mul", [dy, ctx.scalar_like(node.output[0], beta)])
        out[2] = unbroadcast(ctx, dc, node.input[2], node.output[0])
    return out


def matmul(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = A @ B (numpy semantics):  dA = unbroadcast(dY @ B^T),  dB = unbroadcast(A^T @ dY)."""
    dy = dys[0]
    assert dy is not None
    A, B, y = node.input[0], node.input[1], node.output[0]
    ra, rb = ctx.info.rank(A), ctx.info.rank(B)
    if ra is None or rb is None or ra < 2 or rb < 2:
        raise ctx.unsupported(node, f"operands of rank {ra} and {rb} (rank >= 2 needed)")
    b = ctx.b
    da = db = None
    if wrt[0] and dy in ctx.one_hot and ra == 2 and rb == 2 and ctx.info.const(B) is not None:
        # one-hot dY: dA = dY B^T is the explained class's column of B
        da = b.transpose(ctx.gather_weight(B, ctx.one_hot[dy], axis=1), [1, 0])
        ctx.linear_back[da] = LinearBack(ctx.one_hot[dy], B, rows_out=False, gather=True)
    elif wrt[0] and ra == 2 and rb == 2 and ctx.info.dequantized_source(B) is not None:
        da = ctx.product(dy, B, transpose=True)  # from the int8 weight itself
        ctx.linear_back[da] = LinearBack(dy, B, rows_out=False)
    elif wrt[0]:
        bt = _transposed_weight(ctx, B)
        da = b.op("MatMul", [dy, bt])
        if rb > 2:  # with a 2-D B, dY @ B^T already has A's shape
            da = unbroadcast(ctx, da, A, y)
        if ra == 2 and rb == 2 and ctx.info.const(B) is not None:
            ctx.linear_back[da] = LinearBack(dy, B, rows_out=False)
    if wrt[1]:
        at = _transposed_weight(ctx, A)
        db = b.op("MatMul", [at, dy])
        if ra > 2:  # with a 2-D A, A^T @ dY already has B's shape
            db = unbroadcast(ctx, db, B, y)
    return [da, db]


def conv_pads(
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    begin: Sequence[int],
) -> tuple[list[int], list[int]]:
    """End pads and output_padding for a transposed conv that maps out_dims back onto in_dims.

    A ConvTranspose of size o produces s (o - 1) + (k - 1) d + 1 - pb - pe + op elements; we
    choose pe (crop) or op (extend) so that this equals the forward input size exactly.
    """
    ends, extra = [], []
    for i, o, k, s, d, pb in zip(in_dims, out_dims, kernel, strides, dilations, begin, strict=True):
        full = s * (o - 1) + (k - 1) * d + 1
        diff = full - pb - i
        ends.append(max(diff, 0))
        extra.append(max(-diff, 0))
    return ends, extra


def same_pads(
    auto_pad: str, in_dims: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """Begin pads that auto_pad SAME_UPPER / SAME_LOWER imply (VALID: none)."""
    begins = []
    for i, k, s, d in zip(in_dims, kernel, strides, dilations, strict=True):
        if auto_pad == "VALID":
            begins.append(0)
            continue
        o = -(-i // s)
        total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return begins


def conv(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = conv(X, W) + b:  dX = conv_transpose(dY, W) with the same groups, strides and dilations,
    explicit pads, and output_padding chosen to give back X's spatial size (fitted at run time
    with Slice/Pad when the spatial size is dynamic)."""
    dy = dys[0]
    assert dy is not None
    if len(wrt) > 1 and wrt[1] or len(wrt) > 2 and wrt[2]:
        raise ctx.unsupported(node, "weights or bias that depend on the feature tensor")
    x, w, y = node.input[0], node.input[1], node.output[0]
    rank = ctx.info.rank(x)
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    wv = ctx.info.const(w)
    wshape = tuple(wv.shape) if wv is not None else ctx.static_shape(w, node)
    n = rank - 2
    a = ctx.attrs(node)
    kernel = list(a.get("kernel_shape", wshape[2:]))
    strides = list(a.get("strides", [1] * n))
    dilations = list(a.get("dilations", [1] * n))
    group = int(a.get("group", 1))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    xs, ys = ctx.info.static_dims(x, 1), ctx.info.static_dims(y, 1)  # channels and spatial dims
    if xs is None or ys is None:
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            raise ctx.unsupported(node, f"auto_pad={auto_pad} on an input of dynamic spatial size")
        begin = [0] * n if auto_pad == "VALID" else spatial_pads(a.get("pads"), n)[0]
        full = ctx.b.op(
            "ConvTranspose",
            [dy, ctx.weight(w)],
            group=group,
            kernel_shape=kernel,
            strides=strides,
            dilations=dilations,
            pads=list(begin) + [0] * n,
        )
        return [fit_spatial(ctx, full, x, n)] + [None] * (len(node.input) - 1)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        begin = same_pads(auto_pad, xs[1:], kernel, strides, dilations)
    else:
        begin, _ = spatial_pads(a.get("pads"), n)
    dx = conv_transpose_to(ctx, dy, ctx.weight(w), group, kernel, strides, dilations, begin, xs[1:], ys[1:])
    return [dx] + [None] * (len(node.input) - 1)


def conv_transpose_to(
    ctx: RuleContext,
    dy: str,
    w: str,
    group: int,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    begin: Sequence[int],
    in_dims: Sequence[int],
    out_dims: Sequence[int],
) -> str:
    """ConvTranspose of dy with w whose result has exactly the forward input's spatial size in_dims."""
    ends, extra = conv_pads(in_dims, out_dims, kernel, strides, dilations, begin)
    return ctx.b.op(
        "ConvTranspose",
        [dy, w],
        group=group,
        kernel_shape=list(kernel),
        strides=list(strides),
        dilations=list(dilations),
        pads=list(begin) + ends,
        output_padding=extra if any(extra) else None,
    )


def fit_spatial(ctx: RuleContext, t: str, like: str, n: int) -> str:
    """Crop or zero-extend the trailing end of t's n spatial axes to the sizes of `like`, at run time."""
    b = ctx.b
    axes = b.const(np.arange(2, 2 + n, dtype=np.int64), "axes")
    target = b.shape_of(like, 2)
    cropped = b.op("Slice", [t, b.const(np.zeros(n, np.int64), "starts"), target, axes])
    missing = b.op("Max", [b.op("Sub", [target, b.shape_of(cropped, 2)]), b.const(np.zeros(n, np.int64), "zeros")])
    pads = b.op("Concat", [b.const(np.zeros(n + 4, np.int64), "zeros"), missing], axis=0)
    return b.op("Pad", [cropped, pads])


def conv_transpose(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = conv_transpose(X, W) + b:  dX = conv(dY, W) with the same groups, strides, dilations
    and pads (a ConvTranspose weight [C_in, C_out/group, k...] is the matching Conv's weight)."""
    dy = dys[0]
    assert dy is not None
    if len(wrt) > 1 and wrt[1] or len(wrt) > 2 and wrt[2]:
        raise ctx.unsupported(node, "weights or bias that depend on the feature tensor")
    a = ctx.attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID") or "output_shape" in a:
        raise ctx.unsupported(node, "auto_pad SAME or output_shape (give explicit pads)")
    rank = ctx.info.rank(node.input[0])
    if rank is None:
        raise ctx.unsupported(node, "an input of unknown rank")
    n = rank - 2
    wv = ctx.info.const(node.input[1])
    kernel = list(a.get("kernel_shape", wv.shape[2:] if wv is not None else []))
    if not kernel:
        raise ctx.unsupported(node, "weights of unknown shape")
    dx = ctx.b.op(
        "Conv",
        [dy, node.input[1]],
        group=int(a.get("group", 1)),
        kernel_shape=kernel,
        strides=list(a.get("strides", [1] * n)),
        dilations=list(a.get("dilations", [1] * n)),
        pads=list(a.get("pads", [0] * 2 * n)),
    )
    return [dx] + [None] * (len(node.input) - 1)
