"""prepare: the original graph, untouched, plus the gradient and Grad-CAM subgraphs.

One InferenceSession.run of the result returns the original outputs and the Grad-CAM map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._version import __version__
from ..autodiff.builder import GraphBuilder
from ..autodiff.context import RuleContext, TensorInfo
from ..errors import LayerNotFoundError, OnnxGradCamError, UnsupportedOpError
from . import cam, layers
from .load import default_opset, min_ir_version, upgrade_opset
from .shapes import infer_all

META_PREFIX = "gradcam."


@dataclass(frozen=True)
class Preprocess:
    """How images become the model's input: pixels/255, minus mean, over std, RGB or BGR."""

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    bgr: bool = False

    def to_json(self) -> str:
        return json.dumps({"mean": list(self.mean), "std": list(self.std), "bgr": self.bgr})

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        return cls(tuple(d["mean"]), tuple(d["std"]), bool(d.get("bgr", False)))


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(),
    "unit": Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "symmetric": Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": Preprocess((0.0, 0.0, 0.0), (1.0 / 255, 1.0 / 255, 1.0 / 255)),
}


@dataclass(frozen=True)
class PrepareReport:
    """What prepare chose, as recorded in the prepared model's metadata."""

    feature_tensor: str
    reduction_tensor: str
    image_input: str
    layout: str
    method: str = "gradcam"
    metadata: dict[str, str] = field(default_factory=dict)


def prepare_model(
    model: onnx.ModelProto,
    feature_layer: str | None = None,
    reduction_layer: str | None = None,
    preprocess: Preprocess | None = None,
    expose_gradient: bool = False,
    source_sha256: str = "",
) -> tuple[onnx.ModelProto, PrepareReport]:
    """Return (prepared model, report). The input model is not modified."""
    original_ir = model.ir_version
    work = upgrade_opset(model)
    if work is model:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    opset = default_opset(work)
    inferred = infer_all(work)
    info = TensorInfo(inferred.graph)
    graph = work.graph

    reduction = layers.resolve(graph, reduction_layer, "reduction layer") if reduction_layer else layers.default_reduction(graph, info)
    rshape = info.shape(reduction)
    if rshape is None or len(rshape) != 2:
        raise LayerNotFoundError(
            f"the reduction tensor {reduction!r} has shape {rshape}, not [batch, classes]: to fix this, "
            "name the logits with --reduction-layer"
        )
    feature = layers.resolve(graph, feature_layer, "feature layer") if feature_layer else layers.default_feature(graph, info, reduction)
    frank = info.rank(feature)
    if frank is None or frank < 3:
        raise LayerNotFoundError(
            f"the feature tensor {feature!r} has shape {info.shape(feature)}: Grad-CAM needs a feature map "
            "of rank >= 3 ([batch, channels, ...spatial]); to fix this, pick one from `onnx-gradcam layers MODEL`"
        )
    image = layers.image_input(graph, info)
    image_shape = info.shape(image)
    assert image_shape is not None
    layout = cam.detect_layout(image_shape)

    taken = {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    b = GraphBuilder(opset, taken)
    class_input = b.reserve(cam.CLASS_INPUT)
    public = [b.reserve(n) for n in (cam.MAP, cam.RAW, cam.TARGET, cam.SCORE)]
    if expose_gradient:
        public += [b.reserve(cam.FEATURES), b.reserve(cam.GRADIENT)]
    ctx = RuleContext(b, info)
    try:
        outs = cam.append_gradcam(ctx, list(graph.node), image, layout, feature, reduction, class_input, expose_gradient)
    except UnsupportedOpError as err:
        raise err.with_alternatives(layers.downstream_candidates(graph, info, reduction, _node_output(graph, err.node_name)))

    batch_dim = image_shape[0]
    feat_shape = info.shape(feature) or ()
    spatial = [image_shape[i] for i in cam.spatial_axes(image_shape, layout)]
    renames = [
        (outs.map, cam.MAP, TensorProto.FLOAT, [batch_dim, *spatial]),
        (outs.raw, cam.RAW, TensorProto.FLOAT, [batch_dim, *feat_shape[2:]]),
        (outs.target, cam.TARGET, TensorProto.INT64, [batch_dim]),
        (outs.score, cam.SCORE, info.dtype(reduction), [batch_dim]),
    ]
    if expose_gradient:
        renames += [
            (feature, cam.FEATURES, info.dtype(feature), list(feat_shape)),
            (outs.gradient or "", cam.GRADIENT, info.dtype(feature), list(feat_shape)),
        ]
    for internal, public_name, dtype, shape in renames:
        b.nodes.append(helper.make_node("Identity", [internal], [public_name], name=b.fresh(f"{public_name}_out")))
        graph.output.append(helper.make_tensor_value_info(public_name, dtype, [_dim(d) for d in shape]))

    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), class_input))
    graph.input.append(helper.make_tensor_value_info(class_input, TensorProto.INT64, ["gradcam_classes"]))

    work.ir_version = max(original_ir, min_ir_version(opset))
    meta = {
        "feature_tensor": feature,
        "reduction_tensor": reduction,
        "method": "gradcam",
        "source_sha256": source_sha256,
        "version": __version__,
        "input": image,
        "input_layout": layout,
    }
    if preprocess is not None:
        meta["preprocess"] = preprocess.to_json()
    existing = {p.key for p in work.metadata_props}
    for key, value in meta.items():
        full = META_PREFIX + key
        if full in existing:
            raise OnnxGradCamError(f"the model already has metadata {full!r}: to fix this, prepare the original model")
        work.metadata_props.append(onnx.StringStringEntryProto(key=full, value=value))
    return work, PrepareReport(feature, reduction, image, layout, "gradcam", {META_PREFIX + k: v for k, v in meta.items()})


def _dim(d: object) -> int | str | None:
    return d if isinstance(d, (int, str)) else None


def _node_output(graph: onnx.GraphProto, node_name: str) -> str:
    for node in graph.node:
        if node.name == node_name or (node.output and node.output[0] == node_name):
            return node.output[0]
    return node_name


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The gradcam.* metadata of a prepared model (empty for a plain one)."""
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
