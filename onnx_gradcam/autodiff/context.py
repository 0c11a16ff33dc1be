"""What a gradient rule may ask about the forward graph: shapes, dtypes, constants.

Rules read the forward graph through a RuleContext and emit through its builder; they never
touch protobufs of the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedOpError
from .builder import GraphBuilder, Shape

RELU_MODES = ("standard", "guided")
LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


class TensorInfo:
    """Static shapes, element types and prepare-time constants of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto, constants_from: onnx.GraphProto | None = None) -> None:
        """Shapes from `graph` (shape-inferred); constants from `constants_from` (default: graph)."""
        self.shapes: dict[str, Shape] = {}
        self.dtypes: dict[str, int] = {}
        self.constants: dict[str, np.ndarray] = {}
        self._lazy: dict[str, onnx.TensorProto] = {}  # converted on first use: weights stay protobuf
        self.folded: dict[str, list[int]] = {}  # integer values shape subgraphs compute
        self.stored: dict[str, int] = {}  # element types in the model where dtypes[] differs
        # DequantizeLinear nodes, so that a dequantized constant weight is a float constant
        self._dequantized: dict[str, onnx.NodeProto] = {}
        self._unfoldable: set[str] = set()
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            self._add(vi)
        source = constants_from if constants_from is not None else graph
        for init in source.initializer:
            self._lazy[init.name] = init
            self.shapes[init.name] = tuple(int(d) for d in init.dims)
            self.dtypes[init.name] = init.data_type
        self._cast_of: dict[str, tuple[str, int]] = {}  # Cast outputs -> (input, type): constant if it is
        for node in source.node:
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx") and node.input and node.input[0]:
                # float16 converters leave Constant -> Cast(float32) before the ops they keep in float32
                to = next((int(a.i) for a in node.attribute if a.name == "to"), TensorProto.FLOAT)
                self._cast_of[node.output[0]] = (node.input[0], to)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        arr = numpy_helper.to_array(a.t)
                    elif a.name in ("value_float", "value_int"):
                        arr = np.array(helper.get_attribute_value(a))
                    elif a.name in ("value_floats", "value_ints"):
                        arr = np.array(helper.get_attribute_value(a))
                    else:
                        continue
                    self.constants[node.output[0]] = arr
            elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
                self._dequantized[node.output[0]] = node

    def _add(self, vi: onnx.ValueInfoProto) -> None:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            return
        self.dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            dims: list[int | str | None] = []
            for d in t.shape.dim:
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            self.shapes[vi.name] = tuple(dims)

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shapes.get(name)
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        return tuple(int(d) for d in s)  # type: ignore[arg-type]

    def static_dims(self, name: str, start: int) -> tuple[int, ...] | None:
        """dims[start:] when all of them are known at prepare time (the batch may stay symbolic)."""
        s = self.shapes.get(name)
        if s is None or not all(isinstance(d, int) for d in s[start:]):
            return None
        return tuple(int(d) for d in s[start:])  # type: ignore[arg-type]

    def dtype(self, name: str) -> int:
        """The element type gradients of `name` are computed in (see `compute_in_float32`)."""
        return self.dtypes.get(name, TensorProto.FLOAT)

    def stored_dtype(self, name: str) -> int:
        """The element type of `name` in the model itself."""
        return self.stored.get(name, self.dtype(name))

    def compute_in_float32(self) -> set[str]:
        """Report float16 and bfloat16 tensors as float32, the type their gradients and maps are
        computed in; returns their names (GraphBuilder.cast_on_read casts them where appended
        nodes read them). Rules then emit float32 constants and Casts without knowing why.
        """
        low = {name for name, t in self.dtypes.items() if t in LOW_PRECISION}
        for name in low:
            self.stored[name] = self.dtypes[name]
            self.dtypes[name] = TensorProto.FLOAT
        return low

    def grad_dtype(self, name: str) -> int:
        """The element type of the gradient of `name`: its own for a float tensor; float32 for an
        integer one (a quantized tensor's gradient is taken with respect to its integer value as
        a real number, and its scales are float32)."""
        dtype = self.dtype(name)
        return dtype if dtype in FLOAT_TYPES else TensorProto.FLOAT

    def const(self, name: str) -> np.ndarray | None:
        if name == "":
            return None
        if name not in self.constants and name in self._lazy:
            self.constants[name] = numpy_helper.to_array(self._lazy[name])
        if name not in self.constants and name in self._cast_of:
            source, to = self._cast_of[name]
            value = self.const(source)
            if value is not None:
                self.constants[name] = value.astype(helper.tensor_dtype_to_np_dtype(to))
        if name not in self.constants and name in self._dequantized and name not in self._unfoldable:
            folded = self._dequantize(self._dequantized[name])
            if folded is None:
                self._unfoldable.add(name)
            else:
                self.constants[name] = folded
        return self.constants.get(name)

    def add_dequantized(self, node: onnx.NodeProto) -> str:
        """Know `node` (a DequantizeLinear of constants, not emitted) as the constant it computes;
        a rule that needs it as a tensor asks RuleContext.weight or gather_weight."""
        out, x, scale = node.output[0], node.input[0], node.input[1]
        self._dequantized[out] = node
        if x in self.shapes:
            self.shapes[out] = self.shapes[x]
        self.dtypes[out] = self.dtype(scale)
        return out

    def dequantized_source(self, name: str) -> tuple[str, str, str, int] | None:
        """(integer constant, scale, zero point, axis) when `name` is a DequantizeLinear of constants
        per tensor or per axis (a QDQ model's weight), else None."""
        node = self._dequantized.get(name)
        if node is None or self.const(name) is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("block_size", 0)):
            return None
        zp = node.input[2] if len(node.input) > 2 else ""
        return node.input[0], node.input[1], zp, int(attrs.get("axis", 1))

    def _dequantize(self, node: onnx.NodeProto) -> np.ndarray | None:
        """y = (x - zero_point) * scale of constant inputs (per tensor, per axis or per block),
        in the scale's float type: the float weight a QDQ model's Conv/Gemm/MatMul reads."""
        x, scale = self.const(node.input[0]), self.const(node.input[1])
        zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if x is None or scale is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return dequantize(x, scale, zp, int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))


def dequantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1, block_size: int = 0
) -> np.ndarray:
    """ONNX DequantizeLinear in NumPy: (x - zero_point) * scale, computed in float64 and returned
    in the scale's type; a 1-D scale applies along `axis`, a blocked one per `block_size` run."""

    def spread(v: np.ndarray) -> np.ndarray:
        if v.ndim == 0 or v.size == 1 and x.ndim == 0:
            return v.reshape(())
        ax = axis + x.ndim if axis < 0 else axis
        if block_size:
            return np.repeat(v, block_size, axis=ax).take(range(x.shape[ax]), axis=ax)
        shape = [1] * x.ndim
        shape[ax] = v.size
        return v.reshape(shape)

    zp = np.zeros((), np.float64) if zero_point is None else spread(zero_point.astype(np.float64))
    out = (x.astype(np.float64) - zp) * spread(scale.astype(np.float64))
    return out.astype(scale.dtype)


@dataclass(frozen=True)
class LinearBack:
    """dX = alpha dY M for a constant matrix M [outputs, inputs]: M = `weight` if `rows_out`,
    else its transpose. `dy` is dY, or with `gather` the class index [N] of a one-hot dY, so
    that dX = alpha M[class]."""

    dy: str
    weight: str
    rows_out: bool
    alpha: float = 1.0
    gather: bool = False


