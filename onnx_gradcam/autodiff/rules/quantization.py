"""Gradients of int8 graphs: QuantizeLinear/DequantizeLinear, dynamic quantization, QLinear* ops.

A quantized tensor's gradient is taken with respect to its integer value read as a real number
(float32). A quantizer passes gradient by the clipped straight-through estimator; every other
quantized op differentiates its dequantized float form, with weights dequantized at prepare time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..context import RuleContext
from . import activations, elementwise, linear, pooling, shape

Grads = list[str | None]

# [qmin, qmax] of each integer type QuantizeLinear writes (ONNX saturates to these)
_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
}


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


def _along_axis(ctx: RuleContext, v: str, like: str, axis: int) -> str:
    """A scale or zero point that broadcasts against tensor `like`: a 1-D one along `axis`."""
    rank = ctx.info.rank(like)
    vshape = ctx.info.shape(v)
    if vshape is None or len(vshape) == 0 or rank is None or rank <= 1:
        return v
    ax = axis + rank if axis < 0 else axis
    target = [1] * rank
    target[ax] = -1
    value = ctx.info.const(v)
    if value is not None:
        return ctx.b.const(value.reshape([1] * ax + [value.size] + [1] * (rank - ax - 1)), "scale")
    return ctx.b.op("Reshape", [v, ctx.b.const(np.array(target, np.int64), "shape")])


def _blocked(ctx: RuleContext, node: onnx.NodeProto) -> None:
    if int(ctx.attrs(node).get("block_size", 0)):
        raise ctx.unsupported(node, "blocked quantization (block_size) of an activation")


def straight_through(
    ctx: RuleContext, node: onnx.NodeProto, dy: str, y: str, scale: str, zero_point: str, axis: int = 1
) -> str:
    """The clipped straight-through gradient of Y = saturate(round(X / s) + zp):
    dX = dY / s where qmin < Y < qmax, else 0. The mask reads the integer output (a saturated value
    passes nothing: this restores the ReLU/Clip gates the quantizer removed); a tensor in
    ctx.unclipped (the score's own quantizer) passes dY / s everywhere."""
    b = ctx.b
    dtype = ctx.info.dtype(zero_point) if zero_point else TensorProto.UINT8
    if dtype not in _RANGES:
        raise ctx.unsupported(node, f"quantized output type {helper.tensor_dtype_to_string(dtype)}")
    before = ctx.rescaled.get(dy)
    if before is not None and before[1:] == (scale, axis):
        scaled = before[0]  # a QDQ pair with one scale: (dY s) / s is dY itself (a one-hot stays one)
    else:
        scaled = b.op("Div", [dy, _along_axis(ctx, scale, y, axis)], hint="ste")
    if y in ctx.unclipped:
        return scaled
    lo, hi = _RANGES[dtype]
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    # qmin < Y < qmax as clip(Y, qmin + 1, qmax - 1) == Y: two nodes, not three (a tail of small
    # tensors costs per node, not per element)
    bounds = [b.const(np.array(lo + 1, np_type), "qmin"), b.const(np.array(hi - 1, np_type), "qmax")]
    if dtype in (TensorProto.UINT8, TensorProto.INT8):
        inside = b.op("Equal", [b.op("Clip", [y, *bounds]), y])
    else:  # 16-bit activations: onnxruntime's Clip has no 16-bit kernels
        inside = b.op("And", [b.op("GreaterOrEqual", [y, bounds[0]]), b.op("LessOrEqual", [y, bounds[1]])])
    return b.op("Where", [inside, scaled, ctx.scalar_like(dy, 0.0)], hint="ste_clipped")


def quantize_linear(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = saturate(round(X / s) + zp):  dX = dY / s * (qmin < Y < qmax)  (clipped straight-through)."""
    dy = dys[0]
    assert dy is not None
    _blocked(ctx, node)
    axis = int(ctx.attrs(node).get("axis", 1))
    dx = straight_through(ctx, node, dy, node.output[0], node.input[1], _input(node, 2), axis)
    return [dx] + [None] * (len(node.input) - 1)


def dequantize_linear(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = (X - zp) * s:  dX = dY * s  (X's integer value read as a real number)."""
    dy = dys[0]
    assert dy is not None
    _blocked(ctx, node)
    axis = int(ctx.attrs(node).get("axis", 1))
    dx = ctx.b.op("Mul", [dy, _along_axis(ctx, node.input[1], node.input[0], axis)])
    ctx.rescaled[dx] = (dy, node.input[1], axis)
    return [dx] + [None] * (len(node.input) - 1)


def dynamic_quantize_linear(
    ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]
) -> Grads:
    """(Y, s, zp) = dynamic uint8 quantization of X:  dX = dY / s * (0 < Y < 255); the scale's and
    zero point's dependence on X is not differentiated (straight-through, as quantize-aware training)."""
    dy = dys[0]
    if dy is None:  # only the scale carried gradient: straight-through ignores it
        return [None]
    y, scale, zp = node.output[0], node.output[1], node.output[2]
    ctx.info.dtypes.setdefault(zp, TensorProto.UINT8)
    return [straight_through(ctx, node, dy, y, scale, zp)]


# -- float forms of quantized ops ----------------------------------------------------------


def _register(ctx: RuleContext, name: str, like: str, dtype: int = TensorProto.FLOAT) -> str:
    """Record an appended float tensor's shape (that of `like`) so float rules can read it."""
    shape_ = ctx.info.shape(like)
    if shape_ is not None:
        ctx.info.shapes[name] = shape_
    ctx.info.dtypes[name] = dtype
    return name


def _constant(ctx: RuleContext, x: str, scale: str, zp: str, axis: int) -> str:
    """The dequantized constant (x - zp) * s as rules see it: a name that TensorInfo knows the
    value of, emitted only as the float rows or the whole float weight a rule asks for (a one-hot
    class row is gathered from the int8 weight; a dense product gets a float initializer)."""
    name = ctx.b.fresh("dequantized_weight")
    inputs = [x, scale, zp] if zp else [x, scale]
    return ctx.info.add_dequantized(helper.make_node("DequantizeLinear", inputs, [name], axis=axis))


def _float_of(ctx: RuleContext, x: str, scale: str, zp: str, axis: int = 1) -> str:
    """DQ(x) = (x - zp) * s: folded when x is a constant (a weight), else a DequantizeLinear node."""
    if ctx.info.const(x) is not None and ctx.info.const(scale) is not None:
        return _constant(ctx, x, scale, zp, axis)
    inputs = [x, scale, zp] if zp else [x, scale]
    return _register(ctx, ctx.b.op("DequantizeLinear", inputs, hint="dequantized", axis=axis), x)


def _centered(ctx: RuleContext, node: onnx.NodeProto, x: str, zp: str, axis: int) -> str:
    """x - zp as float (ConvInteger/MatMulInteger operands): for a constant x, the dequantized
    constant of scale 1 (zero point per row of a Conv weight, per column of a MatMul one)."""
    if ctx.info.const(x) is not None:
        if zp and ctx.info.const(zp) is None:
            raise ctx.unsupported(node, f"a weight zero point {zp!r} that is not a constant")
        one = np.array(1.0, np.float32)
        unit = ctx.b.const(one, "unit_scale")
        ctx.info.constants[unit], ctx.info.shapes[unit], ctx.info.dtypes[unit] = one, (), TensorProto.FLOAT
        return _constant(ctx, x, unit, zp, axis)
    xf = ctx.b.op("Cast", [x], to=TensorProto.FLOAT)
    if zp:
        xf = ctx.b.op("Sub", [xf, ctx.b.op("Cast", [zp], to=TensorProto.FLOAT)])
    return _register(ctx, xf, x)


def _virtual(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], like: onnx.NodeProto, drop: Sequence[str] = ()
) -> onnx.NodeProto:
    """A float node standing for a quantized one (its attributes, minus `drop`), never emitted:
    the float rule differentiates it."""
    attrs = [a for a in like.attribute if a.name not in drop]
    node = helper.make_node(op_type, list(inputs), list(outputs), name=like.name or like.output[0])
    node.attribute.extend(attrs)
    return node


