"""Issue 12's element-wise extrema, activations, reductions, copies, GatherElements and Einsum
beyond their one-node finite-difference cases: ties of three or more, where central differences
cannot tell the share (they give 1/2 to each), against torch's amax/amin; and a network whose
backbone has an Einsum and whose head uses all of them, prepared and compared with torch autograd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gradcam import prepare

from .conditioning import per_sample_error, well_conditioned, with_nudged
from .conftest import cpu_session, rel_err
from .rule_cases import Case, i64, x_
from .test_rules import _forward_model, _gradient_model
from .torch_ref import autograd_at

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

EXACT = 1e-4  # relative to each sample's largest magnitude


def _engine_gradient(op: str, case: Case, seed: np.ndarray) -> np.ndarray:
    """The engine's dX for one node and dY = seed, run in onnxruntime."""
    fwd = _forward_model(op, case)
    grad = _gradient_model(fwd, "x", {"y0": seed}, case.opset)
    feeds = {n: v for n, v, const in case.inputs if not const}
    return cpu_session(grad.SerializeToString()).run(None, {**feeds, "seed_y0": seed})[0]


def _three_way_ties() -> np.ndarray:
    x = np.random.RandomState(5).uniform(-1, 1, (3, 6))
    x[0, [1, 3, 4]] = 2.0  # the maximum, three times
    x[1, [0, 5]] = -2.0  # the minimum, twice
    x[2, :] = 0.5  # all six tie
    return x


@pytest.mark.parametrize(
    ("op", "attrs", "extra", "opset", "reference"),
    [
        ("ReduceMax", {"axes": [1], "keepdims": 0}, [], 13, lambda t: t.amax(dim=1)),
        ("ReduceMax", {"keepdims": 1}, [("axes", i64(-1), True)], 18, lambda t: t.amax(dim=-1, keepdim=True)),
        ("ReduceMin", {"axes": [1], "keepdims": 0}, [], 11, lambda t: t.amin(dim=1)),
        ("ReduceMin", {"keepdims": 0}, [], 18, lambda t: t.amin()),
    ],
    ids=["ReduceMax13", "ReduceMax18", "ReduceMin11", "ReduceMin18_all"],
)
def test_reduce_extremum_ties_share_dy_as_torch_amax(op, attrs, extra, opset, reference) -> None:  # type: ignore[no-untyped-def]
    x = _three_way_ties()
    t = torch.from_numpy(x).requires_grad_(True)
    y = reference(t)
    seed = np.random.RandomState(2).uniform(0.5, 1.5, tuple(y.shape))
    (y * torch.from_numpy(seed)).sum().backward()
    got = _engine_gradient(op, Case("ties", [x_(x), *extra], attrs=attrs, opset=opset), seed)
    assert rel_err(got, t.grad.numpy()) < 1e-12


@pytest.mark.parametrize(("op", "opset"), [("Max", 11), ("Min", 13), ("Max", 21)])
def test_variadic_extremum_ties_share_dy_as_torch_amax(op: str, opset: int) -> None:
    """Three operands equal at some positions (two at others): Max(X, B, C) = amax(stack, 0)."""
    rs = np.random.RandomState(3)
    x, b, c = (rs.uniform(-1, 1, (2, 4)) for _ in range(3))
    b[0], c[0] = x[0], x[0]  # three-way ties in row 0
    c[1, :2] = b[1, :2]  # two-way ties (x is elsewhere, on one side or the other)
    case = Case("ties", [x_(x), x_(b, "b"), x_(c, "c")], opset=opset)
    ts = [torch.from_numpy(v).requires_grad_(True) for v in (x, b, c)]
    stacked = torch.stack(ts)
    y = stacked.amax(0) if op == "Max" else stacked.amin(0)
    seed = rs.uniform(0.5, 1.5, (2, 4))
    (y * torch.from_numpy(seed)).sum().backward()
    fwd = _forward_model(op, case)
    for name, t in zip(("x", "b", "c"), ts):
        grad = _gradient_model(fwd, name, {"y0": seed}, opset)
        got = cpu_session(grad.SerializeToString()).run(None, {"x": x, "b": b, "c": c, "seed_y0": seed})[0]
        assert rel_err(got, t.grad.numpy()) < 1e-12, name


class _Probe(nn.Module):
    """The identity, as a module whose output torch hooks can read (and replace)."""

    def forward(self, y):  # type: ignore[no-untyped-def]
        return y


