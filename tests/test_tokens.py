"""Models of integer ids [N, T] (bytes, tokens): prepared at a float tensor after their embedding.

The byte CNN of tools/train_bytes.py (trained here in 10-20 s on 1 thread, or read from
.cache/bytes/; the whole file takes about 45 s from nothing, 6 s cached) tells synthetic "file
types" by a 4-byte magic number at a random offset; it is exported with its embedding as Gather
and as an Equal + Cast one-hot. The map over the 2048 bytes must peak on the magic number, and
the gradient at the feature tensor must equal torch autograd in float64. A small untrained byte
model checks the command line's --bytes and --pad.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from onnx_gradcam import Explainer, prepare
from onnx_gradcam.cli import main
from onnx_gradcam.errors import BadInputError, LayerNotFoundError
from onnx_gradcam.surgery.prepare import prepare_model

from .conftest import cpu_session, rel_err
from .torch_ref import gradcam_reference, hooked

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_bytes  # noqa: E402

EXPORTS = ("gather", "onehot")


@pytest.fixture(scope="module")
def byte_models() -> dict[str, tuple[Path, torch.nn.Module]]:
    """{export: (ONNX path, the torch model it was exported from)}, cached by the tool's source."""
    torch.set_num_threads(1)
    digest = hashlib.sha256((ROOT / "tools" / "train_bytes.py").read_bytes()).hexdigest()[:12]
    folder = ROOT / ".cache" / "bytes" / digest
    weights = folder / "bytes.pt"
    if weights.is_file() and all((folder / f"bytes_{e}.onnx").is_file() for e in EXPORTS):
        model = train_bytes.build("gather")
        model.load_state_dict(torch.load(weights))
        model.eval()
    else:
        model = train_bytes.train()
        folder.mkdir(parents=True, exist_ok=True)
        train_bytes.export(model, folder / "bytes_gather.onnx")
        train_bytes.export(train_bytes.folded_onehot(model), folder / "bytes_onehot.onnx", global_pool=True)
        torch.save(model.state_dict(), weights)
    return {
        "gather": (folder / "bytes_gather.onnx", model),
        "onehot": (folder / "bytes_onehot.onnx", train_bytes.folded_onehot(model)),
    }


def _balanced(per_class: int = 4, seed: int = 11) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y, off = train_bytes.samples(64, train_bytes.LENGTH, seed)
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(len(train_bytes.CLASSES))])
    return x[keep], y[keep], off[keep]


