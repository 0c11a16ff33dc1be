"""prepare: the original graph, untouched, plus the gradient and Grad-CAM subgraphs.

One InferenceSession.run of the result returns the original outputs and the Grad-CAM map.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._version import __version__
from ..autodiff.builder import GraphBuilder
from ..autodiff.context import FLOAT_TYPES, RuleContext, TensorInfo
from ..errors import BadInputError, LayerNotFoundError, OnnxGradCamError, UnsupportedOpError
from . import cam, layers
from . import layout as axes
from .load import default_opset, min_ir_version, upgrade_opset
from .metadata import CLASS_INPUTS, META_PREFIX, Preprocess
from .metadata import PRESETS as PRESETS  # re-exported: the public names stay where they were
from .metadata import read_metadata as read_metadata
from .shapes import folded_constants, infer_all


@dataclass(frozen=True)
class PrepareReport:
    """What prepare chose, as recorded in the prepared model's metadata."""

    feature_tensor: str
    reduction_tensor: str
    image_input: str
    layout: str
    method: str = "gradcam"
    metadata: dict[str, str] = field(default_factory=dict)
    feature_tensors: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("gradcam",)
    outputs: tuple[str, ...] = ()
    feature_layout: str = "NCHW"


def prepare_model(
    model: onnx.ModelProto,
    feature_layer: str | Sequence[str] | None = None,
    reduction_layer: str | None = None,
    preprocess: Preprocess | None = None,
    expose_gradient: bool = False,
    source_sha256: str = "",
    methods: Sequence[str] = ("gradcam",),
    counterfactual: bool = False,
    guided: bool = False,
    target: str = "class",
    inplace: bool = False,
    layout: str | None = None,
    opset: int | None = None,
    class_input: str = "optional",
) -> tuple[onnx.ModelProto, PrepareReport]:
    """Return (prepared model, report). The input model is not modified.

    `feature_layer` may name several layers (one map each, `gradcam_map` their mean);
    `methods` lists CAM methods (the first gives `gradcam_map`); `counterfactual` adds the map
    of the negated gradient; `guided` adds Guided Backprop and Guided Grad-CAM. `target="seed"`
    replaces the class input by `gradcam_seed`, dL/d(reduction tensor) given by the caller, for
    segmentation, regression, detection or any other differentiable output. `inplace=True`
    lets prepare extend `model` itself instead of a copy (for callers that own it). `layout`
    (nchw, nhwc, tokens, sequence-first) states the feature tensors' layout where the graph does
    not tell it; otherwise it is found from the graph (surgery/layout.py). `opset` first upgrades a
    model below it with onnx's version converter (for instance 16, where overlapping MaxPool
    windows scatter-add their gradient); the IR version stays the source's where the opset allows.
    `class_input` (CLASS_INPUTS) is how `gradcam_class` is given: an optional input defaulting to
    top-1 (-1), a required input [batch], or none at all (top-1 only); class targets only.
    """
    _check_class_input(class_input, target)
    original_ir = model.ir_version
    source_opset = default_opset(model)
    upgraded_from = source_opset if opset is not None and opset > source_opset else None
    work = upgrade_opset(model, opset)
    if work is model and not inplace:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    opset = default_opset(work)
    inferred = infer_all(work)
    info = TensorInfo(inferred.graph, constants_from=work.graph)
    info.folded = folded_constants(inferred)
    low_precision = info.compute_in_float32()
    graph = work.graph

    if reduction_layer:
        reduction = layers.resolve(graph, reduction_layer, "reduction layer")
    else:
        reduction = layers.default_reduction(graph, info)
    rshape = info.shape(reduction)
    if target == "class" and (rshape is None or len(rshape) != 2):
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} has shape {rshape}, not [batch, classes]: to fix this, "
            "name the logits with --reduction-layer, or explain other outputs with --target seed"
        )
    if rshape is None:
        raise LayerNotFoundError(
            f"the shape of the reduction tensor {reduction!r} is unknown: to fix this, "
            "name another tensor with --reduction-layer"
        )
    if feature_layer is None:
        features = [layers.default_feature(graph, info, reduction)]
    else:
        names = [feature_layer] if isinstance(feature_layer, str) else list(feature_layer)
        features = [layers.resolve(graph, n, "feature layer") for n in names]
    for feature in features:
        frank = info.rank(feature)
        if frank is None or frank < 3:
            raise LayerNotFoundError(
                f"the feature tensor {feature!r} has shape {info.shape(feature)}: Grad-CAM needs a feature map "
                "of rank >= 3 ([batch, channels, ...spatial]); to fix this, pick one from `onnx-gradcam layers MODEL`"
            )
    if info.dtype(reduction) not in FLOAT_TYPES:
        for feature in features:  # an integer score after ArgMax, TopK's Indices, NMS: name that op
            layers.check_differentiable(graph, feature, reduction)
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} is an integer (quantized) tensor: to fix this, name the float "
            "tensor dequantized from it with --reduction-layer"
        )
    dequantize = {f: q for f in features if (q := layers.dequantization(graph, info, f)) is not None}
    image = layers.image_input(graph, info)
    image_shape = info.shape(image)
    assert image_shape is not None
    input_layout = axes.image_layout(image_shape, layers.is_token_input(info, image))
    if guided and input_layout == axes.TOKEN_IDS:
        raise BadInputError(
            f"--guided draws the gradient at the input, but {image!r} holds integer ids, which have none: to fix "
            "this, leave out --guided (the Grad-CAM map over the ids needs no gradient there)"
        )
    layouts = _feature_layouts(graph, info, features, layout, image_shape, input_layout)
    spec = cam.CamSpec(
        tuple(features),
        reduction,
        tuple(methods),
        counterfactual,
        guided,
        expose_gradient,
        target,
        dequantize,
        {f: lay for f, lay in layouts.items() if not lay.is_identity},
    )
    for feature in features:
        layers.check_differentiable(graph, feature, reduction)

    taken = {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    b = GraphBuilder(opset, taken)
    # float16 (and bfloat16) models: the gradient and the maps are computed in float32, reading
    # the forward tensors through Casts. float16 has a 10-bit mantissa and its smallest normal
    # number is 6.1e-5, while a class score's gradient at the feature map is a classifier weight
    # over the number of positions, shrunk by every layer of the head. Measured on torchvision's
    # mobilenet_v3_large (float32, calibrated random weights): 90% of dS/dA lies below 6.1e-5,
    # where float16 keeps a few bits (rounding moves entries by up to 18%); resnet18 and
    # efficientnet_b0: 7% and 9%. Σ_k α_k A_k then sums 512 to 1280 channels, and Grad-CAM++'s
    # constants (1e-6, 1e-7) are float16 subnormals. The head's backward pass is small next to the
    # forward pass, so float32 costs little; onnxruntime's CPU provider runs most float16 ops
    # through float32 Casts of its own anyway. The outputs are float32 either way (the contract).
    b.cast_on_read(low_precision, TensorProto.FLOAT)
    target_input = b.reserve(cam.CLASS_INPUT if target == "class" else cam.SEED_INPUT)
    ctx = RuleContext(b, info, unclipped=layers.score_quantizers(graph, reduction))
    read_by_cam = None if class_input == "none" else target_input
    try:
        outs = cam.append_cam(ctx, list(graph.node), image, input_layout, spec, read_by_cam)
    except UnsupportedOpError as err:
        after = _node_output(graph, err.node_name)
        later = layers.downstream_candidates(graph, info, reduction, after)
        raise err.with_alternatives(later, layers.scores_before(graph, info, err.node_name, features)) from None

    renamed: dict[str, str] = {}
    produced = {o for node in b.nodes for o in node.output}
    for public_name, (internal, dtype, shape) in outs.tensors.items():
        b.reserve(public_name)
        if internal in produced and internal not in renamed:
            renamed[internal] = public_name  # the appended node writes the output itself
        else:  # an original tensor (exposed features) or one already public under another name
            source = renamed.get(internal, internal)
            b.nodes.append(helper.make_node("Identity", [source], [public_name], name=b.fresh(f"{public_name}_out")))
        graph.output.append(helper.make_tensor_value_info(public_name, dtype, [_dim(d) for d in shape]))
    _rename(b.nodes, renamed)

    nodes, inits = _live(b.nodes, b.initializers, set(outs.tensors))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    if target == "class" and class_input == "optional":
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), target_input))
        graph.input.append(helper.make_tensor_value_info(target_input, TensorProto.INT64, ["gradcam_classes"]))
    elif target == "class" and class_input == "required":  # one per sample: batches as the image does
        batch_dim = _dim(image_shape[0]) or "gradcam_classes"
        graph.input.append(helper.make_tensor_value_info(target_input, TensorProto.INT64, [batch_dim]))
    elif target == "seed":
        seed_dims = [_dim(image_shape[0]), *[_dim(d) for d in rshape[1:]]]
        graph.input.append(helper.make_tensor_value_info(target_input, info.dtype(reduction), seed_dims))
    known = {vi.name for vi in [*graph.input, *graph.output, *graph.value_info]}
    if reduction not in known:  # its type, for callers that add the logits to the outputs
        graph.value_info.append(helper.make_tensor_value_info(reduction, info.stored_dtype(reduction), None))

    work.ir_version = max(original_ir, min_ir_version(opset))
    meta = {
        "feature_tensor": features[0],
        "reduction_tensor": reduction,
        "method": spec.methods[0],
        "source_sha256": source_sha256,
        "version": __version__,
        "input": image,
        "input_layout": input_layout,
        "feature_layout": layouts[features[0]].label,
        "feature_layouts": json.dumps([layouts[f].label for f in features]),
        "methods": json.dumps(list(spec.methods)),
        "feature_tensors": json.dumps(features),
        "counterfactual": json.dumps(counterfactual),
        "guided": json.dumps(guided),
        "target": target,
    }
    if target == "class":
        meta["class_input"] = class_input
    if preprocess is not None:
        meta["preprocess"] = preprocess.to_json()
    if upgraded_from is not None:
        meta["source_opset"] = str(upgraded_from)
    existing = {p.key for p in work.metadata_props}
    for key, value in meta.items():
        full = META_PREFIX + key
        if full in existing:
            raise OnnxGradCamError(f"the model already has metadata {full!r}: to fix this, prepare the original model")
        work.metadata_props.append(onnx.StringStringEntryProto(key=full, value=value))
    report = PrepareReport(
        features[0],
        reduction,
        image,
        input_layout,
        spec.methods[0],
        {META_PREFIX + k: v for k, v in meta.items()},
        tuple(features),
        tuple(spec.methods),
        tuple(outs.tensors),
        layouts[features[0]].label,
    )
    return work, report


