"""Choosing the feature tensor (A) and the reduction tensor (the score's source).

The default feature tensor is the deepest tensor of rank >= 3 with spatial size > 1 that every
differentiable path from the input to the score passes through: the last conv feature map.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from ..autodiff.backprop import backward_reachable, forward_reachable
from ..autodiff.context import TensorInfo
from ..autodiff.registry import differentiable_inputs
from ..errors import LayerNotFoundError
from . import layout as axes

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
    # an integer tensor of a QOperator graph: (scale, zero point) that dequantize it for the CAM
    dequantize: tuple[str, str] | None = None
    layout: str = "?"  # NCHW, NHWC, tokens 1+14x14, sequence-first; "?" when the graph does not tell


def graph_inputs(graph: onnx.GraphProto) -> list[str]:
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


_INTEGER_TYPES = {
    TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
}  # fmt: skip


def image_input(graph: onnx.GraphProto, info: TensorInfo) -> str:
    """The input the map is drawn over: the first float input of rank >= 3, else the first
    integer input [N, T] (tokens or bytes) that an embedding reads (see `embedding_outputs`)."""
    names = graph_inputs(graph)
    for name in names:
        shape = info.shape(name)
        if info.dtype(name) in _FLOAT_TYPES and shape is not None and len(shape) >= 3:
            return name
    for name in names:
        if is_token_input(info, name) and embedding_outputs(graph, info, name):
            return name
    tokens = [n for n in names if is_token_input(info, n)]
    if tokens:
        raise LayerNotFoundError(
            f"the integer input {tokens[0]!r} {list(info.shape(tokens[0]) or ())} reaches no embedding (a Gather "
            "from a float table, OneHot, or Equal with a constant then Cast to float): onnx-gradcam explains token "
            "and byte models at a float tensor after their embedding; to fix this, export the embedding as one of those"
        )
    raise LayerNotFoundError(
        "the model has no float input of rank >= 3 (an image, a signal or a volume) and no integer input [N, T] "
        "(tokens or bytes): onnx-gradcam explains convolutional models of such inputs"
    )


def is_token_input(info: TensorInfo, name: str) -> bool:
    """An integer tensor [N, T]: token ids or bytes."""
    shape = info.shape(name)
    return info.dtype(name) in _INTEGER_TYPES and shape is not None and len(shape) == 2


def differentiable_sources(graph: onnx.GraphProto, info: TensorInfo, image: str) -> list[str]:
    """Where gradient paths start: the image itself, or the embeddings of a token input."""
    return embedding_outputs(graph, info, image) if is_token_input(info, image) else [image]


def embedding_outputs(graph: onnx.GraphProto, info: TensorInfo, ids: str) -> list[str]:
    """The float tensors an integer input's values first become, position by position: Gather from
    a float table (nn.Embedding), OneHot (float, or integer and then Cast to float), and Cast to
    float of Equal with a constant that adds an axis (a one-hot by broadcasting, as tf2onnx and
    hand-written exports do). Other float tensors
    made from the ids (an attention mask: Cast(Equal(ids, 0))) are not embeddings: no gradient
    path to the score starts there that a feature map should explain."""
    integer = {ids}  # integer or boolean tensors computed from the ids
    one_hot: set[str] = set()  # boolean one-hot tensors (Equal with an added axis)
    found: list[str] = []
    for node in graph.node:
        read = [i for i in node.input if i in integer]
        if not read:
            continue
        op = node.op_type
        out = node.output[0] if node.output else ""
        if op == "Gather" and node.input[1] in integer and node.input[0] not in integer:
            if info.dtype(node.input[0]) in _FLOAT_TYPES and info.const(node.input[0]) is not None:
                found.append(out)
                continue
        if op == "OneHot" and node.input[0] in integer and info.dtype(out) in _FLOAT_TYPES:
            found.append(out)
            continue
        if (op == "OneHot" and node.input[0] in integer) or (op == "Equal" and _adds_axis(info, read, out)):
            one_hot.add(out)  # an integer or boolean one-hot (torch's F.one_hot is int64), cast later
        if op == "Cast" and node.input[0] in one_hot and info.dtype(out) in _FLOAT_TYPES:
            found.append(out)
            continue
        for o in node.output:
            if o and info.dtype(o) not in _FLOAT_TYPES:
                integer.add(o)
                if op in ("Cast", "Identity", "Reshape", "Transpose") and node.input[0] in one_hot:
                    one_hot.add(o)
    return found


def _adds_axis(info: TensorInfo, read: list[str], out: str) -> bool:
    """True if `out` is larger than the one id tensor it compares (with a constant) on one axis
    where the ids have size 1: the class axis of a one-hot."""
    oshape = info.shape(out)
    shape = info.shape(read[0]) if len(read) == 1 else None
    if oshape is None or shape is None or len(shape) != len(oshape):
        return False
    return sum(1 for d, o in zip(shape, oshape) if d == 1 and o != 1) == 1


_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "QuantizeLinear", "DequantizeLinear")

# where each quantized op reads its output's (scale, zero point)
_OUTPUT_QPARAMS: dict[str, tuple[int, int]] = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QLinearConcat": (0, 1),
}
# QOperator ops that are a linear float op followed by requantization
_QLINEAR_FLOAT = {
    "QLinearConv": "Conv",
    "QLinearMatMul": "MatMul",
    "QGemm": "Gemm",
    "QLinearAdd": "Add",
    "QLinearGlobalAveragePool": "GlobalAveragePool",
    "QLinearAveragePool": "AveragePool",
    "QLinearConcat": "Concat",
}
# ops that move quantized values without changing their scale
_QUANT_KEEPING = {"MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Split"}


def quantization_params(graph: onnx.GraphProto) -> dict[str, tuple[str, str]]:
    """Integer tensors of an int8 graph -> the (scale, zero point) that dequantize them: outputs of
    QuantizeLinear and of QLinear* ops, and what MaxPool, Reshape and the like make of those."""
    params: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        where = _OUTPUT_QPARAMS.get(node.op_type)
        if where is not None and len(node.input) > where[1] and node.input[where[0]]:
            params[node.output[0]] = (node.input[where[0]], node.input[where[1]])
        elif node.op_type in _QUANT_KEEPING and node.input and node.input[0] in params:
            for out in node.output[: 1 if node.op_type == "MaxPool" else len(node.output)]:
                params[out] = params[node.input[0]]
    return params


def _stand_ins(graph: onnx.GraphProto) -> set[str]:
    """Tensors that another tensor stands for (QDQ): a float tensor read only by QuantizeLinear
    (the DequantizeLinear after it gives the activation the network goes on with), and an integer
    tensor read only by DequantizeLinear (its float form is that node's output)."""
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    return {
        t
        for t, ops in consumers.items()
        if ops and (all(op == "QuantizeLinear" for op in ops) or all(op == "DequantizeLinear" for op in ops))
    }


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


def score_quantizers(graph: onnx.GraphProto, reduction: str) -> set[str]:
    """The integer tensor the score is dequantized from, if any (an int8 model's output
    quantizer): its clip is not the network's, and the explained logit is often the largest
    that calibration saw, which saturates; so the score's gradient passes it unclipped."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(reduction)
    if node is not None and node.op_type == "DequantizeLinear":
        return {node.input[0]}
    return set()


def dequantization(graph: onnx.GraphProto, info: TensorInfo, tensor: str) -> tuple[str, str] | None:
    """(scale, zero point) of an integer feature tensor (QOperator), None for a float one; an
    error for an integer tensor of unknown scale."""
    if info.dtype(tensor) in _FLOAT_TYPES:
        return None
    params = quantization_params(graph).get(tensor)
    if params is None:
        raise LayerNotFoundError(
            f"the tensor {tensor!r} is an integer tensor of unknown scale: to fix this, pick a float or "
            "dequantizable one from `onnx-gradcam layers MODEL`"
        )
    return params


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


_LINEAR = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "Add",
    "Sub",
    "Sum",
    "Neg",
    "BatchNormalization",
    "Resize",
    "Upsample",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Dropout",
    "Cast",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Pad",
    "GlobalAveragePool",
    "AveragePool",
    "ReduceMean",
    "ReduceSum",
}


# a dense output's head: linear maps, plus the per-pixel output activation (probabilities)
# (a QDQ pair is the identity up to its clip: the tail runs through it, and a dequantized
# activation is not a linear op's output, since the clip is where the quantizer put the ReLU)
_TAIL = _LINEAR | {"Sigmoid", "Softmax", "LogSoftmax", "QuantizeLinear", "DequantizeLinear"} | set(_QLINEAR_FLOAT)


def _linear_tail(nodes: list[onnx.NodeProto], reduction: str, on_path: set[str]) -> set[str]:
    """Tensors from which every path to the reduction is linear (a dense output's classifier)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for k in differentiable_inputs(node):  # Shape and the like read no values
            if k < len(node.input) and node.input[k] in on_path:
                consumers.setdefault(node.input[k], []).append(node)
    tail = {reduction}
    for node in reversed(nodes):
        for t in node.input:
            if t not in on_path or t in tail:
                continue
            ok = True
            for c in consumers.get(t, []):
                path_inputs = sum(1 for i in c.input if i in on_path)
                linear = c.op_type in _TAIL or (c.op_type in ("Mul", "Div", "MatMul") and path_inputs == 1)
                if not linear or not all(o in tail for o in c.output if o in on_path):
                    ok = False
                    break
            if ok:
                tail.add(t)
    return tail


def _after_global_pooling(
    nodes: list[onnx.NodeProto], info: TensorInfo, sources: list[str], reduction: str, on_path: set[str]
) -> set[str]:
    """Tensors after the first 1x1 (globally pooled) tensor that every path passes through:
    reshaped or transposed copies of pooled features (e.g. channels-last [N, 1, 1, C] around a
    LayerNorm) are not spatial feature maps, whatever their last axes look like."""
    for node in nodes:
        for out in node.output:
            shape = info.shape(out)
            if out not in on_path or shape is None or len(shape) < 3:
                continue
            spatial = [d for d in shape[2:] if isinstance(d, int)]
            if len(spatial) != len(shape) - 2 or math.prod(spatial) != 1:
                continue
            if _dominates(nodes, sources, out, reduction):
                return forward_reachable(nodes, [out]) - {out}
    return set()


def _activation_op(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], info: TensorInfo) -> str:
    """The op that made a tensor's values, looking through a QDQ pair DQ(Q(t)) to t's producer and
    reading a QLinear op as its float op — unless the output's range starts at zero (zero point at
    qmin): that clip is the ReLU the quantizer removed or fused, so the result is an activation."""
    quant = node
    if node.op_type == "DequantizeLinear" and node.input[0] in producers:
        quant = producers[node.input[0]]
        if quant.op_type != "QuantizeLinear" or quant.input[0] not in producers:
            return node.op_type
        made_by = producers[quant.input[0]].op_type
    elif node.op_type in _QLINEAR_FLOAT:
        made_by = _QLINEAR_FLOAT[node.op_type]
    else:
        return node.op_type
    where = _OUTPUT_QPARAMS[quant.op_type]
    zp = info.const(quant.input[where[1]]) if len(quant.input) > where[1] and quant.input[where[1]] else None
    qmin = 0 if zp is None or zp.dtype.kind == "u" else int(np.iinfo(zp.dtype).min)
    if zp is None or np.all(zp == qmin):
        return "QuantizeLinear"
    return made_by


def feature_layouts(graph: onnx.GraphProto, info: TensorInfo) -> dict[str, axes.Layout]:
    """The layout of every tensor whose axes the graph explains (see surgery/layout.py)."""
    source = image_input(graph, info)
    shape = info.shape(source) or ()
    input_layout = axes.image_layout(shape, is_token_input(info, source))
    roles = axes.propagate(list(graph.node), info, source, input_layout)
    spatial_rank = axes.spatial_rank(shape, input_layout)
    found = {}
    for name, r in roles.items():
        lay = axes.layout_of(r, info.shape(name), spatial_rank)
        if lay is not None:
            found[name] = lay
    return found


def candidates(
    graph: onnx.GraphProto, info: TensorInfo, reduction: str, all_dominators: bool = True
) -> list[Candidate]:
    """Feature-map candidates on the paths input -> reduction, shallowest first.

    For dense outputs (a reduction tensor of rank >= 3: segmentation, detection maps), the
    linear classifier at the end (Conv, Resize, ...) is not a default: its output is the class
    map itself; the default is the last activation before it. A tensor whose layout the graph
    does not tell is listed but never the default.
    """
    nodes = list(graph.node)
    source = image_input(graph, info)
    sources = differentiable_sources(graph, info, source)
    fwd = forward_reachable(nodes, sources)
    bwd = backward_reachable(nodes, [reduction])
    if reduction not in fwd:
        for start in sources:
            check_differentiable(graph, start, reduction)  # names a non-differentiable op, if one is the cause
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} does not depend differentiably on the input {source!r}: "
            "to fix this, choose another --reduction-layer"
        )
    layouts = feature_layouts(graph, info)
    pooled = _after_global_pooling(nodes, info, sources, reduction, fwd & bwd)
    qparams = quantization_params(graph)
    skip = _stand_ins(graph)
    found: list[tuple[str, onnx.NodeProto, tuple[int | str | None, ...]]] = []
    for node in nodes:
        for out in node.output:
            if out not in fwd or out not in bwd or out == reduction or out in pooled or out in skip:
                continue
            shape = info.shape(out)
            if shape is None or len(shape) < 3:
                continue
            if info.dtype(out) not in _FLOAT_TYPES and out not in qparams:
                continue
            lay = layouts.get(out)
            size = lay.spatial_size() if lay is not None else None
            if (lay is not None and (size is None or size > 1)) or (lay is None and _spatial_gt_one(shape)):
                found.append((out, node, shape))
    rshape = info.shape(reduction)
    tail = _linear_tail(nodes, reduction, fwd & bwd) if rshape is not None and len(rshape) >= 3 else set()
    producers = {o: n for n in nodes for o in n.output}
    chosen = _class_token_default(nodes, info, layouts, [f[0] for f in found], fwd & bwd, fwd)
    result: list[Candidate] = []
    default_set = chosen is not None
    for out, node, shape in reversed(found):
        dom = _dominates(nodes, sources, out, reduction) if (all_dominators or not default_set) else False
        eligible = out not in tail or _activation_op(node, producers, info) not in _LINEAR | {"Mul", "Div", "MatMul"}
        eligible = eligible and out in layouts
        is_default = out == chosen if chosen is not None else dom and eligible and not default_set
        default_set = default_set or is_default
        quant = qparams.get(out) if info.dtype(out) not in _FLOAT_TYPES else None
        label = layouts[out].label if out in layouts else "?"
        result.append(Candidate(out, node.op_type, node.name, shape, dom, is_default, quant, label))
    return list(reversed(result))


