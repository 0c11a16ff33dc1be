"""Explainer: one session over a prepared model; images or arrays in, maps and predictions out."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from .._version import __version__
from ..errors import BadInputError
from ..surgery.load import load_model
from ..surgery.metadata import META_PREFIX, PRESETS, Preprocess, read_metadata
from .images import load_image
from .overlay import overlay
from .png import encode_png
from .preprocess import InputSpec, to_tensor
from .session import create_session, run_session

Target = int | str | Sequence[int | str] | None
ImageLike = str | os.PathLike[str] | Image.Image


@dataclass(frozen=True)
class ExplainResult:
    """What one explain call returns, one row per input sample.

    maps: [N, H, W] float32 in [0, 1] at the network's input size; raw: [N, h, w] before
    normalisation; targets: [N] the classes explained; scores: [N] their scores before softmax;
    logits / probabilities: [N, K] (None for seed targets); extra: other gradcam_* outputs.
    """

    maps: np.ndarray
    raw: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None
    probabilities: np.ndarray | None
    method: str
    feature_layer: str
    provider: str
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def save(
        self,
        folder: str | os.PathLike[str],
        names: Sequence[str] | None = None,
        images: Sequence[ImageLike] | None = None,
        colormap: str = "jet",
        alpha: float = 0.5,
    ) -> list[Path]:
        """Write each sample's map as `<name>.npy`, its overlay as `<name>.png` when `images` (the
        pictures explained, paths or PIL images) are given, and all fields to `result.json`.

        Example:
            >>> result = exp.explain(paths)
            >>> result.save("maps", names=[Path(p).stem for p in paths], images=paths)
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        names = list(names) if names is not None else [f"sample{i}" for i in range(len(self.maps))]
        if len(names) != len(self.maps) or (images is not None and len(images) != len(self.maps)):
            raise BadInputError(
                f"{len(names)} names and {len(images) if images is not None else 0} images for "
                f"{len(self.maps)} maps: to fix this, give one per sample"
            )
        written = []
        for i, (name, m) in enumerate(zip(names, self.maps)):
            written.append(_atomic_npy(out / f"{name}.npy", m))
            if images is not None:
                item = images[i]
                img = item if isinstance(item, Image.Image) else load_image(item)
                written.append(_atomic_png(out / f"{name}.png", overlay(img, m, colormap, alpha)))
        summary = {
            "method": self.method,
            "feature_layer": self.feature_layer,
            "provider": self.provider,
            "versions": self.versions,
            "samples": [
                {"name": n, "class": int(t), "score": float(s)} for n, t, s in zip(names, self.targets, self.scores)
            ],
        }
        path = out / "result.json"
        _atomic_text(path, json.dumps(summary, indent=2) + "\n")
        return [*written, path]


def _value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    """A graph output for tensor `name` of its own element type (prepare records it; float16
    logits declared float32 would not load)."""
    known = next((vi for vi in graph.value_info if vi.name == name), None)
    elem = known.type.tensor_type.elem_type if known is not None else onnx.TensorProto.FLOAT
    return onnx.helper.make_tensor_value_info(name, elem, None)


