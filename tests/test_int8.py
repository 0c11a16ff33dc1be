"""int8 models from onnxruntime's quantizer (QDQ, QOperator, dynamic): exactness of the gradient
against a torch fake-quantization reference, faithfulness of the maps to the float model's, the
layer choice, and the command line on quantized files.

Exactness (tolerance 1e-4 relative to the largest reference entry): the tail feature -> score of
the quantized file, evaluated by tests/int8_ref.py in float64 (fake quantization forward, clipped
straight-through backward), from the feature map onnxruntime computed. A case counts only if it
is well-conditioned: the float32 reference agrees with the float64 one within 1e-5 and the
reference's score equals onnxruntime's within 1e-5, so no rounding decision sits at a boundary.
These files use reduce_range (7-bit weights): with full-range weights onnxruntime's AVX2 u8 x s8
kernels saturate in 16 bits and the file no longer computes its own float semantics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from onnx_gradcam import prepare, region_seed
from onnx_gradcam.api import layers as list_layers
from onnx_gradcam.cli import main
from onnx_gradcam.explain.preprocess import InputSpec, to_tensor
from onnx_gradcam.surgery import layers
from onnx_gradcam.surgery.prepare import Preprocess, prepare_model

from .conftest import cpu_session, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from .int8_ref import TailReference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import export  # noqa: E402
from quantize_int8 import quantize  # noqa: E402

CACHE = ROOT / ".cache" / "models"
SAMPLES = ROOT / "models" / "samples"
BOXES = json.loads((ROOT / "models" / "demo_boxes.json").read_text())
TOL = 1e-4
CONDITION = TOL / 10

# (architecture, quantized form, feature layer prefix or None for the default)
EXACT = [
    ("resnet18", "qdq", None),
    ("resnet18", "qdq_per_tensor", None),
    ("resnet18", "qop", None),
    ("mobilenet_v2", "qdq", None),
    ("mobilenet_v2", "qop", None),
    ("mobilenet_v3_large", "qdq", None),
    ("mobilenet_v3_large", "qop", None),
    # dynamic quantization through ConvInteger (layer4) and MatMulInteger (fc)
    ("resnet18", "dynamic", "/layer3/"),
]


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def outputs(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def reference_gradient(
    model: onnx.ModelProto, feature: str, reduction: str, a: np.ndarray, target: np.ndarray, dtype
) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(dS/dA, S) of the torch reference, from the feature map A onnxruntime computed; for an
    int8 feature (QOperator) from its integer values q, dS/dA = dS/dq / s."""
    ref = TailReference(model, layers.score_quantizers(model.graph, reduction))
    params = layers.quantization_params(model.graph).get(feature)
    if params is not None:
        scale, zero_point = float(ref.inits[params[0]]), float(ref.inits[params[1]])
        start = torch.tensor(np.round(a.astype(np.float64) / scale) + zero_point, dtype=dtype, requires_grad=True)
    else:
        scale = 1.0
        start = torch.tensor(a, dtype=dtype, requires_grad=True)
    env = ref.run({feature: start}, dtype)
    score = env[reduction].gather(1, torch.from_numpy(target)[:, None])[:, 0]
    score.sum().backward()
    assert start.grad is not None
    return start.grad.numpy().astype(np.float64) / scale, score.detach().numpy().astype(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "form", "prefix"), EXACT, ids=lambda v: v or "default")
