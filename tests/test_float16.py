"""float16 models (issue 10 §2): converted by onnxconverter-common (keep_io_types True and False,
its default op block list) and exported from torch in half precision. The gradient is computed in
float32 behind Casts; it must equal float64 autograd on the same float16 weights, and the maps
must correlate with the float32 model's."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxconverter_common import float16

from onnx_gradcam import Explainer, prepare_model

from .conftest import cpu_session, rel_err

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "models"
SAMPLES = ROOT / "models" / "samples"
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import build, export  # noqa: E402

U = 2.0**-11  # float16's unit roundoff: a value stored in float16 moves by at most U of itself
FORMS = ["keep_io_types=True", "keep_io_types=False", "torch half"]


def converted(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    """onnxconverter-common's float16 conversion with its default op block list (Resize, Max,
    Min, TopK, ... stay float32 between Casts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on values clamped to float16's range
        return float16.convert_float_to_float16(model, keep_io_types=keep_io_types)


def torch_export(net, x, path: Path) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            x,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return onnx.load(str(path))


def run(model: onnx.ModelProto, x: np.ndarray, classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All outputs; the input is sent in the model's own float type."""
    sess = cpu_session(model.SerializeToString())
    image = sess.get_inputs()[0]
    feeds = {image.name: x.astype(np.float16 if image.type == "tensor(float16)" else np.float32)}
    if classes is not None:
        feeds["gradcam_class"] = np.asarray(classes, np.int64)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def check_dtypes(out: dict[str, np.ndarray], logits: type) -> None:
    """The contract: map, raw and score float32 whatever the model's precision; the original
    output keeps its own type."""
    assert out["logits"].dtype == logits
    for name in ("gradcam_map", "gradcam_raw", "gradcam_score"):
        assert out[name].dtype == np.float32, name


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


class SmoothHead(torch.nn.Module):
    """Conv-ReLU (the feature map A), then a head with no discrete decision after A: AvgPool,
    Conv-SiLU, bilinear Upsample (a Resize, which the converter keeps in float32), Conv-SiLU, GAP,
    Linear. A ReLU or MaxPool after A would make the gradient jump wherever float16 rounding moves
    a value across zero or reorders a window (measured: 11% of the gradient's largest entry with a
    MaxPool and a ReLU here); smooth gates keep the case well-conditioned."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2, self.act2 = nn.Conv2d(8, 16, 3, padding=1), nn.SiLU()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv3, self.act3 = nn.Conv2d(16, 16, 1), nn.SiLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = self.act2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        h = self.act3(self.conv3(self.up(h)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


def autograd(net, x, classes: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """dS/dA at relu1's output, S = Σ_i logits[i, classes[i]], in the dtype of net and x."""
    seen = {}

    def keep(_module, _inputs, out):  # type: ignore[no-untyped-def]
        out.retain_grad()
        seen["a"] = out

    net.relu1.register_forward_hook(keep)
    logits = net(x)
    logits[list(range(len(classes))), classes].sum().backward()
    return seen["a"].grad.double().numpy()


@pytest.fixture(scope="module")
def smooth(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = SmoothHead().eval()
    with torch.no_grad():  # the float16-rounded weights every form and every reference uses
        for p in net.parameters():
            p.copy_(p.half().float())
    x = torch.rand(2, 3, 16, 16).half().float()  # an input float16 represents exactly
    folder = tmp_path_factory.mktemp("float16")
    model32 = torch_export(net, x, folder / "smooth.onnx")
    forms = {
        "keep_io_types=True": converted(model32, True),
        "keep_io_types=False": converted(model32, False),
        "torch half": torch_export(copy.deepcopy(net).half(), x.half(), folder / "smooth.half.onnx"),
    }
    return net, x, model32, forms


@pytest.mark.parametrize("form", FORMS)
def test_gradient_equals_float64_autograd_on_the_float16_weights(smooth, form: str) -> None:  # type: ignore[no-untyped-def]
    net, x, model32, forms = smooth
    model = forms[form]
    weights32 = {t.name: onnx.numpy_helper.to_array(t) for t in model32.graph.initializer}
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    # 4 weights and 4 biases, by name: the same float16 values torch's references use
    assert sorted(t.name for t in halves) == sorted(weights32)
    for t in halves:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t).astype(np.float32), weights32[t.name])
    if form.startswith("keep_io_types"):  # the default block list kept Resize in float32 between Casts
        (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        assert producers[resize.input[0]] == "Cast" and producers[resize.input[2]] == "Cast"

    classes = [1, 3]
    g64 = autograd(copy.deepcopy(net).double(), x.double(), classes)
    feature = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    prepared, report = prepare_model(model, feature_layer=feature, expose_gradient=True)
    out = run(prepared, x.numpy(), np.array(classes))
    check_dtypes(out, np.float32 if form == "keep_io_types=True" else np.float16)
    assert out["gradcam_gradient"].dtype == np.float32 and out["gradcam_features"].dtype == np.float32

    # Tolerance from float16 rounding: a runtime may store each forward tensor the gradient reads
    # in float16 (A, the two conv outputs before their SiLUs, the Resize's input and output: 5),
    # each moved by at most U of itself; the head's gates (|SiLU''| <= 0.5) and linear maps pass
    # each such perturbation to the gradient with a gain of order 1: 5 U, doubled for the gains.
    tol = 10 * U  # 4.9e-3
    g32 = autograd(copy.deepcopy(net), x, classes)
    assert rel_err(g32, g64) <= tol / 10  # well-conditioned: torch float32 = float64 to 8e-7
    g16 = autograd(copy.deepcopy(net).half(), x.half(), classes)
    assert rel_err(g16, g64) <= tol  # ... and even torch entirely in float16 stays inside (1.4e-3)
    assert rel_err(out["gradcam_gradient"], g64) <= tol, report  # measured: 2.3e-7 on onnxruntime's CPU
    assert np.array_equal(out["gradcam_target"], classes)


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_demo_model_in_float16_explains_like_float32(keep_io_types: bool) -> None:
    # the bundled trained model, converted, explained from image files through Explainer
    demo = onnx.load(str(ROOT / "models" / "demo.onnx"))
    images = sorted(SAMPLES.glob("*.png"))
    ref = Explainer(demo, device="cpu").explain(images)
    exp = Explainer(converted(demo, keep_io_types), device="cpu")
    got = exp.explain(images)
    assert np.array_equal(got.targets, ref.targets)
    assert got.maps.dtype == got.raw.dtype == got.scores.dtype == np.float32
    assert got.logits is not None and got.logits.dtype == (np.float32 if keep_io_types else np.float16)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-2)  # float16 logits: 3 significant digits
    for i, image in enumerate(images):
        assert correlation(got.maps[i], ref.maps[i]) >= 0.99, image.name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