def _atomic_png(path: Path, image: Image.Image) -> Path:
    """The fast lossless encoder of the folder run (explain/png.py), through a temporary name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(image))
    os.replace(tmp, path)
    return path


def _atomic_npy(path: Path, array: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class Explainer:
    """Explains images with a prepared model (a plain model is prepared in memory).

    One onnxruntime session, created once; `explain` may be called from several threads at
    once (onnxruntime's run is thread-safe and the Explainer keeps no per-call state).

    Example:
        >>> exp = Explainer("model.gradcam.onnx", device="auto")
        >>> result = exp.explain(["cat.jpg", "dog.png"])          # top-1 classes
        >>> result.maps.shape, result.targets, result.scores
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        device: str = "auto",
        preprocess: str | Preprocess | None = None,
        batch_size: int = 8,
        threads: int | None = None,
        labels: Sequence[str] | str | os.PathLike[str] | None = None,
        size: tuple[int, int] | None = None,
        layout: str | None = None,
        verify: bool = True,
        spin: bool = True,
    ) -> None:
        """`verify`: a plain model prepared in memory must first pass prepare's self-check.
        `spin=False`: onnxruntime's threads sleep between runs instead of busy-waiting (what a
        server wants: its event loop needs the cores between batches)."""
        if batch_size < 1:
            raise BadInputError(f"batch size {batch_size} is not positive: to fix this, give 1 or more")
        self.path = None if isinstance(model, onnx.ModelProto) else Path(model)  # the file it was loaded from
        self.device, self.threads = device, threads
        self._model: onnx.ModelProto | None = None
        meta = _ready_file_metadata(self.path) if self.path is not None else None
        if meta is not None:
            # a prepared file with its logits exposed: onnxruntime reads the file itself (resnet50: 0.3 s
            # against 1.1 s to parse it in Python and hand the session its bytes again)
            self.prepared_in_memory = False
            self.session, self.session_info = create_session(str(self.path), device, threads, spin)
            self.class_input = meta.get("class_input", "") if meta.get("target", "class") == "class" else ""
        else:
            proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
            meta = read_metadata(proto)
            self.prepared_in_memory = "method" not in meta
            if self.prepared_in_memory:
                # the gradient engine, loaded only here: running a prepared file does not need it
                from ..surgery.prepare import prepare_model
                from .verify import verify_prepared

                source = proto
                proto, report = prepare_model(source)
                if verify:
                    verify_prepared(source, proto, report)
                meta = read_metadata(proto)
            reduction = meta["reduction_tensor"]
            if reduction not in {o.name for o in proto.graph.output} and meta.get("target", "class") == "class":
                # expose the logits (the score before softmax) so results carry them
                if isinstance(model, onnx.ModelProto):
                    copy = onnx.ModelProto()
                    copy.CopyFrom(proto)
                    proto = copy
                proto.graph.output.append(_value_info(proto.graph, reduction))
            self._model = proto
            self.session, self.session_info = create_session(proto.SerializeToString(), device, threads, spin)
            self.class_input = class_input_form(proto, meta)
        self.metadata = meta
        self.reduction = meta["reduction_tensor"]
        self.batch_size = batch_size
        self.output_names = [o.name for o in self.session.get_outputs()]
        image_name = meta.get("input") or self.session.get_inputs()[0].name
        inp = next(i for i in self.session.get_inputs() if i.name == image_name)
        self.input = InputSpec.from_shape(inp.name, list(inp.shape), layout or meta.get("input_layout"), inp.type)
        self.input_shape: list[int | str | None] = list(inp.shape)
        self.preprocess = _checked_preprocess(_as_preprocess(preprocess, meta), self.input)
        self.size = _checked_size(size, self.input)
        logits_meta = next((o for o in self.session.get_outputs() if o.name == self.reduction), None)
        k = logits_meta.shape[-1] if logits_meta is not None and logits_meta.shape else None
        self.num_classes: int | None = k if isinstance(k, int) else None
        names = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else labels
        self.labels = _checked_labels(names, self.num_classes)
        self.methods: list[str] = json.loads(meta.get("methods", json.dumps([meta.get("method", "gradcam")])))

    @property
    def model(self) -> onnx.ModelProto:
        """The prepared model this session runs (logits exposed); read from the file when first asked
        where the session was made from the file itself."""
        if self._model is None:
            assert self.path is not None
            self._model = load_model(self.path)
        return self._model

    @property
    def provider(self) -> str:
        return self.session_info.provider

    @property
    def feature_layer(self) -> str:
        return self.metadata.get("feature_tensor", "")

    # -- inputs ----------------------------------------------------------------------------

    def to_tensor(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The model input for images (paths or PIL images), preprocessed as the CLI does."""
        if self.input.is_signal or self.input.is_tokens:
            kind = "integer ids [N, T]" if self.input.is_tokens else "a signal [N, C, T]"
            raise BadInputError(
                f"the model's input {self.input.name!r} is {kind}, not an image: to fix this, pass an array "
                "(or .npy files, or raw files with --bytes, to the command line)"
            )
        pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        return to_tensor(pil, self.input, self.preprocess, self.size)

    def resolve_target(self, target: int | str) -> int:
        """A class index from an index or a label name."""
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            if self.labels is None:
                raise BadInputError(
                    f"class {target!r} is a name but no labels were given: to fix this, pass --labels FILE"
                )
            if target not in self.labels:
                raise BadInputError(
                    f"class {target!r} is not in the labels: to fix this, use one of "
                    f"{', '.join(self.labels[:10])}{'...' if len(self.labels) > 10 else ''}"
                )
            return self.labels.index(target)
        return int(target)

    # -- running ---------------------------------------------------------------------------

    def explain(
        self,
        inputs: Sequence[ImageLike] | np.ndarray,
        target: Target = None,
        method: str | None = None,
        seed: np.ndarray | None = None,
    ) -> ExplainResult:
        """Explain a batch: image paths, PIL images, or an array already in the model's layout (float;
        integer ids [N, T] for token and byte models).

        target: None (top-1), a class index or label name for all samples, or one per sample.
        method: one of the prepared methods (default: the first). seed: for models prepared with
        target='seed', the gradient of your score with respect to the reduction tensor.
        """
        x = self._checked_array(inputs if isinstance(inputs, np.ndarray) else self.to_tensor(inputs))
        n = len(x)
        method = self.checked_method(method)
        is_seed = self.metadata.get("target", "class") == "seed"
        if is_seed and seed is None:
            raise BadInputError(
                "this model was prepared with --target seed: to fix this, pass seed=... (see onnx_gradcam.seeds)"
            )
        classes = self.class_feed(target, n)
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, self.batch_size):
            feeds: dict[str, np.ndarray] = {self.input.name: x[start : start + self.batch_size]}
            if is_seed:
                feeds["gradcam_seed"] = np.asarray(seed, np.float32)[start : start + self.batch_size]
            elif self.class_input != "none":
                feeds["gradcam_class"] = classes[start : start + self.batch_size]
            values = run_session(self.session, feeds)
            parts.append(dict(zip(self.output_names, values)))
        got = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self.collect(got, method)

    def checked_method(self, method: str | None) -> str:
        """The method to draw: one of the prepared ones (None: the first)."""
        method = method or self.methods[0]
        if method not in self.methods:
            raise BadInputError(
                f"method {method!r} was not prepared (this model has {', '.join(self.methods)}): "
                f"to fix this, prepare it with --method {method}"
            )
        return method

    def class_feed(self, target: Target, n: int) -> np.ndarray:
        """The `gradcam_class` input [n] for a target (-1: top-1), after checking its range."""
        classes = self._classes(target, n)
        if self.class_input == "none" and classes.size and int(classes.max()) >= 0:
            raise BadInputError(
                f"class {int(classes.max())} was asked for, but this model was prepared with --class-input none and "
                "explains only its top-1 class: to fix this, leave out the class, or prepare the model with "
                "--class-input optional (or required)"
            )
        if self.num_classes is not None and classes.size and int(classes.max()) >= self.num_classes:
            raise BadInputError(
                f"class {int(classes.max())} is out of range: the model has {self.num_classes} "
                f"classes (0..{self.num_classes - 1})"
            )
        return classes

    def collect(self, got: dict[str, np.ndarray], method: str) -> ExplainResult:
        """The result of one run: `got` maps the session's output names to their values [n, ...]."""
        map_name = "gradcam_map" if method == self.methods[0] else f"gradcam_map_{method}"
        raw_name = "gradcam_raw" if method == self.methods[0] else f"gradcam_raw_{method}"
        is_seed = self.metadata.get("target", "class") == "seed"
        n = len(got[map_name])
        logits = got.get(self.reduction) if not is_seed else None
        probs = _softmax(logits) if logits is not None and logits.ndim == 2 else None
        extra = {k: v for k, v in got.items() if k.startswith("gradcam_") and k not in (map_name, raw_name)}
        return ExplainResult(
            maps=got[map_name],
            raw=got[raw_name],
            targets=got.get("gradcam_target", np.full(n, -1, np.int64)),
            scores=got["gradcam_score"],
            logits=logits,
            probabilities=probs,
            method=method,
            feature_layer=self.feature_layer,
            provider=self.provider,
            versions=_versions(),
            extra=extra,
        )

    def explain_top_k(
        self, inputs: Sequence[ImageLike] | np.ndarray, k: int, method: str | None = None
    ) -> list[ExplainResult]:
        """One result per rank: results[r] explains each sample's (r+1)-th best class."""
        x = inputs if isinstance(inputs, np.ndarray) else self.to_tensor(inputs)
        first = self.explain(x, None, method)
        if first.logits is None:
            raise BadInputError("top-k needs class logits: to fix this, prepare the model with --target class")
        order = np.argsort(-first.logits, axis=1)
        k = min(k, order.shape[1])
        return [first] + [self.explain(x, list(order[:, r]), method) for r in range(1, k)]

    def _checked_array(self, x: np.ndarray) -> np.ndarray:
        """x as the input's float type, after checking its rank and the model's static dimensions."""
        declared = self.input_shape
        fixed = [(i, d) for i, d in enumerate(declared) if isinstance(d, int) and d > 0 and i > 0]
        if x.ndim != len(declared) or any(x.shape[i] != d for i, d in fixed):
            dims = [str(d) if isinstance(d, int) else "N" if i == 0 else "?" for i, d in enumerate(declared)]
            shown = "[" + ", ".join(dims) + "]"
            raise BadInputError(
                f"the input array has shape {list(x.shape)} but the model's input {self.input.name!r} is "
                f"{shown} ({self.input.layout}): to fix this, pass arrays of that shape (or images, which "
                "are resized to it)"
            )
        dtype = self.input.numpy_dtype
        if self.input.is_tokens:
            exact = x.dtype.kind in "iu" or (x.dtype.kind == "f" and bool(np.all(x == np.round(x))))
            if not exact:
                raise BadInputError(
                    f"the model's input {self.input.name!r} holds integer ids, but the array has {x.dtype} values "
                    "that are not whole numbers: to fix this, pass integer ids"
                )
        elif np.dtype(dtype).kind != "f":
            dtype = np.float32
        return x if x.dtype == dtype else x.astype(dtype)

    def _classes(self, target: Target, n: int) -> np.ndarray:
        if target is None:
            return np.full(n, -1, np.int64)
        if isinstance(target, (int, str, np.integer)):
            return np.full(n, self.resolve_target(target), np.int64)  # type: ignore[arg-type]
        values = [self.resolve_target(t) for t in target]
        if len(values) != n:
            raise BadInputError(f"{len(values)} targets for {n} inputs: to fix this, give one per input or one for all")
        return np.asarray(values, np.int64)


