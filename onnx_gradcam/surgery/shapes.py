"""Shape inference that survives real exports: onnx's inference plus folding of shape subgraphs.

Exporters such as paddle2onnx compute Reshape targets as Shape -> Cast -> Slice -> Concat,
which onnx's data propagation does not follow; we fold such 1-D shape values symbolically
(dims stay symbolic where the model's are) and feed the Reshape results back to onnx.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .load import infer_shapes

Dim = int | str | None


_SMALL = 1 << 12  # initializers up to this many bytes keep their values (shape arithmetic)


def _sanitised(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy for inference: large initializers become typed inputs (no weights are
    copied or serialised), no stale value_info, invalid dims (<= 0) made symbolic."""
    g = model.graph
    small = [t for t in g.initializer if _nbytes(t) <= _SMALL]
    large = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer if _nbytes(t) > _SMALL
    ]
    nodes = [shape_stand_in(n) for n in g.node]
    graph = helper.make_graph(nodes, g.name, [*g.input, *large], list(g.output), small)
    work = helper.make_model(graph, opset_imports=list(model.opset_import))
    work.ir_version = max(model.ir_version, 4)
    for vi in list(work.graph.input) + list(work.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                d.dim_param = f"{vi.name}_dim{i}"
            elif not d.HasField("dim_value") and not d.dim_param:
                d.dim_param = f"{vi.name}_dim{i}"
    return work


# com.microsoft quantized ops (onnx cannot infer them) -> (standard op of the same output shape,
# the inputs it reads); their outputs keep the integer type of the first input
_MS_SHAPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "QLinearAdd": ("Add", (0, 3)),
    "QLinearMul": ("Mul", (0, 3)),
    "QGemm": ("Gemm", (0, 3)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", (0,)),
    "QLinearAveragePool": ("AveragePool", (0,)),
    "QLinearSigmoid": ("Identity", (0,)),
    "QLinearLeakyRelu": ("Identity", (0,)),
    "QLinearSoftmax": ("Identity", (0,)),
}


_SAME_SHAPE = {"GroupNormalization", "MeanVarianceNormalization"}


def shape_stand_in(node: onnx.NodeProto) -> onnx.NodeProto:
    """A standard node whose output has the shape of this com.microsoft quantized op's (QOperator
    models), so that onnx's shape inference goes on past it; other nodes as they are.
    GroupNormalization and MeanVarianceNormalization too (shaped like their input): onnx 1.23 infers
    nothing for the first, nor for the second without its axes attribute."""
    if node.op_type in _SAME_SHAPE and node.domain in ("", "ai.onnx"):
        return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
    if node.domain != "com.microsoft" or node.op_type not in _MS_SHAPES and node.op_type != "QLinearConcat":
        return node
    if node.op_type == "QLinearConcat":
        op, inputs = "Concat", list(node.input[2::3])
    else:
        op, picks = _MS_SHAPES[node.op_type]
        inputs = [node.input[i] for i in picks]
    keep = {
        "Gemm": ("transA", "transB"),
        "AveragePool": ("kernel_shape", "strides", "pads", "auto_pad", "ceil_mode", "count_include_pad", "dilations"),
        "Concat": ("axis",),
    }.get(op, ())
    stand_in = helper.make_node(op, inputs, list(node.output), name=node.name)
    stand_in.attribute.extend(a for a in node.attribute if a.name in keep)
    return stand_in


def _nbytes(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * 4


def _dims(vi: onnx.ValueInfoProto) -> list[Dim] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    # onnx names the dims it could not infer 'unk__N': unknown, not symbolic
    return [
        d.dim_value
        if d.HasField("dim_value")
        else (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None)
        for d in t.shape.dim
    ]


def _fold_shape_values(model: onnx.ModelProto, shapes: dict[str, list[Dim] | None]) -> dict[str, list[Dim]]:
    """1-D integer values computable from shapes and constants, dims symbolic where unknown."""
    values: dict[str, list[Dim]] = {}
    grids: dict[str, list[int]] = {}  # the shapes of folded values that are not 1-D
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind in "iu" and arr.ndim <= 1 and arr.size <= 16:
            values[init.name] = [int(v) for v in arr.reshape(-1)]
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [values.get(i) for i in node.input]
        out: list[Dim] | None = None
        op = node.op_type
        if op == "Constant" and "value" in attrs:
            arr = numpy_helper.to_array(attrs["value"])
            if arr.dtype.kind in "iu" and arr.ndim <= 1 and arr.size <= 16:
                out = [int(v) for v in arr.reshape(-1)]
        elif op == "Shape":
            s = shapes.get(node.input[0])
            if s is not None:
                out = list(s)[attrs.get("start", 0) : attrs.get("end", len(s))]
        elif op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten") and ins and ins[0] is not None:
            out = ins[0]
            if op in ("Cast", "Identity") and node.input[0] in grids:
                grids[node.output[0]] = grids[node.input[0]]
        elif op == "Concat" and ins and all(v is not None for v in ins):
            out = [d for v in ins for d in v]  # type: ignore[union-attr]
        elif (
            op == "Slice"
            and ins
            and ins[0] is not None
            and all(v is not None for v in ins[1:3])
            and (node.input[0] not in grids)
        ):
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
            bounds = [ins[1][0], ins[2][0], steps[0]]  # type: ignore[index]
            if all(isinstance(v, int) for v in bounds):  # 1-D values: one axis
                start, stop, step = (int(v) for v in bounds)  # type: ignore[arg-type]
                out = ins[0][start:stop:step]
        elif (
            op in ("Mul", "Div", "Add", "Sub", "Mod", "Max", "Min")
            and len(ins) == 2
            and ins[0] is not None
            and ins[1] is not None
        ):
            out = _arith(op, ins[0], ins[1])
        elif op == "Gather" and ins and ins[0] is not None and ins[1] is not None:
            if all(isinstance(v, int) for v in ins[1]) and node.input[0] not in grids:  # type: ignore[union-attr]
                out = [ins[0][int(i)] for i in ins[1]]  # type: ignore[index, arg-type]
        elif op == "ConstantOfShape" and ins and ins[0] is not None and _ints(ins[0]) is not None:
            fill = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1)
            if fill.dtype.kind in "iu" and math.prod(_ints(ins[0]) or [0]) <= 64:  # type: ignore[arg-type]
                out = [int(fill[0])] * math.prod(_ints(ins[0]) or [0])
                if len(ins[0]) != 1:
                    grids[node.output[0]] = _ints(ins[0]) or []
        elif op in ("Reshape", "Transpose", "Slice") and ins and ins[0] is not None and _ints(ins[0]) is not None:
            # torch's F.pad spells its pads out as Reshape [-1, 2] -> Slice(step -1) -> Transpose -> Reshape
            arr = np.array(_ints(ins[0]), np.int64).reshape(grids.get(node.input[0], [len(ins[0])]))
            try:
                folded = _fold_array(op, arr, attrs, ins)
            except ValueError:  # a shape this reading does not track (a value of unknown rank)
                folded = None
            if folded is not None:
                out = [int(v) for v in folded.reshape(-1)]
                if folded.ndim != 1:
                    grids[node.output[0]] = list(folded.shape)
        if out is not None:
            values[node.output[0]] = out
    return values


def _fold_array(op: str, arr: np.ndarray, attrs: dict[str, Any], ins: list[list[Dim] | None]) -> np.ndarray | None:
    """Reshape, Transpose or Slice of a small integer array known at prepare time."""
    if op == "Transpose":
        return arr.transpose(attrs.get("perm", list(reversed(range(arr.ndim)))))
    operands = [_ints(v) if v is not None else None for v in ins[1:]]
    if op == "Reshape":
        target = operands[0] if operands else None
        if target is None or 0 in target:
            return None
        return arr.reshape(target)
    if len(operands) < 2 or operands[0] is None or operands[1] is None:
        return None
    starts, ends = operands[0], operands[1]
    axes = operands[2] if len(operands) > 2 and operands[2] is not None else list(range(len(starts)))
    steps = operands[3] if len(operands) > 3 and operands[3] is not None else [1] * len(starts)
    index = [slice(None)] * arr.ndim
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        index[ax % arr.ndim] = slice(st, en, sp)  # Python's clamping is ONNX's
    return arr[tuple(index)]


def _arith(op: str, a: list[Dim], b: list[Dim]) -> list[Dim] | None:
    """Element-wise integer arithmetic on folded values (scalars broadcast); None if unknown."""
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    xs, ys = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    out: list[Dim] = []
    for x, y in zip(xs, ys):
        if not isinstance(x, int) or not isinstance(y, int):
            out.append(None)
        elif op == "Mul":
            out.append(x * y)
        elif op == "Add":
            out.append(x + y)
        elif op == "Sub":
            out.append(x - y)
        elif op == "Mod":  # fmod=0: the sign of the divisor, as Python's %
            out.append(x % y if y else None)
        elif op in ("Max", "Min"):
            out.append(max(x, y) if op == "Max" else min(x, y))
        else:
            out.append(x // y if y else None)  # integer Div truncates; shape values are positive
    return out


def _reshape_result(in_dims: list[Dim] | None, target: list[Dim], allowzero: int) -> list[Dim]:
    dims: list[Dim] = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            dims.append(in_dims[i] if in_dims is not None and i < len(in_dims) else None)
        else:
            dims.append(d)
    if -1 in dims:
        known = [d for d in dims if d != -1]
        # -1 is determined when the symbolic dims on both sides are the same (e.g. the batch)
        sym_in = sorted(str(d) for d in (in_dims or []) if not isinstance(d, int))
        sym_out = sorted(str(d) for d in known if not isinstance(d, int))
        if in_dims is not None and None not in in_dims and None not in known and sym_in == sym_out:
            total = math.prod(int(d) for d in in_dims if isinstance(d, int))
            rest = math.prod(int(d) for d in known if isinstance(d, int))
            dims[dims.index(-1)] = total // rest if rest else None
        else:
            dims[dims.index(-1)] = None
    return dims


def _float_values(model: onnx.ModelProto) -> dict[str, list[float]]:
    """Small 1-D float constants, also behind a Cast: float16 converters turn Resize's scales
    into a float16 Constant cast back to float32, which onnx's inference does not follow."""
    values: dict[str, list[float]] = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.ndim == 1 and arr.size <= 16:
            values[init.name] = [float(v) for v in arr]
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None:
                continue
            found = numpy_helper.to_array(value)
            if found.dtype.kind == "f" and found.ndim == 1 and found.size <= 16:
                values[node.output[0]] = [float(v) for v in found]
        elif node.op_type == "Cast" and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _hinted_dims(
    node: onnx.NodeProto,
    values: dict[str, list[Dim]],
    shapes: dict[str, list[Dim] | None],
    scales: dict[str, list[float]] | None = None,
) -> list[Dim] | None:
    """Output dims of Reshape / Resize / Slice / Pad whose shape operand folds, else None."""
    if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in values:
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        return _reshape_result(shapes.get(node.input[0]), values[node.input[1]], allowzero)
    if node.op_type == "Slice" and len(node.input) >= 3:
        return _slice_dims(node, values, shapes)
    if node.op_type == "Pad" and len(node.input) > 1 and node.input[1] in values and len(node.input) < 4:
        in_dims, pads = shapes.get(node.input[0]), _ints(values[node.input[1]])
        if in_dims is None or pads is None or len(pads) != 2 * len(in_dims):
            return None  # (Pad's axes input, opset 18, is left to onnx)
        n = len(in_dims)
        return [d + pads[i] + pads[n + i] if isinstance(d, int) else d for i, d in enumerate(in_dims)]
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] in values:
        if any(a.name == "axes" for a in node.attribute):
            return None
        return list(values[node.input[3]])
    if node.op_type == "Resize" and len(node.input) > 2 and scales and node.input[2] in scales:
        in_dims, factors = shapes.get(node.input[0]), scales[node.input[2]]
        if in_dims is None or len(factors) != len(in_dims) or any(a.name == "axes" for a in node.attribute):
            return None
        # ONNX Resize: output size = floor(input size * scale); a scale of 1 keeps symbolic dims
        return [d if f == 1.0 else math.floor(d * f) if isinstance(d, int) else None for d, f in zip(in_dims, factors)]
    return None


def infer_all(model: onnx.ModelProto, rounds: int = 40) -> onnx.ModelProto:
    """Shape-inferred copy of `model`, with Reshape/Resize shapes folded from shape subgraphs.

    Each round lets onnx propagate the shapes folded so far (a chain of reshapes, as in
    ShuffleNet's channel shuffles, resolves one link per round); it stops when nothing improves.
    """
    work = _sanitised(model)
    inferred = infer_shapes(work)
    hints: dict[str, onnx.ValueInfoProto] = {}
    for _ in range(rounds):
        graph = inferred.graph
        shapes = {vi.name: _dims(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}
        for init in graph.initializer:
            shapes[init.name] = list(init.dims)
        values = _fold_shape_values(inferred, shapes)
        scales = _float_values(inferred)
        elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input]}
        improved = False
        for node in graph.node:
            dims = _hinted_dims(node, values, shapes, scales)
            if dims is None:
                continue
            current = shapes.get(node.output[0])
            if current is not None and len(current) == len(dims) and _known(current) >= _known(dims):
                continue
            elem = elem_types.get(node.input[0], onnx.TensorProto.FLOAT)
            hints[node.output[0]] = helper.make_tensor_value_info(node.output[0], elem, dims)
            improved = True
        if not improved:
            break
        fresh = onnx.ModelProto()
        fresh.CopyFrom(work)
        fresh.graph.value_info.extend(hints.values())
        inferred = infer_shapes(fresh)
    return inferred