def test_torchvision_float16_maps_correlate_with_float32(name: str, tmp_path: Path) -> None:
    model32 = onnx.load(str(export(name, CACHE)))  # conditioned random weights (BatchNorm calibrated)
    x = np.random.default_rng(0).random((2, 3, 224, 224)).astype(np.float32)
    prepared32, report32 = prepare_model(model32)
    ref = run(prepared32, x)
    classes = ref["gradcam_target"]  # both explain the float32 model's top-1 class
    forms = {
        "keep_io_types=True": converted(model32, True),
        "keep_io_types=False": converted(model32, False),
        "torch half": torch_export(build(name, CACHE).half(), torch.from_numpy(x[:1]).half(), tmp_path / "h.onnx"),
    }
    for form, model in forms.items():
        prepared, report = prepare_model(model)
        out = run(prepared, x, classes)
        check_dtypes(out, np.float32 if form == "keep_io_types=True" else np.float16)
        assert report.feature_tensor == report32.feature_tensor
        for i in range(len(x)):
            c = correlation(out["gradcam_map"][i], ref["gradcam_map"][i])
            assert c >= 0.99, f"{name} {form} sample {i}: map correlation {c:.5f}"


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_every_method_and_extra_output_agrees_with_float32(keep_io_types: bool) -> None:
    # the demo model with all CAM methods, the counterfactual and Guided Backprop: each float16
    # output against its float32 twin on the bundled samples (preprocessed as Explainer does)
    from onnx_gradcam.surgery.methods import METHODS

    demo = onnx.load(str(ROOT / "models" / "demo.onnx"))
    options = {"methods": list(METHODS), "counterfactual": True, "guided": True}
    prepared32, _ = prepare_model(demo, **options)
    prepared16, report = prepare_model(converted(demo, keep_io_types), **options)
    x = Explainer(prepared32, device="cpu").to_tensor(sorted(SAMPLES.glob("*.png")))
    ref, out = run(prepared32, x), run(prepared16, x)
    compared = [n for n in report.outputs if n.startswith(("gradcam_map", "gradcam_guided"))]
    assert len(compared) == 1 + len(METHODS) + 1 + 2  # map, one per method, counterfactual, guided pair
    for name in compared:
        assert out[name].dtype == np.float32, name
        for i in range(len(x)):
            c = correlation(out[name][i], ref[name][i])
            assert c >= 0.99, f"{name} sample {i}: correlation {c:.5f}"