def _run(path: Path, x: np.ndarray, classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    session = cpu_session(path.read_bytes())
    feeds = {"bytes": x} if classes is None else {"bytes": x, "gradcam_class": classes}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.slow
@pytest.mark.parametrize("export", EXPORTS)
def test_map_over_bytes_peaks_on_the_magic_number(
    byte_models: dict[str, tuple[Path, torch.nn.Module]], export: str, tmp_path: Path, record_property
) -> None:
    """Default settings: the last feature map [N, 32, 1022] (NCT), the map at the input's 2048
    bytes; for every sample of every class the map's maximum lies on the magic number's 4 bytes or
    within one conv stride (2 bytes) of them, the map's resolution. Measured with tools/train_bytes
    as committed: offsets -2..4 from the magic number's start on 256 held-out samples, 84% of them
    on its 4 bytes; here 16 samples."""
    source, _ = byte_models[export]
    report = prepare(source, tmp_path / "p.onnx")
    assert report.feature_layout == "NCT" and report.feature_tensor == "/act/Relu_output_0"
    assert report.metadata["gradcam.input_layout"] == "nt"
    x, y, off = _balanced()
    got = _run(tmp_path / "p.onnx", x)
    np.testing.assert_array_equal(got["gradcam_target"], y)  # the model is right: top-1 is the class
    assert got["gradcam_map"].shape == (len(x), train_bytes.LENGTH)
    peaks = got["gradcam_map"].argmax(axis=1) - off
    record_property("peak_minus_offset", peaks.tolist())
    stride = train_bytes.STRIDE
    assert np.all((peaks >= -stride) & (peaks < 4 + stride)), f"peaks at offset + {peaks.tolist()}, magic 0..3"
    assert np.mean((peaks >= 0) & (peaks < 4)) >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("layer", ["act", "conv"])
def test_gradient_equals_torch_autograd_float64(
    byte_models: dict[str, tuple[Path, torch.nn.Module]], export: str, layer: str, record_property
) -> None:
    """dS/dA and the map at the default feature tensor (after the ReLU) and at the conv output
    (before the written-out LayerNorm) against torch autograd on the same weights in float64,
    for the top-1 class and for another class; 1e-4 relative (measured in record_property)."""
    source, model = byte_models[export]
    tensor = {"act": "/act/Relu_output_0", "conv": "/conv/Conv_output_0"}[layer]
    prepared, _ = prepare_model(onnx.load(str(source)), feature_layer=tensor, expose_gradient=True)
    x, y, _ = _balanced(per_class=2)
    other = (y + 1) % len(train_bytes.CLASSES)
    net = copy.deepcopy(model).double().eval()
    store = hooked(net.get_submodule(layer))
    out = net(torch.from_numpy(x))
    out[torch.arange(len(x)), torch.from_numpy(other)].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()
    path = Path(f"/tmp/onnx-gradcam-tokens-{export}-{layer}.onnx")
    try:
        onnx.save(prepared, str(path))
        got = _run(path, x, other.astype(np.int64))
    finally:
        path.unlink(missing_ok=True)
    raw = gradcam_reference(a, g)
    up = torch.nn.functional.interpolate(torch.from_numpy(raw)[:, None], size=train_bytes.LENGTH, mode="linear")
    up = up[:, 0].numpy()
    lo, hi = up.min(axis=1, keepdims=True), up.max(axis=1, keepdims=True)
    errors = {
        "features": rel_err(got["gradcam_features"], a),
        "gradient": rel_err(got["gradcam_gradient"], g),
        "raw": rel_err(got["gradcam_raw"], raw),
        "map": rel_err(got["gradcam_map"], (up - lo) / (hi - lo)),
    }
    record_property("relative_errors", errors)
    assert np.abs(g).max() > 0
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.slow
def test_embedding_maps_agree_between_gather_and_one_hot(
    byte_models: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path, record_property
) -> None:
    """At the embedding itself (the Gather's [N, T, 8], NTC; the one-hot's [N, T, 256]) the two
    exports give the same map: with α_v = Σ_e α_e E[v, e] over the one-hot's channels,
    Σ_v α_v onehot_tv = Σ_e α_e E[x_t, e]."""
    x, _, _ = _balanced(per_class=2)
    maps = {}
    for export, tensor in (("gather", "/embed/Gather_output_0"), ("onehot", "/Cast_output_0")):
        report = prepare(byte_models[export][0], tmp_path / f"{export}.onnx", feature_layer=[tensor])
        assert report.feature_layout == "NTC"
        maps[export] = _run(tmp_path / f"{export}.onnx", x, np.zeros(len(x), np.int64))["gradcam_raw"]
    assert maps["gather"].shape == (len(x), train_bytes.LENGTH)
    error = rel_err(maps["onehot"], maps["gather"])
    record_property("relative_error", error)
    assert error < 1e-4


@pytest.mark.slow
def test_cli_explains_raw_files_with_bytes(
    byte_models: dict[str, tuple[Path, torch.nn.Module]], tmp_path: Path
) -> None:
    """`explain --bytes 2048` on raw files the test writes (one per class; shorter files padded):
    the predicted classes, the raw maps equal a direct run on the same padded ids, and the PNGs."""
    source, _ = byte_models["onehot"]
    x, y, off = _balanced(per_class=1)
    files = []
    for i, (row, start) in enumerate(zip(x, off)):
        data = row.astype(np.uint8).tobytes()
        cut = max(int(start) + 4, 1200)  # shorter than 2048, the magic number kept
        files.append(tmp_path / f"sample{i}.dat")
        files[-1].write_bytes(data[:cut])
    (tmp_path / "labels.txt").write_text("\n".join(train_bytes.CLASSES) + "\n")
    out = tmp_path / "out"
    args = ["explain", str(source), *map(str, files), "--bytes", "2048", "-o", str(out)]
    res = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "labels.txt")])
    assert res.exit_code == 0, res.stderr
    entries = json.loads((out / "predictions.json").read_text())
    assert [e["label"] for e in entries] == [train_bytes.CLASSES[c] for c in y]
    padded = np.zeros_like(x)
    for i, f in enumerate(files):
        data = np.frombuffer(f.read_bytes(), np.uint8)
        padded[i, : len(data)] = data
    direct = Explainer(source, device="cpu").explain(padded)
    for i, e in enumerate(entries):
        np.testing.assert_allclose(np.load(out / e["raw_map"]), direct.raw[i], rtol=1e-5, atol=1e-7)
        png = Image.open(out / e["overlay"])
        assert png.size[1] > 64 * 30  # 2048 bytes in rows of 32, a hex line, a character line, the bar
        assert int(direct.maps[i].argmax()) - int(off[i]) in range(-train_bytes.STRIDE, 4 + train_bytes.STRIDE)


