"""Artifacts for other servers: the three --class-input forms, Triton model folders
(export-triton, parsed by Triton's own ModelConfig) and OpenVINO against onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_gradcam import BadInputError, Explainer, VerificationError, prepare_model
from onnx_gradcam.api import export_triton
from onnx_gradcam.cli import main
from onnx_gradcam.explain.verify import verify_prepared
from onnx_gradcam.surgery.prepare import read_metadata

from .conftest import cpu_session, rel_err

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo.onnx"
SAMPLES = ROOT / "models" / "samples"
LABELS = [line.strip() for line in (ROOT / "models" / "labels.txt").read_text().splitlines() if line.strip()]
CACHE = ROOT / ".cache" / "models"
RESULT_FIELDS = ("maps", "raw", "targets", "scores", "logits")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def demo_batch(n: int = 4) -> np.ndarray:
    return np.random.default_rng(7).random((n, 3, 96, 96)).astype(np.float32)


def assert_same(got: object, want: object) -> None:
    for name in RESULT_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name


# -- --class-input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_forms() -> dict[str, onnx.ModelProto]:
    source = onnx.load(str(DEMO))
    return {form: prepare_model(source, class_input=form)[0] for form in ("optional", "required", "none")}


def test_class_input_forms_in_the_graph(demo_forms: dict[str, onnx.ModelProto]) -> None:
    """optional: an input backed by an initializer [-1]; required: a plain input [batch]; none: absent."""
    for form, model in demo_forms.items():
        assert read_metadata(model)["class_input"] == form
        inputs = {i.name: i for i in model.graph.input}
        inits = {t.name: t for t in model.graph.initializer}
        if form == "none":
            assert "gradcam_class" not in inputs and "gradcam_class" not in inits
            continue
        assert inputs["gradcam_class"].type.tensor_type.elem_type == onnx.TensorProto.INT64
        if form == "optional":
            assert onnx.numpy_helper.to_array(inits["gradcam_class"]).tolist() == [-1]
        else:
            assert "gradcam_class" not in inits
            dims = inputs["gradcam_class"].type.tensor_type.shape.dim
            assert [d.dim_param for d in dims] == ["batch"]  # the image's batch axis
        session = cpu_session(model.SerializeToString())
        plain = [i.name for i in session.get_inputs()]
        assert ("gradcam_class" in plain) == (form == "required")


@pytest.mark.parametrize("form", ["required", "none"])
def test_class_input_forms_equal_the_default(demo_forms: dict[str, onnx.ModelProto], form: str) -> None:
    """Bit for bit on one machine: top-1 in every form, explicit classes in the required form."""
    x = demo_batch()
    default = Explainer(demo_forms["optional"], device="cpu")
    other = Explainer(demo_forms[form], device="cpu")
    assert other.class_input == form
    top1 = default.explain(x)
    assert_same(other.explain(x), top1)
    explicit = [3, 0, 2, 1]
    if form == "required":
        want = default.explain(x, explicit)
        assert want.targets.tolist() == explicit
        assert_same(other.explain(x, explicit), want)
        assert_same(other.explain(x, [-1, -1, -1, -1]), top1)  # -1 per sample = top-1
    else:
        with pytest.raises(BadInputError, match="--class-input none") as err:
            other.explain(x, explicit)
        assert "\n" not in str(err.value)


def test_class_input_none_refuses_a_class_on_the_command_line(tmp_path: Path) -> None:
    prepared = tmp_path / "demo.gradcam.onnx"
    code, out, err = run("prepare", str(DEMO), "-o", str(prepared), "--class-input", "none")
    assert code == 0, err
    assert read_metadata(onnx.load(str(prepared)))["class_input"] == "none"
    sample = str(SAMPLES / "star.png")
    code, _, err = run("explain", str(prepared), sample, "-o", str(tmp_path / "top1"))
    assert code == 0, err
    code, _, err = run("explain", str(prepared), sample, "--class", "1", "-o", str(tmp_path / "c1"))
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--class-input none" in lines[0], err


def test_class_input_only_for_class_targets() -> None:
    with pytest.raises(BadInputError, match="--target seed"):
        prepare_model(onnx.load(str(DEMO)), target="seed", class_input="required")
    with pytest.raises(BadInputError, match="unknown class input"):
        prepare_model(onnx.load(str(DEMO)), class_input="sometimes")


def test_self_check_catches_a_form_other_than_recorded() -> None:
    """A required gradcam_class recorded as optional: the self-check says so, naming the input."""
    source = onnx.load(str(DEMO))
    prepared, report = prepare_model(source, class_input="required")
    verify_prepared(source, prepared, report)  # as built: passes, probing gradcam_class with -1
    wrong = dict(report.metadata, **{"gradcam.class_input": "optional"})
    with pytest.raises(VerificationError, match="'gradcam_class' is required in onnxruntime"):
        verify_prepared(source, prepared, type(report)(**{**report.__dict__, "metadata": wrong}))


# -- export-triton --------------------------------------------------------------------------------

TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


def triton_pb() -> object:
    """Triton's own ModelConfig protobuf (tritonclient[grpc], a test dependency)."""
    return pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_config(path: Path) -> object:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), triton_pb().ModelConfig())  # type: ignore[attr-defined]


