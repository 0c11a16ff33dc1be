"""Benchmark: the MaxPool gradient below opset 16, equality masks against a one-hot product.

    python tools/bench_maxpool.py [--rounds 30] [--threads 1]   (prints a Markdown table)

Each map's forward graph (SPPF: three MaxPool k5 s1 p2 on [1, 256, 20, 20] and their Concat, as
in YOLOv5s at 640x640; AlexNet's k3 s2 on a 55x55 map; a small 7x7 map) gets its gradient model
four times, the MaxPool rule replaced by (a) `max_pool_masks` (opset 13: the registered rule, one
axis at a time), (a2) the same over all axes at once (the rule's fallback), (b)
`max_pool_one_hot` (opset 13) and, for reference, (c) the ScatterElements-add path (opset 16).
The sessions run in one process, taking turns call by call with a session of the forward pooling
alone; reported: the median over rounds of each session's time over (a)'s in the same round
(ratios: the machine is shared), (a)'s median ms and each gradient against (a)'s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, shape_inference

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_gradcam.autodiff import registry  # noqa: E402
from onnx_gradcam.autodiff.backprop import backprop  # noqa: E402
from onnx_gradcam.autodiff.builder import GraphBuilder  # noqa: E402
from onnx_gradcam.autodiff.context import RuleContext, TensorInfo  # noqa: E402
from onnx_gradcam.autodiff.rules import pooling  # noqa: E402

MAPS: dict[str, tuple[list[int], dict[str, list[int]], int]] = {
    # name: (input shape, MaxPool attributes, how many MaxPools in a row; 3 = SPPF with its Concat)
    "SPPF k5 s1 p2 x3 on [1, 256, 20, 20]": ([1, 256, 20, 20], {"kernel_shape": [5, 5], "pads": [2] * 4}, 3),
    "k3 s2 on [1, 16, 55, 55] (AlexNet's map, 16 of its 96 channels)": (
        [1, 16, 55, 55],
        {"kernel_shape": [3, 3], "strides": [2, 2]},
        1,
    ),
    "k3 s1 p1 on [1, 256, 7, 7]": ([1, 256, 7, 7], {"kernel_shape": [3, 3], "pads": [1] * 4}, 1),
}


def forward_model(shape: Sequence[int], attrs: dict[str, list[int]], pools: int, opset: int) -> onnx.ModelProto:
    nodes, outs, prev = [], [], "x"
    for i in range(pools):
        nodes.append(helper.make_node("MaxPool", [prev], [f"p{i}"], name=f"pool{i}", **attrs))
        prev = f"p{i}"
        outs.append(prev)
    if pools > 1:
        nodes.append(helper.make_node("Concat", ["x", *outs], ["y"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", [prev], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    graph = helper.make_graph(nodes, "pools", [x], [onnx.ValueInfoProto(name="y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def gradient_model(fwd: onnx.ModelProto, opset: int, rule: registry.Rule | None) -> onnx.ModelProto:
    """fwd plus dL/dx for a seed input `seed` (dL/dy), the MaxPool rule replaced by `rule`."""
    inferred = shape_inference.infer_shapes(fwd, strict_mode=True)
    info = TensorInfo(inferred.graph, constants_from=fwd.graph)
    taken = {o for n in fwd.graph.node for o in n.output} | {"x", "seed"}
    b = GraphBuilder(opset, taken)
    saved = registry.RULES["MaxPool"]
    if rule is not None:
        registry.RULES["MaxPool"] = rule
    try:
        dx = backprop(RuleContext(b, info), list(fwd.graph.node), "x", {"y": "seed"})
    finally:
        registry.RULES["MaxPool"] = saved
    model = onnx.ModelProto()
    model.CopyFrom(inferred)
    y = next(vi for vi in [*inferred.graph.value_info, *inferred.graph.output] if vi.name == "y")
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, None))
    model.graph.input[-1].type.CopyFrom(y.type)
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.initializers)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(dx, TensorProto.FLOAT, None))
    return model


def as_rule(variant: Callable[[RuleContext, onnx.NodeProto, str], str]) -> registry.Rule:
    def rule(ctx, node, dys, wrt):  # type: ignore[no-untyped-def]
        return [variant(ctx, node, dys[0])]

    return rule


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(name: str, rounds: int, threads: int) -> str:
    shape, attrs, pools = MAPS[name]
    variants = {
        "(a) masks": (13, as_rule(pooling.max_pool_masks)),
        "(a2) masks, all axes at once": (13, as_rule(lambda c, n, d: pooling.max_pool_masks(c, n, d, separable=False))),
        "(b) one-hot": (13, as_rule(pooling.max_pool_one_hot)),
        "(c) scatter-add, opset 16": (16, None),
    }
    sessions, node_counts = {}, {}
    for label, (opset, rule) in variants.items():
        model = gradient_model(forward_model(shape, attrs, pools, opset), opset, rule)
        node_counts[label] = len(model.graph.node)
        sessions[label] = session(model, threads)
    rs = np.random.RandomState(0)
    x = rs.permutation(int(np.prod(shape))).astype(np.float32).reshape(shape)
    y_shape = sessions["(a) masks"].get_inputs()[1].shape
    feeds = {"x": x, "seed": rs.uniform(-1, 1, y_shape).astype(np.float32)}
    grads = {label: s.run(None, feeds)[0] for label, s in sessions.items()}
    forward = "the forward pooling alone"
    sessions[forward] = session(forward_model(shape, attrs, pools, 13), threads)
    node_counts[forward] = pools + 1
    inputs = {label: feeds for label in sessions} | {forward: {"x": x}}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs[label])
            times[label].append(time.perf_counter() - start)
    base = times["(a) masks"]
    rows = []
    for label in sessions:
        ratio = statistics.median(t / b for t, b in zip(times[label], base, strict=True))
        diff = f"{float(np.max(np.abs(grads[label] - grads['(a) masks']))):.1e}" if label in grads else ""
        ms = f"{1e3 * statistics.median(base):.1f}" if label == "(a) masks" else ""
        rows.append(f"| {name} | {label} | {ratio:.2f} | {ms} | {node_counts[label]} | {diff} |")
        name = ""
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--maps", nargs="*", default=list(MAPS), choices=list(MAPS))
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s), {args.rounds} interleaved rounds")
    print("| map | variant | time / (a) | (a) ms | nodes | max abs dX - dX(a) |")
    print("|---|---|---|---|---|---|")
    for name in args.maps:
        print(measure(name, args.rounds, args.threads), flush=True)


if __name__ == "__main__":
    main()