def _rescale(ctx: RuleContext, dxf: str | None, scale: str) -> str | None:
    """d(integer input) = d(float input) * s_input (recorded, so that the requantization that made
    the input divides it out exactly: see straight_through)."""
    if dxf is None:
        return None
    dq = ctx.b.op("Mul", [dxf, scale])
    ctx.rescaled[dq] = (dxf, scale, 1)
    for known in (ctx.spatial_constant, ctx.channel_sum):  # cheap forms of the gradient carry over
        if dxf in known:
            known[dq] = ctx.b.op("Mul", [known[dxf], scale])
    return dq


def conv_integer(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = conv(X - x_zp, W - w_zp) in int32:  dX = conv_transpose(dY, W - w_zp), W - w_zp folded."""
    dy = dys[0]
    assert dy is not None
    if len(wrt) > 1 and wrt[1]:
        raise ctx.unsupported(node, "weights that depend on the feature tensor")
    w = _centered(ctx, node, node.input[1], _input(node, 3), axis=0)
    (dx, *_) = linear.conv(ctx, _virtual("Conv", [node.input[0], w], node.output, node), [dy], [True, False])
    return [dx] + [None] * (len(node.input) - 1)


def matmul_integer(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = (A - a_zp) @ (B - b_zp) in int32:  dA = dY @ (B - b_zp)^T,  dB = (A - a_zp)^T @ dY."""
    dy = dys[0]
    assert dy is not None
    a, bq = node.input[0], node.input[1]
    af = _centered(ctx, node, a, _input(node, 2), axis=0) if wrt[1] else a
    bf = _centered(ctx, node, bq, _input(node, 3), axis=-1)
    da, db = linear.matmul(ctx, _virtual("MatMul", [af, bf], node.output, node), [dy], [wrt[0], wrt[1]])
    return [da, db] + [None] * (len(node.input) - 2)


def _output_float_grad(ctx: RuleContext, node: onnx.NodeProto, dy: str, scale_at: int) -> str:
    """The gradient of the op's float result before its output requantization (clipped STE)."""
    return straight_through(ctx, node, dy, node.output[0], node.input[scale_at], _input(node, scale_at + 1))


def qlinear_conv(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(conv(DQ(X), DQ(W)) + B s_x s_w):  dX = conv_transpose(dY / s_y * inside(Y), DQ(W)) * s_x."""
    dy = dys[0]
    assert dy is not None
    if wrt[3]:
        raise ctx.unsupported(node, "weights that depend on the feature tensor")
    dyf = _output_float_grad(ctx, node, dy, 6)
    w = _float_of(ctx, node.input[3], node.input[4], node.input[5], axis=0)
    (dxf, *_) = linear.conv(ctx, _virtual("Conv", [node.input[0], w], node.output, node), [dyf], [True, False])
    return [_rescale(ctx, dxf, node.input[1])] + [None] * (len(node.input) - 1)


def qlinear_matmul(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(DQ(A) @ DQ(B)):  dA = (dYf @ DQ(B)^T) s_a,  dB = (DQ(A)^T @ dYf) s_b,  dYf = dY / s_y * inside(Y)."""
    dy = dys[0]
    assert dy is not None
    dyf = _output_float_grad(ctx, node, dy, 6)
    af = _float_of(ctx, node.input[0], node.input[1], node.input[2]) if wrt[3] else node.input[0]
    bf = _float_of(ctx, node.input[3], node.input[4], node.input[5])
    da, db = linear.matmul(ctx, _virtual("MatMul", [af, bf], node.output, node), [dyf], [wrt[0], wrt[3]])
    out: Grads = [None] * len(node.input)
    out[0], out[3] = _rescale(ctx, da, node.input[1]), _rescale(ctx, db, node.input[4])
    return out


def qgemm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """com.microsoft QGemm, Y = Q(alpha DQ(A)' DQ(B)' + DQ(C)) (Y float if y_scale is absent):
    dA = Gemm-gradient(dYf, DQ(B)) s_a,  dYf = dY / s_y * inside(Y)."""
    dy = dys[0]
    assert dy is not None
    if wrt[3]:
        raise ctx.unsupported(node, "weights that depend on the feature tensor")
    dyf = _output_float_grad(ctx, node, dy, 7) if _input(node, 7) else dy
    bf = _float_of(ctx, node.input[3], node.input[4], node.input[5], axis=1 - int(ctx.attrs(node).get("transB", 0)))
    virtual = _virtual("Gemm", [node.input[0], bf], node.output, node)
    (da, _) = linear.gemm(ctx, virtual, [dyf], [True, False])
    return [_rescale(ctx, da, node.input[1])] + [None] * (len(node.input) - 1)


def _binary(
    ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool], op_type: str
) -> Grads:
    dy = dys[0]
    assert dy is not None
    dyf = _output_float_grad(ctx, node, dy, 6)
    a, bq = node.input[0], node.input[3]
    if op_type == "Mul":  # the product rule reads the operands' values
        a = _float_of(ctx, a, node.input[1], node.input[2])
        bq = _float_of(ctx, bq, node.input[4], node.input[5])
    rule = elementwise.add if op_type == "Add" else elementwise.mul
    da, db = rule(ctx, _virtual(op_type, [a, bq], node.output, node), [dyf], [wrt[0], wrt[3]])
    out: Grads = [None] * len(node.input)
    out[0], out[3] = _rescale(ctx, da, node.input[1]), _rescale(ctx, db, node.input[4])
    return out


def qlinear_add(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """C = Q(DQ(A) + DQ(B)):  dA = unbroadcast(dCf) s_a,  dB = unbroadcast(dCf) s_b,  dCf = dC / s_c * inside(C)."""
    return _binary(ctx, node, dys, wrt, "Add")


def qlinear_mul(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """C = Q(DQ(A) DQ(B)):  dA = unbroadcast(dCf DQ(B)) s_a,  dB = unbroadcast(dCf DQ(A)) s_b."""
    return _binary(ctx, node, dys, wrt, "Mul")


def _unary(
    ctx: RuleContext, node: onnx.NodeProto, dy: str | None, op_type: str, reads: str = "", drop: Sequence[str] = ()
) -> Grads:
    """A QLinear op with inputs (X, s_x, zp_x, s_y, zp_y) as its float op: `reads` "input" when the
    float rule reads X's value, "output" when it reads Y's (recomputed in float, not requantized)."""
    assert dy is not None
    if int(ctx.attrs(node).get("channels_last", 0)):
        raise ctx.unsupported(node, "channels_last=1")
    dyf = _output_float_grad(ctx, node, dy, 3)
    x = node.input[0]
    y = node.output[0]
    if reads:
        x = _float_of(ctx, x, node.input[1], node.input[2])
    if reads == "output":
        float_node = _virtual(op_type, [x], ["_"], node, drop)
        y = _register(
            ctx, ctx.b.op(op_type, [x], hint=f"float_{op_type.lower()}", **ctx.attrs(float_node)), node.output[0]
        )
    virtual = _virtual(op_type, [x], [y], node, ("channels_last", *drop))
    rule = {
        "GlobalAveragePool": pooling.global_average_pool,
        "AveragePool": pooling.average_pool,
        "Sigmoid": activations.sigmoid,
        "LeakyRelu": activations.leaky_relu,
        "Softmax": activations.softmax,
    }[op_type]
    (dxf, *_) = rule(ctx, virtual, [dyf], [True])
    return [_rescale(ctx, dxf, node.input[1])] + [None] * (len(node.input) - 1)


def qlinear_global_average_pool(
    ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]
) -> Grads:
    """Y = Q(mean_hw DQ(X)):  dX = dYf / (h w) s_x, broadcast over the spatial axes."""
    return _unary(ctx, node, dys[0], "GlobalAveragePool")


def qlinear_average_pool(
    ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]
) -> Grads:
    """Y = Q(avgpool(DQ(X))):  dX = avgpool-gradient(dYf) s_x."""
    return _unary(ctx, node, dys[0], "AveragePool")


def qlinear_sigmoid(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(σ(DQ(X))):  dX = dYf σ(DQ(X)) (1 - σ(DQ(X))) s_x."""
    return _unary(ctx, node, dys[0], "Sigmoid", reads="output")


def qlinear_leaky_relu(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(leaky_relu(DQ(X))):  dX = dYf (1 if DQ(X) > 0 else alpha) s_x."""
    return _unary(ctx, node, dys[0], "LeakyRelu", reads="input")


def qlinear_softmax(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(softmax(DQ(X))):  dX = S (dYf - Σ dYf S) s_x,  S = softmax(DQ(X)) in float."""
    if int(ctx.attrs(node).get("opset", 13)) < 13:
        raise ctx.unsupported(node, "the opset-11 (2-D coerced) softmax form")
    return _unary(ctx, node, dys[0], "Softmax", reads="output", drop=("opset",))


def qlinear_concat(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = Q(concat(DQ(X_i))), inputs (s_y, zp_y, X_0, s_0, zp_0, ...):  dX_i = slice_i(dYf) s_i."""
    dy = dys[0]
    assert dy is not None
    dyf = straight_through(ctx, node, dy, node.output[0], node.input[0], node.input[1])
    xs = list(node.input[2::3])
    parts = shape.concat(ctx, _virtual("Concat", xs, node.output, node), [dyf], [wrt[i] for i in range(2, len(wrt), 3)])
    out: Grads = [None] * len(node.input)
    for k, part in enumerate(parts):
        out[2 + 3 * k] = _rescale(ctx, part, node.input[3 + 3 * k])
    return out