def check_config_against_model(config: object, model: onnx.ModelProto, max_batch: int, form: str) -> None:
    """Every input the caller feeds and every output, with Triton's data type and dims."""
    enum = triton_pb().DataType  # type: ignore[attr-defined]
    inits = {t.name for t in model.graph.initializer}
    fed = [i for i in model.graph.input if i.name not in inits or i.name == "gradcam_class"]
    for declared, tensors in ((config.input, fed), (config.output, list(model.graph.output))):  # type: ignore[attr-defined]
        assert [t.name for t in declared] == [t.name for t in tensors]
        for entry, vi in zip(declared, tensors):
            assert enum.Name(entry.data_type) == TYPES[vi.type.tensor_type.elem_type]
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
            if max_batch > 0:
                assert dims[0] == -1
                dims = dims[1:]
                if not dims:  # [batch] alone: [1] reshaped to [] (Triton's idiom)
                    assert list(entry.dims) == [1] and entry.HasField("reshape") and list(entry.reshape.shape) == []
                    continue
            assert list(entry.dims) == dims, entry.name
            assert not entry.HasField("reshape")
    optional = {i.name for i in config.input if i.optional}  # type: ignore[attr-defined]
    assert optional == ({"gradcam_class"} if form == "optional" else set())
    assert ("gradcam_class" in [i.name for i in config.input]) == (form != "none")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("max_batch", "form", "kind"),
    [(8, None, "cpu"), (8, "none", "gpu"), (0, None, "cpu"), (0, "required", "cpu"), (4, "required", "gpu")],
)
def test_export_triton_config_parses_and_matches_the_model(
    tmp_path: Path, max_batch: int, form: str | None, kind: str
) -> None:
    repo = tmp_path / "repo"
    args = ["export-triton", str(DEMO), "-o", str(repo), "--max-batch", str(max_batch), "--kind", kind]
    args += ["--instances", "3"] + (["--class-input", form] if form else [])
    code, out, err = run(*args)
    assert code == 0, err
    expected_form = form or ("required" if max_batch > 0 else "optional")
    assert f"class input:     {expected_form}" in out
    folder = repo / "demo"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    exported = onnx.load(str(folder / "1" / "model.onnx"))
    assert read_metadata(exported)["class_input"] == expected_form
    config = parse_config(folder / "config.pbtxt")
    assert config.name == "demo" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch
    assert config.HasField("dynamic_batching") == (max_batch > 0)
    kinds = triton_pb().ModelInstanceGroup.Kind  # type: ignore[attr-defined]
    assert [(g.count, kinds.Name(g.kind)) for g in config.instance_group] == [(3, f"KIND_{kind.upper()}")]
    check_config_against_model(config, exported, max_batch, expected_form)
    labelled = {o.name: o.label_filename for o in config.output if o.label_filename}
    assert labelled == {"logits": "labels.txt"}
    assert (folder / "labels.txt").read_text().splitlines() == LABELS

    # the exported model runs in onnxruntime and equals the prepared model it was made from
    source, _ = prepare_model(onnx.load(str(DEMO)), class_input=expected_form)
    x = demo_batch(3)
    feeds: dict[str, np.ndarray] = {"input": x}
    if expected_form != "none":
        feeds["gradcam_class"] = np.array([2, -1, 0], np.int64)
    got = cpu_session((folder / "1" / "model.onnx").read_bytes()).run(None, feeds)
    want = cpu_session(source.SerializeToString()).run(None, feeds)
    assert len(got) == len(want) == len(config.output)
    for name, g, w in zip([o.name for o in config.output], got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w), name
    if expected_form != "none":
        targets = got[[o.name for o in config.output].index("gradcam_target")]
        assert targets[0] == 2 and targets[2] == 0 and targets[1] == int(np.argmax(got[0][1]))