def test_gradient_equals_fake_quantization_reference(name: str, form: str, prefix: str | None, record_property) -> None:  # type: ignore[no-untyped-def]
    path = quantize(export(name, CACHE), form, reduce_range=True)
    model = onnx.load(str(path))
    feature = None
    if prefix is not None:
        _, found = list_layers(path)
        feature = [c.name for c in found if c.dominates and c.name.startswith(prefix)][-1]
    prepared, report = prepare_model(model, feature_layer=feature, expose_gradient=True)
    x = np.random.RandomState(100).uniform(0, 1, (2, 3, 224, 224)).astype(np.float32)
    got = outputs(cpu_session(prepared.SerializeToString()), {"input": x})
    args = (model, report.feature_tensor, report.reduction_tensor, got["gradcam_features"], got["gradcam_target"])
    g64, s64 = reference_gradient(*args, torch.float64)
    g32, _ = reference_gradient(*args, torch.float32)
    errors = {
        "gradient": rel_err(got["gradcam_gradient"], g64),
        "float32_vs_float64_reference": rel_err(g32, g64),
        "score_vs_reference": rel_err(got["gradcam_score"], s64),
    }
    for key, value in errors.items():
        record_property(key, f"{value:.2e}")
    assert errors["float32_vs_float64_reference"] < CONDITION, f"ill-conditioned case: {errors}"
    assert errors["score_vs_reference"] < CONDITION, f"the reference does not compute the file's forward: {errors}"
    assert errors["gradient"] < TOL, f"{name} {form} at {report.feature_tensor}: {errors}"


# -- layer choice ------------------------------------------------------------------------


def test_layers_lists_dequantized_tensors() -> None:
    src = export("resnet18", CACHE)
    qdq, qop = quantize(src, "qdq"), quantize(src, "qop")
    graph = onnx.load(str(qdq)).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)
    _, found = list_layers(qdq)
    assert found and all(c.dequantize is None for c in found)
    # no int8 tensor, no float tensor that only feeds a requantization
    assert all(readers.get(c.name) != {"QuantizeLinear"} for c in found)
    default = next(c for c in found if c.default)
    assert default.name == "/layer4/layer4.1/relu_1/Relu_output_0_DequantizeLinear_Output"
    _, found = list_layers(qop)
    default = next(c for c in found if c.default)
    assert default.name == "/layer4/layer4.1/Add_output_0_quantized" and default.dequantize is not None
    result = CliRunner().invoke(main, ["layers", str(qop)])
    assert result.exit_code == 0, result.output
    assert "QLinearAdd+DQ" in result.output


# -- faithfulness: the bundled trained demo model ------------------------------------------


def demo_images() -> tuple[list[str], np.ndarray]:
    names = sorted(BOXES)
    images = [Image.open(SAMPLES / n) for n in names]
    return names, to_tensor(images, InputSpec("input", "nchw", 3, (96, 96)), Preprocess())


@pytest.fixture(scope="module")
def demo_copy() -> Path:
    """models/demo.onnx copied into the cache (the quantized files go beside it, not into models/)."""
    data = (ROOT / "models" / "demo.onnx").read_bytes()
    path = CACHE / f"demo.{hashlib.sha256(data).hexdigest()[:12]}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "models" / "demo.onnx", path)
    return path


def explain_raw(model: Path, out: Path) -> dict[str, np.ndarray]:
    """`onnx-gradcam explain MODEL models/samples` with no extra flags: raw map per sample."""
    result = CliRunner().invoke(main, ["explain", str(model), str(SAMPLES), "-o", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "predictions.json").read_text())
    return {Path(e["file"]).name: np.load(out / e["raw_map"]) for e in entries}


