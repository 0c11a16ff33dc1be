"""LSTM, GRU and RNN gradients beyond ring 1: layout 1 (which onnxruntime refuses) in onnx's
reference evaluator in float64, and torch's nn.LSTM / nn.GRU (bidirectional, 2 layers, behind a
Conv) exported at opset 12 and 17 against torch autograd in float64."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_gradcam import prepare
from onnx_gradcam.errors import UnsupportedOpError
from onnx_gradcam.explain.seeds import region_seed

from .conftest import cpu_session, rel_err
from .float64 import evaluator
from .rule_cases import RECURRENT_LAYOUT1_CASES, Case, _gru_case, _lstm_case
from .test_rules import _forward_model, _gradient_model, _typed_outputs

torch = pytest.importorskip("torch")
nn = torch.nn

EXACT = 1e-4  # float32 onnxruntime against float64 autograd, relative to the largest magnitude


def _in_float64(case: Case) -> Case:
    inputs = [(n, v if v is None or np.asarray(v).dtype.kind != "f" else np.asarray(v, np.float64), c)
              for n, v, c in case.inputs]  # fmt: skip
    return replace(case, inputs=inputs, dtype=np.float64)


LAYOUT1 = [(op, case, wrt) for op, cases in RECURRENT_LAYOUT1_CASES.items() for case in cases for wrt in case.wrt]


@pytest.mark.parametrize(("op", "case", "wrt"), LAYOUT1, ids=lambda v: v if isinstance(v, str) else v.id)
def test_layout1_matches_finite_differences_in_the_reference_evaluator(op: str, case: Case, wrt: str) -> None:
    case = _in_float64(case)
    fwd = _forward_model(op, case)
    feeds = {n: v for n, v, const in case.inputs if not const and v is not None}
    run_fwd = ReferenceEvaluator(fwd)
    outs = run_fwd.run(None, feeds)
    rs = np.random.RandomState(1)
    seeds = {f"y{i}": rs.uniform(-1, 1, o.shape) for i, o in enumerate(outs)}
    grad_model = _gradient_model(fwd, wrt, seeds, case.opset)
    onnx.checker.check_model(grad_model, full_check=True)
    (analytic,) = ReferenceEvaluator(grad_model).run(None, {**feeds, **{f"seed_{k}": v for k, v in seeds.items()}})

    def loss(values: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum(y * seeds[f"y{i}"]) for i, y in enumerate(run_fwd.run(None, values))))

    base, step = feeds[wrt], 1e-6
    numeric = np.zeros(base.shape)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += step
        minus[idx] -= step
        numeric[idx] = (loss({**feeds, wrt: plus}) - loss({**feeds, wrt: minus})) / (2 * step)
    err = rel_err(analytic, numeric)
    assert err < 1e-6, f"{op}/{case.id} d/d{wrt}: relative error {err:.2e}"


def _as_layout0(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with each layout-1 recurrent node computed by a layout-0 one between
    Transposes (onnxruntime refuses layout 1): the node's outputs keep their names and values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        layout = next((a.i for a in n.attribute if a.name == "layout"), 0)
        if n.op_type not in ("LSTM", "GRU", "RNN") or layout != 1:
            nodes.append(n)
            continue
        ins, outs = list(n.input), list(n.output)
        for i in (0, 5, 6):
            if i < len(ins) and ins[i]:
                nodes.append(helper.make_node("Transpose", [ins[i]], [f"{n.name}_in{i}"], perm=[1, 0, 2]))
                ins[i] = f"{n.name}_in{i}"
        inner = [f"{n.name}_out{i}" if o else "" for i, o in enumerate(outs)]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name != "layout"}
        nodes.append(helper.make_node(n.op_type, ins, inner, name=n.name, **attrs))
        for i, o in enumerate(outs):
            if o:
                perm = [2, 0, 1, 3] if i == 0 else [1, 0, 2]
                nodes.append(helper.make_node("Transpose", [inner[i]], [o], perm=perm))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


# beyond what the reference evaluator computes: sequence_lens, activations, clip
_ORT_ONLY = {
    "LSTM": [_lstm_case("layout1_reverse_lens_hardsigmoid", layout=1, lens=[4, 2], direction="reverse",
                        activations=["HardSigmoid", "Tanh", "Softsign"], activation_alpha=[0.3])],
    "GRU": [_gru_case("GRU", "layout1_bidirectional_lens", dirs=2, layout=1, lens=[2, 4], direction="bidirectional")],
    "RNN": [_gru_case("RNN", "layout1_lens_clip", layout=1, lens=[3, 1], clip=0.5)],
}  # fmt: skip

ORT_LAYOUT1 = [
    (op, replace(case, id=f"{case.id}{suffix}", symbolic=symbolic), wrt)
    for op in ("LSTM", "GRU", "RNN")
    for case in RECURRENT_LAYOUT1_CASES[op] + _ORT_ONLY[op]
    for suffix, symbolic in (("", ()), ("_run_time_length", (1,)))
    for wrt in case.wrt
]


@pytest.mark.parametrize(("op", "case", "wrt"), ORT_LAYOUT1, ids=lambda v: v if isinstance(v, str) else v.id)
def test_layout1_matches_finite_differences_in_onnxruntime(op: str, case: Case, wrt: str) -> None:
    """Layout 1 in onnxruntime (float32, step 1e-2, 2e-3 as ring 1), the recurrent nodes of the
    forward and the gradient model run by layout-0 stand-ins; with a static and a run-time length
    (the Loop path, which onnx's reference evaluator cannot run)."""
    fwd = _forward_model(op, case)
    feeds = {n: np.asarray(v, np.float32) for n, v, const in case.inputs if not const and v is not None}
    run_fwd = cpu_session(_as_layout0(fwd).SerializeToString())
    outs = run_fwd.run(None, feeds)
    rs = np.random.RandomState(1)
    seeds = {f"y{i}": rs.uniform(-1, 1, o.shape).astype(np.float32) for i, o in enumerate(outs)}
    grad_model = _as_layout0(_gradient_model(fwd, wrt, seeds, case.opset))
    assert any(n.op_type == "Loop" for n in grad_model.graph.node) == bool(case.symbolic)
    run_grad = cpu_session(grad_model.SerializeToString())
    (analytic,) = run_grad.run(None, {**feeds, **{f"seed_{k}": v for k, v in seeds.items()}})

    def loss(values: dict[str, np.ndarray]) -> float:
        return float(sum(np.sum(np.float64(y) * seeds[f"y{i}"]) for i, y in enumerate(run_fwd.run(None, values))))

    base, step = feeds[wrt], 1e-2
    numeric = np.zeros(base.shape)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += step
        minus[idx] -= step
        numeric[idx] = (loss({**feeds, wrt: plus}) - loss({**feeds, wrt: minus})) / (2 * step)
    err = rel_err(analytic, numeric)
    assert err < 2e-3, f"{op}/{case.id} d/d{wrt}: relative error {err:.2e}"


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_node_without_y_output_recomputes_the_hidden_states(op: str, dynamic: bool) -> None:
    """A node whose Y output is left out (only Y_h, and Y_c, used): the rule runs a copy of the node
    for the hidden states. Bidirectional with sequence_lens, against finite differences."""
    case = RECURRENT_LAYOUT1_CASES[op][0]
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    rs = np.random.RandomState(5)
    t, n, i, h = 4, 2, 3, 3
    values = {
        "w": rs.uniform(-0.6, 0.6, (2, gates * h, i)),
        "r": rs.uniform(-0.6, 0.6, (2, gates * h, h)),
        "b": rs.uniform(-0.3, 0.3, (2, 2 * gates * h)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items()]
    inits.append(numpy_helper.from_array(np.array([4, 2], np.int32), "lens"))
    outs = ["", "yh", "yc"] if op == "LSTM" else ["", "yh"]
    node = helper.make_node(op, ["x", "w", "r", "b", "lens"], outs, hidden_size=h, direction="bidirectional")
    dims = ["t" if dynamic else t, n, i]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
        [onnx.ValueInfoProto(name=o) for o in outs if o], inits,
    )  # fmt: skip
    fwd = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    fwd.ir_version = 8
    fwd = _typed_outputs(fwd)
    x = rs.uniform(-1, 1, (t, n, i)).astype(np.float32)
    run_fwd = cpu_session(fwd.SerializeToString())
    seeds = {o: rs.uniform(-1, 1, (2, n, h)).astype(np.float32) for o in outs if o}
    grad_model = _gradient_model(fwd, "x", seeds, case.opset)
    assert sum(n.op_type == op for n in grad_model.graph.node) == 2  # the node and its copy for Y
    (analytic,) = cpu_session(grad_model.SerializeToString()).run(
        None, {"x": x, **{f"seed_{k}": v for k, v in seeds.items()}}
    )

    def loss(v: np.ndarray) -> float:
        ys = run_fwd.run(None, {"x": v})
        return float(sum(np.sum(np.float64(y) * seeds[o]) for o, y in zip([o for o in outs if o], ys, strict=True)))

    numeric = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += 1e-2
        minus[idx] -= 1e-2
        numeric[idx] = (loss(plus) - loss(minus)) / 2e-2
    assert not np.any(analytic[2:, 1]), "steps past sequence_lens get no gradient"
    err = rel_err(analytic, numeric)
    assert err < 2e-3, f"{op}: relative error {err:.2e}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activations": ["ThresholdedRelu"]}, "without activation_alpha"),
        ({"activations": ["Tanh", "Tanh"]}, "2 activations for 1 direction"),
        ({"activations": ["Gelu"]}, "activation 'gelu'"),
        ({"weight_input": True}, "not a constant"),
    ],
)
def test_what_the_rules_refuse_is_a_clear_error(change: dict, message: str) -> None:  # type: ignore[type-arg]
    """Runtimes disagree on ThresholdedRelu's, ScaledTanh's and Affine's default alpha/beta (the spec's
    ThresholdedRelu takes 1, onnxruntime 0); weights computed at run time have no gradient here."""
    case = RECURRENT_LAYOUT1_CASES["RNN"][0]
    attrs = {"hidden_size": 3, **{k: v for k, v in change.items() if k != "weight_input"}}
    inputs = [(n, v, c and not (n == "w" and change.get("weight_input"))) for n, v, c in case.inputs]
    inputs = [(n, v[:1] if n in ("w", "r", "b") else v, c) for n, v, c in inputs]  # one direction
    inputs = [(n, v[:, :1] if n == "h0" else v, c) for n, v, c in inputs]
    x = np.asarray(inputs[0][1]).transpose(1, 0, 2)  # layout 0: [T, N, I]
    inputs[0] = ("x", x, False)
    fwd = _forward_model("RNN", replace(case, inputs=inputs, attrs=attrs, outputs=2))
    with pytest.raises(UnsupportedOpError, match=message):
        _gradient_model(fwd, "x", {"y0": np.zeros((1,), np.float32)}, case.opset)


