"""The explain layer: images in any mode, preprocessing, overlays, and the Explainer API."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnx_gradcam import BadInputError, Explainer, OnnxGradCamError, ProviderUnavailableError, overlay, prepare_model
from onnx_gradcam.explain import session as session_module
from onnx_gradcam.explain.explainer import labels_beside, read_labels
from onnx_gradcam.explain.images import collect_inputs, load_image
from onnx_gradcam.explain.overlay import colorize, guided_image
from onnx_gradcam.explain.preprocess import InputSpec, parse_size, to_tensor
from onnx_gradcam.explain.session import create_session, cuda_available, run_session
from onnx_gradcam.surgery.prepare import PRESETS, Preprocess

from .conftest import cpu_session
from .models import handmade

# -- images ---------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # red band on the left of a wide picture
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    shown = np.asarray(load_image(path))
    assert shown.shape == (40, 20, 3)  # displayed tall
    assert shown[:10, :, 0].mean() > 200 and shown[-10:, :, 0].mean() < 50  # red band now on top


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
        ("P", lambda: Image.new("RGB", (4, 4), (10, 200, 30)).quantize(8), (10, 200, 30)),
        ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        ("I;16", lambda: Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)), (128, 128, 128)),
    ],
)
def test_modes_are_converted_to_rgb(tmp_path: Path, mode: str, make, expected) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    make().save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[0, 0], expected, atol=1)


def test_unreadable_image_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(BadInputError, match="not a readable image"):
        load_image(bad)


def test_collect_inputs_folders_globs_and_missing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.jpg", "sub/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    files, problems = collect_inputs([str(tmp_path), str(tmp_path / "sub" / "*.jpg"), str(tmp_path / "nope.png")])
    assert [f.name for f in files] == ["a.png", "b.jpg"]  # de-duplicated, text file skipped
    assert len(problems) == 1 and "nope.png" in problems[0]


# -- preprocessing -------------------------------------------------------------------------


def test_imagenet_normalisation_layouts_and_bgr() -> None:
    img = Image.new("RGB", (3, 2), (255, 128, 0))
    spec = InputSpec("input", "nchw", 3, (2, 3))
    x = to_tensor([img], spec, PRESETS["imagenet"])
    expected = (np.array([255, 128, 0]) / 255.0 - np.array(PRESETS["imagenet"].mean)) / np.array(
        PRESETS["imagenet"].std
    )
    assert x.shape == (1, 3, 2, 3)
    # float32 rounding of values up to about 2.6: absolute, as (128/255 - 0.456) / 0.224 = 0.205 cancels
    np.testing.assert_allclose(x[0, :, 1, 2], expected, rtol=0, atol=1e-6)
    nhwc = to_tensor([img], InputSpec("input", "nhwc", 3, (2, 3)), PRESETS["unit"])
    np.testing.assert_allclose(nhwc[0, 0, 0], [1.0, 128 / 255, 0.0], rtol=1e-6)
    bgr = to_tensor([img], InputSpec("input", "nhwc", 3, (2, 3)), Preprocess((0, 0, 0), (1, 1, 1), bgr=True))
    np.testing.assert_allclose(bgr[0, 0, 0], [0.0, 128 / 255, 1.0], rtol=1e-6)
    raw = to_tensor([img], spec, PRESETS["none"])
    np.testing.assert_allclose(raw[0, :, 0, 0], [255, 128, 0], rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("channels,bgr", [(3, False), (3, True), (1, False)])
def test_fused_normalisation_matches_the_float64_formula(layout: str, channels: int, bgr: bool) -> None:
    """The one multiply-add per channel against (resized / 255 - mean) / std in float64, on a photo-sized image."""
    rs = np.random.RandomState(3)
    img = Image.fromarray(rs.randint(0, 256, (375, 500, 3), np.uint8))
    pre = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), bgr=bgr)
    images = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    x = to_tensor(images, InputSpec("x", layout, channels, (96, 128)), pre)
    for i, source in enumerate(images):
        resized = np.asarray(source.resize((128, 96), Image.Resampling.BILINEAR), np.float64) / 255.0
        resized = resized[..., ::-1] if bgr else resized
        mean, std = np.asarray(pre.mean), np.asarray(pre.std)
        if channels == 1:
            expected = ((resized.mean(axis=2) - mean.mean()) / std.mean())[..., None]
        else:
            expected = (resized - mean) / std
        got = x[i].transpose(1, 2, 0) if layout == "nchw" else x[i]
        assert got.shape == expected.shape and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)  # float32 rounding of values up to 2.7


def test_layout_detection_and_size_parsing() -> None:
    assert InputSpec.from_shape("x", ["N", 224, 224, 3], None).layout == "nhwc"
    assert InputSpec.from_shape("x", ["N", 3, 224, 224], None).size == (224, 224)
    assert InputSpec.from_shape("x", ["N", 3, "h", "w"], None).size is None
    assert parse_size("224") == (224, 224) and parse_size("224x320") == (224, 320)
    with pytest.raises(BadInputError, match="--size"):
        parse_size("big")


# -- overlays ------------------------------------------------------------------------------


def test_jet_endpoints() -> None:
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]), "jet")
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 128])  # dark blue
    np.testing.assert_array_equal(rgb[0, 1], [128, 255, 128])  # green-ish middle
    np.testing.assert_array_equal(rgb[0, 2], [128, 0, 0])  # dark red


def test_overlay_hot_pixels_lie_where_the_map_is_high() -> None:
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    cam = np.zeros((6, 8), np.float32)
    cam[1, 6] = 1.0  # high near the top right
    out = np.asarray(overlay(image, cam, "jet", 0.5)).astype(int)
    assert out.shape == (60, 80, 3)  # at the image's own size
    redness = out[..., 0] - out[..., 2]
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert 5 <= y <= 25 and 55 <= x <= 75
    np.testing.assert_array_equal(np.asarray(overlay(image, cam, alpha=0.0)), np.asarray(image))


def test_overlay_rejects_bad_alpha_and_colormap() -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(BadInputError, match="alpha"):
        overlay(image, np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(BadInputError, match="colormap"):
        overlay(image, np.zeros((2, 2)), colormap="rainbow-unicorn")


def test_guided_image_is_deprocessed_like_pytorch_grad_cam() -> None:
    g = np.random.RandomState(0).randn(3, 5, 4)
    img = np.asarray(guided_image(g)).astype(np.float64) / 255
    ref = np.clip((g - g.mean()) / (g.std() + 1e-5) * 0.1 + 0.5, 0, 1).transpose(1, 2, 0)
    np.testing.assert_allclose(img, ref, atol=1 / 255)


# -- the Explainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared() -> onnx.ModelProto:
    model, _ = prepare_model(handmade())
    return model


def _direct(model: onnx.ModelProto, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    sess = cpu_session(model.SerializeToString())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x, "gradcam_class": classes})))


def test_explainer_equals_a_direct_onnxruntime_run_and_batches(prepared: onnx.ModelProto) -> None:
    x = np.random.RandomState(0).randn(5, 3, 8, 8).astype(np.float32)
    direct = _direct(prepared, x, np.array([0, 1, 2, 0, 1], np.int64))
    exp = Explainer(prepared, device="cpu", batch_size=2)
    result = exp.explain(x, target=[0, 1, 2, 0, 1])
    np.testing.assert_array_equal(result.maps, direct["gradcam_map"])
    np.testing.assert_array_equal(result.raw, direct["gradcam_raw"])
    np.testing.assert_array_equal(result.logits, direct["logits"])
    assert result.probabilities is not None
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-6)
    assert result.provider == "CPUExecutionProvider" and result.method == "gradcam"
    top = Explainer(prepared, device="cpu").explain(x)
    np.testing.assert_array_equal(top.targets, direct["logits"].argmax(1))


def test_plain_model_is_prepared_in_memory(prepared: onnx.ModelProto) -> None:
    x = np.random.RandomState(1).randn(2, 3, 8, 8).astype(np.float32)
    plain = Explainer(handmade(), device="cpu")
    assert plain.prepared_in_memory
    np.testing.assert_array_equal(plain.explain(x).maps, Explainer(prepared, device="cpu").explain(x).maps)


def test_a_prepared_file_is_read_by_onnxruntime_itself_with_the_same_results(
    prepared: onnx.ModelProto, tmp_path: Path
) -> None:
    """A prepared file goes to onnxruntime by path (no parse and re-serialisation in Python): the same
    session inputs, metadata, outputs and model as from the proto; a file prepared before the class input
    was recorded, and a plain file, still take the proto's way."""
    path = tmp_path / "m.gradcam.onnx"
    onnx.save(prepared, path)
    x = np.random.RandomState(2).randn(3, 3, 8, 8).astype(np.float32)
    by_path, by_proto = Explainer(path, device="cpu"), Explainer(onnx.load(path), device="cpu")
    assert by_path._model is None and not by_path.prepared_in_memory  # the proto is not read ...
    assert by_path.metadata == by_proto.metadata and by_path.class_input == by_proto.class_input
    assert by_path.output_names == by_proto.output_names and by_path.num_classes == by_proto.num_classes
    for target in (None, 1):
        a, b = by_path.explain(x, target), by_proto.explain(x, target)
        np.testing.assert_array_equal(a.maps, b.maps)
        np.testing.assert_array_equal(a.logits, b.logits)
    assert by_path.model.SerializeToString() == by_proto.model.SerializeToString()  # ... until it is asked

    older = onnx.load(path)
    kept = [p for p in older.metadata_props if p.key != "gradcam.class_input"]
    del older.metadata_props[:]
    older.metadata_props.extend(kept)
    onnx.save(older, tmp_path / "older.gradcam.onnx")
    old = Explainer(tmp_path / "older.gradcam.onnx", device="cpu")
    assert old._model is not None and old.class_input == by_proto.class_input
    np.testing.assert_array_equal(old.explain(x).maps, by_proto.explain(x).maps)
    onnx.save(handmade(), tmp_path / "plain.onnx")
    assert Explainer(tmp_path / "plain.onnx", device="cpu").prepared_in_memory


