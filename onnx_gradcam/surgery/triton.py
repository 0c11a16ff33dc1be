"""Triton's config.pbtxt for a prepared model: its inputs and outputs as the onnxruntime backend
checks them, batching, instance groups and the labels file. Text only; nothing here runs a model.

Triton's onnxruntime backend accepts an `optional: true` input only when it is an initializer and
max_batch_size is 0, so a batching config needs `gradcam_class` as a plain input (--class-input
required) or no class input at all (--class-input none).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from ..errors import BadInputError
from .cam import CLASS_INPUT

KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# ONNX element type -> Triton's DataType enum (model_config.proto)
DATA_TYPES: dict[int, str] = {
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING",
    TensorProto.BFLOAT16: "TYPE_BF16",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TritonTensor:
    """One config input or output: Triton's dims exclude the batch axis when the model batches; a
    tensor that is only the batch axis ([N]) is declared [1] and reshaped to [] (Triton's own idiom)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False
    label_filename: str = ""


def check_name(name: str) -> str:
    """A model name Triton can use as a folder name."""
    if not _NAME.match(name):
        raise BadInputError(
            f"model name {name!r} cannot be a Triton model folder: to fix this, give --name with letters, digits, "
            "'_', '-' and '.' only (not starting with '.' or '-')"
        )
    return name


def config_tensors(
    model: onnx.ModelProto, max_batch: int, label_outputs: Sequence[str] = (), label_file: str = ""
) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """(inputs, outputs) of the config for `model`. Initializer-backed inputs are left out, except
    gradcam_class, which is kept as `optional: true` (only allowed with max_batch 0)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = []
    for vi in graph.input:
        if vi.name in initializers and vi.name != CLASS_INPUT:
            continue  # a weight listed among the inputs (IR < 4 exporters): no caller feeds it
        optional = vi.name in initializers
        if optional and max_batch > 0:
            raise BadInputError(
                f"input {vi.name!r} is optional (--class-input optional), but Triton's onnxruntime backend refuses "
                f"optional inputs on models that batch (max_batch_size {max_batch}): to fix this, prepare the model "
                "with --class-input required (or none), or give export-triton the plain model, or use --max-batch 0"
            )
        inputs.append(_tensor(vi, max_batch, "input", optional=optional))
    outputs = []
    for vi in graph.output:
        label = label_file if vi.name in label_outputs else ""
        outputs.append(_tensor(vi, max_batch, "output", label=label))
    return inputs, outputs


def _tensor(
    vi: onnx.ValueInfoProto, max_batch: int, role: str, optional: bool = False, label: str = ""
) -> TritonTensor:
    ttype = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or ttype.elem_type not in DATA_TYPES:
        raise BadInputError(
            f"{role} {vi.name!r} is not a tensor of a type Triton declares ({vi.type}): to fix this, export the model "
            "with tensor inputs and outputs"
        )
    if not ttype.HasField("shape"):
        raise BadInputError(
            f"{role} {vi.name!r} has no declared shape, which Triton's config needs: to fix this, give the model's "
            "outputs shapes (onnx.shape_inference) and prepare it again"
        )
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in ttype.shape.dim]
    reshape = None
    if max_batch > 0:
        if not dims or dims[0] != -1:
            shown = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in ttype.shape.dim]
            raise BadInputError(
                f"{role} {vi.name!r} has shape {shown}, whose first axis is not a dynamic batch, but max_batch_size "
                f"{max_batch} makes Triton add one: to fix this, use --max-batch 0 (or export the model with a "
                "dynamic batch axis)"
            )
        dims = dims[1:]
        if not dims:
            dims, reshape = [1], ()
    return TritonTensor(vi.name, DATA_TYPES[ttype.elem_type], tuple(dims), reshape, optional, label)


def config_text(
    name: str,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    max_batch: int,
    instances: int,
    kind: str,
) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig)."""
    lines = [f"name: {_quote(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch}"]
    for key, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{key} [")
        blocks = [_block(t) for t in tensors]
        for i, block in enumerate(blocks):
            lines.extend(block[:-1] + [block[-1] + ("," if i < len(blocks) - 1 else "")])
        lines.append("]")
    if max_batch > 0:
        lines.append("dynamic_batching { }")
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {KINDS[kind]}", "  }", "]"]
    return "\n".join(lines) + "\n"


def _block(t: TritonTensor) -> list[str]:
    body = [f"name: {_quote(t.name)}", f"data_type: {t.data_type}", f"dims: {_list(t.dims)}"]
    if t.reshape is not None:
        body.append(f"reshape: {{ shape: {_list(t.reshape)} }}")
    if t.optional:
        body.append("optional: true")
    if t.label_filename:
        body.append(f"label_filename: {_quote(t.label_filename)}")
    return ["  {", *[f"    {line}" for line in body], "  }"]


def _list(values: Sequence[int]) -> str:
    return f"[ {', '.join(map(str, values))} ]" if values else "[ ]"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