def test_export_triton_from_a_prepared_model(tmp_path: Path) -> None:
    """A prepared model is copied as it is (its form kept); export_triton's Python result."""
    prepared = tmp_path / "shapes.gradcam.onnx"
    assert run("prepare", str(DEMO), "-o", str(prepared), "--class-input", "none")[0] == 0
    done = export_triton(prepared, tmp_path / "repo", max_batch=2, instances=1, labels=ROOT / "models" / "labels.txt")
    assert done.folder == tmp_path / "repo" / "shapes" and done.class_input == "none"
    assert done.labels_output == "logits" and done.labels is not None
    assert onnx.load(str(done.model)).SerializeToString() == onnx.load(str(prepared)).SerializeToString()
    config = parse_config(done.config)
    assert config.max_batch_size == 2 and done.config.read_text() == done.config_text
    check_config_against_model(config, onnx.load(str(done.model)), 2, "none")
    with pytest.raises(BadInputError, match="already prepared with --class-input none"):
        export_triton(prepared, tmp_path / "other", class_input="required")
    assert not (tmp_path / "other").exists()


def static_batch_demo(path: Path) -> Path:
    model = onnx.load(str(DEMO))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("optional-batching", "refuses optional inputs on models that batch"),
        ("exists", "already exists"),
        ("name", "cannot be a Triton model folder"),
        ("static-batch", "first axis is not a dynamic batch"),
        ("labels", "has 3 names but no output"),
        ("not-onnx", ""),
        ("instances", "--instances 0 is not positive"),
    ],
)
def test_export_triton_bad_input(tmp_path: Path, case: str, message: str) -> None:
    """One line, exit code 1, and no repository (nor a temporary folder) left behind."""
    repo = tmp_path / "repo"
    model = str(DEMO)
    extra: list[str] = []
    if case == "optional-batching":
        extra = ["--class-input", "optional", "--max-batch", "8"]
    elif case == "exists":
        (repo / "demo").mkdir(parents=True)
    elif case == "name":
        extra = ["--name", "../escape"]
    elif case == "static-batch":
        model = str(static_batch_demo(tmp_path / "fixed.onnx"))
    elif case == "labels":
        three = tmp_path / "three.txt"
        three.write_text("a\nb\nc\n")
        extra = ["--labels", str(three)]
    elif case == "not-onnx":
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"not a model")
        model = str(junk)
    elif case == "instances":
        extra = ["--instances", "0"]
    code, out, err = run("export-triton", model, "-o", str(repo), *extra)
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    if case == "exists":
        assert [p.relative_to(repo).as_posix() for p in repo.rglob("*")] == ["demo"]
    else:
        assert not repo.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


# -- OpenVINO -------------------------------------------------------------------------------------

