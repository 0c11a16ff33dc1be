"""Choosing the feature tensor (A) and the reduction tensor (the score's source).

The default feature tensor is the deepest tensor of rank >= 3 with spatial size > 1 that every
differentiable path from the input to the score passes through: the last conv feature map.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from ..autodiff.backprop import backward_reachable, forward_reachable
from ..autodiff.context import TensorInfo
from ..autodiff.registry import differentiable_inputs
from ..errors import LayerNotFoundError

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Candidate:
    """A tensor that could serve as Grad-CAM's feature map."""

    name: str
    op_type: str
    node_name: str
    shape: tuple[int | str | None, ...]
    dominates: bool
    default: bool = False


def graph_inputs(graph: onnx.GraphProto) -> list[str]:
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def image_input(graph: onnx.GraphProto, info: TensorInfo) -> str:
    """The input the map is drawn over: the first float input of rank >= 3."""
    for name in graph_inputs(graph):
        shape = info.shape(name)
        if info.dtype(name) in _FLOAT_TYPES and shape is not None and len(shape) >= 3:
            return name
    raise LayerNotFoundError(
        "the model has no float input of rank >= 3 (an image, a signal or a volume): "
        "onnx-gradcam explains convolutional models of such inputs"
    )


_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")


def default_reduction(graph: onnx.GraphProto, info: TensorInfo) -> str:
    """The first output; if a (Log)Softmax produced it (possibly behind reshapes, as opset
    converters leave them), that op's input: the score before softmax."""
    producers = {o: n for n in graph.node for o in n.output}
    first = graph.output[0].name
    name = first
    while name in producers and producers[name].op_type in _PASS_THROUGH:
        name = producers[name].input[0]
    node = producers.get(name)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return first
    logits = node.input[0]
    # step back over reshapes that keep [batch, classes]
    while logits in producers and producers[logits].op_type in _PASS_THROUGH:
        before = producers[logits].input[0]
        if info.shape(before) is None or len(info.shape(before) or ()) != 2:
            break
        logits = before
    return logits


def resolve(graph: onnx.GraphProto, name: str, what: str) -> str:
    """A tensor name, or a node name (meaning that node's first output)."""
    tensors = {o for n in graph.node for o in n.output} | set(graph_inputs(graph))
    if name in tensors:
        return name
    for node in graph.node:
        if node.name == name:
            return node.output[0]
    pool = sorted(tensors | {n.name for n in graph.node if n.name})
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
    raise LayerNotFoundError(
        f"no tensor or node named {name!r} for the {what}{hint}: to fix this, pick a name from "
        "`onnx-gradcam layers MODEL`"
    )


def _dominates(nodes: list[onnx.NodeProto], sources: list[str], cut: str, target: str) -> bool:
    """True if every differentiable path sources -> target passes through `cut`."""
    reached = set(sources) - {cut}
    for node in nodes:
        if any(node.input[i] in reached for i in differentiable_inputs(node) if i < len(node.input)):
            reached.update(o for o in node.output if o and o != cut)
    return target not in reached


def _spatial_gt_one(shape: tuple[int | str | None, ...]) -> bool:
    spatial = shape[2:]
    if any(not isinstance(d, int) for d in spatial):
        return True  # unknown at prepare time (dynamic height/width): may be > 1
    size = 1
    for d in spatial:
        size *= int(d)  # type: ignore[arg-type]
    return size > 1


def candidates(graph: onnx.GraphProto, info: TensorInfo, reduction: str, all_dominators: bool = True) -> list[Candidate]:
    """Feature-map candidates on the paths input -> reduction, shallowest first."""
    nodes = list(graph.node)
    source = image_input(graph, info)
    fwd = forward_reachable(nodes, [source])
    bwd = backward_reachable(nodes, [reduction])
    if reduction not in fwd:
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} does not depend differentiably on the input {source!r}: "
            "to fix this, choose another --reduction-layer"
        )
    found: list[tuple[str, onnx.NodeProto, tuple[int | str | None, ...]]] = []
    for node in nodes:
        for out in node.output:
            if out not in fwd or out not in bwd or out == reduction:
                continue
            shape = info.shape(out)
            if shape is None or len(shape) < 3 or info.dtype(out) not in _FLOAT_TYPES:
                continue
            if _spatial_gt_one(shape):
                found.append((out, node, shape))
    result: list[Candidate] = []
    default_set = False
    for out, node, shape in reversed(found):
        dom = _dominates(nodes, [source], out, reduction) if (all_dominators or not default_set) else False
        is_default = dom and not default_set
        default_set = default_set or is_default
        result.append(Candidate(out, node.op_type, node.name, shape, dom, is_default))
    return list(reversed(result))


def default_feature(graph: onnx.GraphProto, info: TensorInfo, reduction: str) -> str:
    for cand in reversed(candidates(graph, info, reduction, all_dominators=False)):
        if cand.default:
            return cand.name
    raise LayerNotFoundError(
        "found no tensor of rank >= 3 with spatial size > 1 that every path to the score passes "
        "through: to fix this, name one with --feature-layer (see `onnx-gradcam layers MODEL`)"
    )


def downstream_candidates(graph: onnx.GraphProto, info: TensorInfo, reduction: str, after: str) -> list[str]:
    """Candidate feature tensors that lie after the node producing/consuming `after`, deepest first."""
    nodes = list(graph.node)
    later = forward_reachable(nodes, [after])
    return [c.name for c in reversed(candidates(graph, info, reduction)) if c.name in later and c.dominates]
