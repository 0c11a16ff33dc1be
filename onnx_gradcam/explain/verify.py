"""The self-check of a prepared model, run before anything is written: it loads in onnxruntime on
the CPU, a probe batch runs, the original outputs equal the source model's, gradcam_* keep the contract.

It lives here, not in surgery/, because surgery never runs a model.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..autodiff.builder import PREFIX
from ..errors import BadInputError, VerificationError
from ..surgery import cam
from ..surgery.load import serialise
from ..surgery.prepare import PrepareReport

PROBE_BATCH = 1  # a dynamic batch is probed at 1: a second sample would double the cost
PROBE_SIZE = 224  # dynamic non-batch dimensions (spatial sizes, lengths) of the probe
_FLOAT32_OUTPUTS = (cam.MAP, cam.RAW, cam.SCORE)  # prefixes of the contract's float32 outputs
# largest difference of an original output, relative to its largest magnitude, by element type:
# the prepared graph computes the same nodes, but onnxruntime may fuse them differently
_TOLERANCE = {"float16": 1e-2, "bfloat16": 1e-1}
_DEFAULT_TOLERANCE = 1e-4
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# where onnxruntime names a node in its messages (load time, run time): (pattern, name group, op group)
_NODE_PATTERNS = (
    (re.compile(r"Node \(([^)]*)\) Op \(([^)]*)\)"), 1, 2),
    (re.compile(r"running (\w+) node\. Name:'([^']*)'"), 2, 1),
    (re.compile(r"node with name '([^']*)'"), 1, 0),
    (re.compile(r"of node \(([^)]*)\)"), 1, 0),
    (re.compile(r"Name:'([^']*)'"), 1, 0),
)

ModelSource = onnx.ModelProto | bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class Verification:
    """What the self-check ran: the probe's input shapes, and the largest difference between an
    original output of the prepared and of the source model (relative to its largest magnitude)."""

    probe: dict[str, tuple[int, ...]]
    max_difference: float


def verify_prepared(
    source: ModelSource, prepared: onnx.ModelProto, report: PrepareReport, serialised: bytes | None = None
) -> Verification:
    """Raise VerificationError unless `prepared` loads and runs in onnxruntime (CPU) on a probe
    batch, gives the source model's original outputs, and every gradcam_* output is finite and
    shaped as the contract says. `source` is the model before prepare (a file path, bytes or proto);
    `serialised`, if given, is `prepared` as bytes (serialising resnet50 takes 0.3 s).

    Cost: two sessions and two runs at batch 1; resnet50 on 2 idle CPU threads about 0.9 s.
    """
    chosen = f"feature tensor {report.feature_tensor!r}, reduction tensor {report.reduction_tensor!r}"
    feeds, expected = _run_source(source)
    try:
        with _loadable(serialised if serialised is not None else prepared) as model:
            session = _session(model)
    except Exception as exc:  # onnxruntime's pybind errors share no base class but Exception
        raise _ort_failure(prepared, "does not load in onnxruntime", exc, chosen) from exc
    form_problem = _class_input_problem(session, report)
    if form_problem:
        raise _contract_failure(prepared, cam.CLASS_INPUT, form_problem, chosen)
    feeds = {**feeds, **_target_feeds(session, report, feeds, expected)}
    try:
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    except Exception as exc:
        raise _ort_failure(prepared, f"fails in onnxruntime on a probe batch ({_shapes(feeds)})", exc, chosen) from exc
    worst = 0.0
    for name, want in expected.items():
        diff = _difference(got[name], want)
        limit = _TOLERANCE.get(str(want.dtype), _DEFAULT_TOLERANCE)
        if not diff <= limit:
            raise _contract_failure(
                prepared,
                name,
                f"its original output {name!r} differs from the source model's by {diff:.3g} of its largest "
                f"magnitude (allowed {limit:g}) on a probe batch ({_shapes(feeds)})",
                chosen,
            )
        worst = max(worst, diff)
    image = feeds[report.image_input]
    batch = int(image.shape[0])
    spatial = tuple(image.shape[a] for a in cam.spatial_axes(image.shape, report.layout))
    declared = {o.name: o for o in prepared.graph.output}
    for name, value in got.items():
        if name.startswith("gradcam_"):
            problem = _contract_problem(name, value, batch, spatial, tuple(image.shape), declared.get(name))
            if problem:
                raise _contract_failure(prepared, name, f"output {name!r} {problem}", chosen)
    return Verification({k: tuple(v.shape) for k, v in feeds.items()}, worst)


def probe_feeds(
    session: ort.InferenceSession, batch: int = PROBE_BATCH, size: int = PROBE_SIZE
) -> dict[str, np.ndarray]:
    """One probe batch for the session's inputs: static sizes as declared, a dynamic batch of
    `batch`, other dynamic sizes `size`; floats uniform in [0, 1) under a fixed seed, integers 0."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else batch if i == 0 else size for i, d in enumerate(inp.shape)]
        dtype = _NP_TYPES.get(inp.type)
        if dtype is None:
            raise BadInputError(
                f"the self-check cannot make a probe for input {inp.name!r} of type {inp.type}: to fix this, "
                "skip the check with --no-verify (verify=False)"
            )
        feeds[inp.name] = rng.random(dims).astype(dtype) if np.dtype(dtype).kind == "f" else np.zeros(dims, dtype)
    return feeds