def test_explainer_is_thread_safe(prepared: onnx.ModelProto) -> None:
    exp = Explainer(prepared, device="cpu", batch_size=3)
    inputs = [np.random.RandomState(i).randn(4, 3, 8, 8).astype(np.float32) for i in range(8)]
    expected = [exp.explain(x, target=i % 3).maps for i, x in enumerate(inputs)]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = exp.explain(inputs[i], target=i % 3).maps

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(got[i], expected[i])


def test_targets_by_name_and_errors(prepared: onnx.ModelProto) -> None:
    x = np.random.RandomState(2).randn(2, 3, 8, 8).astype(np.float32)
    exp = Explainer(prepared, device="cpu", labels=["cat", "dog", "fox"])
    np.testing.assert_array_equal(exp.explain(x, target="fox").targets, [2, 2])
    with pytest.raises(BadInputError, match="not in the labels"):
        exp.explain(x, target="wolf")
    with pytest.raises(BadInputError, match="out of range"):
        exp.explain(x, target=7)
    with pytest.raises(BadInputError, match="no labels"):
        Explainer(prepared, device="cpu").explain(x, target="fox")


def test_top_k_explains_distinct_classes_in_order(prepared: onnx.ModelProto) -> None:
    x = np.random.RandomState(3).randn(2, 3, 8, 8).astype(np.float32)
    results = Explainer(prepared, device="cpu").explain_top_k(x, 3)
    assert results[0].logits is not None
    order = np.argsort(-results[0].logits, axis=1)
    for r, res in enumerate(results):
        np.testing.assert_array_equal(res.targets, order[:, r])