@dataclass
class RuleContext:
    """Everything a gradient rule needs: the builder, the forward graph's facts, the options."""

    b: GraphBuilder
    info: TensorInfo
    relu_mode: str = "standard"
    opset: int = field(init=False)
    # gradient tensors known to be one-hot on axis 1 of a [N, K] tensor: name -> class index [N]
    one_hot: dict[str, str] = field(default_factory=dict)
    # gradient tensors constant over the spatial axes: name -> their value at [N, C, 1, ...]
    spatial_constant: dict[str, str] = field(default_factory=dict)
    # gradient tensors whose sum over the spatial axes is known more cheaply than the tensor:
    # name -> that sum at [N, C, 1, ...] (Grad-CAM's weights need only this)
    channel_sum: dict[str, str] = field(default_factory=dict)
    # gradients of a constant-weight product: dX -> how dX = alpha dY M was made (see LinearBack)
    linear_back: dict[str, LinearBack] = field(default_factory=dict)
    # quantized tensors whose requantization clip the gradient passes unclipped: the score's own
    # output quantizer (the explained logit is often the largest one calibration saw, i.e. qmax)
    unclipped: set[str] = field(default_factory=set)
    # gradients the DequantizeLinear rule made as dY * s: dX -> (dY, scale, axis), so that the
    # QuantizeLinear before it with the same scale passes dY itself (a QDQ pair's s / s = 1)
    rescaled: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    _float_weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.opset = self.b.opset

    def weight(self, name: str) -> str:
        """A constant weight as the gradient reads it: for a dequantized int8 constant (QDQ), one
        float initializer folded at prepare time, since the model's DequantizeLinear would run on
        every call and a folded weight can be prepacked; any other tensor as it is."""
        if self.info.dequantized_source(name) is None:
            return name
        if name not in self._float_weights:
            value = self.info.const(name)
            assert value is not None
            folded = self.b.const(value, "dequantized_weight")
            self.info.constants[folded] = value
            self.info.shapes[folded] = tuple(value.shape)
            self.info.dtypes[folded] = self.info.grad_dtype(name)
            self._float_weights[name] = folded
        return self._float_weights[name]

    def product(self, dy: str, name: str, transpose: bool, alpha: float = 1.0) -> str:
        """alpha dy @ M for a 2-D dY [N, K] and a constant weight, M = W^T if `transpose` else W;
        of a dequantized int8 weight from its integer values (see _int8_product), else a Gemm
        with the float weight."""
        exact = self._int8_product(dy, name, transpose, alpha)
        if exact is not None:
            return exact
        return self.b.op("Gemm", [dy, self.weight(name)], alpha=alpha if alpha != 1.0 else None, transB=int(transpose))

    def _int8_product(self, dy: str, name: str, transpose: bool, alpha: float) -> str | None:
        """dy @ M with M = (Q - Z) S, from the int8 Q itself and exact to float32: each row of dY
        over its largest magnitude m is written as three 7-bit digits, dY = m (D0 + D1 / 126 +
        D2 / 126^2) + e with |e| <= m / (2 * 63 * 126^2) ~ 5e-7 m, and the three rows of digits go
        through one product, DequantizeLinear(uint8) @ DequantizeLinear(int8).

        Standard ops, which onnxruntime runs as one integer product with float output
        (MatMulIntegerToFloat) on the int8 weight the forward already holds, where a float copy
        would be four times its size and read from memory on every call. The digits stay below
        128 so that u8 x s8 pairs cannot saturate 16 bits in AVX2 kernels. A scale along K is
        applied to dY first; one along M's columns (and alpha) goes into M's dequantization.
        None where W is not such a weight or its zero point varies along K: the caller then
        multiplies by the float weight."""
        source = self.info.dequantized_source(name)
        if source is None or self.opset < 13 or self.info.grad_dtype(name) != TensorProto.FLOAT:
            return None
        q_name, scale_name, zp_name, qaxis = source
        q, scale = self.info.const(q_name), self.info.const(scale_name)
        zp = self.info.const(zp_name) if zp_name else None
        if q is None or scale is None or q.ndim != 2 or q.dtype not in (np.int8, np.uint8) or scale.size == 0:
            return None
        qm = np.ascontiguousarray(q.T if transpose else q)
        axis = None if scale.size == 1 else (1 - qaxis % 2 if transpose else qaxis % 2)  # in M's axes
        s = scale.astype(np.float64).reshape(-1)
        z = np.zeros(1, qm.dtype) if zp is None else zp.reshape(-1).astype(qm.dtype)
        if axis == 0 and np.any(z):
            return None
        b = self.b
        if axis == 0:  # scale per row of M: dY @ diag(s) Q
            dy = b.op("Mul", [dy, b.const(s.astype(np.float32).reshape(1, -1), "row_scale")])
            w_scale, w_zp, w_axis = np.array(alpha, np.float32), z[:1].reshape(()), None
        elif axis == 1:
            w_scale, w_zp, w_axis = (alpha * s).astype(np.float32), np.broadcast_to(z, s.shape).copy(), 1
        else:
            w_scale, w_zp, w_axis = np.array(alpha * s[0], np.float32), z[:1].reshape(()), None
        q_init = q_name if not transpose else b.const(qm, "weight_t")
        w = b.op(
            "DequantizeLinear", [q_init, b.const(w_scale, "weight_scale"), b.const(w_zp, "weight_zp")], axis=w_axis
        )

        largest = b.op("Max", [b.reduce("ReduceMax", b.op("Abs", [dy]), [-1], True), b.scalar(1e-30)])
        rest = b.op("Div", [dy, largest])  # rows in [-1, 1]
        step, offset = b.scalar(1 / 63), b.const(np.array(64, np.uint8), "digit_zp")
        digits = []
        for k in range(3):  # digit k holds 126^k times its share, so that one scale fits all three
            digits.append(b.op("QuantizeLinear", [rest, step, offset]))
            if k < 2:
                left = b.op("Sub", [rest, b.op("DequantizeLinear", [digits[-1], step, offset])])
                rest = b.op("Mul", [left, b.scalar(126.0)])
        stacked = b.op("DequantizeLinear", [b.op("Concat", digits, axis=0), step, offset])
        products = b.op("MatMul", [stacked, w])  # [3 N, columns]
        columns = qm.shape[1]
        parts = b.op("Reshape", [products, b.const(np.array([3, -1, columns], np.int64), "shape")])
        weights = b.const(np.array([1, 1 / 126, 1 / 126**2], np.float32).reshape(3, 1, 1), "digit_weights")
        total = b.reduce("ReduceSum", b.op("Mul", [parts, weights]), [0], False)
        return b.op("Mul", [total, largest])

    def gather_weight(self, name: str, index: str, axis: int) -> str:
        """Gather(weight, index, axis); of a dequantized int8 constant only the gathered rows are
        dequantized (their scales gathered along with them where the scale is per row)."""
        source = self.info.dequantized_source(name)
        if source is None:
            return self.b.op("Gather", [name, index], axis=axis)
        q, scale, zero_point, qaxis = source
        zp_value = self.info.const(zero_point) if zero_point else None
        if zp_value is not None and not np.any(zp_value):
            zero_point = ""  # symmetric int8 weights: a zero point of zeros is the default
        rows = self.b.op("Gather", [q, index], axis=axis)
        rank = self.info.rank(q) or 2
        per_row = (self.info.rank(scale) or 0) == 1 and qaxis % rank == axis % rank
        if per_row:
            scale = self.b.op("Gather", [scale, index], axis=0)
            zero_point = self.b.op("Gather", [zero_point, index], axis=0) if zero_point else ""
        inputs = [rows, scale, zero_point] if zero_point else [rows, scale]
        return self.b.op("DequantizeLinear", inputs, hint="dequantized_rows", axis=qaxis)

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def unsupported(self, node: onnx.NodeProto, detail: str = "") -> UnsupportedOpError:
        return UnsupportedOpError(node.op_type, node.name or node.output[0], self.opset, detail)

    def np_dtype(self, name: str) -> np.dtype:
        """The NumPy type of tensor `name`'s gradient (float32 for an integer tensor)."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.info.grad_dtype(name)))

    def scalar_like(self, name: str, value: float) -> str:
        """A scalar constant of the same element type as tensor `name`."""
        return self.b.const(np.array(value, dtype=self.np_dtype(name)), "scalar")

    def const_like(self, name: str, value: np.ndarray, hint: str = "const") -> str:
        return self.b.const(np.asarray(value, dtype=self.np_dtype(name)), hint)

    def reshape_to(self, name: str) -> str:
        """A Reshape target for a tensor with as many elements as `name` becoming its shape: a
        constant where all but the batch size are known (-1 takes the batch), else Shape(name)."""
        full, rest = self.info.static_dims(name, 0), self.info.static_dims(name, 1)
        if full is not None:
            return self.b.const(np.array(full, np.int64), "shape")
        if rest is not None and self.info.rank(name):
            return self.b.const(np.array([-1, *rest], np.int64), "shape")
        return self.b.shape_of(name)

    def zeros_like(self, name: str) -> str:
        return self.b.zeros_like(name, self.info.grad_dtype(name))

    def static_shape(self, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """A shape known at prepare time, or an error naming the node."""
        s = self.info.static_shape(name)
        if s is None:
            raise self.unsupported(node, f"input {name!r} of unknown static shape {self.info.shape(name)}")
        return s

    def const_input(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index >= len(node.input) or node.input[index] == "":
            return None
        value = self.info.const(node.input[index])
        if value is None and node.input[index] in self.info.folded:
            value = np.array(self.info.folded[node.input[index]], np.int64)
        if value is None:
            raise self.unsupported(node, f"input {index} ({node.input[index]!r}) that is not a constant")
        return value
