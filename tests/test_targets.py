"""Issue 5: targets beyond classification — segmentation, detection, regression, 1-D and 3-D.

Each test compares the prepared model with a reference (torch autograd; finite differences for
the real PaddleOCR detector). The toy models trained here (seconds on 2 cores, fixed seeds) also
check that the map lands where the evidence is. Measured errors and distances are recorded as
junit properties: `pytest tests/test_targets.py --junitxml=report.xml` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.utils import Extractor

from onnx_gradcam import LayerNotFoundError, box_seed, output_seed, prepare, region_seed
from onnx_gradcam.surgery.load import upgrade_opset

from .conditioning import derived_tolerances, per_sample_error, well_conditioned, with_nudged
from .conftest import cpu_session, rel_err
from .float64 import directional_errors
from .thirdparty import rapidocr_model
from .torch_ref import autograd_at, forward_at, gradcam_reference, hooked, with_raw

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import CONDITIONING, conditioned  # noqa: E402

CACHE = ROOT / ".cache" / "models"
EXACT = 1e-4  # relative to the reference's largest magnitude


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = cpu_session(path.read_bytes())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def export(model, x, path: Path, output: str = "out") -> Path:  # type: ignore[no-untyped-def]
    torch.onnx.export(
        model.eval(),
        torch.from_numpy(x[:1]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=[output],
        dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}},
    )
    return path


def train(model, x: np.ndarray, y: np.ndarray, loss_fn, epochs: int, lr: float = 3e-3) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def normalised(m: np.ndarray) -> np.ndarray:
    """Per-sample min-max to [0, 1], as the prepared model does."""
    axes = tuple(range(1, m.ndim))
    lo, hi = m.min(axis=axes, keepdims=True), m.max(axis=axes, keepdims=True)
    return (m - lo) / np.where(hi > lo, hi - lo, 1)


def upsampled(raw: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """torch's (bi/tri)linear interpolation, align_corners=False (half-pixel), of [N, *spatial]."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    t = torch.from_numpy(np.ascontiguousarray(raw, np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=size, mode=mode, align_corners=False)[:, 0].numpy()


def peak(m: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(m), m.shape))


# -- segmentation --------------------------------------------------------------------------


class SegOut(nn.Module):
    def __init__(self, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.net = net

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)["out"]


# model -> [(torch module, ONNX tensor)] for the default feature layer, then a backbone layer
SEGMENTATION = {
    "fcn_resnet50": [
        ("classifier.2", "/net/classifier/classifier.2/Relu_output_0"),
        ("backbone.layer4", "/net/backbone/layer4/layer4.2/relu_2/Relu_output_0"),
    ],
    "lraspp_mobilenet_v3_large": [
        # LR-ASPP adds a classifier of backbone.4 ('low') to one of backbone.16 ('high'):
        # backbone.4's output is the last tensor that every path to the output crosses
        ("backbone.4", "/net/backbone/backbone.4/block/block.3/block.3.0/Conv_output_0"),
        ("backbone.16", "/net/backbone/backbone.16/backbone.16.2/HardSwish_output_0"),
    ],
}


SEG_SIZE = 96  # few enough ReLU inputs in the heads that none sits at float32's rounding of zero


