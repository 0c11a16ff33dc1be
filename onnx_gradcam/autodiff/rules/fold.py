"""Gradient of Col2Im (torch's F.fold): the adjoint, patch extraction, as a Conv with
one-hot kernels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..context import RuleContext

Grads = list[str | None]


def col2im(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y[n, c, p] = Σ X[n, c K + k, l] over the block offsets k and columns l that land on pixel
    p (strides, dilations, pads):  dX[n, c K + k, l] = dY[n, c] at l's patch, offset k, i.e.
    dX = Conv(dY as [N C, 1, *image], one-hot kernels [K, 1, *block]) reshaped to [N, C K, L]
    (im2col, F.unfold).

    image_shape and block_shape must be constants (they give the output's shape)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    image = ctx.const_input(node, 1)
    block = ctx.const_input(node, 2)
    assert image is not None and block is not None
    image_dims, block_dims = [int(v) for v in image], [int(v) for v in block]
    spatial = len(block_dims)
    a = ctx.attrs(node)
    kernels = int(np.prod(block_dims))
    weight = np.zeros([kernels, 1, *block_dims])
    for k, offset in enumerate(np.ndindex(*block_dims)):
        weight[(k, 0) + offset] = 1.0
    b = ctx.b
    planes = b.op("Reshape", [dy, b.const(np.array([-1, 1, *image_dims], np.int64), "shape")])  # [N C, 1, *image]
    patches = b.op(
        "Conv",
        [planes, ctx.const_like(x, weight, "col2im_kernels")],
        kernel_shape=block_dims,
        strides=list(a.get("strides", [1] * spatial)),
        dilations=list(a.get("dilations", [1] * spatial)),
        pads=list(a.get("pads", [0] * 2 * spatial)),
    )  # [N C, K, *columns]: row-major columns, as Col2Im reads them
    return [b.op("Reshape", [patches, ctx.reshape_to(x)]), None, None]
