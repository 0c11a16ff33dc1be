"""Whole models through the ops of issue 12 (rules-b): per-sample normalisations, depth <-> space,
F.unfold/F.fold, Upsample below opset 11, TopK, and the errors on ops that pass no gradient.

Each gradient is compared with torch autograd in float64 on a twin that writes the op out from its
ONNX definition (not from the rule); the prepared model runs in float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gradcam import LayerNotFoundError, OnnxGradCamError, UnsupportedOpError, prepare
from onnx_gradcam.surgery.load import upgrade_opset

from .conftest import cpu_session, rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional

EXACT = 1e-5  # float32 prepared model against float64 autograd (measured: 1e-7 .. 1e-6)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = cpu_session(path.read_bytes())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def save(nodes: list, inits: dict[str, np.ndarray], outputs: list, opset: int, path: Path, ir: int = 8) -> Path:  # type: ignore[type-arg]
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info(name, dtype, None) for name, dtype in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.save(model, str(path))
    return path


def weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {
        k: rs.normal(0, 1 / np.sqrt(np.prod(s[1:]) if len(s) > 1 else 1), s).astype(np.float32)
        for k, s in shapes.items()
    }


def t64(v: np.ndarray):  # type: ignore[no-untyped-def]
    return torch.from_numpy(np.asarray(v, np.float64))


# -- torch twins of the ONNX definitions ------------------------------------------------------


def space_to_depth(x, b: int):  # type: ignore[no-untyped-def]
    """ONNX SpaceToDepth: [N, C, H/b, b, W/b, b] -> [0, 3, 5, 1, 2, 4] -> [N, C b b, H/b, W/b]."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def mean_variance(x, axes: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """ONNX MeanVarianceNormalization's function body: (X - E X) / (sqrt(E X^2 - (E X)^2) + 1e-9)."""
    mean = x.mean(axes, keepdim=True)
    return (x - mean) / ((x * x).mean(axes, keepdim=True) - mean * mean).sqrt().add(1e-9)


def upsample(x, scales: tuple[int, int], mode: str):  # type: ignore[no-untyped-def]
    """ONNX Upsample (opset 7-9): x_in = x_out / scale; nearest takes the floor, linear
    interpolates between floor and floor + 1 (clamped to the edge)."""
    for axis, scale in zip((2, 3), scales, strict=True):
        n_in = x.shape[axis]
        pos = torch.arange(n_in * scale, dtype=torch.float64) / scale
        lo = pos.floor().long().clamp(max=n_in - 1)
        if mode == "nearest":
            x = x.index_select(axis, lo)
            continue
        hi = (lo + 1).clamp(max=n_in - 1)
        w = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.dim())])
        x = x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    return x


