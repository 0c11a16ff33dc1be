"""Issue 4: every CAM method, counterfactual maps and Guided Backprop against torch.

torchvision resnet50, densenet121 and mobilenet_v3_large (random weights) at the default layer;
Guided Backprop on resnet18 and squeezenet1_1 (MaxPool, strided Conv, Concat on the input path).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_gradcam import prepare

from .conditioning import derived_tolerances, per_sample_error, well_conditioned, with_nudged
from .conftest import cpu_session, rel_err
from .torch_ref import autograd_at, corr, forward_at, resize

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import build, export  # noqa: E402

CACHE = ROOT / ".cache" / "models"
METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise"]
PGC_CLASS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
}
CLASSES = [7, 311]
EXACT = 1e-4  # relative to each sample's largest magnitude
SIZE = 96  # as in tests/test_torchvision.py: small enough that no ReLU input sits at float32's rounding of zero


def _layer_model(name: str):
    """(model for pytorch-grad-cam, path of the module at the default layer), as exported."""
    net = build(name, CACHE, SIZE)
    if name == "densenet121":
        # torchvision runs F.relu(inplace=True) after features.norm5, which overwrites the
        # activation pytorch-grad-cam saves; an out-of-place ReLU module computes the same logits
        relu = torch.nn.ReLU(inplace=False)
        wrapped = torch.nn.Sequential(
            net.features, relu, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), net.classifier
        ).eval()
        return wrapped, "1"
    if name == "mobilenet_v3_large":
        return net, f"features.{len(net.features) - 1}"
    return net, "layer4"


def numpy_method(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The published formulas, as pytorch-grad-cam writes them, before the final ReLU."""
    ax = (2, 3)
    if method == "gradcam":
        w = g.mean(ax, keepdims=True)
    elif method == "gradcam++":
        g2, g3 = g**2, g**3
        aij = g2 / (2 * g2 + a.sum(ax, keepdims=True) * g3 + 1e-6)
        w = (np.maximum(g, 0) * np.where(g != 0, aij, 0)).sum(ax, keepdims=True)
    elif method == "xgradcam":
        w = (g * a / (a.sum(ax, keepdims=True) + 1e-7)).sum(ax, keepdims=True)
    elif method == "hirescam":
        return (g * a).sum(1)
    elif method == "layercam":
        return (np.maximum(g, 0) * a).sum(1)
    else:
        return np.maximum(g * a, 0).sum(1)
    return (w * a).sum(1)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "mobilenet_v3_large"])