def _run_source(source: ModelSource) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(probe feeds, the source model's outputs on them)."""
    try:
        with _loadable(source) as model:
            session = _session(model)
        feeds = probe_feeds(session)
        names = [o.name for o in session.get_outputs()]
        return feeds, dict(zip(names, session.run(None, feeds)))
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(
            f"the self-check cannot run the source model in onnxruntime on the CPU ({_one_line(exc)}): to fix "
            "this, check that the model runs in onnxruntime as exported, or skip the check with --no-verify "
            "(verify=False)"
        ) from exc


def _target_feeds(
    session: ort.InferenceSession,
    report: PrepareReport,
    feeds: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """gradcam_seed for seed targets: ones shaped like the reduction tensor; a required
    gradcam_class: -1 per sample (top-1, what an optional one defaults to)."""
    batch = int(feeds[report.image_input].shape[0])
    if any(i.name == cam.CLASS_INPUT for i in session.get_inputs()):
        return {cam.CLASS_INPUT: np.full(batch, -1, np.int64)}
    seed = next((i for i in session.get_inputs() if i.name == cam.SEED_INPUT), None)
    if seed is None:
        return {}
    dims = [d if isinstance(d, int) and d > 0 else batch if i == 0 else -1 for i, d in enumerate(seed.shape)]
    if -1 in dims:
        if report.reduction_tensor not in expected:
            raise BadInputError(
                f"the self-check cannot tell the shape of gradcam_seed {seed.shape} (the reduction tensor "
                f"{report.reduction_tensor!r} has dynamic sizes and is no output): to fix this, skip the check "
                "with --no-verify (verify=False)"
            )
        dims = list(expected[report.reduction_tensor].shape)
    return {cam.SEED_INPUT: np.ones(dims, _NP_TYPES.get(seed.type, np.float32))}


def _class_input_problem(session: ort.InferenceSession, report: PrepareReport) -> str:
    """What is wrong with how the session takes gradcam_class, against the recorded
    --class-input ("" if nothing): an input, an overridable initializer, or absent."""
    form = report.metadata.get("gradcam.class_input")
    if form is None:  # seed targets
        return ""
    plain = any(i.name == cam.CLASS_INPUT for i in session.get_inputs())
    optional = any(i.name == cam.CLASS_INPUT for i in session.get_overridable_initializers())
    found = "required" if plain else "optional" if optional else "none"
    if found != form:
        return f"input {cam.CLASS_INPUT!r} is {found} in onnxruntime, but the model records --class-input {form}"
    return ""


def _contract_problem(
    name: str,
    value: np.ndarray,
    batch: int,
    spatial: tuple[int, ...],
    image: tuple[int, ...],
    declared: onnx.ValueInfoProto | None,
) -> str:
    """What is wrong with one gradcam_* output ("" if nothing): README's contract table."""
    shape = tuple(value.shape)
    if name.startswith(_FLOAT32_OUTPUTS) and value.dtype != np.float32:
        return f"is {value.dtype}, not float32"
    if name == cam.TARGET and value.dtype != np.int64:
        return f"is {value.dtype}, not int64"
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        return f"has {int(np.sum(~np.isfinite(value)))} non-finite values on a probe batch"
    if name in (cam.SCORE, cam.TARGET):
        want: tuple[int, ...] | None = (batch,)
    elif name.startswith(cam.MAP):
        want = (batch, *spatial)
    elif name.startswith((cam.GUIDED_BACKPROP, cam.GUIDED)):
        want = image
    else:
        want = None
    if want is not None and shape != want:
        return f"has shape {list(shape)}, not {list(want)} (batch {batch}, input {list(image)})"
    as_in_graph = name in (cam.FEATURES, cam.GRADIENT)  # the feature tensor in its own layout
    if not as_in_graph and (not shape or shape[0] != batch):
        return f"has shape {list(shape)}: its first axis is not the batch ({batch})"
    if name.startswith(cam.RAW) and len(shape) != len(spatial) + 1:
        return f"has shape {list(shape)}, not [batch, {len(spatial)} feature-map axes] like the input's"
    if name.startswith(cam.MAP) and value.size and (float(value.min()) < 0.0 or float(value.max()) > 1.0):
        return f"has values in [{float(value.min()):.3g}, {float(value.max()):.3g}], not in [0, 1]"
    if declared is not None:
        dims = declared.type.tensor_type.shape.dim
        static = [(i, d.dim_value) for i, d in enumerate(dims) if d.HasField("dim_value")]
        if len(dims) != len(shape) or any(shape[i] != v for i, v in static):
            shown = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
            return f"has shape {list(shape)}, but the model declares {shown}"
    return ""


def _difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over the largest |want| (inf when shapes, types or NaN/inf patterns differ)."""
    if not isinstance(want, np.ndarray) or not isinstance(got, np.ndarray):  # sequences, maps (ZipMap)
        return 0.0 if got == want else float("inf")
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    if want.dtype.kind not in "fc":
        return 0.0 if np.array_equal(got, want) else float("inf")
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(finite, np.isfinite(g)) or not np.array_equal(g[~finite], w[~finite], equal_nan=True):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(np.max(np.abs(w[finite])))
    diff = float(np.max(np.abs(g[finite] - w[finite])))
    return diff / scale if scale > 0 else diff


def _ort_failure(model: onnx.ModelProto, what: str, exc: BaseException, chosen: str) -> VerificationError:
    """One line: the failing node and op as onnxruntime names them, the layers chosen, a way on."""
    message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _one_line(exc))
    node, op = _failing_node(model, message)
    if node:
        origin = "appended by onnx-gradcam" if node.startswith(PREFIX) else "a node of the original model"
        where = f"node {node!r} ({op or 'op unknown'}, {origin})"
    else:
        where = "no node named"
    return VerificationError(
        f"the prepared model {what} at {where}: onnxruntime says: {message} ({chosen}); nothing was written. {_WAY_ON}",
        node,
        op,
    )


def _contract_failure(model: onnx.ModelProto, output: str, problem: str, chosen: str) -> VerificationError:
    producer = next((n for n in model.graph.node if output in n.output), None)
    node, op = (producer.name, producer.op_type) if producer is not None else ("", "")
    made = f", made by node {node!r} ({op})" if producer is not None else ""
    return VerificationError(
        f"the prepared model breaks its contract: {problem}{made} ({chosen}); nothing was written. {_WAY_ON}", node, op
    )


_WAY_ON = (
    "To fix this, choose another feature layer with --feature-layer (`onnx-gradcam layers MODEL` lists them); "
    "if none works, this is a bug in onnx-gradcam: please report it with this message"
)


def _failing_node(model: onnx.ModelProto, message: str) -> tuple[str, str]:
    """(node name, op type) of the node onnxruntime's message names, ("", "") if it names none."""
    for pattern, name_group, op_group in _NODE_PATTERNS:
        match = pattern.search(message)
        if match is not None:
            name = match.group(name_group)
            op = next((n.op_type for n in model.graph.node if n.name == name), "")
            return name, op or (match.group(op_group) if op_group else "")
    return "", ""


def _session(model: bytes | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the default-class initializer note is expected, not a problem
    # basic optimisations (constant folding, no fusions): loading checks every node's types and
    # shapes all the same, at a third of the time (resnet50: 0.2 s instead of 0.7 s)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # two short runs: threads that spin between ops only take the cores from other work (on 2 busy
    # cores resnet50's check took 1.4 s spinning, 1.0 s without)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@contextmanager
def _loadable(model: ModelSource) -> Iterator[bytes | str]:
    """What InferenceSession takes: a path, or bytes; models over 2 GB through a temporary file."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model)
        return
    if isinstance(model, bytes):
        yield model
        return
    data = serialise(model)  # None over protobuf's 2 GB (ByteSize alone costs as much as serialising)
    if data is not None:
        yield data
        return
    with tempfile.TemporaryDirectory(prefix="onnx-gradcam-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        # onnx.save moves the tensors out of `model`; they are read back at once (no second copy)
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
        onnx.load_external_data_for_model(model, tmp)
        yield str(path)


def _shapes(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__
