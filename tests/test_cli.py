"""The command line, through click's CliRunner and as a real subprocess, on the bundled demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from onnx_gradcam.cli import main
from onnx_gradcam.explain.session import cuda_available

from .models import handmade

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = ROOT / "models" / "samples"
BOXES = json.loads((ROOT / "models" / "demo_boxes.json").read_text())
LABELS = ROOT / "models" / "labels.txt"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", sorted(BOXES))
def test_demo_overlay_sits_on_the_object(name: str, tmp_path: Path) -> None:
    code, _, err = run("explain", str(DEMO), str(SAMPLES / name), "-o", str(tmp_path))
    assert code == 0, err
    assert "class names from" in err  # models/labels.txt beside the model is found
    entries = json.loads((tmp_path / "predictions.json").read_text())
    assert len(entries) == 1
    entry = entries[0]
    assert entry["method"] == "gradcam" and entry["feature_layer"]
    labels = LABELS.read_text().split()
    assert labels[entry["class"]] == BOXES[name]["class"] == entry["label"]  # the demo model gets it right
    assert 0.5 < entry["probability"] <= 1.0
    original = Image.open(SAMPLES / name)
    over = Image.open(tmp_path / entry["overlay"])
    assert over.size == original.size  # the map is drawn at the image's own size
    raw = np.load(tmp_path / entry["raw_map"])
    assert raw.ndim == 2 and raw.max() > 0
    # the map's peak, upsampled to the original size, lies on the object
    up = np.asarray(Image.fromarray(raw.astype(np.float32), "F").resize(original.size, Image.Resampling.BILINEAR))
    y, x = np.unravel_index(np.argmax(up), up.shape)
    x0, y0, x1, y1 = BOXES[name]["box"]
    assert x0 <= x <= x1 and y0 <= y <= y1, f"peak ({x}, {y}) outside the object {BOXES[name]['box']}"


def test_explain_subprocess_with_labels_top_k_and_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnx_gradcam.cli",
            "explain",
            str(DEMO),
            str(SAMPLES),
            "-o",
            str(out),
            "--labels",
            str(LABELS),
            "--top-k",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((out / "predictions.json").read_text())
    assert len(entries) == 2 * len(BOXES)
    by_file: dict[str, list[dict]] = {}
    for e in entries:
        by_file.setdefault(Path(e["file"]).name, []).append(e)
    for name, items in by_file.items():
        items.sort(key=lambda e: e["rank"])
        assert items[0]["label"] == BOXES[name]["class"]
        assert items[0]["class"] != items[1]["class"]
        assert items[0]["probability"] >= items[1]["probability"]
        for e in items:
            assert (out / e["overlay"]).is_file() and (out / e["raw_map"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written outside OUTDIR


def test_class_by_name_and_method_in_names(tmp_path: Path) -> None:
    code, _, err = run(
        "explain",
        str(DEMO),
        str(SAMPLES / "star.png"),
        "-o",
        str(tmp_path),
        "--class",
        "circle",
        "--labels",
        str(LABELS),
        "--colormap",
        "turbo",
        "--alpha",
        "0.3",
    )
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "predictions.json").read_text())
    assert entry["label"] == "circle" and entry["overlay"] == "star.gradcam.c0.png"


def test_prepare_then_explain_with_methods_and_guided(tmp_path: Path) -> None:
    out = tmp_path / "demo.gradcam.onnx"
    code, stdout, err = run(
        "prepare",
        str(DEMO),
        "-o",
        str(out),
        "--method",
        "gradcam",
        "--method",
        "layercam",
        "--guided",
        "--preprocess",
        "imagenet",
    )
    assert code == 0, err
    assert "feature layer:" in stdout and str(out) in stdout
    code, _, err = run(
        "explain", str(out), str(SAMPLES / "circle.png"), "-o", str(tmp_path / "o"), "--method", "layercam"
    )
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert entry["method"] == "layercam" and ".layercam." in entry["overlay"]
    assert (tmp_path / "o" / entry["guided"]).is_file()


def test_layers_lists_candidates_and_marks_the_default() -> None:
    code, stdout, err = run("layers", str(DEMO))
    assert code == 0, err
    marked = [line for line in stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "Relu" in marked[0]
    meta = {p.key: p.value for p in onnx.load(str(DEMO)).metadata_props}
    assert not any(k.startswith("gradcam.") for k in meta)  # listing never modifies the model


def test_unreadable_image_among_good_ones(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(SAMPLES / "star.png", images / "star.png")
    (images / "broken.png").write_bytes(b"\x89PNG but not really")
    code, _, err = run("explain", str(DEMO), str(images), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "broken.png" in err and "not a readable image" in err
    entries = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(e["file"]).name for e in entries] == ["star.png"]
    assert not leftovers(tmp_path)


def test_sources_are_never_overwritten(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "star.png", tmp_path / "star.png")
    before = (tmp_path / "star.png").read_bytes()
    code, _, err = run("explain", str(DEMO), str(tmp_path / "star.png"), "-o", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "star.png").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "missing.onnx", "x.png"], "does not exist"),
        (["explain", "{notonnx}", "{star}"], "not a readable ONNX model"),
        (["explain", "{alone}", "{star}", "--class", "wolf"], "no labels"),
        (["explain", "{demo}", "{star}", "--class", "wolf", "--labels", "{labels}"], "not in the labels"),
        (["explain", "{demo}", "{star}", "--class", "9"], "out of range"),
        (["explain", "{demo}", "{star}", "--class", "4"], "has 4 classes (0..3)"),
        (["explain", "{demo}", "{star}", "--class", "-2"], "negative"),
        (["explain", "{demo}", "{star}", "--labels", "{short}"], "2 names but the model has 4 classes"),
        (["explain", "{demo}", "{star}", "--labels", "{empty}"], "is empty"),
        (["explain", "{demo}", "{star}", "--size", "huge"], "--size"),
        (["explain", "{demo}", "{star}", "--size", "64"], "fixed at 96x96"),
        (["explain", "{demo}", "{star}", "--layout", "nhwc"], "channels"),
        (["explain", "{demo}", "{star}", "--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
        (["explain", "{demo}", "{star}", "--mean", "0.5,0.5", "--std", "0.5,0.5"], "give 1 or 3"),
        (["explain", "{demo}", "{star}", "--mean", "a,b,c", "--std", "1,1,1"], "not a list of numbers"),
        (["explain", "{demo}", "nothing-here.png"], "no such file"),
        (["explain", "{demo}", "{star}", "-o", "{afile}/sub"], "cannot create the output folder"),
        (["prepare", "{demo}", "--feature-layer", "nope"], "no tensor or node named 'nope'"),
        (["prepare", "{notonnx}"], "not a readable ONNX model"),
        (["prepare", "{demo}", "-o", "{missingdir}/x.onnx"], "does not exist"),
        (["layers", "{notonnx}"], "not a readable ONNX model"),
    ],
)
def test_bad_input_one_line_error_and_no_partial_files(tmp_path: Path, args: list[str], message: str) -> None:
    given = tmp_path / "in"
    given.mkdir()
    (given / "model.onnx").write_text("hello")
    (given / "short.txt").write_text("circle\nsquare\n")
    (given / "empty.txt").write_text("\n")
    (given / "afile").write_text("a file, not a folder")
    shutil.copy(DEMO, given / "alone.onnx")  # no labels file beside it
    fmt = {
        "demo": str(DEMO),
        "alone": str(given / "alone.onnx"),
        "star": str(SAMPLES / "star.png"),
        "labels": str(LABELS),
        "notonnx": str(given / "model.onnx"),
        "short": str(given / "short.txt"),
        "empty": str(given / "empty.txt"),
        "afile": str(given / "afile"),
        "missingdir": str(tmp_path / "nope"),
    }
    before = sorted(p.name for p in given.iterdir())
    out = tmp_path / "out"
    argv = [a.format(**fmt) for a in args]
    if argv[0] == "explain" and "-o" not in argv:
        argv += ["-o", str(out)]
    code, stdout, err = run(*argv)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err + stdout
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in"], ["in", "out"])
    assert sorted(p.name for p in given.iterdir()) == before


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "{demo}"],  # no INPUT
        ["explain", "{demo}", "{star}", "--colormap", "rainbow"],
        ["explain", "{demo}", "{star}", "--alpha", "2"],
        ["explain", "{demo}", "{star}", "--upsample", "lanczos"],
        ["explain", "{demo}", "{star}", "--top-k", "0"],
        ["explain", "{demo}", "{star}", "--batch-size", "0"],
        ["explain", "{demo}", "{star}", "--device", "tpu"],
        ["explain", "{demo}", "{star}", "--labels", "no-such-labels.txt"],
        ["prepare", "{demo}", "--preprocess", "caffe"],
        ["explain", "{demo}", "{star}", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    argv = [a.format(demo=str(DEMO), star=str(SAMPLES / "star.png")) for a in args]
    code, stdout, err = run(*argv, "-o", str(tmp_path / "out")) if argv[0] == "explain" else run(*argv)
    assert code == 2, err
    assert "Error:" in err and "Traceback" not in err + stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(cuda_available(), reason="checks the error where CUDA is absent")
def test_explicit_cuda_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run("explain", str(DEMO), str(SAMPLES / "star.png"), "-o", str(tmp_path), "--device", "cuda")
    assert code == 1 and "CUDA was asked for" in err and "--device cpu" in err
    assert not any(tmp_path.iterdir())


def test_plain_model_note_and_nhwc_layout(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(handmade(), str(src))
    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "i.png")
    code, _, err = run("explain", str(src), str(tmp_path / "i.png"), "-o", str(tmp_path / "o"))
    assert code == 0, err
    assert "not prepared; preparing it in memory" in err


def test_help_texts_have_examples() -> None:
    for cmd in ([], ["prepare"], ["explain"], ["layers"]):
        code, stdout, _ = run(*cmd, "--help")
        assert code == 0 and "Example" in stdout


def _reference_run(image: Path, cls: int | None = None) -> dict[str, np.ndarray]:
    """The demo prepared in memory, run directly in onnxruntime on an independently built input."""
    from onnx_gradcam import prepare_model

    from .conftest import cpu_session

    rgb = Image.open(image).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((np.asarray(rgb, np.float64) / 255 - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]
    prepared, _ = prepare_model(onnx.load(str(DEMO)))
    sess = cpu_session(prepared.SerializeToString())
    feeds = {"input": x, "gradcam_class": np.array([-1 if cls is None else cls], np.int64)}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_predictions_and_raw_map_equal_a_direct_onnxruntime_run(tmp_path: Path) -> None:
    code, _, err = run("explain", str(DEMO), str(SAMPLES / "circle.png"), "-o", str(tmp_path), "--class", "3")
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "predictions.json").read_text())
    ref = _reference_run(SAMPLES / "circle.png", 3)
    logits = ref["logits"][0].astype(np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert entry["class"] == 3 and entry["label"] == "star"
    np.testing.assert_allclose(entry["score"], logits[3], rtol=1e-5)
    np.testing.assert_allclose(entry["probability"], probs[3], rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / entry["raw_map"]), ref["gradcam_raw"][0], rtol=1e-5, atol=1e-7)
    # the overlay is the reference map, bilinearly upsampled to the image, jet at alpha 0.5
    src = Image.open(SAMPLES / "circle.png").convert("RGB")
    up = np.asarray(Image.fromarray(ref["gradcam_map"][0], "F").resize(src.size, Image.Resampling.BILINEAR))
    t = np.clip(up, 0, 1)[..., None]
    jet = np.clip(1.5 - np.abs(4 * t - np.array([3, 2, 1])), 0, 1) * 255
    expected = 0.5 * np.asarray(src, np.float64) + 0.5 * jet
    got = np.asarray(Image.open(tmp_path / entry["overlay"]), np.float64)
    assert np.abs(got - expected).max() <= 2.0


def test_second_run_over_the_same_folder_skips_the_output_folder(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(SAMPLES / "star.png", tmp_path / "star.png")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, _, err = run("explain", str(DEMO), ".")  # default OUTDIR ./gradcam-out, inside "."
        assert code == 0, err
    entries = json.loads((tmp_path / "gradcam-out" / "predictions.json").read_text())
    assert [Path(e["file"]).name for e in entries] == ["star.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam-out", "star.png"]


def test_globs_progress_bar_and_summary(tmp_path: Path) -> None:
    code, _, err = run("explain", str(DEMO), str(SAMPLES / "*.png"), "-o", str(tmp_path), "--batch-size", "2")
    assert code == 0, err
    assert "explaining" in err and f"explained {len(BOXES)} of {len(BOXES)} images" in err
    entries = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted(Path(e["file"]).name for e in entries) == sorted(BOXES)
    code, _, err = run("explain", str(DEMO), str(SAMPLES / "star.png"), "-o", str(tmp_path / "one"))
    assert code == 0 and "explaining" not in err  # no bar for a single image


def test_exif_rotated_grey_and_16_bit_images_through_the_cli(tmp_path: Path) -> None:
    src = Image.open(SAMPLES / "triangle.png").convert("RGB").crop((0, 0, 256, 160))  # wide, object kept
    exif = src.getexif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to display"
    turned = src.transpose(Image.Transpose.ROTATE_270)  # stored sideways, displayed upright
    images = tmp_path / "imgs"
    images.mkdir()
    turned.save(images / "exif.jpg", exif=exif, quality=95)
    src.convert("L").save(images / "grey.png")
    wide = (np.asarray(src.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(images / "deep.png")
    code, _, err = run("explain", str(DEMO), str(images), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0, err
    entries = {Path(e["file"]).name: e for e in json.loads((tmp_path / "out" / "predictions.json").read_text())}
    assert sorted(entries) == ["deep.png", "exif.jpg", "grey.png"]
    assert Image.open(tmp_path / "out" / entries["exif.jpg"]["overlay"]).size == src.size  # displayed size
    assert entries["exif.jpg"]["label"] == "triangle"  # upright again, so still a triangle
    # 16-bit grey scaled to 8 bits gives the same input as 8-bit grey
    np.testing.assert_allclose(entries["deep.png"]["score"], entries["grey.png"]["score"], rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime's CUDAExecutionProvider and a GPU")
def test_explain_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    for device in ("cuda", "cpu"):
        code, _, err = run("explain", str(DEMO), str(SAMPLES), "-o", str(tmp_path / device), "--device", device)
        assert code == 0, err
    gpu = json.loads((tmp_path / "cuda" / "predictions.json").read_text())
    cpu = json.loads((tmp_path / "cpu" / "predictions.json").read_text())
    assert [e["class"] for e in gpu] == [e["class"] for e in cpu]
    np.testing.assert_allclose([e["score"] for e in gpu], [e["score"] for e in cpu], rtol=1e-3)
