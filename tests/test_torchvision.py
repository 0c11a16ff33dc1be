"""Ring 2: whole torchvision architectures (random weights) against torch autograd and
pytorch-grad-cam, at the default layer and at an earlier block."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gradcam import prepare

from .conftest import cpu_session, rel_err
from .torch_ref import corr, hooked, resize

torch = pytest.importorskip("torch")
pgc = pytest.importorskip("pytorch_grad_cam")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import build, export, input_size  # noqa: E402

CACHE = ROOT / ".cache" / "models"
CLASSES = [3, 917]

# architecture: (torch module at the default layer, an earlier block whose path to the logits
# holds Conv, pooling, Concat, squeeze-excitation Mul or LayerNorm)
LAYERS = {
    "resnet18": ("layer4", "layer3"),
    "resnet50": ("layer4", "layer3"),
    "vgg16": ("avgpool", "features.23"),
    "googlenet": ("inception5b", "inception4e"),
    "inception_v3": ("Mixed_7c", "Mixed_6e"),
    "densenet121": ("relu(features)", "features.transition3"),
    "mobilenet_v2": ("features", "features.13"),
    "mobilenet_v3_large": ("features", "features.12"),
    "efficientnet_b0": ("features", "features.5"),
    "convnext_tiny": ("features", "features.5"),
    "regnet_y_400mf": ("trunk_output", "trunk_output.block3"),
    "shufflenet_v2_x1_0": ("conv5", "stage3"),
    "squeezenet1_1": ("classifier.2", "features"),
    "mnasnet1_0": ("layers", "layers.13"),
}


def onnx_tensor(model: onnx.ModelProto, module: str) -> str:
    """The output of a torch module in a TorchScript export: its scope's last node."""
    if module == "relu(features)":  # densenet: F.relu(self.features(x)) in forward
        return next(n.output[0] for n in model.graph.node if n.op_type == "Relu" and n.name == "/Relu")
    # scopes: a named child keeps its name, a numbered one is "<parent scope>.<index>"
    scopes: list[str] = []
    for part in module.split("."):
        scopes.append(f"{scopes[-1]}.{part}" if part.isdigit() and scopes else part)
    prefix = "/" + "/".join(scopes) + "/"
    return [n for n in model.graph.node if n.name.startswith(prefix)][-1].output[0]


def torch_model_and_layer(name: str, module: str):  # -> (torch.nn.Module, torch.nn.Module)
    net = build(name)
    if module == "relu(features)":
        # torchvision's densenet runs F.relu(inplace=True) after features.norm5, which overwrites the
        # activation pytorch-grad-cam saves; an out-of-place ReLU module gives the same logits
        relu = torch.nn.ReLU(inplace=False)
        wrapped = torch.nn.Sequential(
            net.features, relu, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), net.classifier
        ).eval()
        return wrapped, relu
    return net, net.get_submodule(module)


# (architecture, layer, sample) where a ReLU decision in the path after the layer sits within
# float32 rounding of zero, and torch's and onnxruntime's convolutions (different summation
# orders) take it differently: measured for inception_v3 at Mixed_6e, sample 1 — 76% of the
# gradient's entries move by up to 1.4e-2 of its largest value, correlation 0.99995, while
# sample 0 of the same case agrees to 7e-7. Any other divergence fails the test.
ROUNDING_FLIPS = {("inception_v3", "earlier", 1)}

CASES = [(name, which) for name in LAYERS for which in ("default", "earlier")]


@pytest.mark.parametrize(("name", "which"), CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_gradient_and_maps_equal_torch(name: str, which: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    src = export(name, CACHE)
    module = LAYERS[name][0 if which == "default" else 1]
    tensor = onnx_tensor(onnx.load(str(src), load_external_data=False), module)
    out = tmp_path / "prepared.onnx"
    report = prepare(src, out, feature_layer=None if which == "default" else tensor, expose_gradient=True)
    if which == "default":
        assert report.feature_tensor == tensor, f"default layer {report.feature_tensor!r}, expected {tensor!r}"

    size = input_size(name)
    x = np.random.RandomState(0).rand(2, 3, size, size).astype(np.float32)
    sess = cpu_session(out.read_bytes())
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"input": x, "gradcam_class": np.array(CLASSES, np.int64)}),
        )
    )

    model, layer = torch_model_and_layer(name, module)
    store = hooked(layer)
    logits = model(torch.from_numpy(x))
    logits[torch.arange(2), torch.tensor(CLASSES)].sum().backward()
    a = store["a"].detach().double().numpy()  # type: ignore[union-attr]
    g = store["g"].double().numpy()  # type: ignore[union-attr]
    raw = np.maximum((g.mean(axis=(2, 3), keepdims=True) * a).sum(1), 0)

    assert rel_err(got["logits"], logits.detach().numpy()) < 1e-4
    assert rel_err(got["gradcam_features"], a) < 1e-4  # the tensor is the torch module's output
    for i in range(2):  # each sample against its own magnitude (random weights: 1e-14 .. 1e12)
        err_g = rel_err(got["gradcam_gradient"][i], g[i])
        err_r = rel_err(got["gradcam_raw"][i], raw[i])
        print(f"{name} {which} sample {i}: gradient {err_g:.2e} raw {err_r:.2e}")
        if (name, which, i) in ROUNDING_FLIPS:
            assert corr(got["gradcam_gradient"][i], g[i]) > 0.9999 and err_g < 5e-2
            continue
        assert err_g < 1e-4 and err_r < 1e-4
    np.testing.assert_array_equal(got["gradcam_target"], CLASSES)

    targets = [pgc.utils.model_targets.ClassifierOutputTarget(c) for c in CLASSES]
    with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
        theirs = cam(input_tensor=torch.from_numpy(x), targets=targets)
    for i in range(2):
        ours = got["gradcam_map"][i]
        if raw[i].max() == 0:  # every channel weighs against the class: an empty map
            assert np.all(ours == 0)
            continue
        if raw[i].max() > 1e-5:
            c = corr(ours, theirs[i])
        else:
            # pytorch-grad-cam divides by (max + 1e-7): at random weights' ~1e-10 that epsilon
            # flattens its map, so compare with the exact map (autograd, resized, normalised)
            up = resize(raw[i], size)
            c = corr(ours, (up - up.min()) / (up.max() - up.min()))
        print(f"{name} {which} sample {i}: map correlation {c:.6f}")
        assert c >= 0.999


def test_dynamo_export_opset_above_17(tmp_path: Path) -> None:
    src = export("resnet18", CACHE, dynamo=True)
    proto = onnx.load(str(src))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")][0] >= 18
    out = tmp_path / "dyn.onnx"
    prepare(src, out, expose_gradient=True)
    prepared = onnx.load(str(out))
    assert prepared.ir_version == proto.ir_version
    x = np.random.RandomState(1).rand(2, 3, 224, 224).astype(np.float32)
    sess = cpu_session(out.read_bytes())
    got = dict(
        zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": np.array(CLASSES)}))
    )
    model, layer = torch_model_and_layer("resnet18", "layer4")
    store = hooked(layer)
    model(torch.from_numpy(x))[torch.arange(2), torch.tensor(CLASSES)].sum().backward()
    assert rel_err(got["gradcam_features"], store["a"].detach().numpy()) < 1e-4  # type: ignore[union-attr]
    assert rel_err(got["gradcam_gradient"], store["g"].numpy()) < 1e-4  # type: ignore[union-attr]