def _as_preprocess(preprocess: str | Preprocess | None, meta: dict[str, str]) -> Preprocess:
    if isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        if preprocess not in PRESETS:
            raise BadInputError(f"unknown preprocessing {preprocess!r}: to fix this, use one of {', '.join(PRESETS)}")
        return PRESETS[preprocess]
    if "preprocess" in meta:
        return Preprocess.from_json(meta["preprocess"])
    return PRESETS["imagenet"]


def _checked_preprocess(pre: Preprocess, spec: InputSpec) -> Preprocess:
    """Mean and std must give one value, or one per colour channel."""
    if spec.is_signal or spec.is_tokens:
        return pre
    if len(pre.mean) != len(pre.std) or len(pre.mean) not in (1, 3):
        raise BadInputError(
            f"preprocessing has {len(pre.mean)} mean and {len(pre.std)} std values: to fix this, give 1 or 3 "
            "of each (one per RGB channel), e.g. --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5"
        )
    if any(v == 0 for v in pre.std):
        raise BadInputError("a std value is 0: to fix this, give positive std values")
    return pre


def _checked_size(size: tuple[int, int] | None, spec: InputSpec) -> tuple[int, int] | None:
    """A requested size must agree with a model whose height and width are fixed."""
    if size is None or spec.size is None or spec.is_signal or spec.is_tokens:
        return size
    if tuple(size) != tuple(spec.size):
        h, w = spec.size
        raise BadInputError(
            f"--size {size[0]}x{size[1]} does not fit the model: its input {spec.name!r} is fixed at "
            f"{h}x{w} (height x width); to fix this, leave out --size"
        )
    return size