def _tiny_byte_model(tmp_path: Path, length: int | None = 64) -> Path:
    """An untrained byte CNN (Gather embedding) with input [N, length] int32 (length None: dynamic)."""
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(256, 4)
            self.conv = torch.nn.Conv1d(4, 6, 5, padding=2)
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(self.embed(ids.long()).transpose(1, 2)))
            return self.fc(h.mean(dim=2))

    path = tmp_path / "tiny.onnx"
    axes = {"bytes": {0: "batch"} if length else {0: "batch", 1: "length"}, "logits": {0: "batch"}}
    torch.onnx.export(
        Tiny().eval(),
        torch.zeros(1, length or 64, dtype=torch.int32),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["bytes"],
        output_names=["logits"],
        dynamic_axes=axes,
    )
    m = onnx.load(str(path))
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_cli_bytes_pad_and_npy_inputs(tmp_path: Path) -> None:
    """--pad fills the rest of a short file, --bytes N reads only N bytes, a .npy holds the ids with
    or without the batch axis: each raw map equals a direct run on the ids it should have read."""
    src = _tiny_byte_model(tmp_path)
    rs = np.random.RandomState(0)
    data = rs.randint(0, 256, 100).astype(np.uint8)
    (tmp_path / "short.bin").write_bytes(data[:10].tobytes())
    (tmp_path / "long.bin").write_bytes(data.tobytes())
    ids = rs.randint(0, 256, 64).astype(np.int32)
    np.save(tmp_path / "plain.npy", ids)
    np.save(tmp_path / "batched.npy", ids[None].astype(np.int64))
    exp = Explainer(src, device="cpu")
    short = np.full(64, 7, np.int32)
    short[:10] = data[:10]
    head = np.full(64, 7, np.int32)
    head[:40] = data[:40]
    cases = [
        (["short.bin", "--bytes", "64", "--pad", "7"], short),
        (["long.bin", "--bytes", "40", "--pad", "7"], head),
        (["long.bin", "--bytes", "64"], data[:64].astype(np.int32)),
        (["plain.npy"], ids),
        (["batched.npy"], ids),
    ]
    for k, (args, want) in enumerate(cases):
        out = tmp_path / f"o{k}"
        res = CliRunner().invoke(main, ["explain", str(src), str(tmp_path / args[0]), *args[1:], "-o", str(out)])
        assert res.exit_code == 0, (args, res.stderr)
        (entry,) = json.loads((out / "predictions.json").read_text())
        direct = exp.explain(want[None])
        assert entry["class"] == int(direct.targets[0])
        np.testing.assert_allclose(np.load(out / entry["raw_map"]), direct.raw[0], rtol=1e-5, atol=1e-7)
        assert Image.open(out / entry["overlay"]).size[0] > 32 * 10
    # errors: more bytes than the model reads, --pad alone, a raw file without --bytes
    for args, message in [
        (["long.bin", "--bytes", "65"], "more than the model reads"),
        (["long.bin", "--pad", "1"], "--pad goes with --bytes"),
    ]:
        res = CliRunner().invoke(main, ["explain", str(src), str(tmp_path / args[0]), *args[1:], "-o", str(tmp_path)])
        assert res.exit_code != 0 and message in res.stderr, res.stderr
    res = CliRunner().invoke(main, ["explain", str(src), str(tmp_path / "long.bin"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and "--bytes N" in res.stderr


def test_dynamic_length_bytes_and_map_length(tmp_path: Path) -> None:
    """A byte model of dynamic length reads --bytes N padded to N; the map has the input's length
    and equals a direct run (both ways of running are the prepared model's own)."""
    src = _tiny_byte_model(tmp_path, length=None)
    (tmp_path / "f.bin").write_bytes(bytes(range(30)))
    res = CliRunner().invoke(
        main, ["explain", str(src), str(tmp_path / "f.bin"), "--bytes", "50", "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.stderr
    (entry,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    want = np.zeros((1, 50), np.int32)
    want[0, :30] = np.arange(30)
    direct = Explainer(src, device="cpu").explain(want)
    assert direct.maps.shape == (1, 50)
    np.testing.assert_allclose(np.load(tmp_path / "o" / entry["raw_map"]), direct.raw[0], rtol=1e-5, atol=1e-7)


def test_token_models_refuse_guided_and_need_an_embedding(tmp_path: Path) -> None:
    """--guided needs a gradient at the input (ids have none); an integer input that reaches no
    embedding is a clear error, not a wrong map."""
    model = onnx.load(str(_tiny_byte_model(tmp_path)))
    with pytest.raises(BadInputError, match="guided"):
        prepare_model(model, guided=True)
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["f", "w"], ["logits"]),
        ],
        "no_embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((8, 3), np.float32), "w")],
    )
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain.ir_version = 8
    with pytest.raises(LayerNotFoundError, match="reaches no embedding"):
        prepare_model(plain)


def test_image_models_take_npy_arrays(tmp_path: Path) -> None:
    """An image model explained from .npy files holding its input ([C, H, W] or [1, C, H, W]):
    the raw map equals a direct run on the array, and the overlay has the input's size."""
    from .models import export, tiny_cnn

    src = export(tiny_cnn(), tmp_path / "cnn.onnx", size=16)
    x = np.random.RandomState(3).randn(1, 3, 16, 16).astype(np.float32)
    np.save(tmp_path / "a.npy", x[0])
    np.save(tmp_path / "b.npy", x)
    res = CliRunner().invoke(
        main, ["explain", str(src), str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.stderr
    direct = Explainer(src, device="cpu").explain(x)
    for entry in json.loads((tmp_path / "o" / "predictions.json").read_text()):
        np.testing.assert_allclose(np.load(tmp_path / "o" / entry["raw_map"]), direct.raw[0], rtol=1e-5, atol=1e-7)
        assert Image.open(tmp_path / "o" / entry["overlay"]).size == (16, 16)
    np.save(tmp_path / "bad.npy", x[0, :, :8])
    res = CliRunner().invoke(main, ["explain", str(src), str(tmp_path / "bad.npy"), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "[N, 3, 16, 16]" in res.stderr, res.stderr


def test_onehot_op_int64_tokens_equal_torch_autograd(tmp_path: Path, record_property) -> None:
    """Token ids [N, T] int64 through ONNX's OneHot (torch's F.one_hot), a Conv1d and a mean over
    T: the layout is read from the ids (the one-hot adds C), and dS/dA and the map at the ReLU equal
    torch autograd in float64 (1e-5 relative; float32 forward)."""
    torch.manual_seed(1)

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(16, 8, 3, padding=1)
            self.act = torch.nn.ReLU()
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            one = torch.nn.functional.one_hot(ids, 16).to(self.conv.weight.dtype)  # [N, T, 16]
            return self.fc(self.act(self.conv(one.transpose(1, 2))).mean(dim=2))

    model = Tokens().eval()
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 40, dtype=torch.int64),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["ids"],
        output_names=["logits"],
        dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}},
    )
    source = onnx.load(str(path))
    assert "OneHot" in {n.op_type for n in source.graph.node}
    source.ir_version = 8
    prepared, report = prepare_model(source, expose_gradient=True)
    assert report.feature_tensor == "/act/Relu_output_0" and report.feature_layout == "NCT"
    ids = np.random.RandomState(0).randint(0, 16, (3, 40)).astype(np.int64)
    classes = np.array([0, 3, 4], np.int64)
    got = dict(
        zip(
            [o.name for o in prepared.graph.output],
            cpu_session(prepared.SerializeToString()).run(
                [o.name for o in prepared.graph.output], {"ids": ids, "gradcam_class": classes}
            ),
        )
    )
    net = copy.deepcopy(model).double()
    store = hooked(net.act)
    net(torch.from_numpy(ids))[torch.arange(3), torch.from_numpy(classes)].sum().backward()
    a, g = store["a"].detach().numpy(), store["g"].numpy()
    raw = gradcam_reference(a, g)
    lo, hi = raw.min(axis=1, keepdims=True), raw.max(axis=1, keepdims=True)
    errors = {
        "gradient": rel_err(got["gradcam_gradient"], g),
        "raw": rel_err(got["gradcam_raw"], raw),
        "map": rel_err(got["gradcam_map"], (raw - lo) / (hi - lo)),  # T' = T: no resampling
    }
    record_property("relative_errors", errors)
    assert max(errors.values()) < 1e-5, errors


def _keras_byte_model() -> Path:
    """tf2onnx 1.17's export of a Keras byte CNN (random weights, fixed seed), cached: tf.one_hot
    (OneHot), Conv1D (Unsqueeze, Transpose, Conv, Squeeze, Transpose: channels-last again), the
    LayerNormalization spelled with GlobalAveragePool over the channels, Neg, Sub, Mul, Sqrt,
    Reciprocal, GlobalMaxPooling1D as ReduceMax over T, Dense as MatMul and Add."""
    path = ROOT / ".cache" / "bytes" / "keras_bytes_tf2onnx.onnx"
    if path.is_file():
        return path
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)

    class OneHot(tf.keras.layers.Layer):
        def call(self, x):  # type: ignore[no-untyped-def]
            return tf.one_hot(x, 256)

    inp = tf.keras.Input((train_bytes.LENGTH,), dtype="int32")
    h = tf.keras.layers.Conv1D(32, 6, strides=2)(OneHot()(inp))
    h = tf.keras.layers.ReLU()(tf.keras.layers.LayerNormalization()(h))
    out = tf.keras.layers.Dense(4)(tf.keras.layers.GlobalMaxPooling1D()(h))
    spec = (tf.TensorSpec((None, train_bytes.LENGTH), tf.int32, name="bytes"),)
    proto, _ = tf2onnx.convert.from_keras(tf.keras.Model(inp, out), input_signature=spec, opset=13)
    proto.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


@pytest.mark.slow
def test_tf2onnx_byte_model_layouts() -> None:
    """The tf2onnx export's layouts are read from the ids: the one-hot [N, T, 256] and the ReLU
    [N, T', 32] are NTC, the conv between them NC1T, and the default feature tensor is the ReLU."""
    from onnx_gradcam.api import layers

    _, found = layers(_keras_byte_model())
    by_op = {c.op_type: c for c in found}
    assert by_op["OneHot"].layout == "NTC" and by_op["Conv"].layout == "NC1T"
    (default,) = [c for c in found if c.default]
    assert default.op_type == "Relu" and default.layout == "NTC" and default.shape[1:] == (1022, 32)


@pytest.mark.slow
def test_tf2onnx_byte_model_gradient_through_reduce_max() -> None:
    """Once ReduceMax has a rule (another branch adds it): the prepared tf2onnx model's gradient at
    the ReLU equals the analytic one, dS/dA[n, t, c] = W[c, k] where t is the first argmax of
    A[n, :, c] over T (ReduceMax's gradient, the Dense weight W), 0 elsewhere."""
    from onnx_gradcam.autodiff.registry import RULES

    if "ReduceMax" not in RULES:
        pytest.skip("ReduceMax has no gradient rule on this branch (it is being added on another)")
    source = onnx.load(str(_keras_byte_model()))
    prepared, report = prepare_model(source, expose_gradient=True)
    x, _, _ = _balanced(per_class=1)
    classes = np.array([0, 1, 2, 3], np.int64)
    names = [o.name for o in prepared.graph.output]
    got = dict(zip(names, cpu_session(prepared.SerializeToString()).run(names, {"bytes": x, "gradcam_class": classes})))
    a = got["gradcam_features"]
    weight = next(onnx.numpy_helper.to_array(t) for t in source.graph.initializer if t.dims == [32, 4])
    want = np.zeros_like(a)
    for n, k in enumerate(classes):
        first = a[n].argmax(axis=0)
        want[n, first, np.arange(a.shape[2])] = weight[:, k]
    assert rel_err(got["gradcam_gradient"], want) < 1e-6


def test_plot_tokens_draws_each_ids_map_value_beneath_it() -> None:
    """The bar beneath the ids holds one cell per id, coloured by the map at that id, in order; a
    map of another length is resampled to one value per id."""
    from onnx_gradcam import plot_tokens
    from onnx_gradcam.explain.overlay import colorize

    ids = np.frombuffer(b"%PDF-1.7 \x00\x01\xff\x89PNG", np.uint8)
    cam = np.linspace(0, 1, len(ids))
    for given in (cam, np.interp(np.linspace(0, 1, 3 * len(ids)), np.linspace(0, 1, len(ids)), cam)):
        img = np.asarray(plot_tokens(ids, given, "jet", per_row=len(ids)))
        coloured = [(y, img[y]) for y in range(img.shape[0])]
        # the bar: the pixel row with the most saturated pixels (text is black and grey)
        y, line = max(coloured, key=lambda r: int(np.sum(r[1].max(axis=1).astype(int) - r[1].min(axis=1) > 60)))
        runs = [
            tuple(p)
            for k, p in enumerate(line)
            if (k == 0 or tuple(p) != tuple(line[k - 1])) and tuple(p) != (255, 255, 255)
        ]
        want = [tuple(c) for c in colorize(cam, "jet")]
        assert runs == want, (y, runs[:4], want[:4])
    tokens = plot_tokens(np.array([300, 7, 65535]), np.array([0.0, 0.5, 1.0]))  # not bytes: numbers
    assert tokens.size[0] > 3 * 30
