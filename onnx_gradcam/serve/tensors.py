"""Open Inference Protocol tensors: JSON `data` and the binary tensor extension, both ways.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes, then each
binary tensor's raw little-endian bytes in the order the header lists them (`binary_data_size`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {v.name: k for k, v in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.name not in _NAMES:
        raise BadInputError(f"no protocol datatype for {array.dtype}")
    return _NAMES[array.dtype.name]


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: its tensors, the outputs asked for (None: all) and how to send them."""

    id: str | None
    tensors: dict[str, np.ndarray]
    outputs: list[str] | None
    binary: dict[str, bool]  # output name -> send as binary
    binary_default: bool


def _bad(msg: str) -> BadInputError:
    return BadInputError(msg)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {}) or {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' is not an object: to fix this, send a JSON object")
    return params


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header then binary tensors)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise _bad(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < size <= len(body):
            raise _bad(
                f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes: "
                "to fix this, give the JSON header's length in bytes"
            )
        head, rest = body[:size], memoryview(body)[size:]
    else:
        head, rest = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request is not JSON ({exc}): to fix this, send an inference request object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("the request has no 'inputs' list: to fix this, send {'inputs': [{name, shape, datatype, data}]}")
    params = _parameters(doc, "request")
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    for item in doc["inputs"]:
        if not isinstance(item, dict):
            raise _bad("an input is not an object: to fix this, send {name, shape, datatype, data}")
        name, shape, dtype_name = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(dtype_name, str):
            raise _bad("an input lacks name, shape or datatype: to fix this, send all three")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(f"input {name!r} has shape {shape}: to fix this, give non-negative integers")
        if dtype_name not in DATATYPES:
            raise _bad(
                f"input {name!r} has datatype {dtype_name!r}, which this server does not take: to fix this, "
                f"use one of {', '.join(DATATYPES)}"
            )
        if name in tensors:
            raise _bad(f"input {name!r} is given twice")
        dtype = DATATYPES[dtype_name]
        count = int(np.prod(shape)) if shape else 1
        nbytes = _parameters(item, f"input {name!r}").get("binary_data_size")
        if nbytes is not None:
            if not isinstance(nbytes, int) or nbytes != count * dtype.itemsize:
                raise _bad(
                    f"input {name!r}: binary_data_size {nbytes} is not {count} x {dtype.itemsize} bytes "
                    f"for shape {shape} {dtype_name}"
                )
            if offset + nbytes > len(rest):
                raise _bad(f"input {name!r}: the body ends before its {nbytes} binary bytes")
            array = np.frombuffer(rest[offset : offset + nbytes], dtype=dtype).reshape(shape)
            offset += nbytes
        else:
            if "data" not in item:
                raise _bad(f"input {name!r} has no 'data' and no binary_data_size: to fix this, send one")
            try:
                array = np.asarray(item["data"], dtype=dtype)
            except (ValueError, TypeError) as exc:
                raise _bad(f"input {name!r}: data is not {dtype_name} numbers ({exc})") from None
            if array.size != count:
                raise _bad(f"input {name!r}: {array.size} values for shape {shape} ({count} values)")
            array = array.reshape(shape)
        tensors[name] = array.astype(dtype.newbyteorder("="), copy=False)
    if offset != len(rest):
        raise _bad(f"{len(rest) - offset} bytes after the binary inputs: to fix this, send only what the header lists")
    outputs: list[str] | None = None
    binary: dict[str, bool] = {}
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' is not a list: to fix this, send [{name, parameters}]")
        outputs = []
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad("an output has no name: to fix this, send {'name': ...}")
            oparams = _parameters(out, f"output {out['name']!r}")
            if oparams.get("classification"):
                raise _bad("the classification extension is not supported: to fix this, ask for the logits")
            outputs.append(out["name"])
            if "binary_data" in oparams:
                binary[out["name"]] = bool(oparams["binary_data"])
    return InferRequest(
        id=doc.get("id") if isinstance(doc.get("id"), str) else None,
        tensors=tensors,
        outputs=outputs,
        binary=binary,
        binary_default=bool(params.get("binary_data_output", False)),
    )


def encode_response(model: str, request: InferRequest, results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is all JSON) for the asked outputs."""
    names = request.outputs if request.outputs is not None else list(results)
    blobs: list[bytes] = []
    outputs = []
    for name in names:
        value = np.ascontiguousarray(results[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(value), "shape": list(value.shape)}
        if request.binary.get(name, request.binary_default):
            raw = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = value.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
