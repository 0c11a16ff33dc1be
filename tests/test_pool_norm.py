"""MaxPool's gradient on tied maxima against torch (a tie counts once, at the first maximum), for
each way the engine builds it and in a float16 graph; LRN with an even size (which onnxruntime
refuses) in float64.

Finite differences cannot see ties (the max is not differentiable there), so tests/rule_cases.py
uses distinct values; here integer-valued inputs tie in almost every window.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnx_gradcam import UnsupportedOpError
from onnx_gradcam.autodiff import registry
from onnx_gradcam.autodiff.backprop import backprop
from onnx_gradcam.autodiff.builder import GraphBuilder
from onnx_gradcam.autodiff.context import RuleContext, TensorInfo
from onnx_gradcam.autodiff.rules import pooling

from .conftest import cpu_session, rel_err
from .rule_cases import Case, rnd, x_
from .test_rules import _forward_model, _gradient_model, _inferred

torch = pytest.importorskip("torch")

POOLS = {
    # id: (input shape, torch pooling kwargs)
    "sppf_k5s1p2": ((2, 3, 9, 9), {"kernel_size": 5, "stride": 1, "padding": 2}),
    "k3s2": ((2, 3, 9, 9), {"kernel_size": 3, "stride": 2}),
    "k3s2p1_dilated": ((1, 3, 11, 11), {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2}),
    "k3s2p1_ceil": ((1, 3, 8, 8), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    "pool1d_k3s1p1": ((2, 3, 11), {"kernel_size": 3, "stride": 1, "padding": 1}),
    "pool3d_k3s2p1": ((1, 2, 7, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1}),
}


def _one_hot(ctx, node, dys, wrt):  # type: ignore[no-untyped-def]
    return [pooling.max_pool_one_hot(ctx, node, dys[0])]


def _all_axes(ctx, node, dys, wrt):  # type: ignore[no-untyped-def]
    return [pooling.max_pool_masks(ctx, node, dys[0], separable=False)]


# (opset, the MaxPool rule): the registered rule below 16 (masks, one axis at a time), at 16
# (scatter-add), and what tools/bench_maxpool.py compares them with: the masks over all axes at
# once (the rule's fallback) and the one-hot product
VARIANTS = {
    "masks_opset13": (13, None),
    "scatter_opset16": (16, None),
    "masks_all_axes_opset13": (13, _all_axes),
    "one_hot_opset13": (13, _one_hot),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])  # the masks' placement: Pads, a ConvTranspose
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pool", list(POOLS))
def test_maxpool_ties_count_once_like_torch(
    pool: str, variant: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, kw = POOLS[pool]
    opset, rule = VARIANTS[variant]
    if rule is not None:
        monkeypatch.setitem(registry.RULES, "MaxPool", rule)
    n = len(shape) - 2
    x = np.random.RandomState(0).randint(0, 3, shape).astype(dtype)  # values 0, 1, 2: ties everywhere
    attrs = {
        "kernel_shape": [kw["kernel_size"]] * n,
        "strides": [kw["stride"]] * n,
        "pads": [kw.get("padding", 0)] * (2 * n),
        "dilations": [kw.get("dilation", 1)] * n,
        "ceil_mode": int(kw.get("ceil_mode", False)),
    }
    fwd = _forward_model("MaxPool", Case(pool, [x_(x)], attrs, opset=opset, dtype=x.dtype))
    (y,) = cpu_session(fwd.SerializeToString()).run(None, {"x": x})
    seed = np.random.RandomState(1).uniform(0.5, 1.5, y.shape).astype(dtype)
    grad = _gradient_model(fwd, "x", {"y0": seed}, opset)
    (got,) = cpu_session(grad.SerializeToString()).run(None, {"x": x, "seed_y0": seed})

    xt = torch.from_numpy(x).requires_grad_(True)
    yt = getattr(torch.nn.functional, f"max_pool{n}d")(xt, **kw)
    np.testing.assert_array_equal(yt.detach().numpy(), y)
    (yt * torch.from_numpy(seed)).sum().backward()
    expected = xt.grad.numpy()
    tol = 1e-12 if dtype == "float64" else 1e-6  # float32: sums of up to k^n seeds in another order
    assert rel_err(got, expected) < tol, f"{pool}/{variant}: {rel_err(got, expected):.2e}"
    # each window's seed lands once: the gradient's total is the seed's
    assert math.isclose(got.sum(dtype=np.float64), seed.sum(dtype=np.float64), rel_tol=tol)


def _lrn_numpy(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """The ONNX spec's LRN: channels max(0, c - floor((size-1)/2)) .. min(C-1, c + ceil((size-1)/2))."""
    lo, hi = (size - 1) // 2, size // 2
    squares = np.stack([np.sum(x[:, max(0, c - lo) : c + hi + 1] ** 2, axis=1) for c in range(x.shape[1])], axis=1)
    return x / (bias + alpha / size * squares) ** beta


