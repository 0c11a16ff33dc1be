"""Issue 5: targets beyond classification — segmentation, detection, regression, 1-D and 3-D.

Each test compares with torch autograd; trained toy models (a few seconds on 2 cores, fixed
seeds) also check that the map lands where the evidence is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.utils import Extractor

from onnx_gradcam import LayerNotFoundError, box_seed, class_seed, output_seed, prepare, region_seed
from onnx_gradcam.surgery.load import upgrade_opset

from .conftest import cpu_session, rel_err
from .thirdparty import rapidocr_model
from .torch_ref import gradcam_reference, hooked

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

pytestmark = pytest.mark.slow
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


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
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


# -- seeds ---------------------------------------------------------------------------------


def test_seed_helpers_build_the_documented_arrays() -> None:
    s = region_seed([1, 3, 4, 5], 2, (1, 0, 3, 2))
    expected = np.zeros((1, 3, 4, 5), np.float32)
    expected[0, 2, 0:2, 1:3] = 1
    np.testing.assert_array_equal(s, expected)
    mask = np.zeros((8, 10), bool)
    mask[:4, :6] = True  # resized (nearest) to the output's 4x5
    np.testing.assert_array_equal(
        region_seed([1, 3, 4, 5], 0, mask)[0, 0], np.kron([[1, 1, 1, 0, 0]] * 2 + [[0] * 5] * 2, 1)
    )
    np.testing.assert_array_equal(class_seed([2, 3], [0, 2], batch=2), [[1, 0, 0], [0, 0, 1]])
    b = box_seed([1, 4, 7], index=2, cls=1)
    assert b.sum() == 1 and b[0, 2, 6] == 1
    np.testing.assert_array_equal(output_seed([1, 3], 2), [[0, 0, 1]])


# -- segmentation --------------------------------------------------------------------------


class SegOut(nn.Module):
    def __init__(self, net) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.net = net

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.net(x)["out"]


@pytest.mark.parametrize(
    ("name", "default_module", "backbone_module", "backbone_tensor"),
    [
        ("fcn_resnet50", "classifier.2", "backbone.layer4", "/net/backbone/layer4/layer4.2/relu_2/Relu_output_0"),
        ("lraspp_mobilenet_v3_large", None, "backbone.16", None),
    ],
)
def test_segmentation_region_maps_equal_autograd(
    name: str, default_module: str | None, backbone_module: str, backbone_tensor: str | None, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = SegOut(getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None).eval())
    x = np.random.RandomState(0).rand(2, 3, 160, 160).astype(np.float32)
    src = export(net, x, CACHE / f"{name}.onnx") if not (CACHE / f"{name}.onnx").exists() else CACHE / f"{name}.onnx"
    nodes = onnx.load(str(src), load_external_data=False).graph.node
    if backbone_tensor is None:
        backbone_tensor = [n for n in nodes if n.name.startswith("/net/backbone/backbone.16/")][-1].output[0]
    seed = np.concatenate(
        [region_seed([1, 21, 160, 160], 15, (40, 30, 120, 100)), region_seed([1, 21, 160, 160], 3, (0, 0, 80, 160))]
    )
    for which, tensor, module in (("default", None, default_module), ("backbone", backbone_tensor, backbone_module)):
        if which == "default" and module is None:
            continue
        out = tmp_path / f"{which}.onnx"
        prepare(src, out, target="seed", feature_layer=tensor, expose_gradient=True)
        got = run(out, {"input": x, "gradcam_seed": seed})
        store = hooked(net.net.get_submodule(module))
        y = net(torch.from_numpy(x))
        (y * torch.from_numpy(seed)).sum().backward()
        a, g = store["a"].detach().numpy(), store["g"].numpy()  # type: ignore[union-attr]
        assert rel_err(got["gradcam_features"], a) < 1e-4
        for i in range(2):
            assert rel_err(got["gradcam_gradient"][i], g[i]) < 1e-4, f"{name} {which} sample {i}"
            assert rel_err(got["gradcam_raw"][i], gradcam_reference(a, g)[i]) < 1e-4
        np.testing.assert_allclose(
            got["gradcam_score"], (y * torch.from_numpy(seed)).sum((1, 2, 3)).detach().numpy(), rtol=1e-4
        )
        assert got["gradcam_map"].shape == (2, 160, 160)


# -- the real PaddleOCR text detector ------------------------------------------------------


def test_paddle_text_detector_region_map(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (320, 160), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=28)
    draw.text((20, 20), "Hello world", fill="black", font=font)
    draw.text((150, 100), "ONNX", fill="black", font=font)
    x = ((np.asarray(img, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    x = x[None].astype(np.float32)
    src = rapidocr_model("ch_PP-OCRv4_det_infer.onnx")
    out = tmp_path / "det.gradcam.onnx"
    report = prepare(src, out, target="seed", expose_gradient=True, methods=["gradcam", "hirescam"])
    region = (10, 10, 200, 60)  # around "Hello world"
    seed = region_seed([1, 1, 160, 320], 0, region)
    got = run(out, {"x": x, "gradcam_seed": seed})
    prob = got[onnx.load(str(src), load_external_data=False).graph.output[0].name]
    assert prob[0, 0, region[1] : region[3], region[0] : region[2]].max() > 0.5  # it sees text there
    # Grad-CAM's channel weights are averaged over the whole map, so all text-like features light
    # up (the other word too); HiResCAM keeps the gradient's location and peaks in the region
    assert np.all(np.isfinite(got["gradcam_map"])) and got["gradcam_map"].max() == pytest.approx(1.0)
    m = got["gradcam_map_hirescam"][0]
    y, xx = np.unravel_index(np.argmax(m), m.shape)
    assert region[1] <= y < region[3] and region[0] <= xx < region[2], f"peak ({xx}, {y}) outside {region}"
    # the gradient at the feature tensor against central differences of the score, along
    # random directions, through a head model fed the feature tensor
    head = Extractor(upgrade_opset(onnx.load(str(src)))).extract_model(
        [report.feature_tensor], [report.reduction_tensor]
    )
    hs = cpu_session(head.SerializeToString())
    a, g = got["gradcam_features"], got["gradcam_gradient"].astype(np.float64)
    rs = np.random.RandomState(0)
    analytic, numeric = [], []
    for _ in range(8):
        v = rs.randn(*a.shape).astype(np.float32)
        plus, minus = hs.run(None, {report.feature_tensor: np.concatenate([a + 1e-3 * v, a - 1e-3 * v])})[0]
        numeric.append(float(((plus - minus) * seed[0]).sum()) / 2e-3)
        analytic.append(float((g * v).sum()))
    # float32 differences through ConvTranspose, BatchNorm, Relu and a sigmoid: 1e-2 of the largest
    assert rel_err(np.array(analytic), np.array(numeric)) < 1e-2


# -- regression ----------------------------------------------------------------------------


def blobs(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    pos = rs.uniform(4, size - 4, (n, 2)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i, (px, py) in enumerate(pos):
        x[i, 0] += 2.0 * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 4.0)
    return x, pos / size


def test_regression_map_equals_autograd_and_peaks_on_the_blob(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )
    x, y = blobs(1500, 0)
    train(model, x, y, nn.functional.mse_loss, epochs=6)
    src = export(model, x, tmp_path / "blob.onnx", output="position")
    out = tmp_path / "blob.gradcam.onnx"
    prepare(src, out, target="seed", expose_gradient=True)
    xt, _ = blobs(4, 1)
    seed = output_seed([1, 2], 0, batch=4)  # explain the x coordinate
    got = run(out, {"input": xt, "gradcam_seed": seed})
    store = hooked(model[6])
    pred = model(torch.from_numpy(xt))
    pred[:, 0].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()  # type: ignore[union-attr]
    assert rel_err(got["gradcam_raw"], gradcam_reference(a, g)) < 1e-4
    _, truth = blobs(4, 1)
    for i in range(4):
        py, px = np.unravel_index(np.argmax(got["gradcam_map"][i]), (32, 32))
        dist = np.hypot(px - truth[i, 0] * 32, py - truth[i, 1] * 32)
        assert dist <= 4.0, f"sample {i}: map peak {dist:.1f} px from the blob (tolerance 4 px)"


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


def squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int, int]]]:
    """32x32 noise with one 8x8 square (class 0 bright red, class 1 bright green)."""
    rs = np.random.RandomState(seed)
    x = rs.uniform(0, 0.4, (n, 3, 32, 32)).astype(np.float32)
    target = np.zeros((n, 16, 7), np.float32)
    boxes = []
    for i in range(n):
        cls = rs.randint(2)
        x0, y0 = rs.randint(0, 24, 2)
        x[i, cls, y0 : y0 + 8, x0 : x0 + 8] = 1.0
        cell = ((y0 + 4) // 8) * 4 + (x0 + 4) // 8
        target[i, cell, 4] = 1.0
        target[i, cell, 5 + cls] = 1.0
        boxes.append((cell, cls, int(x0), int(y0), int(x0) + 8))
    return x, target, boxes


def test_detection_box_map_equals_autograd_and_peaks_in_the_box(tmp_path: Path) -> None:
    torch.manual_seed(0)
    det = TinyDetector()
    x, target, _ = squares(2000, 0)

    def loss(pred, t):  # type: ignore[no-untyped-def]
        return nn.functional.binary_cross_entropy_with_logits(pred[:, :, 4:], t[:, :, 4:])

    train(det, x, target, loss, epochs=12, lr=5e-3)
    src = export(det, x, tmp_path / "det.onnx", output="raw")
    out = tmp_path / "det.gradcam.onnx"
    prepare(src, out, target="seed", expose_gradient=True)
    xt, _, boxes = squares(4, 1)
    seed = np.concatenate([box_seed([1, 16, 7], cell, cls) for cell, cls, *_ in boxes])
    got = run(out, {"input": xt, "gradcam_seed": seed})
    store = hooked(det.backbone)
    pred = det(torch.from_numpy(xt))
    (pred * torch.from_numpy(seed)).sum().backward()
    g = store["g"].numpy()  # type: ignore[union-attr]
    assert rel_err(got["gradcam_gradient"], g) < 1e-4
    for i, (_cell, _cls, x0, y0, x1) in enumerate(boxes):
        py, px = np.unravel_index(np.argmax(got["gradcam_map"][i]), (32, 32))
        assert x0 - 2 <= px < x1 + 2 and y0 - 2 <= py < y0 + 10, f"sample {i}: peak ({px}, {py}) off the box"
    # after a non-differentiable op the error names it and a tensor before it
    src2 = tmp_path / "det_argmax.onnx"
    torch.onnx.export(
        WithArgMax(det).eval(),
        torch.from_numpy(xt[:1]),
        str(src2),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["raw", "best"],
    )
    best = onnx.load(str(src2)).graph.output[1].name
    with pytest.raises(LayerNotFoundError, match="ArgMax") as err:
        prepare(src2, tmp_path / "x.onnx", target="seed", reduction_layer=best)
    assert "--reduction-layer" in str(err.value)


# -- sequences and volumes -----------------------------------------------------------------


def motifs(n: int, seed: int, length: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.normal(0, 0.5, (n, 1, length)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int64)
    where = rs.randint(8, length - 24, n)
    burst = np.sin(np.linspace(0, 4 * np.pi, 16)) * 2.0
    for i in range(n):
        if y[i]:
            x[i, 0, where[i] : where[i] + 16] += burst
    return x, y, where


def test_one_dimensional_map_peaks_on_the_motif(tmp_path: Path) -> None:
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
    prepare(src, out, expose_gradient=True)
    xt, yt, where = motifs(8, 1)
    got = run(out, {"input": xt, "gradcam_class": np.ones(8, np.int64)})
    assert got["gradcam_map"].shape == (8, 128)  # linear upsampling to the input's length
    store = hooked(model[7])
    model(torch.from_numpy(xt))[:, 1].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()  # type: ignore[union-attr]
    assert rel_err(got["gradcam_raw"], gradcam_reference(a, g)) < 1e-4
    for i in np.where(yt == 1)[0]:
        peak = int(np.argmax(got["gradcam_map"][i]))
        assert where[i] - 8 <= peak <= where[i] + 24, (
            f"sample {i}: peak at {peak}, motif at {where[i]}..{where[i] + 16}"
        )


def test_volume_map_has_the_input_shape_and_equals_autograd(tmp_path: Path) -> None:
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
    prepare(src, out)
    got = run(out, {"input": x, "gradcam_class": np.array([0, 2], np.int64)})
    assert got["gradcam_map"].shape == (2, 8, 12, 12)  # trilinear to the input volume
    store = hooked(model[4])
    model(torch.from_numpy(x))[[0, 1], [0, 2]].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()  # type: ignore[union-attr]
    assert rel_err(got["gradcam_raw"], gradcam_reference(a, g)) < 1e-4


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