def test_result_save_writes_maps_and_summary(prepared: onnx.ModelProto, tmp_path: Path) -> None:
    x = np.random.RandomState(4).randn(2, 3, 8, 8).astype(np.float32)
    result = Explainer(prepared, device="cpu").explain(x)
    written = result.save(tmp_path / "out", ["a", "b"])
    assert [p.name for p in written] == ["a.npy", "b.npy", "result.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "b.npy"), result.maps[1])
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [s["class"] for s in summary["samples"]] == result.targets.tolist()
    pictures = [Image.new("RGB", (30, 20), (90, 90, 90)), Image.new("RGB", (10, 40), (0, 0, 0))]
    written = result.save(tmp_path / "pics", ["a", "b"], images=pictures, alpha=0.4)
    assert [p.name for p in written] == ["a.npy", "a.png", "b.npy", "b.png", "result.json"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "pics" / "b.png")), np.asarray(overlay(pictures[1], result.maps[1], alpha=0.4))
    )
    with pytest.raises(BadInputError, match="one per sample"):
        result.save(tmp_path / "x", ["only-one"])


@pytest.mark.skipif(cuda_available(), reason="checks the error raised where CUDA is absent")
def test_explicit_cuda_without_cuda_is_an_error_not_a_fallback(prepared: onnx.ModelProto) -> None:
    with pytest.raises(ProviderUnavailableError, match="--device cpu"):
        Explainer(prepared, device="cuda")
    assert Explainer(prepared, device="auto").provider == "CPUExecutionProvider"


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime's CUDAExecutionProvider and a GPU")
def test_cuda_matches_cpu(prepared: onnx.ModelProto) -> None:
    x = np.random.RandomState(5).randn(3, 3, 8, 8).astype(np.float32)
    gpu = Explainer(prepared, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu.explain(x).maps, Explainer(prepared, device="cpu").explain(x).maps, atol=1e-4)


