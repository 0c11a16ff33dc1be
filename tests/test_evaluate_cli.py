"""onnx_gradcam.evaluate() and `onnx-gradcam evaluate` on the demo model: metrics.json holds what
the metric functions return when called directly, and bad input is one line, an exit code, no file."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnx_gradcam
from onnx_gradcam import Explainer, OnnxGradCamError, prepare, prepare_model
from onnx_gradcam.api import layers as list_layers
from onnx_gradcam.cli import main
from onnx_gradcam.evaluation.base import MetricResult, make_context
from onnx_gradcam.evaluation.run import EXPLAINER, METRICS, default_metrics
from onnx_gradcam.surgery.load import file_sha256, load_model

from .demo_set import DEMO, demo_set

LABELS = (DEMO.parent / "labels.txt").read_text().split()
N = 4  # one image per class; ROAD's imputation (a sparse solve per image and percentile) dominates the time
METHODS = ["gradcam", "gradcam++"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """N demo pictures as PNG files and their boxes file (true classes as label names)."""
    folder = tmp_path_factory.mktemp("evalset")
    images, classes, boxes = demo_set(N, seed=7)
    paths, entries = [], {}
    for i, (img, cls, box) in enumerate(zip(images, classes, boxes)):
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(path)
        entries[path.name] = {"class": LABELS[cls], "box": [int(v) for v in box]}
    boxes_file = folder / "boxes.json"
    boxes_file.write_text(json.dumps(entries))
    return {"folder": folder, "paths": paths, "images": images, "classes": classes, "boxes": boxes_file}


@pytest.fixture(scope="module")
def evaluated(data: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("evalout") / "run"
    result = onnx_gradcam.evaluate(
        DEMO, data["paths"], boxes=data["boxes"], methods=METHODS, out_dir=out, device="cpu", threads=1, batch_size=16
    )
    return result, json.loads((out / "metrics.json").read_text())


def _close(got: object, want: object, where: str) -> None:
    """JSON values equal, numbers to 1e-6 relative (another CPU may round the last bit differently)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)), where
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=where)
    else:
        assert got == want, where


def test_metrics_json_equals_the_metric_functions_called_directly(data: dict, evaluated: tuple) -> None:  # type: ignore[type-arg]
    result, doc = evaluated
    assert doc["metrics"] == default_metrics(True, True) == list(METRICS)  # boxes and classes: every metric
    assert doc["model"]["sha256"] == file_sha256(DEMO)
    assert doc["images"] == [p.name for p in data["paths"]]
    assert {"onnx_gradcam", "onnxruntime", "onnx", "numpy", "matplotlib"} <= set(doc["versions"])
    # the reference: prepared by hand with both methods, the context and maps built directly
    prepared, _ = prepare_model(load_model(DEMO), methods=METHODS)
    exp = Explainer(prepared, device="cpu", threads=1, labels=LABELS)
    notes = json.loads(data["boxes"].read_text())
    own = [[notes[p.name]["box"]] for p in data["paths"]]
    ctx = make_context(exp, data["images"], [p.name for p in data["paths"]], own, data["classes"], 16)
    probs = exp.explain(ctx.x).probabilities
    assert probs is not None
    for row, cls, p in zip(doc["predictions"], data["classes"], probs):
        assert row["class"] == int(np.argmax(p)) and row["truth"] == cls and row["correct"] == (row["class"] == cls)
        assert row["label"] == LABELS[row["class"]]
        np.testing.assert_allclose(row["probability"], p.max(), rtol=1e-5)
    assert [(r["method"], r["layer"]) for r in doc["runs"]] == [(m, exp.feature_layer) for m in METHODS]
    for run, method in zip(doc["runs"], METHODS):
        maps = exp.explain(ctx.x, target=list(ctx.classes), method=method).maps
        np.testing.assert_array_equal(result.run(method).maps, maps)
        want: dict[str, object] = {}
        for spec in {(s.module, s.function, s.options): s for s in METRICS.values()}.values():
            if spec.module == "road" and method != METHODS[0]:  # the slowest: checked for one method
                want.update({k: v for k, v in run["metrics"].items() if k.startswith("road_")})
                continue
            fn = spec.resolve()
            if EXPLAINER in spec.needs:
                direct: list[MetricResult] = fn(exp, ctx, method=method, verify=True, **dict(spec.options))
            else:
                direct = fn(ctx, maps, **dict(spec.options))
            want.update({m.name: json.loads(json.dumps(m.to_json())) for m in direct})
        _close(run["metrics"], want, f"{method}")