def test_methods_and_counterfactual_match_torch(name: str, tmp_path: Path) -> None:
    src = export(name, CACHE, size=SIZE)
    out = tmp_path / f"{name}.methods.onnx"
    prepare(src, out, methods=METHODS, counterfactual=True, expose_gradient=True)
    x = with_nudged(np.random.RandomState(0).rand(2, 3, SIZE, SIZE))  # and a 1e-6 nudge: the same verdict
    classes = np.array(CLASSES * 2, np.int64)
    sess = cpu_session(out.read_bytes())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))

    model, layer = _layer_model(name)
    fwd, tols = derived_tolerances(forward_at(model, layer), x, EXACT, name)
    assert per_sample_error(got["gradcam_features"], fwd["a"]) < tols["a"]  # the default layer is the torch layer
    score = lambda out: out[torch.arange(len(classes)), torch.from_numpy(classes)].sum()  # noqa: E731
    head = autograd_at(model, layer, score, features=got["gradcam_features"])

    def reference(xs: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        r = head(xs, dtype)
        for method in METHODS:
            r[method] = np.maximum(numpy_method(method, r["a"], r["g"]), 0)
        r["counterfactual"] = np.maximum(numpy_method("gradcam", r["a"], -r["g"]), 0)
        return r

    ref = well_conditioned(reference, x, EXACT, name)
    a, g = ref["a"], ref["g"]
    assert per_sample_error(got["gradcam_gradient"], g) < EXACT
    for method in METHODS:
        for i in range(len(x)):
            err = rel_err(got[f"gradcam_raw_{method}"][i], ref[method][i])
            print(f"{name} {method} sample {i}: raw error {err:.2e}")
            assert err < EXACT, f"{name} {method} sample {i}: raw error {err:.2e}"
    for i in range(len(x)):
        assert rel_err(got["gradcam_raw_counterfactual"][i], ref["counterfactual"][i]) < EXACT

    # pytorch-grad-cam in float64 at the prepared model's feature tensor (as in tests/test_torchvision.py)
    targets = [pgc.utils.model_targets.ClassifierOutputTarget(c) for c in CLASSES]
    model64 = copy.deepcopy(model).double()
    features = torch.from_numpy(a[:2])
    model64.get_submodule(layer).register_forward_hook(lambda _m, _i, _o: features.clone().requires_grad_(True))
    x64 = torch.from_numpy(x[:2].astype(np.float64))
    for method in METHODS:
        cam_cls = getattr(pgc, PGC_CLASS[method])
        module = model64.get_submodule(layer)
        with cam_cls(model=model64, target_layers=[module]) as cam:
            theirs = cam(input_tensor=x64, targets=targets)
            their_raw = np.maximum(cam.get_cam_image(x64, module, targets, a[:2], g[:2], False), 0)
        for i in range(2):
            ours = got[f"gradcam_map_{method}"][i]
            if their_raw[i].max() == 0:  # every channel weighs against the class: an empty map
                assert np.all(ours == 0), f"{name} {method} sample {i}: expected an empty map"
                continue
            c = corr(ours, theirs[i])
            assert c >= 0.999, f"{name} {method} sample {i}: correlation {c:.5f}"


# Guided Backprop differentiates the whole net down to the input: resnet18 and squeezenet1_1 carry
# MaxPool, strided Conv and Concat on that path. (vgg16 exports only at 224 pixels, where its
# 13 convolutions hold ReLU inputs at float32's rounding of zero: torch float32 and float64 part.)
@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_guided_backprop_for_the_whole_batch(name: str, tmp_path: Path) -> None:
    src = export(name, CACHE, size=SIZE)
    out = tmp_path / f"{name}.guided.onnx"
    prepare(src, out, guided=True)
    x = with_nudged(np.random.RandomState(1).randn(2, 3, SIZE, SIZE))
    classes = np.array([1, 5, 1, 5], np.int64)
    sess = cpu_session(out.read_bytes())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))
    net = build(name, CACHE, SIZE)

    def reference(xs: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        gbm = pgc.GuidedBackpropReLUModel(copy.deepcopy(net).to(getattr(torch, dtype)), device=torch.device("cpu"))
        # pytorch-grad-cam explains one image per call; the prepared model does the whole batch at once
        rows = [
            gbm(torch.from_numpy(xs[i : i + 1]), target_category=int(classes[i])).transpose(2, 0, 1)
            for i in range(len(xs))
        ]
        return {"guided_backprop": np.stack(rows).astype(np.float64)}

    ref = well_conditioned(reference, x, EXACT, f"{name} guided")["guided_backprop"]
    for i in range(len(x)):
        err = rel_err(got["gradcam_guided_backprop"][i], ref[i])
        print(f"{name} sample {i}: guided backprop error {err:.2e}")
        assert err < EXACT, f"{name} sample {i}: guided backprop error {err:.2e}"
        expected = got["gradcam_guided_backprop"][i] * got["gradcam_map"][i][None]
        np.testing.assert_allclose(got["gradcam_guided"][i], expected, rtol=1e-6, atol=1e-12)
    assert not np.allclose(got["gradcam_guided_backprop"][0], got["gradcam_guided_backprop"][1])


def test_several_feature_layers_give_one_map_each_and_their_mean(tmp_path: Path) -> None:
    src = export("resnet18", CACHE, size=SIZE)
    import onnx

    nodes = onnx.load(str(src), load_external_data=False).graph.node
    layer3 = [n for n in nodes if n.name.startswith("/layer3/")][-1].output[0]
    layer4 = [n for n in nodes if n.name.startswith("/layer4/")][-1].output[0]
    out = tmp_path / "two_layers.onnx"
    report = prepare(src, out, feature_layer=[layer3, layer4])
    assert report.feature_tensors == (layer3, layer4)
    x = np.random.RandomState(2).rand(2, 3, SIZE, SIZE).astype(np.float32)
    sess = cpu_session(out.read_bytes())
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"input": x, "gradcam_class": np.array(CLASSES, np.int64)}),
        )
    )
    net = build("resnet18", CACHE, SIZE)
    score = lambda out: out[torch.arange(2), torch.tensor(CLASSES)].sum()  # noqa: E731

    def reference(xs: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
        r = {}
        for j, module in enumerate(("layer3", "layer4")):
            at = autograd_at(net, module, score)(xs, dtype)
            r[f"raw{j}"] = np.maximum(numpy_method("gradcam", at["a"], at["g"]), 0)
        return r

    ref = well_conditioned(reference, x, EXACT, "resnet18 layer3+layer4")
    maps = []
    for j in range(2):
        raw = ref[f"raw{j}"]
        assert per_sample_error(got[f"gradcam_raw_layer{j}"], raw) < EXACT
        maps.append(got[f"gradcam_map_layer{j}"])
        for i in range(2):
            up = resize(raw[i], SIZE)
            if up.max() > up.min():
                assert corr(got[f"gradcam_map_layer{j}"][i], (up - up.min()) / (up.max() - up.min())) > 0.9999
    mean = (maps[0] + maps[1]) / 2
    for i in range(2):  # gradcam_map = the per-layer normalised maps' mean, normalised again
        expected = (mean[i] - mean[i].min()) / (mean[i].max() - mean[i].min())
        np.testing.assert_allclose(got["gradcam_map"][i], expected, atol=1e-5)
