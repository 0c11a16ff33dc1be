"""The two verbs users call from Python: prepare() and Explainer (plus the overlay helper)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .autodiff.context import TensorInfo
from .errors import BadInputError
from .explain.explainer import Explainer, ExplainResult
from .explain.overlay import overlay
from .surgery import layers as layer_choice
from .surgery.layers import Candidate
from .surgery.load import file_sha256, load_model, save_model_atomic, upgrade_opset
from .surgery.prepare import PRESETS, PrepareReport, Preprocess, prepare_model
from .surgery.shapes import infer_all


def default_output(model_path: str | os.PathLike[str]) -> Path:
    """MODEL.onnx -> MODEL.gradcam.onnx beside it."""
    p = Path(model_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.gradcam.onnx")


def as_preprocess(preprocess: str | Preprocess | None) -> Preprocess | None:
    if preprocess is None or isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess not in PRESETS:
        raise BadInputError(
            f"unknown preprocessing preset {preprocess!r}: to fix this, use one of {', '.join(PRESETS)}"
        )
    return PRESETS[preprocess]


def prepare(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    feature_layer: str | Sequence[str] | None = None,
    reduction_layer: str | None = None,
    preprocess: str | Preprocess | None = None,
    expose_gradient: bool = False,
    methods: Sequence[str] = ("gradcam",),
    counterfactual: bool = False,
    guided: bool = False,
    target: str = "class",
) -> PrepareReport:
    """Write a prepared model: the original graph plus Grad-CAM, in standard ONNX operators.

    Example:
        >>> report = prepare("resnet50.onnx")          # writes resnet50.gradcam.onnx
        >>> report.feature_tensor
        '/layer4/layer4.2/relu_2/Relu_output_0'
    """
    src = Path(model)
    out = Path(output) if output is not None else default_output(src)
    if out.resolve() == src.resolve():
        raise BadInputError(f"output {str(out)!r} is the input model: to fix this, choose another -o path")
    proto = load_model(src)
    prepared, report = prepare_model(
        proto,
        feature_layer=feature_layer,
        reduction_layer=reduction_layer,
        preprocess=as_preprocess(preprocess),
        expose_gradient=expose_gradient,
        source_sha256=file_sha256(src),
        methods=methods,
        counterfactual=counterfactual,
        guided=guided,
        target=target,
        inplace=True,
    )
    save_model_atomic(prepared, out)
    return report


def layers(model: str | os.PathLike[str], reduction_layer: str | None = None) -> tuple[str, list[Candidate]]:
    """(score tensor, feature-map candidates shallowest first; `default` marks prepare's choice)."""
    proto = upgrade_opset(load_model(model))
    info = TensorInfo(infer_all(proto).graph, constants_from=proto.graph)
    graph = proto.graph
    if reduction_layer:
        reduction = layer_choice.resolve(graph, reduction_layer, "reduction layer")
    else:
        reduction = layer_choice.default_reduction(graph, info)
    return reduction, layer_choice.candidates(graph, info, reduction)


__all__ = ["prepare", "default_output", "layers", "Explainer", "ExplainResult", "overlay"]