_NORMALISATIONS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}


def _class_token_default(
    nodes: list[onnx.NodeProto],
    info: TensorInfo,
    layouts: dict[str, axes.Layout],
    found: list[str],
    on_path: set[str],
    dynamic: set[str],
) -> str | None:
    """For a model that predicts from its class (or distillation) tokens alone, the default layer.

    After the last op that mixes tokens (attention: a MatMul of two activations), every token
    goes its own way to the head, so the score's gradient is zero on all patch tokens of every
    later tensor: Grad-CAM there is an empty map. The default is then the normalised input of
    that last mixer (ViT/DeiT: the last block's norm1, the layer pytorch-grad-cam's tutorials
    pick), or, without a normalisation op, the deepest token tensor before it. None for models
    that pool their tokens (Swin, LeViT) or have no tokens: their deepest map carries gradient
    everywhere.
    """
    if not _reads_class_tokens_only(nodes, info, layouts, on_path):
        return None
    mixers = [
        n
        for n in nodes
        if n.op_type in ("MatMul", "Einsum") and n.output[0] in on_path and sum(i in dynamic for i in n.input) >= 2
    ]
    if not mixers:
        return None
    before = backward_plain(nodes, mixers[-1].output[0])
    grids = [t for t in found if t in before and t in layouts and "tokens" in layouts[t].label]
    norms = _normalised(nodes, dynamic)
    normalised = [t for t in grids if t in norms]
    pool = normalised or grids
    return pool[-1] if pool else None