# Largest difference to onnxruntime under INFERENCE_PRECISION_HINT=f32, relative to the largest
# magnitude of onnxruntime's output (gradcam_map lies in [0, 1]), measured on this machine (a Xeon
# with AMX, OpenVINO 2026.4.1): demo map 1.4e-6, raw 1.1e-6, logits 2.4e-7; resnet18 at 96 pixels
# map 2.7e-6, raw 4.1e-6, logits 1.1e-6. Without the hint OpenVINO computes in bfloat16 on AMX
# CPUs: demo map 2.3e-2, raw 1.7e-2, logits 2.2e-3; resnet18 map 2.6e-2, raw 1.9e-2, logits 4.6e-3.
OPENVINO_TOLERANCE = 1e-5


def openvino_vs_onnxruntime(prepared: onnx.ModelProto, x: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    ov = pytest.importorskip("openvino")
    data = prepared.SerializeToString()
    core = ov.Core()
    ov_model = core.read_model(data, b"")
    assert [i.get_any_name() for i in ov_model.inputs][-1] == "gradcam_class"  # kept as an input
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = {"input": x, "gradcam_class": classes}
    result = compiled(feeds)
    got = {o.get_any_name(): result[o] for o in compiled.outputs}
    session = cpu_session(data)
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert got["gradcam_target"].tolist() == classes.tolist()
    assert np.array_equal(got["gradcam_target"], want["gradcam_target"])
    return {k: rel_err(got[k], want[k]) for k in ("gradcam_map", "gradcam_raw", "logits", "gradcam_score")}


def test_openvino_keeps_a_required_class_input_and_matches_onnxruntime(demo_forms: dict[str, onnx.ModelProto]) -> None:
    ov = pytest.importorskip("openvino")
    optional = ov.Core().read_model(demo_forms["optional"].SerializeToString(), b"")
    # the known limitation the required form exists for: an initializer-backed input is a constant
    assert [i.get_any_name() for i in optional.inputs] == ["input"]
    errors = openvino_vs_onnxruntime(demo_forms["required"], demo_batch(4), np.array([3, 0, 2, 1], np.int64))
    print("openvino f32 vs onnxruntime, demo:", errors)
    assert max(errors.values()) <= OPENVINO_TOLERANCE, errors


@pytest.mark.slow
def test_openvino_and_the_required_form_match_onnxruntime_on_resnet18() -> None:
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(ROOT / "tools"))
    from export_torchvision import export

    path = export("resnet18", CACHE, size=96)
    source = onnx.load(str(path))
    prepared, _ = prepare_model(source, class_input="required")
    x = np.random.default_rng(3).standard_normal((2, 3, 96, 96)).astype(np.float32)
    # the required form equals the default one bit for bit here too (top-1 and explicit classes)
    default = Explainer(prepare_model(source)[0], device="cpu")
    required = Explainer(prepared, device="cpu")
    for target in (None, [3, 917]):
        assert_same(required.explain(x, target), default.explain(x, target))
    errors = openvino_vs_onnxruntime(prepared, x, np.array([3, 917], np.int64))
    print("openvino f32 vs onnxruntime, resnet18:", errors)
    assert max(errors.values()) <= OPENVINO_TOLERANCE, errors


def test_readme_config_is_what_export_triton_writes(tmp_path: Path) -> None:
    """README's example config.pbtxt, from the command it names, run here."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Other servers", 1)[1]
    command = section.split("`onnx-gradcam export-triton ", 1)[1].split("`", 1)[0].split()
    shown = section.split("```protobuf\n", 1)[1].split("```", 1)[0]
    assert command[0] == "models/demo.onnx" and command[1:3] == ["-o", "repo"]
    code, _, err = run("export-triton", str(ROOT / command[0]), "-o", str(tmp_path / "repo"), *command[3:])
    assert code == 0, err
    assert (tmp_path / "repo" / "demo" / "config.pbtxt").read_text() == shown
    parse_config(tmp_path / "repo" / "demo" / "config.pbtxt")