def test_the_command_writes_what_the_api_returns(data: dict, evaluated: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _, doc = evaluated
    out = tmp_path / "cli"
    argv = ["evaluate", str(DEMO), str(data["folder"]), "--boxes", str(data["boxes"]), "-o", str(out)]
    argv += ["--metric", "deletion", "--metric", "pointing-game", "--device", "cpu", "--threads", "1"]
    res = CliRunner().invoke(main, argv + ["--batch-size", "16"])
    assert res.exit_code == 0, res.output
    got = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]
    assert got["metrics"] == ["deletion", "pointing-game"]
    (run,) = got["runs"]
    assert run["method"] == "gradcam" and set(run["metrics"]) == {"deletion", "pointing_game"}
    for name in ("deletion", "pointing_game"):
        _close(run["metrics"][name], doc["runs"][0]["metrics"][name], name)
        assert f"{name} {doc['runs'][0]['metrics'][name]['value']:.4g}" in res.stdout


def test_a_prepared_model_is_used_as_it_is_and_layers_are_evaluated_apart(data: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    _, found = list_layers(DEMO)
    deep = [c.name for c in found if c.dominates][-2:]  # the default layer and the one before it
    assert len(deep) == 2
    both = onnx_gradcam.evaluate(DEMO, data["paths"][:4], layers=deep, metrics=["deletion"], device="cpu")
    assert [r.layer for r in both.runs] == deep
    for run in both.runs:
        exp = Explainer(prepare_model(load_model(DEMO), feature_layer=run.layer)[0], device="cpu")
        np.testing.assert_array_equal(run.maps, exp.explain(make_context(exp, data["images"][:4]).x).maps)
    assert not np.allclose(both.runs[0].maps, both.runs[1].maps)
    prepared = tmp_path / "demo.gradcam.onnx"
    prepare(DEMO, prepared, feature_layer=deep[0])
    again = onnx_gradcam.evaluate(prepared, data["paths"][:4], metrics=["deletion"], device="cpu")
    assert [r.layer for r in again.runs] == [deep[0]]
    _close(again.metric("deletion").to_json(), both.metric("deletion", "gradcam", deep[0]).to_json(), "prepared")
    with pytest.raises(OnnxGradCamError, match="was not prepared.*--method gradcam\\+\\+"):
        onnx_gradcam.evaluate(prepared, data["paths"][:4], methods=["gradcam++"], metrics=["deletion"])
    with pytest.raises(OnnxGradCamError, match="already prepared at"):
        onnx_gradcam.evaluate(prepared, data["paths"][:4], layers=[deep[1]], metrics=["deletion"])


def _bad_boxes(folder: Path, paths: list[Path]) -> dict[str, Path]:
    def write(name: str, text: str) -> Path:
        (folder / name).write_text(text)
        return folder / name

    good = {p.name: {"class": "circle", "box": [1, 1, 20, 20]} for p in paths}
    return {
        "not json": write("a.json", "{not json"),
        "a list": write("b.json", "[]"),
        "no box": write("c.json", json.dumps({**good, paths[0].name: {"class": "star"}})),
        "upside down": write("d.json", json.dumps({**good, paths[0].name: {"box": [20, 20, 1, 1]}})),
        "three numbers": write("e.json", json.dumps({**good, paths[0].name: {"boxes": [[1, 2, 3]]}})),
        "unknown class": write("f.json", json.dumps({**good, paths[0].name: {"class": "cat", "box": [1, 1, 9, 9]}})),
        "missing image": write("g.json", json.dumps({k: v for k, v in good.items() if k != paths[0].name})),
    }


BAD = {
    "not json": "cannot read the boxes file",
    "a list": "is not a JSON object",
    "no box": "has no box",
    "upside down": "x1 > x0",
    "three numbers": "has the box [1, 2, 3]",
    "unknown class": "'cat'",
    "missing image": "not in the boxes file",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_boxes_files_fail_with_one_line_and_write_nothing(case: str, data: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    files = _bad_boxes(tmp_path, data["paths"])
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main, ["evaluate", str(DEMO), *map(str, data["paths"]), "--boxes", str(files[case]), "-o", str(out)]
    )
    assert res.exit_code == 1, res.output
    (line,) = res.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and BAD[case] in line and "to fix this" in line, res.stderr
    assert not [ln for ln in res.stderr.splitlines() if ln.startswith("Traceback")]
    assert not out.exists()


def test_bad_options_fail_before_any_file(data: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    out = tmp_path / "out"
    base = ["evaluate", str(DEMO), str(data["paths"][0]), "-o", str(out)]
    cases = [
        (["--metric", "pointing-game"], 1, "needs object boxes"),
        (["--metric", "nope"], 2, "'nope' is not one of"),
        (["--layer", "no/such/tensor", "--metric", "deletion"], 1, "no/such/tensor"),
        ([str(tmp_path / "missing.png")], 1, "no such file"),
        (["--labels", str(tmp_path / "two.txt")], 1, "the labels list has 2 names but the model has 4 classes"),
    ]
    (tmp_path / "two.txt").write_text("a\nb\n")
    for extra, code, text in cases:
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == code and text in res.stderr, (extra, res.stderr)
        assert not out.exists(), extra
    (out.parent / "file").write_text("x")  # -o names a file: nothing else is written either
    res = CliRunner().invoke(main, [*base[:-1], str(out.parent / "file"), "--metric", "deletion"])
    assert res.exit_code == 2 and "is a file" in res.stderr
    with pytest.raises(OnnxGradCamError, match="cannot create the output folder"):
        onnx_gradcam.evaluate(DEMO, data["paths"][:1], metrics=["deletion"], out_dir=out.parent / "file" / "sub")
    assert (out.parent / "file").read_text() == "x" and sorted(p.name for p in out.parent.iterdir()) == [
        "file",
        "two.txt",
    ]


def test_without_matplotlib_the_report_says_which_extra(
    data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[type-arg]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(OnnxGradCamError, match=r"pip install 'onnx-gradcam\[report\]'"):
        onnx_gradcam.evaluate(DEMO, data["paths"][:2], metrics=["deletion"], out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    done = onnx_gradcam.evaluate(DEMO, data["paths"][:2], metrics=["deletion"], out_dir=tmp_path / "b", report=False)
    assert done.files == [tmp_path / "b" / "metrics.json"] and sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "metrics.json"
    ]


def test_the_function_is_the_public_name_and_the_modules_stay_importable() -> None:
    from onnx_gradcam.evaluation import base
    from onnx_gradcam.evaluation.run import evaluate

    assert onnx_gradcam.evaluate is evaluate and "evaluate" in onnx_gradcam.__all__
    assert (
        importlib.import_module("onnx_gradcam.evaluation.base") is base is sys.modules["onnx_gradcam.evaluation.base"]
    )
    import onnx_gradcam.evaluation.road as road_module  # the subpackage's own name: no shadowing

    assert callable(road_module.road) and onnx_gradcam.evaluate is evaluate
    for spec in METRICS.values():  # every registered name has its function
        assert callable(spec.resolve())
    import subprocess

    code = "import sys, onnx_gradcam, onnx_gradcam.cli; print([m for m in sys.modules if m.startswith('matplotlib')])"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "[]"  # the report extra is imported by the report alone


def test_the_readme_command_and_metric_table_are_true(tmp_path: Path) -> None:
    import re
    import shlex

    readme = (DEMO.parent.parent / "README.md").read_text()
    section = readme.split("## Evaluate", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `([a-z-]+)` \|", section, re.M) == list(METRICS)  # one row per registered metric
    (command,) = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    argv = shlex.split(command.split("&&", 1)[1])
    assert argv[:2] == ["onnx-gradcam", "evaluate"]
    argv = [str(DEMO.parent.parent / a) if a.startswith("models/") else a for a in argv[1:]]
    argv[argv.index("-o") + 1] = str(tmp_path / "eval")
    # two cheap metrics: ROAD's imputation takes ~2 s an image here, and the default list (every metric,
    # with boxes and classes) is checked by test_metrics_json_equals_the_metric_functions_called_directly
    res = CliRunner().invoke(main, [*argv, "--device", "cpu", "--metric", "deletion", "--metric", "pointing-game"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["images"] == ["circle.png", "star.png", "triangle.png"]
    assert [r["method"] for r in doc["runs"]] == ["gradcam", "gradcam++"]
    assert doc["runs"][0]["metrics"]["pointing_game"]["value"] == 1.0  # the demo model points at each object
    assert (tmp_path / "eval" / "report.html").stat().st_size > 10_000