def _normalised(nodes: list[onnx.NodeProto], dynamic: set[str]) -> set[str]:
    """Outputs of layer normalisations: the op itself, or as opsets before 17 spell it out,
    (x - mean) / Sqrt(var + eps), then at most a Mul by a weight and an Add of a bias."""
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    found = {n.output[0] for n in nodes if n.op_type in _NORMALISATIONS}
    for node in nodes:
        root = producers.get(node.input[1]) if node.op_type == "Div" and len(node.input) > 1 else None
        if root is None or root.op_type != "Sqrt":
            continue
        out = node.output[0]
        for op in ("Mul", "Add"):
            after = consumers.get(out, [])
            if len(after) == 1 and after[0].op_type == op and sum(i in dynamic for i in after[0].input) == 1:
                out = after[0].output[0]
        found.add(out)
    return found


def _reads_class_tokens_only(
    nodes: list[onnx.NodeProto], info: TensorInfo, layouts: dict[str, axes.Layout], on_path: set[str]
) -> bool:
    """True if the score reads a token axis with extra tokens only by selecting some of them
    (Gather or Slice of the class tokens), never by pooling over the tokens."""
    selects = pools = 0
    for node in nodes:
        if not node.input or node.input[0] not in on_path or node.input[0] not in layouts:
            continue
        roles = layouts[node.input[0]].roles
        token_axis = next((a for a, r in enumerate(roles) if axes.parse_tokens(r)), None)
        if token_axis is None:
            continue
        extra = axes.parse_tokens(roles[token_axis])[0]  # type: ignore[index]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gather" and int(attrs.get("axis", 0)) % len(roles) == token_axis:
            indices = info.const(node.input[1])
            if indices is not None and extra and bool(np.all((indices >= 0) & (indices < extra))):
                selects += 1
        elif node.op_type == "Slice" and node.output[0] not in layouts and extra:
            selects += 1  # layout.py keeps the grid of any slice but one of the class tokens
        elif node.op_type in ("ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool"):
            rank = len(roles)
            reduced = axes.reduce_axes(node, info, rank) if node.op_type != "GlobalAveragePool" else set(range(2, rank))
            pools += token_axis in (reduced or set())
    return selects > 0 and pools == 0


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


