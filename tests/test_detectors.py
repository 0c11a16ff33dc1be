"""Ring 2 for overlapping MaxPool and LRN: a YOLOv5s-style detector (SPPF: MaxPool k5 s1 p2 three
times) at opsets 12 and 17, and a Caffe-style AlexNet (LocalResponseNorm, MaxPool k3 s2) at opset 11,
each against torch autograd in float64 at the prepared model's own feature tensor.

Opset 12 is upgraded to 13 on load, where the MaxPool gradient is built from equality masks per
window offset; at 17 it is a scatter-add; `opset=16` upgrades the opset-12 export first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_gradcam import box_seed, prepare

from .conftest import cpu_session, rel_err
from .torch_ref import autograd_at

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from export_torchvision import condition  # noqa: E402

EXACT = 1e-4  # relative to the reference's largest magnitude


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = cpu_session(path.read_bytes())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def export(model, size: int, path: Path, opset: int) -> Path:  # type: ignore[no-untyped-def]
    torch.onnx.export(
        model.eval(),
        torch.rand(1, 3, size, size),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["out"],
        dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
    )
    return path


# -- YOLOv5s, small: the same blocks (ultralytics/yolov5 models/common.py), width 1/4 -------------


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 1), Conv(c, c, 3), shortcut

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        c = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, c, 1), Conv(c1, c, 1), Conv(2 * c, c2, 1)
        self.m = nn.Sequential(Bottleneck(c, shortcut))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c, 1), Conv(4 * c, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class YoloV5s(nn.Module):
    """Backbone (6x6 stem, C3, SPPF), PANet neck, Detect head with YOLOv5's export decode:
    [N, 3 anchors x cells over strides 8, 16, 32, 5 + classes]."""

    def __init__(self, classes: int = 2, size: int = 128) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            Conv(3, 8, 6, 2, 2),
            Conv(8, 16, 3, 2),
            C3(16, 16),
            Conv(16, 32, 3, 2),
            C3(32, 32),  # 4: P3, stride 8
            Conv(32, 64, 3, 2),
            C3(64, 64),  # 6: P4, stride 16
            Conv(64, 64, 3, 2),
            C3(64, 64),  # 8: SPPF's input, stride 32
            SPPF(64, 64),
        )
        self.lat5, self.top4 = Conv(64, 32, 1), C3(96, 32, False)
        self.lat4, self.out3 = Conv(32, 16, 1), C3(48, 16, False)
        self.down3, self.out4 = Conv(16, 16, 3, 2), C3(32, 32, False)
        self.down4, self.out5 = Conv(32, 32, 3, 2), C3(64, 64, False)
        self.no, self.na = 5 + classes, 3
        self.detect = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in (16, 32, 64))
        anchors = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]])
        self.strides = (8, 16, 32)
        for i, s in enumerate(self.strides):
            n = size // s
            yv, xv = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            self.register_buffer(f"grid{i}", torch.stack((xv, yv), 2).view(1, 1, n, n, 2).float() - 0.5)
            self.register_buffer(f"anchor{i}", anchors[i].float().view(1, self.na, 1, 1, 2))

    def forward(self, x):  # type: ignore[no-untyped-def]
        b = self.backbone
        p3 = b[:5](x)
        p4 = b[5:7](p3)
        p5 = b[7:](p4)
        h5 = self.lat5(p5)
        t4 = self.top4(torch.cat([F.interpolate(h5, scale_factor=2.0, mode="nearest"), p4], 1))
        h4 = self.lat4(t4)
        o3 = self.out3(torch.cat([F.interpolate(h4, scale_factor=2.0, mode="nearest"), p3], 1))
        o4 = self.out4(torch.cat([self.down3(o3), h4], 1))
        o5 = self.out5(torch.cat([self.down4(o4), h5], 1))
        out = []
        for i, (feat, conv) in enumerate(zip((o3, o4, o5), self.detect, strict=True)):
            n, _, h, w = feat.shape
            y = conv(feat).view(n, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            xy = (y[..., :2] * 2 + getattr(self, f"grid{i}")) * self.strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * getattr(self, f"anchor{i}")
            out.append(torch.cat((xy, wh, y[..., 4:]), -1).view(n, -1, self.no))
        return torch.cat(out, 1)


# (torch module, the tensor its output is in the TorchScript export)
SPPF_INPUT = ("backbone.8", "/backbone.8/cv3/act/Mul_output_0")


@pytest.mark.parametrize(("export_opset", "opset"), [(12, None), (17, None), (12, 16)], ids=["12", "17", "12to16"])
def test_yolov5s_box_gradient_equals_autograd(  # type: ignore[no-untyped-def]
    export_opset: int, opset: int | None, tmp_path: Path, record_property
) -> None:
    size = 128
    torch.manual_seed(0)
    net = condition(YoloV5s(size=size), (2, 3, size, size))
    src = export(net, size, tmp_path / f"yolo{export_opset}.onnx", export_opset)
    source = onnx.load(str(src))
    x = np.random.RandomState(1).uniform(0, 1, (2, 3, size, size)).astype(np.float32)
    boxes = 3 * (16 * 16 + 8 * 8 + 4 * 4)
    # box 100 (stride 8, anchor 0) for class 0 in sample 0, box 3 * 256 + 30 (stride 16) for class 1 in 1
    seed = box_seed([None, boxes, 7], [100, 3 * 256 + 30], [0, 1], batch=2)
    for which, layer in {"default": None, "sppf_input": SPPF_INPUT}.items():
        out = tmp_path / f"yolo{export_opset}.{which}.onnx"
        report = prepare(src, out, target="seed", expose_gradient=True, feature_layer=layer and layer[1], opset=opset)
        prepared = onnx.load(str(out))
        got_opset = next(i.version for i in prepared.opset_import if i.domain in ("", "ai.onnx"))
        assert got_opset == (opset or max(export_opset, 13))
        assert prepared.ir_version == max(source.ir_version, 8 if opset else 0) <= 13
        # below opset 16 SPPF's gradient comes from equality masks, from 16 on from a scatter-add
        assert any(n.op_type == "ScatterElements" for n in prepared.graph.node) == (got_opset >= 16)
        module = layer[0] if layer else _module_of(report.feature_tensor)
        got = run(out, {"input": x, "gradcam_seed": seed})
        reference = autograd_at(
            net, module, lambda y: (y * torch.from_numpy(seed).to(y.dtype)).sum(), features=got["gradcam_features"]
        )(x, "float64")
        err = rel_err(got["gradcam_gradient"], reference["g"])
        record_property(f"{which}:{report.feature_tensor}:gradient_relative_error", err)
        assert err < EXACT, f"{which} ({report.feature_tensor}): relative error {err:.2e}"


def _module_of(tensor: str) -> str:
    """The torch module whose output a default feature tensor is (forward() slices the backbone:
    its blocks export without the Sequential's scope)."""
    known = {"/backbone.4/cv3/act/Mul_output_0": "backbone.4"}
    assert tensor in known, f"unexpected default feature tensor {tensor!r}"
    return known[tensor]


# -- AlexNet as in Caffe: LRN after the first two convs, overlapping k3 s2 pooling ----------------


class _LRN(torch.autograd.Function):
    """Exports F.local_response_norm as one ONNX LRN node (as Caffe converters write it); torch's
    own export spells it out with Pad, AveragePool and an If."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):  # type: ignore[no-untyped-def]
        return F.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):  # type: ignore[no-untyped-def]
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.LocalResponseNorm):
    def forward(self, x):  # type: ignore[no-untyped-def]
        if torch.onnx.is_in_onnx_export():
            return _LRN.apply(x, self.size, self.alpha, self.beta, self.k)
        return super().forward(x)


class CaffeAlexNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 11, 4, 2),
            nn.ReLU(),
            LRN(5, alpha=0.5, beta=0.75, k=2.0),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            LRN(5, alpha=0.5, beta=0.75, k=2.0),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(32, 48, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(48, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),  # 12: the default feature tensor
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x))


def test_caffe_alexnet_lrn_and_overlapping_pooling_at_opset11(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    size = 127
    torch.manual_seed(0)
    net = condition(CaffeAlexNet(), (2, 3, size, size))
    src = export(net, size, tmp_path / "alexnet11.onnx", 11)
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    assert {"LRN", "MaxPool"} <= ops
    x = np.random.RandomState(2).uniform(0, 1, (2, 3, size, size)).astype(np.float32)
    classes = np.array([3, 7], np.int64)
    onehot = torch.from_numpy(np.eye(10)[classes])
    # the default (the last pooled map, 3x3), the last conv's ReLU (its head: MaxPool k3 s2) and the
    # first conv's ReLU (LRN, MaxPool, conv, ReLU, LRN, MaxPool, ... MaxPool)
    layers = {
        "default": ("features.12", None),
        "last_relu": ("features.11", "/features/features.11/Relu_output_0"),
        "first_relu": ("features.1", "/features/features.1/Relu_output_0"),
    }
    for which, (module, tensor) in layers.items():
        out = tmp_path / f"alexnet.{which}.onnx"
        report = prepare(src, out, expose_gradient=True, feature_layer=tensor)
        prepared = onnx.load(str(out))
        assert not any(n.op_type == "ScatterElements" for n in prepared.graph.node)  # opset 13: masks
        if tensor is None:
            assert report.feature_tensor == "/features/features.12/MaxPool_output_0"
        got = run(out, {"input": x, "gradcam_class": classes})
        reference = autograd_at(
            net, module, lambda y: (y * onehot.to(y.dtype)).sum(), features=got["gradcam_features"]
        )(x, "float64")
        err = rel_err(got["gradcam_gradient"], reference["g"])
        record_property(f"{which}:gradient_relative_error", err)
        assert err < EXACT, f"{which}: relative error {err:.2e}"
