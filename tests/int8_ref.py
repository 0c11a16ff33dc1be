"""A torch reference for int8 graphs: the tail feature -> score of a quantized ONNX model,
evaluated node by node in float32 or float64 with fake quantization in the forward and the
clipped straight-through estimator in the backward.

Integer tensors are carried as real tensors holding integers. QuantizeLinear rounds half to even
and saturates (as ONNX); its backward passes dY / s where the integer value lies strictly inside
[qmin, qmax] (no clip at the score's own output quantizer). QLinear* ops are Q(f(DQ(inputs))), the
dynamic ops their integer formulas; the weights are dequantized in the reference's precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

QRANGE = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
}


class _Quantize(torch.autograd.Function):
    """q = clamp(round(x / s) + zp, qmin, qmax);  dx = dq / s * (qmin < q < qmax)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, lo: int, hi: int, clip: bool
    ) -> torch.Tensor:  # type: ignore[override]
        q = torch.clamp(torch.round(x / s) + zp, lo, hi)
        inside = (q > lo) & (q < hi) if clip else torch.ones_like(q, dtype=torch.bool)
        ctx.save_for_backward(inside, s)
        return q

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        inside, s = ctx.saved_tensors
        return dq / s * inside, None, None, None, None, None


def _along(v: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    if v.ndim == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return v.reshape(shape)


class TailReference:
    """A quantized model's nodes in torch (float32/float64): `run` evaluates those that the given
    tensors (the feature map) and the constants determine, i.e. the tail to the score."""

    def __init__(self, model: onnx.ModelProto, unclipped: set[str]) -> None:
        self.nodes = list(model.graph.node)
        self.unclipped = unclipped
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.int_types = {t.name: t.data_type for t in model.graph.initializer}

    def run(self, values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(values)
        types: dict[str, int] = {}

        def get(name: str) -> torch.Tensor:
            if name not in env:
                env[name] = torch.as_tensor(np.asarray(self.inits[name], np.float64), dtype=dtype)
                types[name] = self.int_types.get(name, 0)
            return env[name]

        def qtype(zp_name: str) -> int:
            return self.int_types.get(zp_name, onnx.TensorProto.UINT8) if zp_name else onnx.TensorProto.UINT8

        def quantize(x: torch.Tensor, s: torch.Tensor, zp_name: str, out: str, axis: int = 1) -> torch.Tensor:
            lo, hi = QRANGE[qtype(zp_name)]
            zp = get(zp_name) if zp_name else torch.zeros((), dtype=dtype)
            return _Quantize.apply(
                x, _along(s, x.ndim, axis), _along(zp, x.ndim, axis), lo, hi, out not in self.unclipped
            )

        def dq(x: torch.Tensor, s: str, zp: str, axis: int = 1) -> torch.Tensor:
            z = get(zp) if zp else torch.zeros((), dtype=dtype)
            return (x - _along(z, x.ndim, axis)) * _along(get(s), x.ndim, axis)

        for node in self.nodes:  # those that the given values and the constants determine
            if any(n and n not in env and n not in self.inits for n in node.input) or node.output[0] in self.inits:
                continue
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            i = list(node.input) + [""] * 9
            op = node.op_type
            if op == "QuantizeLinear":
                y = quantize(get(i[0]), get(i[1]), i[2], node.output[0], int(a.get("axis", 1)))
            elif op == "DequantizeLinear":
                y = dq(get(i[0]), i[1], i[2], int(a.get("axis", 1)))
            elif op == "DynamicQuantizeLinear":
                x = get(i[0])
                lo, hi = torch.clamp(x.min().detach(), max=0), torch.clamp(x.max().detach(), min=0)
                s = (hi - lo) / 255
                zp = torch.clamp(torch.round(-lo / s), 0, 255)
                y = _Quantize.apply(x, s, zp, 0, 255, True)
                env[node.output[1]], env[node.output[2]] = s, zp
            elif op == "MatMulInteger":
                az = get(i[2]) if i[2] else 0
                bz = get(i[3]) if i[3] else 0
                y = (get(i[0]) - az) @ (get(i[1]) - bz)
            elif op == "ConvInteger":
                xz = get(i[2]) if i[2] else 0
                wz = get(i[3]) if i[3] else 0
                y = _conv(get(i[0]) - xz, get(i[1]) - wz, None, a)
            elif op in ("QLinearConv",):
                w = dq(get(i[3]), i[4], i[5], axis=0)
                bias = get(i[8]) * get(i[1]) * get(i[4]) if i[8] else None
                y = quantize(_conv(dq(get(i[0]), i[1], i[2]), w, bias, a), get(i[6]), i[7], node.output[0])
            elif op == "QLinearMatMul":
                f = dq(get(i[0]), i[1], i[2]) @ dq(get(i[3]), i[4], i[5])
                y = quantize(f, get(i[6]), i[7], node.output[0])
            elif op == "QGemm":
                tb = int(a.get("transB", 0))
                wq = dq(get(i[3]), i[4], i[5], axis=1 - tb)
                f = float(a.get("alpha", 1.0)) * dq(get(i[0]), i[1], i[2]) @ (wq.T if tb else wq)
                if i[6]:
                    f = f + get(i[6]) * get(i[1]) * get(i[4])
                y = quantize(f, get(i[7]), i[8], node.output[0]) if i[7] else f
            elif op in ("QLinearAdd", "QLinearMul"):
                fa, fb = dq(get(i[0]), i[1], i[2]), dq(get(i[3]), i[4], i[5])
                y = quantize(fa + fb if op == "QLinearAdd" else fa * fb, get(i[6]), i[7], node.output[0])
            elif op == "QLinearGlobalAveragePool":
                f = dq(get(i[0]), i[1], i[2]).mean(dim=tuple(range(2, env[i[0]].ndim)), keepdim=True)
                y = quantize(f, get(i[3]), i[4], node.output[0])
            elif op in ("QLinearSigmoid", "QLinearLeakyRelu"):
                f = dq(get(i[0]), i[1], i[2])
                f = torch.sigmoid(f) if op == "QLinearSigmoid" else F.leaky_relu(f, float(a.get("alpha", 0.01)))
                y = quantize(f, get(i[3]), i[4], node.output[0])
            else:
                y = _FLOAT[op](*[get(n) if n else None for n in node.input], **a)
            env[node.output[0]] = y
        return env


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, a: dict[str, Any]) -> torch.Tensor:
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        pads = [0, 0, 0, 0]
    return F.conv2d(
        x,
        w,
        b,
        stride=list(a.get("strides", [1, 1])),
        padding=pads[:2],
        dilation=list(a.get("dilations", [1, 1])),
        groups=int(a.get("group", 1)),
    )


def _gemm(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    transA: int = 0,
    transB: int = 0,
) -> torch.Tensor:
    y = alpha * (A.T if transA else A) @ (B.T if transB else B)
    return y if C is None else y + beta * C


_FLOAT: dict[str, Callable[..., torch.Tensor]] = {
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Flatten": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:axis])), -1),
    "Reshape": lambda x, shape, allowzero=0: x.reshape(
        [x.shape[k] if int(d) == 0 else int(d) for k, d in enumerate(shape.tolist())]
    ),
    "Gemm": _gemm,
    "MatMul": lambda a, b: a @ b,
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Relu": torch.relu,
    "Clip": lambda x, lo=None, hi=None: torch.clamp(x, lo, hi),
    "HardSwish": F.hardswish,
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0, 1),
    "Sigmoid": torch.sigmoid,
    "Cast": lambda x, to=1, saturate=1: x,
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, **kw: x,
    "Conv": lambda x, w, b=None, **a: _conv(x, w, b, a),
}
