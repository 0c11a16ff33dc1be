"""Loading and saving models: external data, opset upgrades, shape inference, atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

from ..errors import BadInputError, OnnxGradCamError

MIN_OPSET = 13
_TWO_GB = 2**31 - 1


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load a model file, external data included; a clear error if it is not an ONNX model."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"model file {str(p)!r} does not exist: to fix this, check the path")
    try:
        return onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf raises several unrelated types
        raise BadInputError(
            f"{str(p)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}): "
            "to fix this, pass the .onnx file exported from your framework"
        ) from exc


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise BadInputError("the model imports no ai.onnx opset: to fix this, re-export it as a standard ONNX model")


def upgrade_opset(model: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """Models below opset 13 are converted to 13 (the gradient subgraph needs its ops); with
    `opset`, models below it are converted to it (prepare --opset). The model itself is returned
    where nothing changes."""
    current = default_opset(model)
    if opset is not None:
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise BadInputError(
                f"opset {opset} is out of range: to fix this, choose an opset from {MIN_OPSET} to {newest}"
            )
        if current > opset:
            raise BadInputError(
                f"the model already has opset {current}, above the requested {opset}: the option only upgrades; "
                f"to fix this, leave it out or ask for opset {current} or newer"
            )
    target = max(opset or MIN_OPSET, MIN_OPSET)
    if current >= target:
        return model
    resizes = _opset10_resizes(model) if current < 11 else {}
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise OnnxGradCamError(
            f"the model has opset {current} and onnx's version converter could not upgrade it to opset "
            f"{target} ({exc}): to fix this, re-export the model at opset {target} or newer"
        ) from exc
    if resizes:
        _restore_resizes(converted, resizes)
    return converted


def _restore_resizes(converted: onnx.ModelProto, resizes: dict[str, dict[str, str]]) -> None:
    """Give the converted Resize nodes (in the order of their sources) their opset-10 attributes
    back, and their outputs the source's names (the converter renames them '_v_N')."""
    nodes = [n for n in converted.graph.node if n.op_type == "Resize" and n.domain in ("", "ai.onnx")]
    if len(nodes) != len(resizes):
        raise OnnxGradCamError(
            f"onnx's version converter turned {len(resizes)} Upsample/Resize nodes into {len(nodes)} Resize nodes: "
            f"to fix this, re-export the model at opset {MIN_OPSET} or newer"
        )
    taken = {o for n in converted.graph.node for o in n.output}
    renamed: dict[str, str] = {}
    for node, (name, attrs) in zip(nodes, resizes.items(), strict=True):
        _set_attributes(node, attrs)
        if node.output[0] != name and name not in taken:
            renamed[node.output[0]] = name
            node.output[0] = name
    for node in converted.graph.node:
        for i, v in enumerate(node.input):
            if v in renamed:
                node.input[i] = renamed[v]
    for vi in [*converted.graph.output, *converted.graph.value_info]:
        if vi.name in renamed:
            vi.name = renamed[vi.name]


def _opset10_resizes(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """The Resize-11 attributes that compute what each Upsample (opset 7-9) and Resize-10 node
    computes, by output name.

    Those read coordinates as x_in = x_out / scale ('asymmetric') and, in nearest mode, take the
    floor when upsampling and the ceiling when downsampling (the opset-10 spec and onnxruntime's
    kernels). onnx's version converter turns them into Resize without these attributes, i.e.
    half_pixel and round_prefer_floor: measured on a 2x linear Upsample, outputs move by 0.24 of
    the input's range, and nearest ones at scales such as 1.25."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    out: dict[str, dict[str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Upsample", "Resize") or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        fixed = {"coordinate_transformation_mode": "asymmetric"}
        if mode == "nearest":
            scales = attrs["scales"] if "scales" in attrs else values.get(node.input[1] if len(node.input) > 1 else "")
            factors = [] if scales is None else [float(v) for v in np.asarray(scales).reshape(-1)]
            if node.op_type == "Upsample" or not factors or all(f >= 1 for f in factors):
                # Upsample's scales are >= 1 by its spec; scales computed at run time are taken to
                # upsample (if they do not, prepare's self-check finds the outputs changed)
                fixed["nearest_mode"] = "floor"
            elif all(f <= 1 for f in factors):
                fixed["nearest_mode"] = "ceil"
            else:
                raise OnnxGradCamError(
                    f"the Resize node {node.name or node.output[0]!r} (opset 10, mode 'nearest') has scales "
                    f"{factors}: its rounding, floor up and ceiling down, has no Resize-11 "
                    "form when they are not all >= 1 or all <= 1; to fix this, re-export the model at opset 11 or newer"
                )
        out[node.output[0]] = fixed
    return out


def _set_attributes(node: onnx.NodeProto, values: dict[str, str]) -> None:
    kept = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in values.items())


def min_ir_version(opset: int) -> int:
    """The lowest IR version that can carry this ai.onnx opset."""
    for row in helper.VERSION_TABLE:  # (release, ir, ai.onnx opset, ml opset[, training])
        if row[2] == opset:
            return int(row[1])
    return int(helper.VERSION_TABLE[-1][1])


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (with data propagation), through a file for models over 2 GB."""
    if model.ByteSize() < _TWO_GB:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src, save_as_external_data=True, location="in.onnx.data")
        shape_inference.infer_shapes_path(src, dst, check_type=False, strict_mode=False, data_prop=True)
        return onnx.load(dst, load_external_data=True)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike[str], data: bytes | None = None) -> Path:
    """Write to a temporary file beside `path`, then rename: no partial file on failure.

    Models over 2 GB get their tensors in `<name>.data` beside the file (external data). `data`:
    the model already serialised by `serialise` (serialising resnet50 takes 0.3 s).
    """
    out = Path(path)
    if not out.parent.exists():
        raise BadInputError(f"output folder {str(out.parent)!r} does not exist: to fix this, create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_data = None
    try:
        data = data if data is not None else serialise(model)
        if data is not None:
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            data_name = out.name + ".data"
            tmp_data = out.parent / f".{data_name}.tmp"
            onnx.save(
                model,
                tmp,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data.name,
                size_threshold=1024,
            )
            # the file refers to the final data name; rewrite the location after moving
            saved = onnx.load(tmp, load_external_data=False)
            for t in _external_tensors(saved):
                for kv in t.external_data:
                    if kv.key == "location":
                        kv.value = data_name
            onnx.save(saved, tmp)
            if tmp_data.exists():  # small tensors stay inline; there may be no data file
                os.replace(tmp_data, out.parent / data_name)
        os.replace(tmp, out)
    except BaseException:
        for leftover in (tmp, tmp_data):
            if leftover is not None and os.path.exists(leftover):
                os.remove(leftover)
        raise
    return out


def serialise(model: onnx.ModelProto) -> bytes | None:
    """The serialised model, or None when it needs external data (protobuf's 2 GB limit)."""
    if _has_external(model):
        return None
    try:
        data = model.SerializeToString()
    except (ValueError, OverflowError):  # over protobuf's limit
        return None
    return data if len(data) < _TWO_GB else None


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _has_external(model: onnx.ModelProto) -> bool:
    return bool(_external_tensors(model))