def _checked_labels(labels: Sequence[str] | None, num_classes: int | None) -> list[str] | None:
    """Class names, one per class when the model's class count is known."""
    if labels is None:
        return None
    names = list(labels)
    if num_classes is not None and len(names) != num_classes:
        raise BadInputError(
            f"the labels list has {len(names)} names but the model has {num_classes} classes: to fix this, "
            "give a labels file with one name per class, in class-index order"
        )
    return names


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line in class-index order (blank lines ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"cannot read labels file {str(path)!r} ({exc}): to fix this, give a UTF-8 text file, one name per line"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise BadInputError(f"labels file {str(path)!r} is empty: to fix this, write one class name per line")
    return names


def labels_beside(model: str | os.PathLike[str]) -> Path | None:
    """MODEL.labels.txt (for MODEL.gradcam.onnx also MODEL.labels.txt) or labels.txt beside the model."""
    p = Path(model)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.stem
    stems = [stem, stem[: -len(".gradcam")]] if stem.endswith(".gradcam") else [stem]
    for candidate in [p.with_name(f"{s}.labels.txt") for s in stems] + [p.with_name("labels.txt")]:
        if candidate.is_file():
            return candidate
    return None


def _ready_file_metadata(path: Path) -> dict[str, str] | None:
    """The gradcam.* metadata of a prepared model file whose session can run it as it is (its logits an
    output, its class input recorded), read by onnxruntime without optimising the graph; None for any
    other file (a plain model, an older prepared one, or one onnxruntime cannot read, left to load_model
    and its errors)."""
    import onnxruntime as ort

    if not path.is_file():
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        probe = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's errors share no base class; load_model says what is wrong
        return None
    found = probe.get_modelmeta().custom_metadata_map
    meta = {k[len(META_PREFIX) :]: v for k, v in found.items() if k.startswith(META_PREFIX)}
    if "method" not in meta or "reduction_tensor" not in meta:
        return None
    if meta.get("target", "class") == "class":
        if "class_input" not in meta or meta["reduction_tensor"] not in {o.name for o in probe.get_outputs()}:
            return None
    return meta


def class_input_form(model: onnx.ModelProto, meta: dict[str, str]) -> str:
    """How a class-target model takes gradcam_class: "optional", "required" or "none" ("" for
    seed targets); from the metadata, or for models prepared before it was recorded, the graph."""
    if meta.get("target", "class") != "class":
        return ""
    if "class_input" in meta:
        return meta["class_input"]
    if not any(i.name == "gradcam_class" for i in model.graph.input):
        return "none"
    return "optional" if any(t.name == "gradcam_class" for t in model.graph.initializer) else "required"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnx_gradcam": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