@pytest.mark.parametrize("size", [2, 4])
def test_lrn_even_size_matches_finite_differences_in_float64(size: int) -> None:
    # onnx 1.23's reference LRN loops its channel window over x.shape[0]: with N == C it is right
    x = rnd(6, 6, 2, 3, lo=-2, hi=2)
    attrs = {"size": size, "alpha": 0.75, "beta": 0.625, "bias": 1.5}  # exact in float32 attributes
    case = Case(f"size{size}", [x_(x)], attrs, opset=13)
    fwd = _forward_model("LRN", case)
    lrn = (attrs["size"], attrs["alpha"], attrs["beta"], attrs["bias"])
    (y,) = ReferenceEvaluator(fwd).run(None, {"x": x})
    np.testing.assert_allclose(y, _lrn_numpy(x, *lrn), rtol=1e-12)  # the reference is the spec here
    seed = np.random.RandomState(1).uniform(-1, 1, y.shape)
    grad = _gradient_model(fwd, "x", {"y0": seed}, 13)
    (got,) = ReferenceEvaluator(grad).run(None, {"x": x, "seed_y0": seed})
    step, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += step
        minus[idx] -= step
        numeric[idx] = np.sum((_lrn_numpy(plus, *lrn) - _lrn_numpy(minus, *lrn)) * seed) / (2 * step)
    err = rel_err(got, numeric)
    assert err < 1e-8, f"LRN size {size}: relative error {err:.2e}"


def test_maxpool_masks_on_a_dynamic_map_say_how_to_get_around() -> None:
    x = np.zeros((1, 2, 7, 7))
    case = Case("dynamic", [x_(x)], {"kernel_shape": [3, 3], "strides": [2, 2]}, opset=13, symbolic=(2, 3))
    fwd = _forward_model("MaxPool", case)
    with pytest.raises(
        UnsupportedOpError, match=r"dynamic size .* below opset 16: to fix this, prepare with --opset 16"
    ):
        _gradient_model(fwd, "x", {"y0": np.zeros((1, 2, 3, 3))}, 13)
    # at opset 16 the scatter-add needs no static size
    _gradient_model(
        _forward_model("MaxPool", Case("dynamic16", [x_(x)], case.attrs, opset=16, symbolic=(2, 3))),
        "x",
        {"y0": np.zeros((1, 2, 3, 3))},
        16,
    )


@pytest.mark.parametrize("pool", ["k3s2", "sppf_k5s1p2"])
def test_maxpool_masks_in_a_float16_graph_count_ties_like_torch(pool: str) -> None:
    """A float16 graph's gradient is computed in float32 behind Casts (as prepare does it): the
    masks compare float32 casts of float16 values, exact, so ties still count once."""
    shape, kw = POOLS[pool]
    x = np.random.RandomState(0).randint(0, 3, shape).astype(np.float16)
    attrs = {"kernel_shape": [kw["kernel_size"]] * 2, "strides": [kw["stride"]] * 2, "pads": [kw.get("padding", 0)] * 4}
    fwd = _forward_model("MaxPool", Case(pool, [x_(x)], attrs, opset=13, dtype=np.float16))
    (y,) = cpu_session(fwd.SerializeToString()).run(None, {"x": x})
    seed = np.random.RandomState(1).uniform(0.5, 1.5, y.shape).astype(np.float32)
    info = TensorInfo(_inferred(fwd).graph, constants_from=fwd.graph)
    b = GraphBuilder(13, {"x", "y0", "seed"})
    b.cast_on_read(info.compute_in_float32(), TensorProto.FLOAT)
    dx = backprop(RuleContext(b, info), list(fwd.graph.node), "x", {"y0": "seed"})
    model = onnx.ModelProto()
    model.CopyFrom(fwd)
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, list(y.shape)))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(dx, TensorProto.FLOAT, None))
    (got,) = cpu_session(model.SerializeToString()).run(None, {"x": x, "seed": seed})
    xt = torch.from_numpy(x.astype(np.float32)).requires_grad_(True)
    (torch.nn.functional.max_pool2d(xt, **kw) * torch.from_numpy(seed)).sum().backward()
    assert got.dtype == np.float32
    assert rel_err(got, xt.grad.numpy()) < 1e-6
