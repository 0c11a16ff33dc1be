"""The models a server holds: one Explainer (one onnxruntime session) per model, named by file stem.

A plain model is prepared in memory at start-up, after prepare's self-check (Explainer(verify=True)).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from ..explain.explainer import Explainer, labels_beside, read_labels

# onnxruntime element types -> Open Inference Protocol datatypes
ORT_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as the protocol describes it: shape with -1 for a dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]
    optional: bool = False

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "datatype": self.datatype, "shape": self.shape}
        if self.optional:
            out["parameters"] = {"optional": True}
        return out


def _dims(shape: Sequence[object]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


class ServedModel:
    """A loaded model: its Explainer, its protocol metadata and the checks a request must pass."""

    def __init__(self, name: str, path: Path, explainer: Explainer) -> None:
        self.name = name
        self.path = path
        self.explainer = explainer
        sess = explainer.session
        self.inputs = [TensorMeta(i.name, ORT_TO_OIP.get(i.type, i.type), _dims(i.shape)) for i in sess.get_inputs()]
        for init in sess.get_overridable_initializers():
            # gradcam_class (and a seed's default): optional, one value per sample
            dims = [-1] + _dims(init.shape)[1:] if init.shape else [-1]
            self.inputs.append(TensorMeta(init.name, ORT_TO_OIP.get(init.type, init.type), dims, optional=True))
        self.outputs = [TensorMeta(o.name, ORT_TO_OIP.get(o.type, o.type), _dims(o.shape)) for o in sess.get_outputs()]
        self.output_names = [o.name for o in self.outputs]
        self.is_seed = explainer.metadata.get("target", "class") == "seed"

    def metadata(self) -> dict[str, object]:
        """The V2 model metadata response."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [t.as_json() for t in self.inputs],
            "outputs": [t.as_json() for t in self.outputs],
            "parameters": {
                "feature_layer": self.explainer.feature_layer,
                "methods": self.explainer.methods,
                "labels": self.explainer.labels,
                "prepared_at_startup": self.explainer.prepared_in_memory,
            },
        }

    def warm_up(self, max_batch: int) -> int | None:
        """Run one batch of `max_batch` zero samples, as Triton's `model_warmup` does, so that
        onnxruntime's arena reaches its largest batch before the first request (the server's memory
        is then flat from the start: BENCHMARKS.md, serving). Returns the batch run, or None for
        an input whose size is not fixed (nothing to warm up with)."""
        spec = self.explainer.input
        shape = self.explainer.input_shape
        dims = shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        x = np.zeros([max_batch, *dims], spec.numpy_dtype)  # type: ignore[misc,list-item]
        feeds: dict[str, np.ndarray] = {spec.name: x}
        if self.is_seed:
            seed = next((t for t in self.inputs if t.name == "gradcam_seed"), None)
            if seed is None or any(d < 0 for d in seed.shape[1:]):
                return None
            feeds["gradcam_seed"] = np.zeros([max_batch, *seed.shape[1:]], np.float32)
        elif self.explainer.class_input != "none":
            feeds["gradcam_class"] = np.full(max_batch, -1, np.int64)
        self.explainer.session.run(None, feeds)
        return max_batch

    def checked_feeds(self, tensors: dict[str, np.ndarray], max_batch: int) -> dict[str, np.ndarray]:
        """The session feeds for a request's tensors, every sample with its class.

        Checks names, datatypes, ranks, fixed dimensions, one batch size for every input (at most
        `max_batch`) and class indices; `gradcam_class` of one value is broadcast to the batch, and
        an absent one means top-1 (-1) for every sample.
        """
        known = {t.name: t for t in self.inputs}
        unknown = sorted(set(tensors) - set(known))
        if unknown:
            raise BadInputError(
                f"model {self.name!r} has no input {unknown[0]!r}: to fix this, send only {', '.join(known)}"
            )
        missing = [t.name for t in self.inputs if not t.optional and t.name not in tensors]
        if missing:
            raise BadInputError(
                f"input {missing[0]!r} is missing: to fix this, send it (see GET /v2/models/{self.name})"
            )
        image = self.explainer.input.name
        n = len(tensors[image]) if tensors[image].ndim else 0
        if n < 1:
            raise BadInputError(f"input {image!r} has no samples: to fix this, send a batch of 1 or more")
        if n > max_batch:
            raise BadInputError(
                f"batch of {n} samples is more than the server's --max-batch {max_batch}: to fix this, "
                "send at most that many per request"
            )
        feeds: dict[str, np.ndarray] = {}
        for name, value in tensors.items():
            meta = known[name]
            if name == "gradcam_class":
                value = np.broadcast_to(value.reshape(-1), (n,)) if value.size == 1 else value
            if meta.datatype != _oip(value.dtype):
                raise BadInputError(
                    f"input {name!r} is {meta.datatype}, not {_oip(value.dtype)}: to fix this, send {meta.datatype}"
                )
            fixed = [(i, d) for i, d in enumerate(meta.shape) if d >= 0 and i > 0]
            if value.ndim != len(meta.shape) or any(value.shape[i] != d for i, d in fixed) or len(value) != n:
                raise BadInputError(
                    f"input {name!r} has shape {list(value.shape)}, but the model takes {meta.shape} (-1: any) with "
                    f"{n} samples as in {image!r}: to fix this, send that shape"
                )
            feeds[name] = np.ascontiguousarray(value)
        if not self.is_seed:
            classes = feeds.get("gradcam_class", np.full(n, -1, np.int64))
            classes = self.explainer.class_feed([int(c) for c in classes], n)  # --class-input none: -1 only
            if self.explainer.class_input != "none":
                feeds["gradcam_class"] = classes
        return feeds


def _oip(dtype: np.dtype) -> str:
    name = {"bool": "BOOL", "float16": "FP16", "float32": "FP32", "float64": "FP64"}.get(dtype.name)
    return name or dtype.name.upper()


def model_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files to serve: each path given, and every .onnx file directly in a folder given."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".onnx" and q.is_file())
            if not found:
                raise BadInputError(f"folder {str(p)!r} holds no .onnx file: to fix this, give a model or its folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise BadInputError(f"{str(p)!r}: no such model file or folder")
    return files


def load_models(
    paths: Sequence[str | os.PathLike[str]], device: str = "auto", threads: int | None = None, verify: bool = True
) -> dict[str, ServedModel]:
    """name (file stem) -> model, for every model file (or folder of them) in `paths`."""
    models: dict[str, ServedModel] = {}
    for path in model_files(paths):
        name = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
        if name in models:
            raise BadInputError(
                f"two models are named {name!r} ({models[name].path} and {path}): to fix this, rename one"
            )
        # spin=False: busy-waiting intra-op threads would take the cores from the event loop
        # between batches (tools/bench_serve.py: 1.4-1.9x the requests/s of the demo model on 2 cores)
        explainer = Explainer(path, device=device, threads=threads, verify=verify, spin=False)
        found = labels_beside(path)
        if found is not None and explainer.num_classes is not None:
            names = read_labels(found)
            if len(names) == explainer.num_classes:
                explainer.labels = names
        models[name] = ServedModel(name, path, explainer)
    return models