@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_segmentation_region_maps_equal_autograd(name: str, tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    s = SEG_SIZE
    net = SegOut(getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None))
    net = conditioned(f"targets_{name}_{s}", net, (8, 3, s, s), CACHE)
    x = with_nudged(np.random.RandomState(0).rand(2, 3, s, s))  # and a 1e-6 nudge: the same verdict
    src = CACHE / f"targets_{name}_{s}.{CONDITIONING}.onnx"
    if not src.exists():
        export(net, x, src)
    # two samples, two classes, two regions: each sample's map must follow its own seed
    seed = np.concatenate(
        [region_seed([1, 21, s, s], 15, (24, 18, 72, 60)), region_seed([1, 21, s, s], 3, (0, 0, 48, 96))] * 2
    )

    def score(y):  # type: ignore[no-untyped-def]
        return (y * torch.from_numpy(seed).to(y.dtype)).sum()

    for which, (module, tensor) in zip(("default", "backbone"), SEGMENTATION[name]):
        out = tmp_path / f"{which}.onnx"
        report = prepare(
            src, out, target="seed", feature_layer=None if which == "default" else tensor, expose_gradient=True
        )
        assert report.feature_tensor == tensor, f"{name}: default feature layer {report.feature_tensor!r}"
        got = run(out, {"input": x, "gradcam_seed": seed})
        fwd, tols = derived_tolerances(forward_at(net, f"net.{module}"), x, EXACT, f"{name} {module}")
        head = autograd_at(net, f"net.{module}", score, features=got["gradcam_features"])
        ref = well_conditioned(with_raw(head), x, EXACT, f"{name} {module}")
        raw = ref["raw"]
        errors = {
            "gradient": per_sample_error(got["gradcam_gradient"], ref["g"]),
            "raw": per_sample_error(got["gradcam_raw"], raw),
            "map": rel_err(got["gradcam_map"], normalised(upsampled(raw, (s, s)))),
            "score": rel_err(got["gradcam_score"], (ref["out"] * seed).sum((1, 2, 3))),
        }
        for key, value in errors.items():
            record_property(f"{which}:{module}:{key}", f"{value:.2e}")
        print(f"{name} at {module}: relative errors {errors}")
        assert max(errors.values()) < EXACT, f"{name} at {module} ({tensor}): relative errors {errors}"
        # the ONNX tensor is torch's `module` output (a forward comparison: its tolerance is derived)
        assert per_sample_error(got["gradcam_features"], fwd["a"]) < tols["a"]


# -- the real PaddleOCR text detector ------------------------------------------------------


