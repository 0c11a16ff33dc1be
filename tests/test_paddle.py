"""Ring 3: a real model nobody here exported (PaddleOCR's text-direction classifier, opset 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.utils import Extractor

from onnx_gradcam import prepare
from onnx_gradcam.surgery.load import upgrade_opset

from .conftest import cpu_session
from .float64 import directional_errors
from .thirdparty import rapidocr_model

CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
EXACT = 1e-4  # relative to the largest directional derivative


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = rapidocr_model(CLS)
    out = tmp_path_factory.mktemp("paddle") / "cls.gradcam.onnx"
    prepare(src, out, expose_gradient=True)
    return src, out


def _text_like(n: int) -> np.ndarray:
    rs = np.random.RandomState(0)
    x = np.full((n, 3, 48, 192), 1.0, np.float32)
    for i in range(n):  # dark strokes on white, normalised as PaddleOCR does ((x - 0.5) / 0.5)
        for _ in range(12):
            r, c = rs.randint(8, 40), rs.randint(4, 180)
            x[i, :, r : r + rs.randint(2, 6), c : c + rs.randint(2, 12)] = 0.0
    return (x - 0.5) / 0.5


def test_prepared_paddle_classifier_keeps_outputs_and_gives_a_map(cls_model) -> None:
    src, out = cls_model
    original, prepared = onnx.load(str(src)), onnx.load(str(out))
    assert prepared.ir_version == original.ir_version  # IR 7 carries opset 13
    assert [o.version for o in prepared.opset_import] == [13]  # upgraded from opset 11
    onnx.checker.check_model(prepared, full_check=True)
    x = _text_like(2)
    sess = cpu_session(prepared.SerializeToString())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    ref = cpu_session(src.read_bytes()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got[original.graph.output[0].name], ref)
    m = got["gradcam_map"]
    assert m.shape == (2, 48, 192)
    assert np.all(np.isfinite(m)) and m.min() >= 0.0 and m.max() <= 1.0
    assert m.max() == pytest.approx(1.0, abs=1e-6)


def _engine_and_head(src: Path, prepared: onnx.ModelProto, feature: str, logits: str, x: np.ndarray, cls: int):  # type: ignore[no-untyped-def]
    """(the prepared model's outputs for class `cls`, the source's head feature -> logits)."""
    head = Extractor(upgrade_opset(onnx.load(str(src)))).extract_model([feature], [logits])
    sess = cpu_session(prepared.SerializeToString())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "gradcam_class": np.array([cls])})))
    score = cpu_session(head.SerializeToString()).run(None, {feature: got["gradcam_features"]})[0][0, cls]
    np.testing.assert_allclose(score, got["gradcam_score"][0], rtol=1e-5)
    return got, head


def _directional(got: dict[str, np.ndarray], head: onnx.ModelProto, feature: str, cls: int) -> tuple[float, float]:
    """The engine's dS/dA against float64 central differences of the head (tests/float64.py)."""
    err, steps = directional_errors(
        head, feature, got["gradcam_features"], got["gradcam_gradient"], lambda y: y[:, cls], directions=16
    )
    print(f"{feature} class {cls}: directional error {err:.2e}, step agreement {steps:.2e}")
    return err, steps


def test_paddle_gradient_matches_finite_differences(cls_model) -> None:
    src, out = cls_model
    prepared = onnx.load(str(out))
    meta = {p.key: p.value for p in prepared.metadata_props}
    feature, logits = meta["gradcam.feature_tensor"], meta["gradcam.reduction_tensor"]
    x = _text_like(1)
    for cls in (0, 1):
        got, head = _engine_and_head(src, prepared, feature, logits, x, cls)
        err, steps = _directional(got, head, feature, cls)
        assert steps < EXACT / 10, f"class {cls}: differences at two steps part by {steps:.1e} (a kink in the step)"
        assert err < EXACT, f"class {cls}: directional derivatives differ by {err:.1e}"


def test_paddle_earlier_block_with_dynamic_convs_matches_finite_differences(tmp_path: Path) -> None:
    # a residual block before the end: depthwise and 1x1 Conv on dynamic H x W, BatchNorm,
    # hard-swish as Add/Clip/Mul/Div, squeeze-excitation (GAP, Conv, Relu, HardSigmoid, Mul), MaxPool
    src = rapidocr_model(CLS)
    out = tmp_path / "cls_block.gradcam.onnx"
    report = prepare(src, out, feature_layer="elementwise_add_5", expose_gradient=True)
    prepared = onnx.load(str(out))
    ops = {n.op_type for n in prepared.graph.node if n.name.startswith("gradcam/")}
    assert {"ConvTranspose", "ScatterElements", "Pad"} <= ops
    cls = 1
    got, head = _engine_and_head(src, prepared, report.feature_tensor, report.reduction_tensor, _text_like(1), cls)
    # float64 differences at steps 1e-5 and 1e-6: a kink (Clip, Relu, MaxPool tie) inside the step
    # would part them; float32 ones stalled at ~0.5% here (rounding and kinks within a 1e-3 step)
    err, steps = _directional(got, head, report.feature_tensor, cls)
    assert steps < EXACT / 10, f"differences at two steps part by {steps:.1e} (a kink in the step)"
    assert err < EXACT, f"directional derivatives differ by {err:.1e}"