def scores_before(graph: onnx.GraphProto, info: TensorInfo, node_name: str, features: list[str]) -> list[str]:
    """The float inputs of the node named `node_name` (or writing that tensor) that depend
    differentiably on every feature tensor: scores the gradient can start from, before that node."""
    nodes = list(graph.node)
    node = next((n for n in nodes if n.name == node_name or (n.output and n.output[0] == node_name)), None)
    if node is None:
        return []
    reach = [forward_reachable(nodes, [f]) for f in features]
    return [
        i
        for i in dict.fromkeys(node.input)
        if i and info.dtype(i) in _FLOAT_TYPES and all(i in r for r in reach) and i not in features
    ]


def check_differentiable(graph: onnx.GraphProto, feature: str, reduction: str) -> None:
    """An error naming the non-differentiable op (NMS, TopK indices, ArgMax, ...) between the
    feature tensor and the reduction tensor, and the tensors before it, when the score cannot
    carry a gradient back to the feature map."""
    nodes = list(graph.node)
    if reduction in forward_reachable(nodes, [feature]):
        return
    # plain reachability, differentiable or not
    reached = {feature}
    for node in nodes:
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    if reduction not in reached:
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} does not depend on the feature tensor {feature!r}: to fix this, "
            "choose a feature layer before it (see `onnx-gradcam layers MODEL`)"
        )
    fwd = forward_reachable(nodes, [feature])
    ancestors = backward_plain(nodes, reduction)
    # a node that reads the feature's descendants and writes the score's ancestors without
    # passing gradient along that output (ArgMax, Round, NonMaxSuppression, TopK's Indices, ...)
    blockers = [
        (n, dead)
        for n in nodes
        if any(i in fwd for i in n.input) and (dead := [o for o in n.output if o and o in ancestors and o not in fwd])
    ]
    if not blockers:
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} does not depend differentiably on the feature tensor {feature!r}: "
            "to fix this, choose a reduction tensor that does with --reduction-layer (see `onnx-gradcam layers MODEL`)"
        )
    node, dead = blockers[-1]  # the one nearest the score
    # the tensors nearest before it that carry gradient: its other outputs (TopK's Values), its inputs
    usable = [o for o in node.output if o in fwd] + [i for i in node.input if i in fwd]
    via = f", output {dead[0]!r}" if len(node.output) > 1 else ""
    where = f"op {node.op_type!r} (node {node.name or node.output[0]!r}{via})"
    raise LayerNotFoundError(
        f"the reduction tensor {reduction!r} lies after {where}, which passes no gradient: to fix this, choose "
        f"a reduction tensor before it with --reduction-layer, e.g. {', '.join(repr(t) for t in usable[:3])}"
    )


def backward_plain(nodes: list[onnx.NodeProto], target: str) -> set[str]:
    """Every tensor `target` depends on, through any input."""
    reached = {target}
    for node in reversed(nodes):
        if any(o in reached for o in node.output if o):
            reached.update(i for i in node.input if i)
    return reached


def list_layers(model: str | os.PathLike[str], reduction_layer: str | None = None) -> tuple[str, list[Candidate]]:
    """(score tensor, feature-map candidates shallowest first; `default` marks prepare's choice) of a model file."""
    from .load import load_model, upgrade_opset
    from .shapes import infer_all

    proto = upgrade_opset(load_model(model))
    info = TensorInfo(infer_all(proto).graph, constants_from=proto.graph)
    graph = proto.graph
    reduction = (
        resolve(graph, reduction_layer, "reduction layer") if reduction_layer else default_reduction(graph, info)
    )
    return reduction, candidates(graph, info, reduction)