class DeployedOps(nn.Module):
    """Conv -> ELU -> a 1x1 convolution written as an Einsum -> ReLU (the feature map), then a
    head of ReduceMax, Expand, Max, Min, Where, Softplus, Selu, Celu, Softsign, Abs, Tile,
    ReduceLogSumExp, ReduceL2, GatherElements (indices Expanded over the batch), ReduceMin and
    an Einsum classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(6, 8) * 0.4)
        self.mix_bias = nn.Parameter(torch.randn(1, 6, 1, 1) * 0.1)
        self.features = _Probe()
        self.before_tile = _Probe()
        self.register_buffer("picks", torch.from_numpy(np.random.RandomState(0).randint(0, 64, (1, 12, 5))))
        self.classifier = nn.Parameter(torch.randn(5, 36) * 0.3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = F.elu(self.conv(x))
        f = self.features(torch.relu(torch.einsum("nchw,oc->nohw", h, self.mix) + self.mix_bias))
        n, c, hh, ww = f.shape
        gate = torch.sigmoid(f.amax(dim=(2, 3), keepdim=True)).expand(n, c, hh, ww)
        u = torch.maximum(f * gate, 0.3 - f)
        v = torch.minimum(u, F.softplus(f) - 0.2)
        w = torch.where(f > 0.1, v, F.selu(f) * 0.5)
        w = F.celu(w, 0.5) + F.softsign(w) + 0.1 * w.abs()
        tiled = self.before_tile(w).repeat(1, 2, 1, 1).flatten(2)  # [N, 12, 64]: Expand, then Tile
        lse = torch.logsumexp(tiled, dim=2)
        l2 = torch.linalg.vector_norm(tiled, dim=2)
        picked = torch.gather(tiled, 2, self.picks.expand(n, -1, -1)).amin(dim=2)
        return torch.einsum("nk,ck->nc", torch.cat([lse, l2, picked], 1), self.classifier)


def _export(net: nn.Module, path: Path, opset: int) -> Path:
    torch.onnx.export(
        net.eval(),
        torch.randn(1, 3, 8, 8),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


@pytest.mark.parametrize("opset", [12, 18])
def test_network_of_the_new_ops_matches_torch_autograd(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    net = DeployedOps()
    src = _export(net, tmp_path / "ops.onnx", opset)
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    expected = {"Einsum", "ReduceMax", "Expand", "Max", "Min", "Where", "Tile", "GatherElements", "ReduceMin"}
    assert expected <= ops, sorted(expected - ops)
    relu = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Relu")
    x = with_nudged(np.random.default_rng(0).random((2, 3, 8, 8)))
    classes = np.array([1, 3, 1, 3], np.int64)
    score = lambda o: o[torch.arange(len(classes)), torch.from_numpy(classes)].sum()  # noqa: E731
    # at the ReLU after the Einsum (its layout read through the Einsum), and at the default: the
    # last tensor of known layout on every path, the Expand (of ones) that torch's repeat puts before Tile
    for layer, probe in ((relu, "features"), (None, "before_tile")):
        out = tmp_path / "ops.gradcam.onnx"
        report = prepare(src, out, feature_layer=layer, expose_gradient=True)
        assert report.feature_layout == "NCHW"
        sess = cpu_session(out.read_bytes())
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))
        head = autograd_at(net, probe, score, features=got["gradcam_features"])
        ref = well_conditioned(head, x, EXACT, f"deployed_ops_opset{opset}_{probe}")
        assert per_sample_error(got["gradcam_gradient"], ref["g"]) < EXACT


def test_layout_roles_through_copies_gathers_and_einsum() -> None:
    """Axis roles (surgery/layout.py) from an NCHW image through the ops of issue 12: an axis keeps
    its role where its positions stay (Expand of an existing axis, Tile by 1, GatherElements off
    its axis, an Einsum letter from the activation); the others become unknown. A reduction with
    noop_with_empty_axes and no axes is the identity."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    from onnx_gradcam.autodiff.context import TensorInfo
    from onnx_gradcam.surgery.layout import propagate

    consts = {
        "w": np.zeros((4, 3, 3, 3), np.float32),
        "mix": np.zeros((6, 4), np.float32),
        "ones": i64(1, 1, 1, 1),
        "twice": i64(1, 2, 1, 1),
        "full": i64(2, 4, 8, 8),
        "idx": np.zeros((2, 4, 8, 3), np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["f"], pads=[1, 1, 1, 1]),
        helper.make_node("Tile", ["f", "ones"], ["tiled_once"]),
        helper.make_node("Tile", ["f", "twice"], ["tiled_channels"]),
        helper.make_node("GatherElements", ["f", "idx"], ["gathered"], axis=3),
        helper.make_node("ReduceMax", ["f"], ["pooled"], axes=[2, 3]),
        helper.make_node("ReduceSum", ["f"], ["not_reduced"], noop_with_empty_axes=1),  # the identity
        helper.make_node("Expand", ["pooled", "full"], ["spread"]),
        helper.make_node("Expand", ["f", "ones"], ["same"]),
        helper.make_node("Einsum", ["f", "mix"], ["mixed"], equation="nchw,oc->nohw"),
        helper.make_node("Einsum", ["f"], ["last"], equation="nchw->nhwc"),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3, 8, 8])
    outs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes[1:]]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [image], outs, inits), opset_imports=[helper.make_opsetid("", 13)]
    )
    graph = shape_inference.infer_shapes(model, strict_mode=True).graph
    roles = propagate(list(graph.node), TensorInfo(graph), "image", "nchw")
    assert roles["f"] == ("N", "C", "S0", "S1")
    assert roles["tiled_once"] == roles["same"] == roles["not_reduced"] == roles["f"]
    assert roles["tiled_channels"] == ("N", "?", "S0", "S1")
    assert roles["gathered"] == ("N", "C", "S0", "?")
    assert roles["spread"] == ("N", "C", "?", "?")
    assert roles["mixed"] == ("N", "C", "S0", "S1")
    assert roles["last"] == ("N", "S0", "S1", "C")
