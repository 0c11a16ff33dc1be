"""Issue 4: every CAM method, counterfactual maps and Guided Backprop against torch.

torchvision resnet50, densenet121 and mobilenet_v3_large (random weights) at the default layer;
Guided Backprop on resnet18 and vgg16 (MaxPool and strided Conv on the input path), batch of 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_gradcam import prepare

from .conftest import cpu_session, rel_err
from .torch_ref import corr, hooked, resize

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import export  # noqa: E402

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


def _net(name: str):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def _layer_model(name: str):
    """(model for pytorch-grad-cam, module at the default layer), equivalent to the export."""
    net = _net(name)
    if name == "densenet121":
        # torchvision runs F.relu(inplace=True) after features.norm5, which overwrites the
        # activation pytorch-grad-cam saves; an out-of-place ReLU module computes the same logits
        relu = torch.nn.ReLU(inplace=False)
        wrapped = torch.nn.Sequential(
            net.features, relu, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), net.classifier
        ).eval()
        return wrapped, relu
    if name == "mobilenet_v3_large":
        return net, net.features[-1]
    return net, net.layer4


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
    src = export(name, CACHE)
    out = tmp_path / f"{name}.methods.onnx"
    prepare(src, out, methods=METHODS, counterfactual=True, expose_gradient=True)
    x = np.random.RandomState(0).rand(2, 3, 224, 224).astype(np.float32)
    sess = cpu_session(out.read_bytes())
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"input": x, "gradcam_class": np.array(CLASSES, np.int64)}),
        )
    )

    model, layer = _layer_model(name)
    store = hooked(layer)
    logits = model(torch.from_numpy(x))
    logits[torch.arange(2), torch.tensor(CLASSES)].sum().backward()
    # float32, as pytorch-grad-cam computes: XGrad-CAM divides by Σ_ij A + 1e-7, and random
    # mobilenet_v3 has Σ_ij A ~ 1e-10..5e-7, where float64 and float32 sums part by 1e-4
    a = store["a"].detach().numpy()  # type: ignore[union-attr]
    g = store["g"].numpy()  # type: ignore[union-attr]
    assert rel_err(got["gradcam_features"], a) < 1e-4  # the default layer is the torch layer

    assert rel_err(got["gradcam_gradient"], g) < 1e-4
    for method in METHODS:
        ref = np.maximum(numpy_method(method, a, g), 0)
        if name == "mobilenet_v3_large" and method == "xgradcam":
            # Σ_ij G A cancels (random weights: Σ_ij A ~ 1e-10, next to XGrad-CAM's 1e-7), which
            # turns torch-vs-onnxruntime rounding (1e-6) into 3e-4: take the formula on our own A
            # and G, each equal to torch's within 1e-4 (asserted above)
            ref = np.maximum(numpy_method(method, got["gradcam_features"], got["gradcam_gradient"]), 0)
        for i in range(2):
            err = rel_err(got[f"gradcam_raw_{method}"][i], ref[i])
            assert err < 1e-4, f"{name} {method} sample {i}: raw error {err:.2e}"
    cf = np.maximum(numpy_method("gradcam", a, -g), 0)
    for i in range(2):
        assert rel_err(got["gradcam_raw_counterfactual"][i], cf[i]) < 1e-4

    targets = [pgc.utils.model_targets.ClassifierOutputTarget(c) for c in CLASSES]
    for method in METHODS:
        cam_cls = getattr(pgc, PGC_CLASS[method])
        with cam_cls(model=model, target_layers=[layer]) as cam:
            theirs = cam(input_tensor=torch.from_numpy(x), targets=targets)
            their_raw = np.maximum(
                cam.get_cam_image(
                    torch.from_numpy(x), layer, targets, a.astype(np.float32), g.astype(np.float32), False
                ),
                0,
            )
        for i in range(2):
            ours = got[f"gradcam_map_{method}"][i]
            if their_raw[i].max() == 0:  # every channel weighs against the class: an empty map
                assert np.all(ours == 0), f"{name} {method} sample {i}: expected an empty map"
                continue
            if their_raw[i].max() > 1e-5:
                c = corr(ours, theirs[i])
            else:
                # pytorch-grad-cam normalises with (x - min) / (max + 1e-7): below ~1e-5 that epsilon
                # flattens its map (random weights make mobilenet_v3's ~1e-10), so compare with its
                # own raw map resized and normalised without an epsilon
                up = resize(their_raw[i], 224)
                c = corr(ours, (up - up.min()) / (up.max() - up.min()))
            assert c >= 0.999, f"{name} {method} sample {i}: correlation {c:.5f}"


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_guided_backprop_for_the_whole_batch(name: str, tmp_path: Path) -> None:
    src = export(name, CACHE)
    out = tmp_path / f"{name}.guided.onnx"
    prepare(src, out, guided=True)
    x = np.random.RandomState(1).randn(4, 3, 224, 224).astype(np.float32)
    classes = np.array([1, 5, 9, 200], np.int64)
    sess = cpu_session(out.read_bytes())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))
    gbm = pgc.GuidedBackpropReLUModel(_net(name), device=torch.device("cpu"))
    for i in range(4):  # pytorch-grad-cam explains one image per call; we do the whole batch at once
        ref = gbm(torch.from_numpy(x[i : i + 1]), target_category=int(classes[i])).transpose(2, 0, 1)
        ours = got["gradcam_guided_backprop"][i]
        if name == "resnet18":
            err = rel_err(ours, ref)
            assert err < 1e-4, f"{name} sample {i}: guided backprop error {err:.2e}"
        else:
            # vgg16 chains 13 convolutions and 15 ReLU masks: float32 rounding that differs between
            # torch's and onnxruntime's convolutions flips a few near-zero ReLU/MaxPool decisions on
            # some samples (measured: 0 of 4 samples' pixels for seeds where none flips, up to 4%
            # of pixels off by up to 6e-3 of the largest value otherwise). Everything else agrees to 1e-4.
            off = np.abs(ours - ref) > 1e-4 * np.abs(ref).max()
            assert off.mean() < 0.05, f"{name} sample {i}: {off.mean():.2%} of the values differ"
            assert rel_err(ours, ref) < 1e-2
            assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99999
        expected = got["gradcam_guided_backprop"][i] * got["gradcam_map"][i][None]
        np.testing.assert_allclose(got["gradcam_guided"][i], expected, rtol=1e-6, atol=1e-12)
    assert not np.allclose(got["gradcam_guided_backprop"][0], got["gradcam_guided_backprop"][1])


def test_several_feature_layers_give_one_map_each_and_their_mean(tmp_path: Path) -> None:
    src = export("resnet18", CACHE)
    import onnx

    nodes = onnx.load(str(src), load_external_data=False).graph.node
    layer3 = [n for n in nodes if n.name.startswith("/layer3/")][-1].output[0]
    layer4 = [n for n in nodes if n.name.startswith("/layer4/")][-1].output[0]
    out = tmp_path / "two_layers.onnx"
    report = prepare(src, out, feature_layer=[layer3, layer4])
    assert report.feature_tensors == (layer3, layer4)
    x = np.random.RandomState(2).rand(2, 3, 224, 224).astype(np.float32)
    sess = cpu_session(out.read_bytes())
    got = dict(
        zip(
            [o.name for o in sess.get_outputs()],
            sess.run(None, {"input": x, "gradcam_class": np.array(CLASSES, np.int64)}),
        )
    )
    net = _net("resnet18")
    store: dict[str, object] = {}
    for name, module in (("l3", net.layer3), ("l4", net.layer4)):

        def hook(_m, _i, o, name=name):  # type: ignore[no-untyped-def]
            store[name] = o
            o.register_hook(lambda grad, name=name: store.__setitem__(name + "g", grad))

        module.register_forward_hook(hook)
    net(torch.from_numpy(x))[torch.arange(2), torch.tensor(CLASSES)].sum().backward()
    maps = []
    for j, name in enumerate(("l3", "l4")):
        a = store[name].detach().numpy()  # type: ignore[union-attr]
        g = store[name + "g"].numpy()  # type: ignore[union-attr]
        raw = np.maximum(numpy_method("gradcam", a, g), 0)
        assert rel_err(got[f"gradcam_raw_layer{j}"], raw) < 1e-4
        maps.append(got[f"gradcam_map_layer{j}"])
        for i in range(2):
            up = resize(raw[i], 224)
            if up.max() > up.min():
                assert corr(got[f"gradcam_map_layer{j}"][i], (up - up.min()) / (up.max() - up.min())) > 0.9999
    mean = (maps[0] + maps[1]) / 2
    for i in range(2):  # gradcam_map = the per-layer normalised maps' mean, normalised again
        expected = (mean[i] - mean[i].min()) / (mean[i].max() - mean[i].min())
        np.testing.assert_allclose(got["gradcam_map"][i], expected, atol=1e-5)
