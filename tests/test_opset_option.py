"""`prepare --opset N`: the model is upgraded with onnx's version converter before preparing (not
the default: the source opset is kept); the IR version stays the source's where the opset allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_gradcam.cli import main

from .conftest import cpu_session
from .models import export, tiny_cnn

torch = pytest.importorskip("torch")


def _opset(model: onnx.ModelProto) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def _maps(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = cpu_session(path.read_bytes())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


def test_prepare_opset_upgrades_and_keeps_the_maps(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    src = export(tiny_cnn(), tmp_path / "tiny12.onnx", opset=12)
    source = onnx.load(str(src))
    kept, upgraded = tmp_path / "kept.onnx", tmp_path / "upgraded.onnx"
    for out, extra in ((kept, []), (upgraded, ["--opset", "16"])):
        result = CliRunner().invoke(main, ["prepare", str(src), "-o", str(out), "--expose-gradient", *extra])
        assert result.exit_code == 0, result.output
    a, b = onnx.load(str(kept)), onnx.load(str(upgraded))
    assert (_opset(source), _opset(a), _opset(b)) == (12, 13, 16)
    assert b.ir_version == max(source.ir_version, 8)  # opset 16 needs IR 8; onnxruntime 1.31 reads <= 13
    meta = {p.key: p.value for p in b.metadata_props}
    assert meta["gradcam.source_opset"] == "12"
    assert "gradcam.source_opset" not in {p.key for p in a.metadata_props}
    x = np.random.RandomState(0).uniform(0, 1, (2, 3, 16, 16)).astype(np.float32)
    got_a, got_b = _maps(kept, x), _maps(upgraded, x)
    for name in ("probs", "gradcam_gradient", "gradcam_map"):
        np.testing.assert_allclose(got_b[name], got_a[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("source_opset", "asked", "message"),
    [(17, "16", "already has opset 17, above the requested 16"), (12, "12", "opset 12 is out of range")],
)
def test_prepare_opset_refuses_a_downgrade_or_an_old_opset(
    source_opset: int, asked: str, message: str, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    src = export(tiny_cnn(), tmp_path / "tiny.onnx", opset=source_opset)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["prepare", str(src), "-o", str(out), "--opset", asked])
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def test_prepare_help_documents_opset() -> None:
    result = CliRunner().invoke(main, ["prepare", "--help"])
    assert result.exit_code == 0
    assert "--opset" in result.output and "version converter" in result.output