def class_gradient(feature, logits, classes: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    logits[torch.arange(len(classes)), torch.from_numpy(classes)].sum().backward()
    return feature.grad.numpy()


# -- normalisations and depth <-> space, written in ONNX by hand ------------------------------


@pytest.mark.parametrize("opset", [18, 21])
def test_group_and_mean_variance_norm_model_equals_autograd(opset: int, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """Conv, Sigmoid (the feature), GroupNormalization (per group at 18, per channel at 21),
    MeanVarianceNormalization without axes (default [0, 2, 3]), SpaceToDepth, Conv, pooling."""
    groups, channels = 2, 4
    w = weights(0, w1=(channels, 3, 3, 3), w2=(6, 16, 1, 1), fc=(5, 6))
    per = channels if opset >= 21 else groups
    rs = np.random.RandomState(1)
    w["gs"], w["gb"] = rs.uniform(0.5, 1.5, per).astype(np.float32), rs.normal(0, 0.5, per).astype(np.float32)
    w["fb"] = np.zeros(5, np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["feat"]),  # no dead channel: MVN of a constant channel is NaN
        helper.make_node("GroupNormalization", ["feat", "gs", "gb"], ["gn"], num_groups=groups, epsilon=1e-3),
        helper.make_node("MeanVarianceNormalization", ["gn"], ["mvn"]),
        helper.make_node("SpaceToDepth", ["mvn"], ["s2d"], blocksize=2),
        helper.make_node("Conv", ["s2d", "w2"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fb"], ["logits"], transB=1),
    ]
    src = save(nodes, w, [("logits", TensorProto.FLOAT)], opset, tmp_path / "m.onnx")
    out = tmp_path / "m.gradcam.onnx"
    prepare(src, out, feature_layer="feat", expose_gradient=True)
    x = np.random.RandomState(2).rand(3, 3, 8, 8).astype(np.float32)
    classes = np.array([1, 4, 0])
    got = run(out, {"input": x, "gradcam_class": classes})

    feat = torch.sigmoid(F.conv2d(t64(x), t64(w["w1"]), padding=1)).detach().requires_grad_()
    scale = t64(w["gs"]) if opset >= 21 else t64(w["gs"]).repeat_interleave(channels // groups)
    bias = t64(w["gb"]) if opset >= 21 else t64(w["gb"]).repeat_interleave(channels // groups)
    gn = F.group_norm(feat, groups, scale, bias, eps=1e-3)
    r2 = F.relu(F.conv2d(space_to_depth(mean_variance(gn, (0, 2, 3)), 2), t64(w["w2"])))
    logits = r2.mean((2, 3)) @ t64(w["fc"]).T
    assert rel_err(got["logits"], logits.detach().numpy()) < 1e-5, "the twin computes another model"
    err = rel_err(got["gradcam_gradient"], class_gradient(feat, logits, classes))
    record_property("relative_error", f"{err:.2e}")
    assert err < EXACT, f"relative error {err:.2e}"


# -- torch exports: InstanceNorm, GroupNorm (as InstanceNormalization), PixelShuffle, unfold/fold


class Folded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True)
        self.c2 = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(4, 8)
        self.fc = torch.nn.Linear(32, 5)

    def head(self, a):  # type: ignore[no-untyped-def]
        a = F.pixel_shuffle(a, 2)  # DepthToSpace, mode CRD
        a = F.relu(self.gn(self.c2(a)))
        a = F.pixel_unshuffle(a, 2)
        cols = F.unfold(a, kernel_size=2, stride=2)  # Pad + Gather (run-time indices in TorchScript)
        a = F.fold(cols, (8, 8), kernel_size=2, stride=2)  # Col2Im
        return self.fc(a.mean((2, 3)))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(F.relu(self.inorm(self.c1(x))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_norms_pixel_shuffle_unfold_fold_equal_autograd(dynamo: bool, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Folded().eval()
    with torch.no_grad():  # affine parameters away from their identity defaults
        for norm in (model.inorm, model.gn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    src = tmp_path / "folded.onnx"
    torch.onnx.export(
        model, (torch.rand(2, 3, 8, 8),), str(src), dynamo=dynamo, opset_version=18,
        input_names=["input"], output_names=["logits"],
    )  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    assert {"InstanceNormalization", "DepthToSpace", "Col2Im"} <= ops, sorted(ops)
    feature = next(n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Relu")
    out = tmp_path / "folded.gradcam.onnx"
    prepare(src, out, feature_layer=feature, expose_gradient=True)
    x = np.random.RandomState(0).rand(2, 3, 8, 8).astype(np.float32)
    classes = np.array([1, 3])
    got = run(out, {"input": x, "gradcam_class": classes})

    double = model.double()
    with torch.no_grad():
        a = F.relu(double.inorm(double.c1(t64(x))))
    a.requires_grad_()
    err = rel_err(got["gradcam_gradient"], class_gradient(a, double.head(a), classes))
    record_property("relative_error", f"{err:.2e}")
    assert err < EXACT, f"relative error {err:.2e}"


# -- Upsample below opset 11 --------------------------------------------------------------------


@pytest.mark.parametrize(("opset", "mode"), [(9, "nearest"), (9, "linear"), (7, "linear")])
def test_upsample_model_below_opset_11_equals_autograd(opset: int, mode: str, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """The model is upgraded to opset 13 on load: its Upsample becomes a Resize that must keep
    Upsample's asymmetric coordinates (onnx's converter alone moves a 2x linear Upsample's
    outputs by a quarter of the input's range, and the prepared model would fail its check)."""
    w = weights(3, w1=(4, 3, 3, 3), w2=(6, 4, 3, 3), fc=(5, 6))
    w["fb"] = np.zeros(5, np.float32)
    scales = (2, 3)
    if opset >= 9:
        w["scales"] = np.array([1, 1, *scales], np.float32)
        up = helper.make_node("Upsample", ["feat", "scales"], ["up"], mode=mode)
    else:
        up = helper.make_node("Upsample", ["feat"], ["up"], mode=mode, scales=[1.0, 1.0, *map(float, scales)])
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["feat"]),
        up,
        helper.make_node("Conv", ["up", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fb"], ["logits"], transB=1),
    ]
    src = save(nodes, w, [("logits", TensorProto.FLOAT)], opset, tmp_path / "up.onnx", ir=4)
    out = tmp_path / "up.gradcam.onnx"
    prepare(src, out, feature_layer="feat", expose_gradient=True)
    x = np.random.RandomState(4).rand(2, 3, 8, 8).astype(np.float32)
    classes = np.array([2, 0])
    got = run(out, {"input": x, "gradcam_class": classes})

    feat = F.relu(F.conv2d(t64(x), t64(w["w1"]), padding=1)).detach().requires_grad_()
    r2 = F.relu(F.conv2d(upsample(feat, scales, mode), t64(w["w2"]), padding=1))
    logits = r2.mean((2, 3)) @ t64(w["fc"]).T
    source = run(src, {"input": x})["logits"]  # the opset-7/9 model as onnxruntime runs it
    assert rel_err(source, logits.detach().numpy()) < 1e-5, "the twin computes another Upsample"
    assert rel_err(got["logits"], source) < 1e-6
    err = rel_err(got["gradcam_gradient"], class_gradient(feat, logits, classes))
    record_property("relative_error", f"{err:.2e}")
    assert err < EXACT, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("op", "opset", "mode", "scales"),
    [
        ("Upsample", 9, "nearest", [1, 1, 1.25, 1.75]),  # half_pixel rounding would pick other pixels
        ("Upsample", 9, "linear", [1, 1, 2, 3]),
        ("Resize", 10, "nearest", [1, 1, 0.6, 0.7]),  # downsampling: the ceiling
        ("Resize", 10, "nearest", None),  # scales at run time (an input here): taken to upsample
        ("Resize", 10, "linear", [1, 1, 0.6, 1.7]),
    ],
)
def test_upgrade_keeps_what_opset_10_resizing_computes(op: str, opset: int, mode: str, scales: list | None) -> None:  # type: ignore[type-arg]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 8])]
    inits = []
    if scales is None:
        inputs.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]))
    else:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
    node = helper.make_node(op, ["x", "scales"], ["resized"], mode=mode)
    after = helper.make_node("Neg", ["resized"], ["y"])  # an inner tensor keeps its name
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node, after], "r", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 5
    upgraded = upgrade_opset(model)
    assert [n.output[0] for n in upgraded.graph.node if n.op_type == "Resize"] == ["resized"]
    upgraded.ir_version = 7
    feeds = {"x": np.random.RandomState(0).rand(1, 2, 7, 8).astype(np.float32)}
    if scales is None:
        feeds["scales"] = np.array([1, 1, 1.25, 1.75], np.float32)
    want = cpu_session(model.SerializeToString()).run(None, feeds)[0]
    got = cpu_session(upgraded.SerializeToString()).run(None, feeds)[0]
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"moved by up to {np.abs(got - want).max():.3g}"


def test_opset_10_nearest_resize_up_one_axis_down_another_is_refused() -> None:
    scales = numpy_helper.from_array(np.array([1, 1, 0.5, 2], np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "scales"], ["y"], mode="nearest", name="mixed")],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    with pytest.raises(OnnxGradCamError, match="'mixed'.*re-export the model at opset 11 or newer"):
        upgrade_opset(model)


# -- detector-style heads: TopK, ArgMax, NMS, Round, Floor -------------------------------------


def detector(tail: list, outputs: list, path: Path) -> Path:  # type: ignore[type-arg]
    """Conv, ReLU ('feat'), a 1x1 Conv to 6 numbers per cell of an 8x8 grid, 'raw' [N, 64, 6]
    ([x0, y0, x1, y1, objectness, class]), 'objectness' [N, 64]; then `tail`."""
    w = weights(5, w1=(8, 3, 3, 3), w2=(6, 8, 1, 1))
    w.update(shape=np.array([0, 6, -1], np.int64), four=np.array(4, np.int64), k=np.array([5], np.int64))
    w.update(starts=np.array([0], np.int64), ends=np.array([4], np.int64), axis2=np.array([2], np.int64))
    w.update(one=np.array([1], np.int64), most=np.array([10], np.int64), iou=np.array([0.5], np.float32))
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["feat"], name="relu1"),
        helper.make_node("Conv", ["feat", "w2"], ["head"], name="conv2"),
        helper.make_node("Reshape", ["head", "shape"], ["flat"], name="reshape"),
        helper.make_node("Transpose", ["flat"], ["raw"], perm=[0, 2, 1], name="transpose"),
        helper.make_node("Gather", ["raw", "four"], ["objectness"], axis=2, name="objectness"),
    ]
    return save(nodes + tail, w, [("raw", TensorProto.FLOAT), *outputs], 17, path)


TOPK = helper.make_node("TopK", ["objectness", "k"], ["top_scores", "top_cells"], axis=1, name="topk")
HEADS = {
    "topk_indices": (
        [TOPK],
        [("top_cells", TensorProto.INT64)],
        "the reduction tensor 'top_cells' lies after op 'TopK' (node 'topk', output 'top_cells'), which passes no "
        "gradient: to fix this, choose a reduction tensor before it with --reduction-layer, e.g. 'top_scores', "
        "'objectness'",
    ),
    "argmax": (
        [helper.make_node("ArgMax", ["objectness"], ["best"], axis=1, keepdims=0, name="argmax")],
        [("best", TensorProto.INT64)],
        "the reduction tensor 'best' lies after op 'ArgMax' (node 'argmax'), which passes no gradient: to fix "
        "this, choose a reduction tensor before it with --reduction-layer, e.g. 'objectness'",
    ),
    "nms": (
        [
            helper.make_node("Slice", ["raw", "starts", "ends", "axis2"], ["boxes"], name="boxes"),
            helper.make_node("Unsqueeze", ["objectness", "one"], ["scores"], name="scores"),
            helper.make_node("NonMaxSuppression", ["boxes", "scores", "most", "iou"], ["kept"], name="nms"),
        ],
        [("kept", TensorProto.INT64)],
        "the reduction tensor 'kept' lies after op 'NonMaxSuppression' (node 'nms'), which passes no gradient: to "
        "fix this, choose a reduction tensor before it with --reduction-layer, e.g. 'boxes', 'scores'",
    ),
    "hardmax": (
        [helper.make_node("Hardmax", ["raw"], ["one_hot"], axis=-1, name="hardmax")],
        [("one_hot", TensorProto.FLOAT)],
        "the reduction tensor 'one_hot' lies after op 'Hardmax' (node 'hardmax'), which passes no gradient: to fix "
        "this, choose a reduction tensor before it with --reduction-layer, e.g. 'raw'",
    ),
    "round": (
        [helper.make_node("Round", ["raw"], ["rounded"], name="round")],
        [("rounded", TensorProto.FLOAT)],
        "the reduction tensor 'rounded' lies after op 'Round' (node 'round'), which passes no gradient: to fix "
        "this, choose a reduction tensor before it with --reduction-layer, e.g. 'raw'",
    ),
    "floor": (
        [
            helper.make_node("Sigmoid", ["raw"], ["probabilities"], name="sigmoid"),
            helper.make_node("Floor", ["probabilities"], ["floored"], name="floor"),
        ],
        [("floored", TensorProto.FLOAT)],
        "the reduction tensor 'floored' lies after op 'Floor' (node 'floor'), which passes no gradient: to fix "
        "this, choose a reduction tensor before it with --reduction-layer, e.g. 'probabilities'",
    ),
}


@pytest.mark.parametrize("feature", [None, "feat"], ids=["default_feature", "named_feature"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_score_after_an_op_without_gradient_names_it(head: str, feature: str | None, tmp_path: Path) -> None:
    tail, outputs, message = HEADS[head]
    src = detector(tail, outputs, tmp_path / f"{head}.onnx")
    reduction = outputs[-1][0]
    with pytest.raises(LayerNotFoundError) as err:
        prepare(src, tmp_path / "x.onnx", target="seed", reduction_layer=reduction, feature_layer=feature)
    assert str(err.value) == message
    assert not (tmp_path / "x.onnx").exists()
    # the first tensor it suggests serves as the score
    suggested = message.split("e.g. ")[1].split(",")[0].strip("'")
    prepare(src, tmp_path / "y.onnx", target="seed", reduction_layer=suggested, feature_layer="feat")


def test_topk_values_and_the_boxes_they_pick_equal_autograd(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """A head ending in TopK: the best cells' scores (TopK's Values) and their rows of 'raw'
    (Gather by TopK's Indices: out[n, i, j] = raw[n, cells[i, j]]), each as the score."""
    tail = [TOPK, helper.make_node("Gather", ["raw", "top_cells"], ["picked"], axis=1, name="pick")]
    src = detector(tail, [("top_scores", TensorProto.FLOAT), ("picked", TensorProto.FLOAT)], tmp_path / "topk.onnx")
    w = weights(5, w1=(8, 3, 3, 3), w2=(6, 8, 1, 1))
    x = np.random.RandomState(6).rand(2, 3, 8, 8).astype(np.float32)
    rs = np.random.RandomState(7)
    for reduction, shape in (("top_scores", (2, 5)), ("picked", (2, 2, 5, 6))):
        out = tmp_path / f"topk.{reduction}.onnx"
        prepare(src, out, target="seed", reduction_layer=reduction, feature_layer="feat", expose_gradient=True)
        seed = rs.uniform(-1, 1, shape).astype(np.float32)
        got = run(out, {"input": x, "gradcam_seed": seed})

        feat = F.relu(F.conv2d(t64(x), t64(w["w1"]), padding=1)).detach().requires_grad_()
        raw = F.conv2d(feat, t64(w["w2"])).flatten(2).transpose(1, 2)
        values, cells = raw[:, :, 4].topk(5, dim=1)
        score = values if reduction == "top_scores" else raw[:, cells]  # Gather axis 1: [N, N, 5, 6]
        (score * t64(seed)).sum().backward()
        err = rel_err(got["gradcam_gradient"], feat.grad.numpy())
        record_property(f"{reduction}:relative_error", f"{err:.2e}")
        assert err < EXACT, f"{reduction}: relative error {err:.2e}"


def test_op_without_a_rule_names_the_tensors_before_it_as_scores(tmp_path: Path) -> None:
    """An op with no rule between the feature and the score (Sin, as in test_prepare): the error
    names it and offers, besides feature layers after it, the tensors before it that carry gradient."""
    tail = [
        helper.make_node("Sin", ["raw"], ["odd"], name="sine"),
        helper.make_node("Mul", ["odd", "raw"], ["score"], name="mul"),
    ]
    src = detector(tail, [("score", TensorProto.FLOAT)], tmp_path / "sine.onnx")
    with pytest.raises(UnsupportedOpError) as err:
        prepare(src, tmp_path / "x.onnx", target="seed", reduction_layer="score", feature_layer="feat")
    assert str(err.value) == (
        "no gradient rule for op 'Sin' (node 'sine', opset 17); to fix this, choose a feature layer nearer "
        "the output with --feature-layer, or explain a tensor before it with --target seed --reduction-layer, "
        "e.g. 'raw'"
    )