def text_image() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A 320x160 picture of two words, ImageNet-normalised [1, 3, 160, 320]; the words' boxes."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (320, 160), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=28)
    words = [((20, 20), "Hello world"), ((150, 100), "ONNX")]
    boxes = []
    for xy, text in words:
        draw.text(xy, text, fill="black", font=font)
        boxes.append(tuple(int(v) for v in draw.textbbox(xy, text, font=font)))
    x = ((np.asarray(img, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    return x[None].astype(np.float32), boxes  # type: ignore[return-value]


def inside(point: tuple[int, int], box: tuple[int, int, int, int], margin: int = 0) -> bool:
    """(x, y) in box (x0, y0, x1, y1), x1 and y1 exclusive, widened by margin pixels."""
    return box[0] - margin <= point[0] < box[2] + margin and box[1] - margin <= point[1] < box[3] + margin


def test_paddle_text_detector_region_maps(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    x, words = text_image()
    src = rapidocr_model("ch_PP-OCRv4_det_infer.onnx")  # DBNet, opset 12, dynamic H and W
    out = tmp_path / "det.gradcam.onnx"
    report = prepare(src, out, target="seed", expose_gradient=True, methods=["gradcam", "hirescam"])
    # the score: the probability map (the output) summed over a region around one word,
    # one region per sample of a batch of two copies of the image
    regions = [(max(x0 - 6, 0), max(y0 - 6, 0), min(x1 + 6, 320), min(y1 + 6, 160)) for x0, y0, x1, y1 in words]
    seed = np.concatenate([region_seed([1, 1, 160, 320], 0, r) for r in regions])
    got = run(out, {"x": np.concatenate([x, x]), "gradcam_seed": seed})
    prob = got[onnx.load(str(src), load_external_data=False).graph.output[0].name]
    head = Extractor(upgrade_opset(onnx.load(str(src)))).extract_model(
        [report.feature_tensor], [report.reduction_tensor]
    )
    for i, region in enumerate(regions):
        assert prob[i, 0, region[1] : region[3], region[0] : region[2]].max() > 0.5, "the detector sees no text"
        # Grad-CAM's channel weights are a mean over the whole map, so every word's features
        # light up: its peak lies on text, not necessarily on this word. HiResCAM (gradient ⊙
        # features, Draelos & Carin 2020) keeps the gradient's location: its peak is in the region.
        gradcam_peak = peak(got["gradcam_map"][i])[::-1]
        hires_peak = peak(got["gradcam_map_hirescam"][i])[::-1]
        record_property(f"region{i}:{region}:gradcam_peak", gradcam_peak)
        record_property(f"region{i}:{region}:hirescam_peak", hires_peak)
        assert any(inside(gradcam_peak, w, margin=4) for w in words), f"Grad-CAM peak {gradcam_peak} off {words}"
        assert inside(hires_peak, region), f"HiResCAM peak {hires_peak} outside the region {region}"
        # dS/dA against float64 central differences of S through the head fed the prepared
        # model's own A, along random directions v: (S(A + εv) - S(A - εv)) / 2ε = <dS/dA, v>
        err, steps = directional_errors(
            head,
            report.feature_tensor,
            got["gradcam_features"][i : i + 1],
            got["gradcam_gradient"][i : i + 1],
            lambda y, i=i: (y * seed[i]).sum(axis=(1, 2, 3)),
        )
        record_property(f"region{i}:gradient_vs_finite_differences", f"{err:.2e}")
        record_property(f"region{i}:finite_difference_steps", f"{steps:.2e}")
        assert steps < EXACT / 10, f"region {region}: differences at two steps part by {steps:.1e} (a kink?)"
        assert err < EXACT, f"region {region}: directional derivatives differ by {err:.1e} (relative)"


# -- regression ----------------------------------------------------------------------------


def blobs(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noise with one bright Gaussian blob; targets: its (x, y) position / size."""
    rs = np.random.RandomState(seed)
    x = rs.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    pos = rs.uniform(4, size - 4, (n, 2)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i, (px, py) in enumerate(pos):
        x[i, 0] += 2.0 * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 4.0)
    return x, pos / size


def test_regression_map_equals_autograd_and_peaks_on_the_blob(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    # a position regressor keeps the layout to its linear head (Flatten, not global pooling:
    # a pooled vector has no position left but what zero padding leaks); outputs in [0, 1]
    # make the blob positive evidence for both coordinates
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 2),
    )
    x, y = blobs(1500, 0)
    train(model, x, y, nn.functional.mse_loss, epochs=6)
    src = export(model, x, tmp_path / "blob.onnx", output="position")
    out = tmp_path / "blob.gradcam.onnx"
    report = prepare(src, out, target="seed", expose_gradient=True)
    assert report.feature_tensor == "/6/Relu_output_0"  # [N, 8, 16, 16]: the last conv block
    xt, truth = blobs(16, 1)
    xt = np.concatenate([xt, xt])  # explain x (output 0) for the first 16, y (output 1) for the rest
    seed = np.concatenate([output_seed([None, 2], 0, batch=16), output_seed([None, 2], 1, batch=16)])
    got = run(out, {"input": xt, "gradcam_seed": seed})
    store = hooked(model[6])
    pred = model(torch.from_numpy(xt))
    (pred * torch.from_numpy(seed)).sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()
    errors = {
        "gradient": rel_err(got["gradcam_gradient"], g),
        "raw": rel_err(got["gradcam_raw"], gradcam_reference(a, g)),
    }
    record_property("relative_errors", errors)
    assert max(errors.values()) < EXACT, f"relative errors {errors}"
    mae = float(np.abs(pred.detach().numpy()[:16] - truth).mean() * 32)
    record_property("position_mae_px", mae)
    assert mae < 2.0, f"the regressor is off by {mae:.1f} px on average: not trained"
    dists = []
    for i in range(len(xt)):
        py, px = peak(got["gradcam_map"][i])
        dists.append(round(float(np.hypot(px - truth[i % 16, 0] * 32, py - truth[i % 16, 1] * 32)), 1))
    record_property("peak_to_blob_px", dists)
    assert max(dists) <= 4.0, f"map peaks {dists} px from the blobs' centres (tolerance 4 px)"


# -- detection -----------------------------------------------------------------------------


class TinyDetector(nn.Module):
    """YOLO-like: a conv backbone, per-cell [x, y, w, h, objectness, class scores] on a 4x4 grid."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Conv2d(32, 5 + classes, 1)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = self.head(self.backbone(x))  # [N, 5 + C, 4, 4]
        return h.flatten(2).transpose(1, 2)  # [N, cells, 5 + C], before any NMS


class WithArgMax(nn.Module):
    def __init__(self, det: TinyDetector) -> None:
        super().__init__()
        self.det = det

    def forward(self, x):  # type: ignore[no-untyped-def]
        raw = self.det(x)
        return raw, raw[:, :, 4].argmax(1)  # the best cell: not differentiable


class WithNMS(nn.Module):
    """The detector with torchvision's NMS in the graph (ONNX NonMaxSuppression), sample 0."""

    def __init__(self, det: TinyDetector) -> None:
        super().__init__()
        self.det = det

    def forward(self, x):  # type: ignore[no-untyped-def]
        raw = self.det(x)
        cells = torch.arange(16, dtype=raw.dtype)
        cx = (cells % 4 + raw[0, :, 0].sigmoid()) * 8
        cy = (cells // 4 + raw[0, :, 1].sigmoid()) * 8
        w, h = raw[0, :, 2].exp() * 8, raw[0, :, 3].exp() * 8
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        keep = torchvision.ops.nms(boxes, raw[0, :, 4].sigmoid(), 0.5)
        return raw, keep


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int, int]]]:
    """32x32 noise with one 8x8 square (class 0 bright red, class 1 bright green); YOLO targets
    per 8x8 cell: the centre's offset in the cell, log size / 8, objectness, one-hot class."""
    rs = np.random.RandomState(seed)
    x = rs.uniform(0, 0.4, (n, 3, 32, 32)).astype(np.float32)
    target = np.zeros((n, 16, 7), np.float32)
    boxes = []
    for i in range(n):
        cls = rs.randint(2)
        x0, y0 = (int(v) for v in rs.randint(0, 25, 2))
        x[i, cls, y0 : y0 + 8, x0 : x0 + 8] = 1.0
        cx, cy = x0 + 4, y0 + 4
        cell = min(cy // 8, 3) * 4 + min(cx // 8, 3)
        target[i, cell, :4] = [cx / 8 - cell % 4, cy / 8 - cell // 4, 0.0, 0.0]
        target[i, cell, 4] = 1.0
        target[i, cell, 5 + cls] = 1.0
        boxes.append((cell, cls, x0, y0, 8))
    return x, target, boxes


def detection_loss(pred, t):  # type: ignore[no-untyped-def]
    """Objectness and classes: binary cross-entropy; box centre and size at the object's cell."""
    obj = t[:, :, 4:5]
    conf = nn.functional.binary_cross_entropy_with_logits(pred[:, :, 4:], t[:, :, 4:])
    xy = (obj * (pred[:, :, :2].sigmoid() - t[:, :, :2]) ** 2).sum() / obj.sum()
    wh = (obj * (pred[:, :, 2:4] - t[:, :, 2:4]) ** 2).sum() / obj.sum()
    return conf + xy + wh


def test_detection_box_map_equals_autograd_and_peaks_in_the_box(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    det = TinyDetector()
    x, target, _ = squares(2000, 0)
    train(det, x, target, detection_loss, epochs=12, lr=5e-3)
    src = export(det, x, tmp_path / "det.onnx", output="raw")
    xt, _, boxes = squares(16, 1)
    cells = [cell for cell, *_ in boxes]
    # explain the true class's score at the cell responsible for each square
    seed = box_seed([None, 16, 7], cells, [cls for _, cls, *_ in boxes], batch=16)
    # the default layer (the backbone's output, 4x4: one cell per 8x8 box) and the last conv's
    # ReLU before the last pooling (8x8), where a map can say where in a cell the evidence is
    layers = {
        "default": (det.backbone, "/backbone/backbone.8/MaxPool_output_0"),
        "last_conv": (det.backbone[7], "/backbone/backbone.7/Relu_output_0"),
    }
    stores = {which: hooked(module) for which, (module, _) in layers.items()}
    pred = det(torch.from_numpy(xt))
    (pred * torch.from_numpy(seed)).sum().backward()
    top1 = float((pred[:, :, 4].argmax(1).numpy() == cells).mean())
    record_property("objectness_top1_accuracy", top1)
    assert top1 >= 0.9, f"the detector finds {top1:.0%} of the squares: not trained"
    for which, (_, tensor) in layers.items():
        out = tmp_path / f"det.{which}.onnx"
        report = prepare(
            src, out, target="seed", expose_gradient=True, feature_layer=None if which == "default" else tensor
        )
        assert report.feature_tensor == tensor
        got = run(out, {"input": xt, "gradcam_seed": seed})
        a, g = stores[which]["a"].detach().numpy(), stores[which]["g"].numpy()
        errors = {
            "gradient": rel_err(got["gradcam_gradient"], g),
            "raw": rel_err(got["gradcam_raw"], gradcam_reference(a, g)),
        }
        record_property(f"{which}:relative_errors", errors)
        assert max(errors.values()) < EXACT, f"{which} layer {tensor}: relative errors {errors}"
        peaks, misses = [], []
        for i, (_cell, _cls, x0, y0, size) in enumerate(boxes):
            py, px = peak(got["gradcam_map"][i])
            peaks.append((px, py))
            if not inside((px, py), (x0, y0, x0 + size, y0 + size)):
                misses.append(f"sample {i}: peak ({px}, {py}), box ({x0}, {y0}, {x0 + size}, {y0 + size})")
        record_property(f"{which}:peaks_inside_box", f"{len(boxes) - len(misses)}/{len(boxes)}")
        if which == "last_conv":
            assert not misses, f"map peaks outside the 8x8 box (tolerance 0 px): {misses}"


@pytest.mark.parametrize("variant", ["argmax", "nms"])
def test_detection_after_a_non_differentiable_op_names_it(variant: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    det = TinyDetector().eval()
    wrapped = WithArgMax(det) if variant == "argmax" else WithNMS(det)
    src = tmp_path / f"det_{variant}.onnx"
    torch.onnx.export(
        wrapped.eval(),
        torch.rand(1, 3, 32, 32),
        str(src),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["raw", "picked"],
    )
    graph = onnx.load(str(src)).graph
    op = "ArgMax" if variant == "argmax" else "NonMaxSuppression"
    (node,) = [n for n in graph.node if n.op_type == op]
    with pytest.raises(LayerNotFoundError, match=op) as err:
        prepare(src, tmp_path / "x.onnx", target="seed", reduction_layer="picked")
    message = str(err.value)
    assert "--reduction-layer" in message and repr(node.input[0]) in message, message
    # the raw head before it is the right reduction tensor
    prepare(src, tmp_path / "y.onnx", target="seed", reduction_layer="raw")


# -- sequences and volumes -----------------------------------------------------------------


def motifs(n: int, seed: int, length: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise series; odd samples (class 1) carry a 16-step sine burst at a random place."""
    rs = np.random.RandomState(seed)
    x = rs.normal(0, 0.5, (n, 1, length)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    where = rs.randint(8, length - 24, n)
    burst = np.sin(np.linspace(0, 4 * np.pi, 16)) * 2.0
    for i in range(n):
        if y[i]:
            x[i, 0, where[i] : where[i] + 16] += burst
    return x, y, where


def test_one_dimensional_map_peaks_on_the_motif(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )
    x, y, _ = motifs(1200, 0)
    train(model, x, y, nn.functional.cross_entropy, epochs=5)
    src = export(model, x, tmp_path / "seq.onnx", output="logits")
    out = tmp_path / "seq.gradcam.onnx"
    report = prepare(src, out, expose_gradient=True)
    assert report.feature_tensor == "/7/Relu_output_0"  # [N, 32, 32]: the last conv block
    xt, yt, where = motifs(16, 1)
    got = run(out, {"input": xt, "gradcam_class": np.ones(16, np.int64)})  # explain class 1
    store = hooked(model[7])
    logits = model(torch.from_numpy(xt))
    logits[:, 1].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()
    raw = gradcam_reference(a, g)
    errors = {
        "gradient": rel_err(got["gradcam_gradient"], g),
        "raw": rel_err(got["gradcam_raw"], raw),
        "map": rel_err(got["gradcam_map"], normalised(upsampled(raw, (128,)))),  # linear, half-pixel
    }
    record_property("relative_errors", errors)
    assert max(errors.values()) < EXACT, f"relative errors {errors}"
    record_property("accuracy", float((logits.argmax(1).numpy() == yt).mean()))
    # the peak's distance to the motif [where, where + 16): 0 inside it
    offsets = [
        max(where[i] - p, p - (where[i] + 15), 0)
        for i in np.where(yt == 1)[0]
        for p in [np.argmax(got["gradcam_map"][i])]
    ]
    record_property("peak_outside_motif_steps", [int(o) for o in offsets])
    assert max(offsets) <= 4, f"map peaks {offsets} steps outside the 16-step motifs (tolerance 4 of 128)"


def test_volume_map_has_the_input_shape_and_equals_autograd(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    x = np.random.RandomState(0).randn(2, 1, 8, 12, 12).astype(np.float32)
    src = export(model, x, tmp_path / "vol.onnx", output="logits")
    out = tmp_path / "vol.gradcam.onnx"
    prepare(src, out, expose_gradient=True)
    got = run(out, {"input": x, "gradcam_class": np.array([0, 2], np.int64)})
    assert got["gradcam_map"].shape == (2, 8, 12, 12)  # trilinear to the input volume
    store = hooked(model[4])
    model(torch.from_numpy(x))[[0, 1], [0, 2]].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()
    raw = gradcam_reference(a, g)
    errors = {
        "gradient": rel_err(got["gradcam_gradient"], g),
        "raw": rel_err(got["gradcam_raw"], raw),
        "map": rel_err(got["gradcam_map"], normalised(upsampled(raw, (8, 12, 12)))),
    }
    record_property("relative_errors", errors)
    assert max(errors.values()) < EXACT, f"relative errors {errors}"


# -- the command line for seeds and signals ------------------------------------------------


def test_cli_region_box_and_signals_match_direct_runs(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner
    from PIL import Image

    from onnx_gradcam.cli import main

    torch.manual_seed(0)
    seg = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)
    ).eval()
    x = np.random.RandomState(0).rand(1, 3, 32, 32).astype(np.float32)
    src = export(seg, x, tmp_path / "seg.onnx")
    prepared = tmp_path / "seg.gradcam.onnx"
    assert (
        CliRunner()
        .invoke(main, ["prepare", str(src), "-o", str(prepared), "--target", "seed", "--preprocess", "unit"])
        .exit_code
        == 0
    )
    picture = tmp_path / "pic.png"
    Image.fromarray((x[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).resize((64, 64)).save(picture)
    res = CliRunner().invoke(
        main,
        ["explain", str(prepared), str(picture), "-o", str(tmp_path / "o"), "--class", "2", "--region", "16,8,48,40"],
    )
    assert res.exit_code == 0, res.stderr
    (entry,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert entry["class"] == 2
    # the same seed by hand: the region in image pixels (64 px) is 8..24 x 4..20 at the 32 px output
    from onnx_gradcam import Explainer

    exp = Explainer(prepared, device="cpu")
    xin = exp.to_tensor([Image.open(picture)])
    direct = exp.explain(xin, seed=region_seed([1, 3, 32, 32], 2, (8, 4, 24, 20)))
    np.testing.assert_allclose(np.load(tmp_path / "o" / entry["raw_map"]), direct.raw[0], rtol=1e-6)
    res = CliRunner().invoke(main, ["explain", str(prepared), str(picture), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "--class K" in res.stderr

    det = TinyDetector().eval()
    xd = np.random.RandomState(1).rand(1, 3, 32, 32).astype(np.float32)
    dsrc = export(det, xd, tmp_path / "det.onnx", output="raw")
    dprep = tmp_path / "det.gradcam.onnx"
    prepare(dsrc, dprep, target="seed", preprocess="unit")
    dpic = tmp_path / "det.png"
    Image.fromarray((xd[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(dpic)
    res = CliRunner().invoke(
        main, ["explain", str(dprep), str(dpic), "-o", str(tmp_path / "d"), "--box-index", "5", "--class", "1"]
    )
    assert res.exit_code == 0, res.stderr
    (entry,) = json.loads((tmp_path / "d" / "predictions.json").read_text())
    dexp = Explainer(dprep, device="cpu")
    direct = dexp.explain(dexp.to_tensor([Image.open(dpic)]), seed=box_seed([1, 16, 7], 5, 1))
    np.testing.assert_allclose(np.load(tmp_path / "d" / entry["raw_map"]), direct.raw[0], rtol=1e-6)

    seq = nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    xs = np.random.RandomState(2).randn(1, 2, 50).astype(np.float32)
    ssrc = export(seq, xs, tmp_path / "seq.onnx", output="logits")
    np.save(tmp_path / "a.npy", xs[0])
    np.savetxt(tmp_path / "b.csv", xs[0].T, delimiter=",")  # one column per channel
    res = CliRunner().invoke(
        main,
        [
            "explain",
            str(ssrc),
            str(tmp_path / "a.npy"),
            str(tmp_path / "b.csv"),
            "-o",
            str(tmp_path / "s"),
            "--class",
            "1",
        ],
    )
    assert res.exit_code == 0, res.stderr
    entries = json.loads((tmp_path / "s" / "predictions.json").read_text())
    direct = Explainer(ssrc, device="cpu").explain(xs, target=1)
    for e in entries:
        assert Image.open(tmp_path / "s" / e["overlay"]).size[0] == 800  # the signal plot
        np.testing.assert_allclose(np.load(tmp_path / "s" / e["raw_map"]), direct.raw[0], rtol=1e-5)
