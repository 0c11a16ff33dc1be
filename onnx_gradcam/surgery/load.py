"""Loading and saving models: external data, opset upgrades, shape inference, atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
from onnx import helper, shape_inference, version_converter

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
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise OnnxGradCamError(
            f"the model has opset {current} and onnx's version converter could not upgrade it to opset "
            f"{target} ({exc}): to fix this, re-export the model at opset {target} or newer"
        ) from exc
    return converted


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
