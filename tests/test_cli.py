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
    entries = json.loads((tmp_path / "predictions.json").read_text())
    assert len(entries) == 1
    entry = entries[0]
    assert entry["label"] is None and entry["method"] == "gradcam"
    labels = LABELS.read_text().split()
    assert labels[entry["class"]] == BOXES[name]["class"]  # the demo model gets it right
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
        (["explain", "{demo}", "{star}", "--class", "wolf"], "no labels"),
        (["explain", "{demo}", "{star}", "--class", "wolf", "--labels", "{labels}"], "not in the labels"),
        (["explain", "{demo}", "{star}", "--class", "9"], "out of range"),
        (["explain", "{demo}", "{star}", "--size", "huge"], "--size"),
        (["explain", "{demo}", "{star}", "--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
        (["explain", "{demo}", "nothing-here.png"], "no such file"),
        (["prepare", "{demo}", "--feature-layer", "nope"], "no tensor or node named 'nope'"),
        (["prepare", "{notonnx}"], "not a readable ONNX model"),
        (["prepare", "{demo}", "-o", "{missingdir}/x.onnx"], "does not exist"),
    ],
)
def test_bad_input_one_line_error_and_no_partial_files(tmp_path: Path, args: list[str], message: str) -> None:
    notonnx = tmp_path / "model.onnx"
    notonnx.write_text("hello")
    fmt = {
        "demo": str(DEMO),
        "star": str(SAMPLES / "star.png"),
        "labels": str(LABELS),
        "notonnx": str(notonnx),
        "missingdir": str(tmp_path / "nope"),
    }
    out = tmp_path / "out"
    argv = [a.format(**fmt) for a in args]
    if argv[0] == "explain":
        argv += ["-o", str(out)]
    code, _, err = run(*argv)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert any(message in line for line in lines), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in (["model.onnx"], ["model.onnx", "out"])


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
