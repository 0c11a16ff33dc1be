"""The self-check (issue 10 §1): every artifact that would not run, or would break the contract, is
refused with one line naming the failing appended node and op, and no file is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto
from onnxconverter_common import float16

from onnx_gradcam import Explainer, VerificationError, prepare_model
from onnx_gradcam.cli import main
from onnx_gradcam.surgery import cam
from onnx_gradcam.surgery import prepare as surgery

from .conftest import cpu_session, rel_err
from .models import handmade


def broken_map(dtype: int):  # -> a stand-in for cam.normalise that emits a wrong element type
    original = cam.normalise

    def normalise(b, x, rank):  # type: ignore[no-untyped-def]
        return b.op("Cast", [original(b, x, rank)], hint="broken", to=dtype)

    return normalise


def test_a_wrong_dtype_in_an_appended_node_names_it_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cam, "normalise", broken_map(TensorProto.DOUBLE))
    src = tmp_path / "m.onnx"
    onnx.save(handmade(), str(src))
    out = tmp_path / "m.gradcam.onnx"
    result = CliRunner().invoke(main, ["prepare", str(src), "-o", str(out)])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "does not load in onnxruntime at node 'gradcam/broken_node' (Cast, appended by onnx-gradcam)" in line
    assert "tensor(double)" in line and "gradcam_map" in line  # onnxruntime's own words
    assert "feature tensor 'features', reduction tensor 'logits'" in line and "--feature-layer" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(VerificationError) as info:
        prepare_model(handmade())
    assert (info.value.node, info.value.op_type) == ("gradcam/broken_node", "Cast")

    # --no-verify writes it: what the flag gives up is exactly this check
    result = CliRunner().invoke(main, ["prepare", str(src), "-o", str(out), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    assert "verified:        no (--no-verify)" in result.stdout
    with pytest.raises(Exception, match="gradcam/broken_node"):
        cpu_session(out.read_bytes())


def test_a_node_that_fails_at_run_time_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    original = cam.normalise

    def normalise(b, x, rank):  # type: ignore[no-untyped-def]
        # 64 values per sample cannot take the shape [-1, 7]: only running the model shows it
        odd = b.op("Reshape", [original(b, x, rank), b.const(np.array([-1, 7], np.int64))], hint="odd")
        return b.op("Reshape", [odd, b.const(np.array([-1, 8, 8], np.int64))], hint="back")

    monkeypatch.setattr(cam, "normalise", normalise)
    with pytest.raises(VerificationError) as info:
        prepare_model(handmade())
    message = str(info.value)
    assert info.value.node == "gradcam/odd_node" and info.value.op_type == "Reshape", message
    assert "fails in onnxruntime on a probe batch (input [1, 3, 8, 8])" in message


def test_a_map_outside_0_1_breaks_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    original = cam.normalise

    def normalise(b, x, rank):  # type: ignore[no-untyped-def]
        return b.op("Mul", [original(b, x, rank), b.const(np.array(2.0, np.float32))], hint="doubled")

    monkeypatch.setattr(cam, "normalise", normalise)
    with pytest.raises(VerificationError) as info:
        prepare_model(handmade())
    message = str(info.value)
    assert "breaks its contract: output 'gradcam_map' has values in [0, 2], not in [0, 1]" in message
    assert "made by node 'gradcam/doubled_node' (Mul)" in message


def test_a_changed_original_output_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # a prepare that rewired an original output (here: logits computed without the Gemm's bias)
    original = surgery.prepare_model

    def rewired(model, **kwargs):  # type: ignore[no-untyped-def]
        prepared, report = original(model, **kwargs)
        fc = next(n for n in prepared.graph.node if n.name == "fc")
        fc.attribute.append(onnx.helper.make_attribute("alpha", 0.5))
        return prepared, report

    monkeypatch.setattr(surgery, "prepare_model", rewired)
    with pytest.raises(VerificationError) as info:
        prepare_model(handmade())
    message = str(info.value)
    assert "its original output 'logits' differs from the source model's by 0.5 of its largest magnitude" in message
    assert "made by node 'fc' (Gemm)" in message


def test_explain_on_a_plain_model_checks_what_it_prepared_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cam, "normalise", broken_map(TensorProto.DOUBLE))
    with pytest.raises(VerificationError, match="gradcam/broken_node"):
        Explainer(handmade(), device="cpu")
    src = tmp_path / "m.onnx"
    onnx.save(handmade(), str(src))
    with pytest.raises(VerificationError, match="appended by onnx-gradcam"):
        Explainer(src, device="cpu")


def test_explain_cli_checks_a_plain_model_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cam, "normalise", broken_map(TensorProto.DOUBLE))
    src = tmp_path / "m.onnx"
    onnx.save(handmade(), str(src))
    image = str(Path(__file__).resolve().parent.parent / "models" / "samples" / "star.png")
    out = tmp_path / "out"
    checked = CliRunner().invoke(main, ["explain", str(src), image, "-o", str(out), "--device", "cpu"])
    assert checked.exit_code == 1 and "does not load in onnxruntime at node 'gradcam/" in checked.stderr
    # unchecked, the same model fails later, when explain's own session loads it
    unchecked = CliRunner().invoke(main, ["explain", str(src), image, "-o", str(out), "--device", "cpu", "--no-verify"])
    assert unchecked.exit_code == 1 and "onnxruntime cannot load the model" in unchecked.stderr
    assert "appended by onnx-gradcam" not in unchecked.stderr
    assert not out.exists()


def test_a_good_model_passes_and_its_probe_matches_a_direct_run(tmp_path: Path) -> None:
    from onnx_gradcam.explain.verify import probe_feeds, verify_prepared

    model = handmade()
    prepared, report = surgery.prepare_model(model)
    checked = verify_prepared(model, prepared, report)
    assert checked.probe == {"input": (1, 3, 8, 8)}
    assert checked.max_difference <= 1e-6  # the same nodes: equal up to fusion order
    sess = cpu_session(model.SerializeToString())
    feeds = probe_feeds(sess)
    assert feeds["input"].dtype == np.float32 and 0.0 <= feeds["input"].min() < feeds["input"].max() < 1.0
    got = cpu_session(prepared.SerializeToString()).run(["logits"], feeds)[0]
    assert rel_err(got, sess.run(["logits"], feeds)[0]) <= 1e-6


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_float16_models_are_written_only_once_they_run(tmp_path: Path, keep_io_types: bool) -> None:
    # issue 10: prepare printed 'wrote' and onnxruntime then refused the file (gradcam/raw_node
    # declared float32 but computing float16); now the file loads and keeps the contract's types
    demo = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "demo.onnx"))
    src = tmp_path / "demo16.onnx"
    onnx.save(float16.convert_float_to_float16(demo, keep_io_types=keep_io_types), str(src))
    result = CliRunner().invoke(main, ["prepare", str(src)])
    assert result.exit_code == 0, result.stderr
    assert "verified:        loads and runs" in result.stdout
    sess = cpu_session((tmp_path / "demo16.gradcam.onnx").read_bytes())
    types = {o.name: o.type for o in sess.get_outputs()}
    assert types["logits"] == ("tensor(float)" if keep_io_types else "tensor(float16)")
    assert types["gradcam_map"] == types["gradcam_raw"] == types["gradcam_score"] == "tensor(float)"
    x = np.random.default_rng(1).random((2, 3, 96, 96)).astype(np.float32 if keep_io_types else np.float16)
    maps = sess.run(["gradcam_map"], {"input": x})[0]
    assert maps.shape == (2, 96, 96) and np.isfinite(maps).all() and maps.max() == 1.0