# -- the Explainer on the bundled demo, against a direct onnxruntime run ----------------------

DEMO_DIR = Path(__file__).resolve().parent.parent / "models"


def _demo_reference(paths: list[Path]) -> dict[str, np.ndarray]:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rows = []
    for p in paths:
        rgb = Image.open(p).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
        rows.append(((np.asarray(rgb, np.float64) / 255 - mean) / std).transpose(2, 0, 1))
    model, _ = prepare_model(onnx.load(str(DEMO_DIR / "demo.onnx")))
    sess = cpu_session(model.SerializeToString())
    feeds = {"input": np.stack(rows).astype(np.float32), "gradcam_class": np.array([-1], np.int64)}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_explainer_on_image_paths_equals_a_direct_run_of_the_prepared_demo() -> None:
    paths = sorted((DEMO_DIR / "samples").glob("*.png"))
    ref = _demo_reference(paths)
    exp = Explainer(DEMO_DIR / "demo.onnx", device="cpu", batch_size=2, labels=DEMO_DIR / "labels.txt")
    result = exp.explain([str(p) for p in paths])  # 3 images in batches of 2
    assert result.logits is not None and exp.labels is not None
    np.testing.assert_allclose(result.logits, ref["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.maps, ref["gradcam_map"], atol=1e-5)
    np.testing.assert_allclose(result.raw, ref["gradcam_raw"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.targets, ref["gradcam_target"])
    assert [exp.labels[t] for t in result.targets] == [p.stem for p in paths]  # circle, star, triangle
    assert result.versions["onnx_gradcam"] and result.feature_layer == exp.metadata["feature_tensor"]


def test_softmax_output_model_reports_logits_before_softmax() -> None:
    # handmade + Softmax: the reduction tensor (pre-softmax logits) is not an output of the model
    model = handmade()
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output[0].name = "probs"
    x = np.random.RandomState(6).randn(2, 3, 8, 8).astype(np.float32)
    result = Explainer(model, device="cpu").explain(x)
    assert result.logits is not None and result.probabilities is not None
    logits = _direct(prepare_model(handmade())[0], x, np.array([-1], np.int64))["logits"]
    np.testing.assert_allclose(result.logits, logits, rtol=1e-5)
    np.testing.assert_allclose(result.scores, logits.max(1), rtol=1e-5)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(result.probabilities, e / e.sum(1, keepdims=True), rtol=1e-5)


def test_labels_are_checked_and_read_from_files(prepared: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="2 names but the model has 3 classes"):
        Explainer(prepared, device="cpu", labels=["cat", "dog"])
    path = tmp_path / "names.txt"
    path.write_text("cat\n\ndog\nfox\n")
    assert Explainer(prepared, device="cpu", labels=path).labels == ["cat", "dog", "fox"]
    assert read_labels(path) == ["cat", "dog", "fox"]
    with pytest.raises(BadInputError, match="cannot read labels file"):
        read_labels(tmp_path / "missing.txt")


def test_labels_beside_the_model(tmp_path: Path) -> None:
    model = tmp_path / "net.gradcam.onnx"
    assert labels_beside(model) is None
    (tmp_path / "labels.txt").write_text("a\n")
    assert labels_beside(model) == tmp_path / "labels.txt"
    (tmp_path / "net.labels.txt").write_text("a\n")  # MODEL.labels.txt wins, also for the prepared file
    assert labels_beside(model) == tmp_path / "net.labels.txt"


def test_inputs_that_do_not_fit_the_model(prepared: onnx.ModelProto) -> None:
    with pytest.raises(BadInputError, match="fixed at 8x8"):
        Explainer(prepared, device="cpu", size=(16, 16))
    with pytest.raises(BadInputError, match="channels"):
        Explainer(prepared, device="cpu", layout="nhwc")
    with pytest.raises(BadInputError, match="give 1 or 3"):
        Explainer(prepared, device="cpu", preprocess=Preprocess((0.5, 0.5), (0.5, 0.5)))
    exp = Explainer(prepared, device="cpu")
    with pytest.raises(BadInputError, match=r"shape \[1, 3, 9, 8\] but the model's input 'input' is \[N, 3, 8, 8\]"):
        exp.explain(np.zeros((1, 3, 9, 8), np.float32))
    with pytest.raises(BadInputError, match="2 targets for 3 inputs"):
        exp.explain(np.zeros((3, 3, 8, 8), np.float32), target=[0, 1])
    assert exp.explain(np.zeros((1, 3, 8, 8), np.float64)).maps.dtype == np.float32  # other dtypes cast


def test_onnxruntime_errors_become_one_line_package_errors(prepared: onnx.ModelProto) -> None:
    with pytest.raises(OnnxGradCamError, match="onnxruntime cannot load the model"):
        create_session(b"not a model", "cpu")
    sess, _ = create_session(prepared.SerializeToString(), "cpu")
    with pytest.raises(BadInputError, match=r"input \[1, 3, 5, 5\]") as info:
        run_session(sess, {"input": np.zeros((1, 3, 5, 5), np.float32)})
    assert "\n" not in str(info.value)


@pytest.mark.skipif(cuda_available(), reason="simulates a CUDA driver where there is none")
def test_auto_falls_back_quietly_when_the_cuda_provider_fails_to_load(
    prepared: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # a driver library that loads, but onnxruntime's CUDA provider cannot start (as with a CUDA
    # or cuDNN version mismatch): 'auto' gets the CPU with one note, no onnxruntime log lines
    monkeypatch.setattr(session_module, "_cuda_driver_present", lambda: True)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    sess, info = create_session(prepared.SerializeToString(), "auto")
    assert info.provider == "CPUExecutionProvider" == sess.get_providers()[0]
    assert info.note == "note: CUDA is not available here; running on the CPU"
    with pytest.raises(ProviderUnavailableError, match="CUDA driver found.*--device cpu"):
        create_session(prepared.SerializeToString(), "cuda")
    captured = capfd.readouterr()
    assert "onnxruntime" not in captured.err + captured.out


def test_collect_inputs_skips_the_output_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "out" / "a.gradcam.c0.png").write_bytes(b"x")
    files, _ = collect_inputs([str(tmp_path), str(tmp_path / "**" / "*.png")], exclude=tmp_path / "out")
    assert files == [tmp_path / "a.png"]