@pytest.mark.parametrize("form", ["qdq", "qdq_per_tensor", "qop", "dynamic"])
def test_demo_int8_maps_follow_the_float_model(form: str, demo_copy: Path, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    names, x = demo_images()
    quantized = quantize(demo_copy, form, [x[i : i + 1] for i in range(len(names))])  # calibrated on its samples
    float_maps = explain_raw(demo_copy, tmp_path / "float")
    int8_maps = explain_raw(quantized, tmp_path / "int8")
    for name in names:
        corr = float(np.corrcoef(float_maps[name].ravel(), int8_maps[name].ravel())[0, 1])
        size = Image.open(SAMPLES / name).size
        up = np.asarray(
            Image.fromarray(int8_maps[name].astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR)
        )
        py, px = np.unravel_index(np.argmax(up), up.shape)
        x0, y0, x1, y1 = BOXES[name]["box"]
        record_property(f"{name}:correlation", f"{corr:.4f}")
        record_property(f"{name}:peak", f"({px}, {py}) in {BOXES[name]['box']}")
        assert corr >= 0.95, f"{form} {name}: correlation {corr:.4f} with the float32 map"
        assert x0 <= px <= x1 and y0 <= py <= y1, f"{form} {name}: peak ({px}, {py}) outside {BOXES[name]['box']}"


@pytest.mark.parametrize("form", ["qdq", "qop", "dynamic"])
def test_sanity_check_randomises_the_int8_weights(form: str, demo_copy: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    """Cascading randomisation on an int8 model: every quantised weight tensor (behind DequantizeLinear
    in QDQ, an input of QLinearConv/QLinearMatMul or ConvInteger/MatMulInteger otherwise) is randomised
    in its block, the blocks are the float model's, and the maps decorrelate as the float model's do."""
    from onnx_gradcam import Explainer
    from onnx_gradcam.evaluation.base import make_context
    from onnx_gradcam.evaluation.sanity import cascading_randomisation, source_model

    from .demo_set import demo_set

    names, x = demo_images()
    quantized = quantize(demo_copy, form, [x[i : i + 1] for i in range(len(names))])
    images, classes, _ = demo_set(24)
    exp = Explainer(str(quantized), device="cpu", threads=2)
    r = cascading_randomisation(exp, make_context(exp, images, truth=classes), seed=0)[0]
    source = source_model(exp)
    weights = {  # the quantised kernels and matrices (zero points and scales are 0-D or 1-D)
        t.name for t in source.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        and len(t.dims) >= 2
    }  # fmt: skip
    chosen = {n for names_ in r.settings["block_initializers"].values() for n in names_}
    record_property("mean_per_block", [round(float(v), 3) for v in r.curves["mean"]])
    assert len(weights) == 5 and weights <= chosen  # the demo's 4 convs and its Gemm, each in a block
    assert len(r.settings["blocks"]) == 5
    assert r.curves["spearman_none"].min() > 0.99  # prepared again, nothing randomised: the same maps
    assert r.curves["mean"][1] < 0.3  # the last two blocks randomised, as for the float model


# -- a quantized segmentation model, explained by a region seed ------------------------------


class SegOut(torch.nn.Module):
    def __init__(self, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.net = net

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)["out"]


def lraspp() -> Path:
    """torchvision lraspp_mobilenet_v3_large at 160 px, random weights (as tests/test_targets.py)."""
    torchvision = pytest.importorskip("torchvision")
    src = CACHE / "targets_lraspp_mobilenet_v3_large_160.onnx"
    if not src.exists():
        torch.manual_seed(0)
        net = SegOut(torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None))
        x = torch.rand(1, 3, 160, 160)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = src.with_suffix(".part")
        torch.onnx.export(
            net.eval(),
            x,
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["out"],
            dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
        )
        tmp.replace(src)
    return src


@pytest.mark.slow
@pytest.mark.parametrize("form", ["qdq", "qop", "dynamic"])
def test_segmentation_int8_region_maps(form: str, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    src = lraspp()
    x = np.random.RandomState(0).rand(2, 3, 160, 160).astype(np.float32)
    seed = np.concatenate(
        [region_seed([1, 21, 160, 160], 15, (40, 30, 120, 100)), region_seed([1, 21, 160, 160], 3, (0, 0, 80, 160))]
    )
    maps = {}
    for which, path in (("float", src), ("int8", quantize(src, form))):
        out = tmp_path / f"{which}.onnx"
        report = prepare(path, out, target="seed")
        # the float model's default (backbone.4's last conv, which every path crosses), in int8 form
        assert report.feature_tensor.startswith("/net/backbone/backbone.4/block/block.3/block.3.0/Conv_output_0")
        maps[which] = outputs(cpu_session(out.read_bytes()), {"input": x, "gradcam_seed": seed})["gradcam_map"]
    assert np.isfinite(maps["int8"]).all() and maps["int8"].max() > 0
    for i in range(2):
        corr = float(np.corrcoef(maps["float"][i].ravel(), maps["int8"][i].ravel())[0, 1])
        record_property(f"sample{i}:correlation", f"{corr:.4f}")
        assert corr >= 0.95, f"{form} sample {i}: correlation {corr:.4f} with the float32 map"
