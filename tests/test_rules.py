"""Ring 1: every registered gradient rule against central finite differences of its own op.

The cases come from tests/rule_cases.py, keyed by op type; a rule without a case fails.
Tolerances: float64 cases 1e-6 (step 1e-6), float32 cases 2e-3 (step 1e-2), both relative to
the largest magnitude of the numerical gradient.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, shape_inference

from onnx_gradcam.autodiff.backprop import backprop
from onnx_gradcam.autodiff.builder import GraphBuilder
from onnx_gradcam.autodiff.context import RuleContext, TensorInfo
from onnx_gradcam.autodiff.registry import RULES

from .conftest import cpu_session, rel_err
from .rule_cases import CASES, F64, Case

TOL = {np.dtype(F64): (1e-6, 1e-6), np.dtype(np.float32): (1e-2, 2e-3)}


def _typed(case: Case, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(case.dtype) if value.dtype.kind == "f" else value


def _forward_model(op: str, case: Case) -> onnx.ModelProto:
    names = [n for n, _, _ in case.inputs]
    outs = [f"y{i}" for i in range(case.outputs)]
    node = helper.make_node(op, names, outs, name=f"{op}_under_test", **case.attrs)
    inputs, inits = [], []
    for name, value, const in case.inputs:
        if value is None:
            continue
        arr = _typed(case, value)
        if const:
            inits.append(numpy_helper.from_array(arr, name))
        else:
            dims = [f"{name}_d{i}" if i in case.symbolic else d for i, d in enumerate(arr.shape)]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), dims))
    graph = helper.make_graph([node], "case", inputs, [onnx.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8
    return _typed_outputs(model)


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the graph outputs the types and shapes onnx's shape inference finds."""
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    known.update({vi.name: vi for vi in inferred.graph.output if vi.type.HasField("tensor_type")})
    outs = [known[o.name] for o in model.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(outs)
    return model


def _gradient_model(fwd: onnx.ModelProto, source: str, seeds: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    inferred = shape_inference.infer_shapes(fwd, strict_mode=True)
    info = TensorInfo(inferred.graph)
    taken = {o for n in fwd.graph.node for o in n.output} | {i.name for i in fwd.graph.input}
    taken |= {i.name for i in fwd.graph.initializer}
    b = GraphBuilder(opset, taken)
    ctx = RuleContext(b, info)
    seed_names = {out: f"seed_{out}" for out in seeds}
    dx = backprop(ctx, list(fwd.graph.node), source, seed_names)
    model = onnx.ModelProto()
    model.CopyFrom(fwd)
    g = model.graph
    g.node.extend(b.nodes)
    g.node.append(helper.make_node("Identity", [dx], ["dx"]))
    g.initializer.extend(b.initializers)
    for out, value in seeds.items():
        g.input.append(
            helper.make_tensor_value_info(seed_names[out], helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        )
    del g.output[:]
    like = next(vi for vi in fwd.graph.input if vi.name == source)
    g.output.append(helper.make_tensor_value_info("dx", like.type.tensor_type.elem_type, None))
    g.output[0].type.tensor_type.shape.CopyFrom(like.type.tensor_type.shape)
    return model


def _all_cases() -> list[tuple[str, Case, str]]:
    return [(op, case, wrt) for op, cases in CASES.items() for case in cases for wrt in case.wrt]


def test_every_rule_has_a_case() -> None:
    missing = sorted(set(RULES) - set(CASES))
    assert not missing, f"gradient rules without a finite-difference case: {missing}"


@pytest.mark.parametrize(("op", "case", "wrt"), _all_cases(), ids=lambda v: v if isinstance(v, str) else v.id)
def test_rule_matches_finite_differences(op: str, case: Case, wrt: str) -> None:
    fwd = _forward_model(op, case)
    feeds = {n: _typed(case, v) for n, v, const in case.inputs if not const and v is not None}
    run_fwd = cpu_session(fwd.SerializeToString())
    outs = run_fwd.run(None, feeds)
    rs = np.random.RandomState(1)
    seeds = {f"y{i}": rs.uniform(-1, 1, o.shape).astype(o.dtype) for i, o in enumerate(outs)}

    grad_model = _gradient_model(fwd, wrt, seeds, case.opset)
    onnx.checker.check_model(grad_model, full_check=True)
    run_grad = cpu_session(grad_model.SerializeToString())
    (analytic,) = run_grad.run(None, {**feeds, **{f"seed_{k}": v for k, v in seeds.items()}})

    step, tol = TOL[np.dtype(feeds[wrt].dtype)]

    def loss(values: dict[str, np.ndarray]) -> float:
        ys = run_fwd.run(None, values)
        return float(sum(np.sum(np.asarray(y, np.float64) * seeds[f"y{i}"]) for i, y in enumerate(ys)))

    base = feeds[wrt]
    numeric = np.zeros(base.shape, np.float64)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += step
        minus[idx] -= step
        numeric[idx] = (loss({**feeds, wrt: plus}) - loss({**feeds, wrt: minus})) / (2 * step)
    assert analytic.shape == base.shape
    err = rel_err(analytic, numeric)
    assert err < tol, f"{op}/{case.id} d/d{wrt}: relative error {err:.2e} >= {tol:.0e}"
