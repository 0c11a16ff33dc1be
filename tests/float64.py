"""Ring 3's float64 references: a model's float32 tensors made float64 and run by onnx's reference
evaluator, so that central differences reach 1e-7 where float32 ones stall at 1e-3..1e-2.

BatchNormalization is written out as x * k + c first: onnx 1.23's reference BatchNormalization
gave 2.5% off its formula on a PaddleOCR node that onnxruntime computes to 1e-7.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator


def _double(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type != TensorProto.FLOAT:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _batchnorm_written_out(graph: onnx.GraphProto, ranks: dict[str, int]) -> None:
    """Inference-mode BatchNormalization with constant parameters -> Mul and Add, in float64:
    y = x * k + c, k = scale / sqrt(var + eps), c = bias - mean * k (per channel, axis 1)."""
    values = _constants(graph)
    nodes = []
    for node in graph.node:
        params = [values.get(name) for name in node.input[1:5]]
        if node.op_type != "BatchNormalization" or len(node.output) > 1 or any(p is None for p in params):
            nodes.append(node)
            continue
        scale, bias, mean, var = (np.asarray(p, np.float64) for p in params)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        k = scale / np.sqrt(var + np.float64(np.float32(eps)))
        shape = (-1,) + (1,) * (ranks.get(node.input[0], 4) - 2)
        kn, cn = f"{node.output[0]}/k", f"{node.output[0]}/c"
        graph.initializer.extend(
            [
                numpy_helper.from_array(k.reshape(shape), kn),
                numpy_helper.from_array((bias - mean * k).reshape(shape), cn),
            ]
        )
        nodes.append(helper.make_node("Mul", [node.input[0], kn], [f"{node.output[0]}/xk"]))
        nodes.append(helper.make_node("Add", [f"{node.output[0]}/xk", cn], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64: float initializers, Constant values, declared types
    and Casts to float become double; BatchNormalization is written out; the rest is kept."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in list(inferred.input) + list(inferred.value_info)
        if vi.type.tensor_type.HasField("shape")
    }
    _batchnorm_written_out(g, ranks)
    for i, init in enumerate(g.initializer):
        g.initializer[i].CopyFrom(_double(init))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_double(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return m


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """onnx's reference evaluator on the float64 copy of `model`."""
    return ReferenceEvaluator(float64_model(model))


def directional_errors(
    head: onnx.ModelProto,
    feature: str,
    a: np.ndarray,
    gradient: np.ndarray,
    score,  # (the head's first output, float64 [2, ...]) -> [S(A + εv), S(A - εv)]
    directions: int = 8,
    steps: tuple[float, float] = (1e-5, 1e-6),
    seed: int = 0,
) -> tuple[float, float]:
    """(the engine's directional derivatives <dS/dA, v> against float64 central differences
    (S(A + εv) - S(A - εv)) / 2ε at the smaller step, relative to the largest; the two steps'
    differences against each other: the case's conditioning, large where a kink lies in the step).
    `a` is the prepared model's own feature tensor (one sample), `gradient` its gradcam_gradient."""
    ev = evaluator(head)
    rs = np.random.RandomState(seed)
    a64, g64 = np.asarray(a, np.float64), np.asarray(gradient, np.float64)
    analytic, numeric = [], {s: [] for s in steps}
    for _ in range(directions):
        v = rs.randn(*a.shape)
        analytic.append(float((g64 * v).sum()))
        for s in steps:
            plus, minus = score(ev.run(None, {feature: np.concatenate([a64 + s * v, a64 - s * v])})[0])
            numeric[s].append((plus - minus) / (2 * s))
    fine, coarse = np.array(numeric[steps[1]]), np.array(numeric[steps[0]])
    scale = np.abs(fine).max()
    return float(np.abs(np.array(analytic) - fine).max() / scale), float(np.abs(coarse - fine).max() / scale)