def _check_class_input(class_input: str, target: str) -> None:
    if class_input not in CLASS_INPUTS:
        raise BadInputError(f"unknown class input {class_input!r}: to fix this, use one of {', '.join(CLASS_INPUTS)}")
    if target != "class" and class_input != "optional":
        raise BadInputError(
            f"--class-input {class_input} applies to class targets, but this model is prepared with --target "
            f"{target} (its gradcam_seed input is always required): to fix this, leave out --class-input"
        )


def _feature_layouts(
    graph: onnx.GraphProto,
    info: TensorInfo,
    features: Sequence[str],
    given: str | None,
    image_shape: Sequence[object],
    input_layout: str,
) -> dict[str, axes.Layout]:
    """Each feature tensor's layout: the one the user gave, else the graph's; an error for a
    tensor whose layout neither tells (a guess could be a wrong map)."""
    found = layers.feature_layouts(graph, info)
    spatial_rank = axes.spatial_rank(image_shape, input_layout)
    image_spatial = [image_shape[i] for i in cam.spatial_axes(image_shape, input_layout)]
    result = {}
    for f in features:
        shape = info.shape(f) or ()
        if given is not None:
            result[f] = axes.given_layout(given, shape, spatial_rank, image_spatial)
        elif f in found:
            result[f] = found[f]
        else:
            raise LayerNotFoundError(
                f"cannot tell the layout of the feature tensor {f!r} (shape {list(shape)}) from the graph: to fix "
                f"this, give it with --layout ({', '.join(axes.CHOICES)}), or pick a tensor whose layout "
                "`onnx-gradcam layers MODEL` shows"
            )
        if result[f].spatial_size() == 1:
            raise LayerNotFoundError(
                f"the feature tensor {f!r} (shape {list(shape)}, {result[f].label}) has a single position, as after "
                "global pooling: Grad-CAM needs a spatial map; to fix this, pick an earlier tensor from "
                "`onnx-gradcam layers MODEL`"
            )
    return result


def _rename(nodes: list[onnx.NodeProto], names: dict[str, str]) -> None:
    """Rename tensors of appended nodes in place (internal name -> public output name)."""
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)


def _live(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: set[str]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The appended nodes and initializers that some output needs (rules may emit more than a
    method uses, e.g. a broadcast gradient whose mean is known): the rest is dropped."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(_reads(node))
    return list(reversed(kept)), [t for t in inits if t.name in needed]


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads: its inputs and what its subgraphs (a Loop's body) read from the
    enclosing graph (their own tensors too: fresh names, so they match nothing outside)."""
    names = set(node.input)
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for inner in g.node:
                names |= _reads(inner)
    return names


def _dim(d: object) -> int | str | None:
    return d if isinstance(d, (int, str)) else None


def _node_output(graph: onnx.GraphProto, node_name: str) -> str:
    for node in graph.node:
        if node.name == node_name or (node.output and node.output[0] == node_name):
            return node.output[0]
    return node_name