class ConvRecurrent(nn.Module):
    """Conv1d over [N, C, T], the steps as a sequence-first [T, N, C] input of a bidirectional
    2-layer LSTM or GRU, a Linear per step: a per-step score sequence [T, N, K]."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(6, 5, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        seq = torch.tanh(self.conv(x)).permute(2, 0, 1)  # [T, N, 6]
        y, _ = self.rnn(seq)
        return self.fc(y)  # [T, N, 4]


class BatchFirst(nn.Module):
    """A batch-first bidirectional 2-layer LSTM or GRU straight on the input [N, T, I]; the score
    reads the last step's output and the final hidden states."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.kind = kind
        self.rnn = rnn(4, 6, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):  # type: ignore[no-untyped-def]
        y, state = self.rnn(x)
        h = state[0] if self.kind == "lstm" else state
        out = torch.cat([y[:, -1], h.permute(1, 0, 2).flatten(1)], 1)
        return out if self.kind != "lstm" else torch.cat([out, state[1].permute(1, 0, 2).flatten(1)], 1)


def _export(net: nn.Module, x: torch.Tensor, path: Path, opset: int) -> onnx.ModelProto:
    torch.onnx.export(net.eval(), x, str(path), dynamo=False, opset_version=opset, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, 8)
    return model


def _onnx_gradient(model: onnx.ModelProto, x: np.ndarray, seed: np.ndarray, opset: int) -> np.ndarray:
    fwd = onnx.ModelProto()
    fwd.CopyFrom(model)
    grad_model = _gradient_model(fwd, "x", {"y": seed}, opset)
    (got,) = cpu_session(grad_model.SerializeToString()).run(None, {"x": x, "seed_y": seed})
    return np.asarray(got)


