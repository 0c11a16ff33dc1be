"""The verbs users call from Python: prepare(), prepare_model() and Explainer (plus the overlay helper,
and for byte and token models load_bytes and plot_tokens).

prepare and prepare_model check what they built (explain/verify.py) before handing it over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx

from .autodiff.context import TensorInfo
from .errors import BadInputError
from .explain.explainer import Explainer, ExplainResult
from .explain.overlay import overlay
from .explain.tokens import load_bytes, plot_tokens
from .explain.verify import verify_prepared
from .surgery import layers as layer_choice
from .surgery import prepare as surgery
from .surgery.layers import Candidate
from .surgery.load import file_sha256, load_model, save_model_atomic, serialise, upgrade_opset
from .surgery.prepare import PRESETS, PrepareReport, Preprocess
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
    layout: str | None = None,
    verify: bool = True,
    opset: int | None = None,
) -> PrepareReport:
    """Write a prepared model: the original graph plus Grad-CAM, in standard ONNX operators.

    With `verify` (the default) the result is first loaded in onnxruntime on the CPU and run on a
    probe batch beside the source model (see `onnx_gradcam.explain.verify`); if that check fails,
    a VerificationError says which node failed and nothing is written. `opset` (such as 16) first
    upgrades a model below it with onnx's version converter; by default the source opset is kept.

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
    prepared, report = surgery.prepare_model(
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
        layout=layout,
        inplace=True,  # the self-check runs the source from its file
        opset=opset,
    )
    data = serialise(prepared)  # once, for the self-check and the file (None over 2 GB)
    if verify:
        verify_prepared(src, prepared, report, data)
    save_model_atomic(prepared, out, data)
    return report


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
    layout: str | None = None,
    verify: bool = True,
    opset: int | None = None,
) -> tuple[onnx.ModelProto, PrepareReport]:
    """(prepared model, report) in memory; `model` is not modified. The options are prepare()'s.

    With `verify` the result must pass the self-check that prepare() runs (VerificationError
    otherwise); verify=False returns it unchecked, for models too large to run twice.
    """
    prepared, report = surgery.prepare_model(
        model,
        feature_layer=feature_layer,
        reduction_layer=reduction_layer,
        preprocess=preprocess,
        expose_gradient=expose_gradient,
        source_sha256=source_sha256,
        methods=methods,
        counterfactual=counterfactual,
        guided=guided,
        target=target,
        layout=layout,
        opset=opset,
    )
    if verify:
        verify_prepared(model, prepared, report)
    return prepared, report


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


__all__ = [
    "prepare",
    "prepare_model",
    "default_output",
    "layers",
    "Explainer",
    "ExplainResult",
    "overlay",
    "load_bytes",
    "plot_tokens",
]