def _slice_dims(
    node: onnx.NodeProto, values: dict[str, list[Dim]], shapes: dict[str, list[Dim] | None]
) -> list[Dim] | None:
    """Output dims of a Slice whose bounds fold to integers (torch's chunk/split exports)."""
    in_dims = shapes.get(node.input[0])
    operands = [values.get(node.input[k]) if k < len(node.input) and node.input[k] else None for k in range(1, 5)]
    starts, ends, axes, steps = operands
    if in_dims is None or starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    bounds = [_ints(v) for v in (starts, ends, axes, steps)]
    if any(b is None for b in bounds):
        return None
    out = list(in_dims)
    for st, en, ax, sp in zip(*bounds):  # type: ignore[call-overload]
        ax %= len(in_dims)
        dim = in_dims[ax]
        if not isinstance(dim, int):
            return None
        out[ax] = len(range(*slice(st, en, sp).indices(dim)))
    return out


def _ints(values: list[Dim]) -> list[int] | None:
    """The values as ints, or None if any is symbolic or unknown."""
    return [v for v in values if isinstance(v, int)] if all(isinstance(v, int) for v in values) else None


def _known(dims: list[Dim]) -> int:
    return sum(d is not None for d in dims)


def folded_constants(inferred: onnx.ModelProto) -> dict[str, list[int]]:
    """Integer tensors that shape subgraphs compute, where every value is known at prepare time
    (e.g. a Slice's bounds from Shape(x)[1] // 2, as torch's chunk exports them)."""
    graph = inferred.graph
    shapes = {vi.name: _dims(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}
    values = _fold_shape_values(inferred, shapes)
    return {k: ints for k, v in values.items() if (ints := _ints(v)) is not None}
