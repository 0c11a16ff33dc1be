"""Ring 1: every registered gradient rule against central finite differences of its own op.

The cases come from tests/rule_cases.py, keyed by op type; a rule without a case fails.
Tolerances: float64 cases 1e-6 (step 1e-6), float32 cases 2e-3 (step 1e-2), both relative to
the largest magnitude of the numerical gradient. int8 ops are differentiated through their
float64 straight-through surrogate (rule_cases.INT8_CASES): step 1e-3, tolerance 1e-5 (the
engine's gradient is float32).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, shape_inference

from onnx_gradcam.autodiff.backprop import backprop, forward_reachable
from onnx_gradcam.autodiff.builder import GraphBuilder
from onnx_gradcam.autodiff.context import RuleContext, TensorInfo
from onnx_gradcam.autodiff.registry import RULES
from onnx_gradcam.surgery.shapes import shape_stand_in

from .conftest import cpu_session, rel_err
from .rule_cases import CASES, F64, Case

TOL = {np.dtype(F64): (1e-6, 1e-6), np.dtype(np.float32): (1e-2, 2e-3)}
SURROGATE_TOL = (1e-3, 1e-5)
MS = "com.microsoft."


def _typed(case: Case, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(case.dtype) if value.dtype.kind == "f" else value


def _forward_model(op: str, case: Case) -> onnx.ModelProto:
    names = [n for n, _, _ in case.inputs]
    outs = [f"y{i}" for i in range(case.outputs)]
    domain = "com.microsoft" if op.startswith(MS) else ""
    node = helper.make_node(op.removeprefix(MS), names, outs, name=f"{op}_under_test", domain=domain, **case.attrs)
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
    imports = [helper.make_opsetid("", case.opset)] + ([helper.make_opsetid("com.microsoft", 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return _typed_outputs(model)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference, com.microsoft ops read as their standard stand-ins."""
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(model)
    nodes = [shape_stand_in(n) for n in model.graph.node]
    del stand_in.graph.node[:]
    stand_in.graph.node.extend(nodes)
    return shape_inference.infer_shapes(stand_in, strict_mode=True)


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the graph outputs the types and shapes onnx's shape inference finds."""
    inferred = _inferred(model)
    known = {vi.name: vi for vi in inferred.graph.value_info}
    known.update({vi.name: vi for vi in inferred.graph.output if vi.type.HasField("tensor_type")})
    outs = [known[o.name] for o in model.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(outs)
    return model


def _gradient_model(fwd: onnx.ModelProto, source: str, seeds: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    inferred = _inferred(fwd)
    info = TensorInfo(inferred.graph, constants_from=fwd.graph)
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
    g.output.append(helper.make_tensor_value_info("dx", info.grad_dtype(source), None))
    g.output[0].type.tensor_type.shape.CopyFrom(like.type.tensor_type.shape)
    return model


def _all_cases() -> list[tuple[str, Case, str]]:
    return [(op, case, wrt) for op, cases in CASES.items() for case in cases for wrt in case.wrt]


def test_every_rule_has_a_case() -> None:
    missing = sorted(set(RULES) - set(CASES))
    assert not missing, f"gradient rules without a finite-difference case: {missing}"


@pytest.mark.parametrize(("op", "case", "wrt"), _all_cases(), ids=lambda v: v if isinstance(v, str) else v.id)
def test_rule_matches_finite_differences(op: str, case: Case, wrt: str, record_property) -> None:  # type: ignore[no-untyped-def]
    fwd = _forward_model(op, case)
    feeds = {n: _typed(case, v) for n, v, const in case.inputs if not const and v is not None}
    run_fwd = cpu_session(fwd.SerializeToString())
    outs = run_fwd.run(None, feeds)
    rs = np.random.RandomState(1)
    # an integer output's gradient is float32 (by its integer value read as a real number)
    seeds = {
        f"y{i}": rs.uniform(-1, 1, o.shape).astype(o.dtype if o.dtype.kind == "f" else np.float32)
        for i, o in enumerate(outs)
    }

    # outputs that carry no gradient (TopK's Indices) get no seed; the differences still see them
    reached = forward_reachable(list(fwd.graph.node), [wrt])
    grad_seeds = {k: v for k, v in seeds.items() if k in reached}
    grad_model = _gradient_model(fwd, wrt, grad_seeds, case.opset)
    # onnx's checker refuses ops it marks deprecated (GroupNormalization-18), which onnxruntime runs
    if op.startswith(MS) or not onnx.defs.get_schema(op, case.opset).deprecated:
        onnx.checker.check_model(grad_model, full_check=not op.startswith(MS))
    run_grad = cpu_session(grad_model.SerializeToString())
    (analytic,) = run_grad.run(None, {**feeds, **{f"seed_{k}": v for k, v in grad_seeds.items()}})

    if case.surrogate is not None:
        step, tol = SURROGATE_TOL
        every = {n: np.asarray(_typed(case, v), np.float64) for n, v, _ in case.inputs if v is not None}
        _check_surrogate(case, case.surrogate(every, outs), outs)

        def loss(values: dict[str, np.ndarray]) -> float:
            ys = case.surrogate({**every, **values}, outs)
            return float(sum(np.sum(np.asarray(y, np.float64) * seeds[f"y{i}"]) for i, y in enumerate(ys)))

        feeds = {n: every[n] for n in feeds}
    else:
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
    record_property("relative_error", f"{err:.1e}")
    assert err < tol, f"{op}/{case.id} d/d{wrt}: relative error {err:.2e} >= {tol:.0e}"


def _check_surrogate(case: Case, ys: list[np.ndarray], outs: list[np.ndarray]) -> None:
    """The surrogate computes onnxruntime's op: its values round (half to even) to onnxruntime's
    integer outputs (within 1 where onnxruntime rounds in integer arithmetic), equal float ones."""
    for y, o in zip(ys, outs, strict=True):
        assert y.shape == o.shape
        if o.dtype.kind == "f":
            np.testing.assert_allclose(y, o, rtol=1e-6, atol=1e-7)
            continue
        info = np.iinfo(o.dtype)
        off = np.abs(np.clip(np.round(y), info.min, info.max) - o.astype(np.float64))
        assert off.max() <= (0 if case.exact else 1), f"surrogate off by {off.max()} from onnxruntime"


# -- products through int8 weights -----------------------------------------------------------
# A dense backward product through a dequantized int8 weight is computed from the integer weight
# (RuleContext._int8_product: dY in three 7-bit digits per row). Rows of very different
# magnitude share one batch, so a per-tensor digit scale would lose the small ones.

_KIN, _KOUT = 30, 40
_SEED_ROWS = np.array([1e-6, 1.0, 1e4, 0.0])


def _weight_case(shape: tuple[int, int], dtype, axis: int | None, zero_points: bool):  # type: ignore[no-untyped-def]
    rs = np.random.RandomState(sum(shape) + (axis or 0) * 7 + zero_points)
    lo, hi = (0, 255) if dtype == np.uint8 else (-128, 127)
    q = rs.randint(lo, hi + 1, size=shape).astype(dtype)
    count = 1 if axis is None else shape[axis]
    s = rs.uniform(0.001, 0.01, count).astype(np.float32)
    z = rs.randint(lo, hi + 1, count).astype(dtype) if zero_points else np.zeros(count, dtype)
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    return q, s, z


WEIGHT_PRODUCTS = [
    # (id, op, transB, weight shape, weight dtype, quantization axis, zero points, alpha, int8 path)
    ("gemm_per_output_channel", "Gemm", 1, (_KOUT, _KIN), np.int8, 0, False, 1.0, True),
    ("gemm_per_input_channel_zero_points_alpha", "Gemm", 1, (_KOUT, _KIN), np.int8, 1, True, 0.5, True),
    ("gemm_not_transposed", "Gemm", 0, (_KIN, _KOUT), np.int8, 1, False, 1.0, True),
    ("matmul_per_tensor_uint8", "MatMul", 0, (_KIN, _KOUT), np.uint8, None, True, 1.0, True),
    ("matmul_per_column", "MatMul", 0, (_KIN, _KOUT), np.int8, 1, False, 1.0, True),
    # zero points along the product's inner axis: the float weight (still exact)
    ("gemm_zero_points_along_k", "Gemm", 1, (_KOUT, _KIN), np.uint8, 0, True, 1.0, False),
]


@pytest.mark.parametrize(
    ("op", "trans_b", "shape", "dtype", "axis", "zero_points", "alpha", "integer"),
    [case[1:] for case in WEIGHT_PRODUCTS],
    ids=[case[0] for case in WEIGHT_PRODUCTS],
)
def test_product_through_int8_weight_is_exact_per_row(  # type: ignore[no-untyped-def]
    op: str, trans_b: int, shape, dtype, axis, zero_points: bool, alpha: float, integer: bool
) -> None:
    q, s, z = _weight_case(shape, dtype, axis, zero_points)
    dq_attrs = {} if axis is None else {"axis": axis}
    attrs = {"transB": trans_b, "alpha": alpha} if op == "Gemm" else {}
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], **dq_attrs),
        helper.make_node(op, ["x", "w"], ["y"], **attrs),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (("wq", q), ("ws", s), ("wz", z))]
    x_info = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", _KIN])
    graph = helper.make_graph(nodes, "case", [x_info], [onnx.ValueInfoProto(name="y")], inits)
    fwd = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fwd.ir_version = 8
    fwd = _typed_outputs(fwd)

    rs = np.random.RandomState(3)
    seed = (rs.uniform(-1, 1, (len(_SEED_ROWS), _KOUT)) * _SEED_ROWS[:, None]).astype(np.float32)
    grad_model = _gradient_model(fwd, "x", {"y": seed}, 17)
    run = cpu_session(grad_model.SerializeToString())
    (got,) = run.run(None, {"x": np.zeros((len(_SEED_ROWS), _KIN), np.float32), "seed_y": seed})

    ax = 0 if axis is None else axis
    w = (q.astype(np.float64) - np.expand_dims(z.astype(np.float64), 1 - ax if z.ndim else ())) * (
        np.expand_dims(s.astype(np.float64), 1 - ax) if s.ndim else s
    )
    m = w if (op == "Gemm" and trans_b) else w.T  # y = x @ M^T-form: dX = dY @ m
    expected = alpha * seed.astype(np.float64) @ m
    for row in range(len(_SEED_ROWS)):
        if _SEED_ROWS[row] == 0:
            assert not np.any(got[row]), "a zero seed row must give a zero gradient"
        else:
            assert rel_err(got[row], expected[row]) < 1e-5, f"row of magnitude {_SEED_ROWS[row]:g}"
    float_copies = [
        i for i in grad_model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) == q.size
    ]
    assert (not float_copies) == integer, "the int8 path reads the integer weight, not a float copy"
