"""Emitting new nodes and initializers: one name generator, opset-aware helpers.

Everything the engine appends goes through a GraphBuilder, so every new name carries the
reserved prefix and no two helpers spell an op's opset differences on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import OnnxGradCamError

PREFIX = "gradcam/"

Dim = int | str | None
Shape = tuple[Dim, ...]


class GraphBuilder:
    """Collects nodes and initializers appended to a graph at one opset."""

    def __init__(self, opset: int, taken: set[str], prefix: str = PREFIX) -> None:
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken)
        self._counts: dict[str, int] = {}
        self._cast_to: dict[str, int] = {}  # forward tensors read through a Cast: name -> type
        self._casts: dict[str, str] = {}  # their Casts, made once, where first read
        clash = sorted(n for n in taken if n.startswith(prefix))
        if clash:
            raise OnnxGradCamError(
                f"the model already has names with the reserved prefix {prefix!r} (e.g. {clash[0]!r}); "
                "it looks prepared already: to fix this, prepare the original model instead"
            )

    def fresh(self, hint: str) -> str:
        """A new unique name under the reserved prefix."""
        n = self._counts.get(hint, 0)
        self._counts[hint] = n + 1
        name = f"{self.prefix}{hint}" if n == 0 else f"{self.prefix}{hint}_{n}"
        if name in self._taken:
            raise OnnxGradCamError(f"name clash on {name!r}: to fix this, rename that tensor in the model")
        self._taken.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim an exact public name (such as an output name); a clash is an error."""
        if name in self._taken:
            raise OnnxGradCamError(
                f"the model already has a tensor named {name!r}: to fix this, rename it before preparing"
            )
        self._taken.add(name)
        return name

    def cast_on_read(self, names: set[str], dtype: int) -> None:
        """Every appended node that reads one of `names` (forward tensors) reads it cast to
        `dtype`; Shape and Size read no values and take the tensor itself."""
        self._cast_to.update(dict.fromkeys(names, dtype))

    def value(self, name: str) -> str:
        """`name` as appended nodes read it: itself, or its Cast (see cast_on_read)."""
        if name not in self._cast_to:
            return name
        if name not in self._casts:
            out = self.fresh("cast")
            self.nodes.append(
                helper.make_node("Cast", [name], [out], name=self.fresh("cast_node"), to=self._cast_to[name])
            )
            self._casts[name] = out
        return self._casts[name]

    def const(self, value: Any, hint: str = "const", dtype: Any = None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        hint: str | None = None,
        outputs: int | Sequence[str] = 1,
        **attrs: Any,
    ) -> Any:
        """Append one node; returns its output name, or the list of names if outputs != 1."""
        base = hint or op_type.lower()
        if isinstance(outputs, int):
            outs = [self.fresh(base) for _ in range(outputs)]
        else:
            outs = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        reads = list(inputs) if op_type in ("Shape", "Size") else [self.value(i) for i in inputs]
        node = helper.make_node(op_type, reads, outs, name=self.fresh(f"{base}_node"), **attrs)
        self.nodes.append(node)
        return outs[0] if isinstance(outputs, int) and outputs == 1 else outs

    # -- opset-aware helpers -------------------------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """ReduceSum/Mean/Max/Min over constant axes, as attribute or input by opset."""
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        kd = int(keepdims)
        if axes is None:
            return self.op(op_type, [x], keepdims=kd)
        if as_input:
            return self.op(op_type, [x, self.const(np.array(list(axes), np.int64), "axes")], keepdims=kd)
        return self.op(op_type, [x], axes=list(axes), keepdims=kd)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(list(axes), np.int64), "axes")])
        return self.op("Unsqueeze", [x], axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.const(np.array(list(axes), np.int64), "axes")])
        return self.op("Squeeze", [x], axes=list(axes))

    def shape_of(self, x: str, start: int | None = None, end: int | None = None) -> str:
        if start is None and end is None:
            return self.op("Shape", [x])
        if self.opset >= 15:
            return self.op("Shape", [x], start=start, end=end)
        full = self.op("Shape", [x])
        return self.op(
            "Slice",
            [
                full,
                self.const(np.array([start or 0], np.int64), "starts"),
                self.const(np.array([end if end is not None else np.iinfo(np.int64).max], np.int64), "ends"),
            ],
        )

    def scalar(self, value: float, dtype: int = TensorProto.FLOAT) -> str:
        return self.const(np.array(value, dtype=helper.tensor_dtype_to_np_dtype(dtype)), "scalar")

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.op("Transpose", [x], perm=list(perm))

    def zeros_like(self, x: str, dtype: int = TensorProto.FLOAT) -> str:
        zero = helper.make_tensor("value", dtype, [1], [0])
        return self.op("ConstantOfShape", [self.shape_of(x)], hint="zeros", value=zero)
