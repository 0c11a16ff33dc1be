"""The verbs users call from Python: prepare(), prepare_model() and Explainer (plus the overlay helper,
and for byte and token models load_bytes and plot_tokens).

prepare and prepare_model check what they built (explain/verify.py) before handing it over.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import BadInputError
from .explain.explainer import Explainer, ExplainResult, class_input_form, labels_beside, read_labels
from .explain.overlay import overlay
from .explain.tokens import load_bytes, plot_tokens
from .explain.verify import verify_prepared
from .surgery import layers as layer_choice
from .surgery import prepare as surgery
from .surgery import triton
from .surgery.layers import Candidate
from .surgery.load import file_sha256, load_model, save_model_atomic, serialise
from .surgery.prepare import CLASS_INPUTS, PRESETS, PrepareReport, Preprocess, read_metadata


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
    class_input: str = "optional",
) -> PrepareReport:
    """Write a prepared model: the original graph plus Grad-CAM, in standard ONNX operators.

    With `verify` (the default) the result is first loaded in onnxruntime on the CPU and run on a
    probe batch beside the source model (see `onnx_gradcam.explain.verify`); if that check fails,
    a VerificationError says which node failed and nothing is written. `opset` (such as 16) first
    upgrades a model below it with onnx's version converter; by default the source opset is kept.
    `class_input`: "optional" (gradcam_class may be left out: top-1), "required" (a plain input
    every run sends, -1 for top-1: for servers that batch, such as Triton) or "none" (top-1 only).

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
        class_input=class_input,
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
    class_input: str = "optional",
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
        class_input=class_input,
    )
    if verify:
        verify_prepared(model, prepared, report)
    return prepared, report


@dataclass(frozen=True)
class TritonExport:
    """What export_triton wrote: the model folder, its config and model files, the labels file
    (None without labels) and the output it labels, the class-input form, and the config text."""

    folder: Path
    config: Path
    model: Path
    labels: Path | None
    labels_output: str | None
    class_input: str
    config_text: str


def export_triton(
    model: str | os.PathLike[str],
    repository: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_batch: int = 8,
    instances: int = 2,
    kind: str = "cpu",
    class_input: str | None = None,
    labels: str | os.PathLike[str] | None = None,
    verify: bool = True,
) -> TritonExport:
    """Write a Triton model folder REPOSITORY/NAME: config.pbtxt, 1/model.onnx and the labels file.

    A plain MODEL is prepared first (and self-checked, unless verify=False) with `class_input`,
    by default "required" when max_batch > 0 (Triton refuses optional inputs on batching models)
    and "optional" when it is 0; a prepared MODEL is copied as it is and keeps its form. Labels:
    `labels`, else MODEL.labels.txt or labels.txt beside MODEL (as `explain` finds them), when they
    name every class; they become `label_filename` of the logits output. Nothing is written unless
    everything is checked; the folder appears whole (written beside it, then renamed).

    Example:
        >>> export_triton("resnet50.onnx", "models", max_batch=8, instances=2, kind="gpu")
        ...   # models/resnet50/config.pbtxt, models/resnet50/1/model.onnx
    """
    src = Path(model)
    name = triton.check_name(name if name is not None else _model_stem(src))
    if max_batch < 0:
        raise BadInputError(f"--max-batch {max_batch} is negative: to fix this, give 0 (no batching) or more")
    if instances < 1:
        raise BadInputError(f"--instances {instances} is not positive: to fix this, give 1 or more")
    if kind not in triton.KINDS:
        raise BadInputError(f"unknown instance kind {kind!r}: to fix this, use one of {', '.join(triton.KINDS)}")
    if class_input is not None and class_input not in CLASS_INPUTS:
        raise BadInputError(f"unknown class input {class_input!r}: to fix this, use one of {', '.join(CLASS_INPUTS)}")
    folder = Path(repository) / name
    if folder.parent.exists() and not folder.parent.is_dir():
        raise BadInputError(
            f"{str(folder.parent)!r} is a file, not a folder: to fix this, give a model repository folder"
        )
    if folder.exists():
        raise BadInputError(
            f"{str(folder)!r} already exists: to fix this, remove it, or choose another --name or repository"
        )
    proto = load_model(src)
    meta = read_metadata(proto)
    if "method" in meta:
        form = class_input_form(proto, meta)
        if class_input is not None and class_input != form:
            given = f"--class-input {form}" if form else "--target seed (it takes gradcam_seed)"
            raise BadInputError(
                f"{str(src)!r} is already prepared with {given}, not --class-input {class_input}: to fix this, give "
                f"export-triton the plain model, or leave out --class-input"
            )
        prepared = proto
    else:
        form = class_input or ("required" if max_batch > 0 else "optional")
        prepared, _ = prepare_model(proto, source_sha256=file_sha256(src), class_input=form, verify=verify)
        meta = read_metadata(prepared)
    names, labels_output = _triton_labels(prepared, meta, src, labels)
    label_file = "labels.txt" if names is not None else ""
    inputs, outputs = triton.config_tensors(prepared, max_batch, [labels_output] if labels_output else [], label_file)
    text = triton.config_text(name, inputs, outputs, max_batch, instances, kind)
    _write_folder(folder, prepared, text, names)
    return TritonExport(
        folder,
        folder / "config.pbtxt",
        folder / "1" / "model.onnx",
        folder / label_file if label_file else None,
        labels_output,
        form,
        text,
    )


def _model_stem(path: Path) -> str:
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    return stem[: -len(".gradcam")] if stem.endswith(".gradcam") else stem


def _triton_labels(
    prepared: onnx.ModelProto, meta: dict[str, str], src: Path, given: str | os.PathLike[str] | None
) -> tuple[list[str] | None, str | None]:
    """(class names, the output they label): the logits output, else an original [N, K] output."""
    path = Path(given) if given is not None else labels_beside(src)
    if path is None:
        return None, None
    names = read_labels(path)
    reduction = meta.get("reduction_tensor", "")
    candidates = [o for o in prepared.graph.output if o.name == reduction] or [
        o for o in prepared.graph.output if not o.name.startswith("gradcam_")
    ]
    for out in candidates:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value == len(names):
            return names, out.name
    if given is None:  # a labels.txt beside the model that does not fit it: as `explain`, not used
        return None, None
    raise BadInputError(
        f"the labels file {str(path)!r} has {len(names)} names but no output of the model has that many classes "
        "([batch, classes]): to fix this, give a labels file with one name per class, in class-index order"
    )


def _write_folder(folder: Path, prepared: onnx.ModelProto, config: str, labels: list[str] | None) -> None:
    """REPOSITORY/NAME whole or not at all: written in a temporary folder beside it, then renamed."""
    repository = folder.parent
    created = not repository.exists()
    repository.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=repository))
    try:
        (tmp / "1").mkdir()
        save_model_atomic(prepared, tmp / "1" / "model.onnx")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        if labels is not None:
            (tmp / "labels.txt").write_text("".join(f"{n}\n" for n in labels), encoding="utf-8")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(repository, ignore_errors=True)
        raise


def layers(model: str | os.PathLike[str], reduction_layer: str | None = None) -> tuple[str, list[Candidate]]:
    """(score tensor, feature-map candidates shallowest first; `default` marks prepare's choice)."""
    return layer_choice.list_layers(model, reduction_layer)


__all__ = [
    "prepare",
    "prepare_model",
    "default_output",
    "layers",
    "export_triton",
    "TritonExport",
    "Explainer",
    "ExplainResult",
    "overlay",
    "load_bytes",
    "plot_tokens",
]