def _torch_gradient(net: nn.Module, x: np.ndarray, seed: np.ndarray) -> np.ndarray:
    net64 = net.double()
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    (net64(xt) * torch.from_numpy(seed.astype(np.float64))).sum().backward()
    net.float()
    return xt.grad.numpy()


@pytest.mark.parametrize("opset", [12, 17])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("model", ["conv", "batch_first"])
def test_torch_bidirectional_two_layers_match_autograd(tmp_path: Path, opset: int, kind: str, model: str) -> None:
    torch.manual_seed(0)
    net = ConvRecurrent(kind) if model == "conv" else BatchFirst(kind)
    x = np.random.default_rng(0).standard_normal((2, 3, 7) if model == "conv" else (2, 7, 4)).astype(np.float32)
    exported = _export(net, torch.from_numpy(x), tmp_path / "net.onnx", opset)
    assert sum(n.op_type in ("LSTM", "GRU") for n in exported.graph.node) == 2
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    seed = np.random.default_rng(1).uniform(-1, 1, out.shape).astype(np.float32)
    got = _onnx_gradient(exported, x, seed, opset)
    ref = _torch_gradient(net, x, seed)
    err = rel_err(got, ref)
    assert err < EXACT, f"{kind}/{model} opset {opset}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_run_time_sequence_length_loops_and_matches_autograd(tmp_path: Path, kind: str) -> None:
    """A sequence length unknown at prepare time: the backward pass is a Loop; one gradient model
    serves lengths 1, 5 and 9."""
    torch.manual_seed(0)
    net = BatchFirst(kind)
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(net.eval(), torch.randn(2, 5, 4), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n", 1: "t"}})  # fmt: skip
    model = onnx.load(str(path))
    model.ir_version = 8
    width = 36 if kind == "gru" else 60  # y[:, -1] (12), final h (24), final c (24)
    seed = np.random.default_rng(1).uniform(-1, 1, (2, width)).astype(np.float32)
    grad_model = _gradient_model(model, "x", {"y": seed}, 17)
    assert any(n.op_type == "Loop" for n in grad_model.graph.node)
    session = cpu_session(grad_model.SerializeToString())
    for length in (1, 5, 9):
        x = np.random.default_rng(length).standard_normal((2, length, 4)).astype(np.float32)
        (got,) = session.run(None, {"x": x, "seed_y": seed})
        err = rel_err(got, _torch_gradient(net, x, seed))
        assert err < EXACT, f"{kind}, length {length}: relative error {err:.2e}"


# -- a CRNN text recogniser trained on rendered digit strings (tools/train_crnn.py) -------------------

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "models"
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def crnn() -> Path:
    """The trained CRNN's ONNX file, trained (about a minute or two on 1 thread) when absent."""
    import train_crnn

    path = CACHE / train_crnn.NAME
    if not path.exists():
        train_crnn.train(CACHE)
    return path


def _peaks(session, images: np.ndarray, labels: np.ndarray, spans, method: str) -> tuple[int, int, list[str]]:  # type: ignore[no-untyped-def]
    """For each character: seed its logit at its middle column; does `method`'s map over the
    columns (its raw map summed over the height) peak inside that character's columns?"""
    import train_crnn

    centres = (np.arange(train_crnn.COLUMNS) + 0.5) * (train_crnn.W / train_crnn.COLUMNS)
    names = [o.name for o in session.get_outputs()]
    hits, total, misses = 0, 0, []
    for i in range(len(images)):
        for x0, x1 in spans[i]:
            columns = np.nonzero((centres >= x0) & (centres < x1))[0]
            t = int(columns[len(columns) // 2])
            mask = np.zeros(train_crnn.COLUMNS, bool)
            mask[t] = True
            seed = region_seed([1, train_crnn.BLANK + 1, train_crnn.COLUMNS], int(labels[i, t]), mask)
            out = dict(zip(names, session.run(None, {"input": images[i : i + 1], "gradcam_seed": seed})))
            raw = out[f"gradcam_raw_{method}"][0]
            peak = int(np.argmax(raw.reshape(-1, raw.shape[-1]).sum(0)))
            total += 1
            hits += peak in columns
            if peak not in columns:
                misses.append(f"image {i} column {t}: peak {peak}, character {[int(c) for c in columns]}")
    return hits, total, misses


def test_crnn_map_at_the_conv_features_peaks_on_the_seeded_character(crnn: Path, tmp_path: Path) -> None:
    """The seed is the logit of the character at column t; the gradient reaches the last conv map
    [N, 48, 8, 32] through the bidirectional LSTM, and is concentrated on t's columns. prepare's
    self-check (verify) runs on the prepared file.

    HiResCAM (gradient x activation per position) peaks on the seeded character's columns: measured
    47 of 48 here (160 of 160 on 40 other images); the test asks
    for 90%. Grad-CAM does not, and cannot be asked to: its channel weights average the gradient
    over all columns, so its map shows every column whose features the weights like (measured 8 of
    48 here, 29 of 160 on the 40 images; chance is about 10%).
    """
    import train_crnn

    model = onnx.load(str(crnn))
    assert any(n.op_type == "LSTM" for n in model.graph.node)
    conv = [n.output[0] for n in model.graph.node if n.op_type == "Relu"][-1]  # [N, 48, 8, 32]
    out = tmp_path / "crnn.gradcam.onnx"
    report = prepare(crnn, out, target="seed", feature_layer=conv, methods=["gradcam", "hirescam"])
    assert report.feature_tensor == conv
    session = cpu_session(out.read_bytes())
    images, labels, spans = train_crnn.dataset(12, seed=7)
    hits, total, misses = _peaks(session, images, labels, spans, "hirescam")
    assert hits >= 0.9 * total, f"{hits}/{total} HiResCAM maps peak on their character: {misses}"
    gradcam_hits, _, _ = _peaks(session, images, labels, spans, "gradcam")
    print(f"CRNN peaks on the seeded character: HiResCAM {hits}/{total}, Grad-CAM {gradcam_hits}/{total}")


def test_crnn_gradcam_at_the_lstm_output_peaks_on_the_seeded_character(crnn: Path, tmp_path: Path) -> None:
    """Grad-CAM where the features are per-column class evidence: the LSTM's output sequence
    [T, N, 64] (sequence-first). Its map is the seeded class's evidence over the columns, so it
    peaks on the character wherever the string holds no second copy of that digit: measured 67 of
    68 characters of such strings among 40 images (136 of 160 with repeated digits counted; at the
    LSTM's input, before it, 46 of 160)."""
    import train_crnn

    model = onnx.load(str(crnn))
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    after = {n.input[0]: n for n in model.graph.node if n.input}
    feature = after[after[lstm.output[0]].output[0]].output[0]  # Transpose, then Reshape to [T, N, 64]
    out = tmp_path / "crnn_lstm.gradcam.onnx"
    report = prepare(crnn, out, target="seed", feature_layer=feature, methods=["gradcam"])
    assert report.feature_layout == "sequence-first"
    session = cpu_session(out.read_bytes())
    images, labels, spans = train_crnn.dataset(40, seed=11)
    centres = (np.arange(train_crnn.COLUMNS) + 0.5) * (train_crnn.W / train_crnn.COLUMNS)
    distinct = [i for i in range(len(images)) if len({int(labels[i][centres >= x0][0]) for x0, _ in spans[i]}) == 4]
    names = [o.name for o in session.get_outputs()]
    hits, total = 0, 0
    for i in distinct:
        for x0, x1 in spans[i]:
            columns = np.nonzero((centres >= x0) & (centres < x1))[0]
            t = int(columns[len(columns) // 2])
            mask = np.zeros(train_crnn.COLUMNS, bool)
            mask[t] = True
            seed = region_seed([1, train_crnn.BLANK + 1, train_crnn.COLUMNS], int(labels[i, t]), mask)
            raw = dict(zip(names, session.run(None, {"input": images[i : i + 1], "gradcam_seed": seed})))["gradcam_raw"]
            hits += int(np.argmax(raw[0].reshape(-1, raw.shape[-1]).sum(0))) in columns
            total += 1
    assert total >= 40 and hits >= 0.9 * total, f"{hits}/{total} Grad-CAM maps peak on their character"


def test_crnn_default_feature_lies_before_the_lstm_and_passes_the_self_check(crnn: Path, tmp_path: Path) -> None:
    """With every default, prepare picks the LSTM's input sequence ([T, N, 48], sequence-first),
    differentiates through the LSTM and its self-check (load, probe batch, original outputs
    unchanged, finite gradcam_* outputs) passes."""
    report = prepare(crnn, tmp_path / "default.gradcam.onnx", target="seed")
    model = onnx.load(str(crnn))
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    assert report.feature_tensor == lstm.input[0] and report.feature_layout == "sequence-first"


def test_crnn_gradient_at_the_conv_features_matches_float64_differences(crnn: Path, tmp_path: Path) -> None:
    """d(logit of the character at column t)/d(conv features) from the prepared file (float32,
    onnxruntime) against float64 central differences of the head (conv map -> logits) in onnx's
    reference evaluator (tests/float64.py), along 6 random directions over the positive features:
    a column of zeros (ReLU) ties in the MaxPool over the height, where no derivative exists."""
    import train_crnn

    model = onnx.load(str(crnn))
    conv = [n.output[0] for n in model.graph.node if n.op_type == "Relu"][-1]
    out = tmp_path / "crnn.gradcam.onnx"
    prepare(crnn, out, target="seed", feature_layer=conv, expose_gradient=True)
    session = cpu_session(out.read_bytes())
    images, labels, _ = train_crnn.dataset(1, seed=3)
    head_path = tmp_path / "head.onnx"
    onnx.utils.extract_model(str(crnn), str(head_path), [conv], ["logits"])
    head = evaluator(onnx.load(str(head_path)))
    names = [o.name for o in session.get_outputs()]
    rs, step = np.random.RandomState(0), 1e-6
    for t in (5, 16, 27):
        seed = np.zeros((1, train_crnn.BLANK + 1, train_crnn.COLUMNS), np.float32)
        seed[0, labels[0, t], t] = 1.0
        got = dict(zip(names, session.run(None, {"input": images, "gradcam_seed": seed})))
        a, g = got["gradcam_features"].astype(np.float64), got["gradcam_gradient"].astype(np.float64)
        analytic, numeric = [], []
        for _ in range(6):
            v = rs.randn(*a.shape) * (a > 0)
            (logits,) = head.run(None, {conv: np.concatenate([a + step * v, a - step * v])})
            plus, minus = (float((logits[k] * seed[0]).sum()) for k in (0, 1))
            numeric.append((plus - minus) / (2 * step))
            analytic.append(float((g * v).sum()))
        err = rel_err(np.array(analytic), np.array(numeric))
        assert err < EXACT, f"column {t}: relative error {err:.2e}"


@pytest.mark.parametrize("opset", [12, 17])
def test_crnn_of_run_time_width_prepares_with_a_loop_and_matches_autograd(tmp_path: Path, opset: int) -> None:
    """A CRNN exported with a dynamic width: the LSTM's length is known only at run time, so the
    prepared file differentiates it with a Loop (and passes prepare's self-check); at two widths,
    the gradient at the conv map equals torch autograd in float64 (random weights)."""
    import train_crnn

    torch.manual_seed(0)
    net = train_crnn.build().eval()
    src = tmp_path / "crnn_dynamic.onnx"
    torch.onnx.export(
        net,
        torch.zeros(1, 1, 32, 128),
        str(src),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch", 3: "width"}, "logits": {0: "batch", 2: "columns"}},
    )
    conv = [n.output[0] for n in onnx.load(str(src)).graph.node if n.op_type == "Relu"][-1]
    out = tmp_path / "crnn_dynamic.gradcam.onnx"
    prepare(src, out, target="seed", feature_layer=conv, expose_gradient=True)
    assert any(n.op_type == "Loop" for n in onnx.load(str(out)).graph.node)
    session = cpu_session(out.read_bytes())
    names = [o.name for o in session.get_outputs()]
    net64 = train_crnn.build()
    net64.load_state_dict(net.state_dict())
    net64 = net64.double().eval()
    for width in (64, 96):
        rng = np.random.default_rng(width)
        x = rng.random((2, 1, 32, width)).astype(np.float32)
        seed = rng.uniform(-1, 1, (2, train_crnn.BLANK + 1, width // 4)).astype(np.float32)
        got = dict(zip(names, session.run(None, {"input": x, "gradcam_seed": seed})))
        features = net64.features(torch.from_numpy(x.astype(np.float64))).detach().requires_grad_(True)
        seq = net64.pool(features).squeeze(2).permute(2, 0, 1)
        logits = net64.fc(net64.lstm(seq)[0]).permute(1, 2, 0)
        (grad,) = torch.autograd.grad((logits * torch.from_numpy(seed.astype(np.float64))).sum(), features)
        err = rel_err(got["gradcam_gradient"], grad.numpy())
        assert err < EXACT, f"width {width}: relative error {err:.2e}"
