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
        return self.constants.get(name)


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

    def __post_init__(self) -> None:
        self.opset = self.b.opset

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def unsupported(self, node: onnx.NodeProto, detail: str = "") -> UnsupportedOpError:
        return UnsupportedOpError(node.op_type, node.name or node.output[0], self.opset, detail)

    def np_dtype(self, name: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.info.dtype(name)))

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
        return self.b.zeros_like(name, self.info.dtype(name))

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
